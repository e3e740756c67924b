"""Tiny generated data and shared fixtures for engine and algorithm tests."""

import numpy as np

from fedsparse import data as data_lib
from fedsparse import engine

STRATEGY_MAPPINGS = [
    engine.ClientMapping('vmap'),
    engine.ClientMapping('chunked', chunk_size=3),
    engine.ClientMapping('sequential'),
    engine.ClientMapping('sharded', inner='vmap'),
    engine.ClientMapping('sharded', inner='sequential'),
]


def tiny_dataset(n_train=60, n_test=30, num_classes=3, seed=0):
  """A 4×4×1 toy image set whose label is readable from the pixels (learnable)."""
  rng = np.random.default_rng(seed)
  def make(n):
    y = rng.integers(0, num_classes, n).astype(np.int32)
    x = rng.integers(0, 60, (n, 4, 4, 1))
    x[np.arange(n), y, 0, 0] = 255  # class c lights up pixel (c, 0)
    return x.astype(np.uint8), y
  x_train, y_train = make(n_train)
  x_test, y_test = make(n_test)
  return data_lib.Dataset(name='tiny', x_train=x_train, y_train=y_train, x_test=x_test,
                          y_test=y_test, num_classes=num_classes, scale=255.0,
                          mean=(0.2,), std=(0.3,))


def tiny_federated(num_clients=6, method='dirichlet', alpha=0.5, seed=0):
  fd, _ = data_lib.make_federated_data(tiny_dataset(), num_clients, method, seed=seed,
                                       alpha=alpha)
  return fd
