"""Shared pytest set-up: several host CPU devices and strict promotion rules."""

import os
import pathlib
import shutil
import tempfile

# XLA:CPU's LLVM backend at optimisation level 0: the suite is dominated by compiling many small
# programs once each, and level 0 roughly halves those compile times (a MNISTNet smoke run: 17 s
# to 9 s) while the programs run a little slower. Set before JAX starts its backend, for this
# process and the subprocesses it launches (the CLI, multi-process and notebook tests). Numbers
# differ from the default level in the last float32 bits only; tests/golden was recorded under
# this flag.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position  (after XLA_FLAGS)
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Sharding tests need several devices; on CPU XLA can split the host into virtual ones. This must
# happen before any JAX backend is initialised, hence at import time of the conftest.
jax.config.update("jax_num_cpu_devices", 8)
# Catch silent broadcasting and dtype drift (e.g. a float64 sneaking in) early.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Many tests compile the same round again (a resumed run, a re-run after kill -9, the same
# config under two settings that leave the program unchanged): XLA's persistent cache, keyed by
# the compiled program, serves the second compile. One directory per test session, shared by
# the xdist workers and the runs they start as subprocesses (through the environment).
_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"fedsparse-tests-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_sessionfinish(session):
  """Removes this session's compilation cache (in the controller, after every worker)."""
  if not hasattr(session.config, "workerinput") and "fedsparse-tests-" in _CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)

@pytest.fixture
def xla_optimized(monkeypatch):
  """Compiles the test's fedsparse programs (`fedsparse.engine.jit`) at XLA:CPU's level 1.

  For the few tests whose running time, not compile time, dominates: FedPM on the
  19M-parameter Conv10 samples and updates every weight's score each step, elementwise work
  that level 0 leaves unvectorised (a smoke run: 108 s at level 0, 51 s at level 1, which
  compiles as fast as level 0 for it).
  """
  from fedsparse.engine import compilation  # pylint: disable=g-import-not-at-top
  plain = compilation.compiler_options
  monkeypatch.setattr(compilation, "compiler_options", lambda *args, **kwargs: {
      **plain(*args, **kwargs), "xla_backend_optimization_level": "1"})


SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def mnist_npz():
  """Path to the offline MNIST file beside the checkout; skips when it is absent."""
  path = SHARED_DATA / "mnist.npz"
  if not path.exists():
    pytest.skip(f"{path} not found (../shared/data is not beside this checkout)")
  return path


def pytest_collection_modifyitems(config, items):
  """Runs the slow tests first: under xdist the workers then fill in with the quick ones instead
  of waiting, at the end, on one worker's long test."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
