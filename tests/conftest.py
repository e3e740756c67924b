"""Shared pytest set-up: several host CPU devices and strict promotion rules."""

import os
import pathlib

import jax
import pytest

# Sharding tests need several devices; on CPU XLA can split the host into virtual ones. This must
# happen before any JAX backend is initialised, hence at import time of the conftest.
jax.config.update("jax_num_cpu_devices", 8)
# Catch silent broadcasting and dtype drift (e.g. a float64 sneaking in) early.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def mnist_npz():
  """Path to the offline MNIST file beside the checkout; skips when it is absent."""
  path = SHARED_DATA / "mnist.npz"
  if not path.exists():
    pytest.skip(f"{path} not found (../shared/data is not beside this checkout)")
  return path
