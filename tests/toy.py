"""Tiny generated data and shared fixtures for engine and algorithm tests."""

from fedsparse import engine
from fedsparse.testing import tiny_dataset, tiny_federated  # pylint: disable=unused-import

STRATEGY_MAPPINGS = [
    engine.ClientMapping('vmap'),
    engine.ClientMapping('chunked', chunk_size=3),
    engine.ClientMapping('sequential'),
    engine.ClientMapping('sharded', inner='vmap'),
    engine.ClientMapping('sharded', inner='sequential'),
]


