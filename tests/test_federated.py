"""Tests for fedsparse.data.federated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsparse.data import federated
from fedsparse.data import sources
from fedsparse.data.partition import partition


@pytest.fixture(scope='module')
def digits():
  return sources.load_dataset('digits')


def _rows(index, size):
  """Host copies of each client's valid indices."""
  index, size = np.asarray(index), np.asarray(size)
  return [index[k, :size[k]] for k in range(len(size))]


def test_shapes_dtypes_and_properties(digits):
  fd, info = federated.make_federated_data(digits, 10, 'dirichlet_balanced', seed=0, alpha=0.5)
  assert isinstance(fd.x_train, jax.Array)
  assert fd.x_train.shape == digits.x_train.shape and fd.x_train.dtype == jnp.uint8
  assert fd.x_test.shape == digits.x_test.shape and fd.x_test.dtype == jnp.uint8
  assert fd.y_train.dtype == jnp.int32 and fd.y_test.dtype == jnp.int32
  n = digits.y_train.size // 10
  assert fd.client_index.shape == (10, n) and fd.client_index.dtype == jnp.int32
  assert fd.client_size.dtype == jnp.int32
  np.testing.assert_array_equal(fd.client_size, np.full(10, n))
  assert fd.client_test_index.dtype == jnp.int32 and fd.client_test_size.dtype == jnp.int32
  assert fd.client_test_index.shape == (10, int(fd.client_test_size.max()))
  assert fd.num_clients == 10
  assert fd.input_shape == (8, 8, 1)
  assert fd.max_client_size == n
  assert (fd.num_classes, fd.scale, fd.mean, fd.std, fd.name) == (
      10, 16.0, digits.mean, digits.std, 'digits')
  assert info == federated.PartitionInfo(
      num_clients=10, dropped_clients=0, min_size=n, mean_size=float(n), max_size=n,
      min_test_size=info.min_test_size, mean_test_size=info.mean_test_size,
      max_test_size=info.max_test_size)
  # Only the arrays are leaves; metadata is static.
  assert len(jax.tree.leaves(fd)) == 8


@pytest.mark.parametrize('method, kwargs', [
    ('iid', {}),
    ('dirichlet', {'alpha': 0.3}),
    ('classes', {'classes_per_client': 2}),
    ('shards', {'shards_per_client': 2}),
])
def test_rows_are_the_partition_and_padding_is_zero(digits, method, kwargs):
  fd, info = federated.make_federated_data(digits, 12, method, seed=5, **kwargs)
  part = partition(digits.y_train, 12, method, seed=5, **kwargs)
  assert fd.num_clients == len(part.client_indices) == info.num_clients
  assert info.dropped_clients == part.dropped_clients
  sizes = np.asarray(fd.client_size)
  np.testing.assert_array_equal(sizes, [len(i) for i in part.client_indices])
  for row, expected in zip(_rows(fd.client_index, fd.client_size), part.client_indices):
    np.testing.assert_array_equal(row, expected)
  index = np.asarray(fd.client_index)
  pad = np.arange(index.shape[1])[None, :] >= sizes[:, None]
  assert np.all(index[pad] == 0)
  test_index = np.asarray(fd.client_test_index)
  test_pad = (np.arange(test_index.shape[1])[None, :]
              >= np.asarray(fd.client_test_size)[:, None])
  assert np.all(test_index[test_pad] == 0)
  assert info.max_size == fd.max_client_size == sizes.max()
  assert info.min_size == sizes.min()


def test_dirichlet_dropped_clients_reported(digits):
  fd, info = federated.make_federated_data(digits, 200, 'dirichlet', seed=0, alpha=0.01)
  assert info.dropped_clients > 0
  assert info.num_clients == fd.num_clients == 200 - info.dropped_clients
  assert int(fd.client_size.min()) >= 1


def test_test_sets_follow_train_class_mix(digits):
  fd, _ = federated.make_federated_data(digits, 15, 'classes', seed=2, classes_per_client=2)
  y_train, y_test = digits.y_train, digits.y_test
  ratio = y_test.size / y_train.size
  train_rows = _rows(fd.client_index, fd.client_size)
  test_rows = _rows(fd.client_test_index, fd.client_test_size)
  for train_idx, test_idx in zip(train_rows, test_rows):
    n, t = len(train_idx), len(test_idx)
    assert t == max(1, round(n * ratio))
    assert np.unique(test_idx).size == t, 'a client drew a test example twice'
    assert set(y_test[test_idx]) <= set(y_train[train_idx])
    # Largest-remainder rounding: each class count within one of its exact share.
    want = np.bincount(y_train[train_idx], minlength=10) * t / n
    got = np.bincount(y_test[test_idx], minlength=10)
    assert np.all(np.abs(got - want) < 1)
    assert got.sum() == t


def test_two_class_client_draws_only_those_classes():
  rng = np.random.default_rng(0)
  y_train = np.repeat(np.array([3, 7], np.int32), 50)
  y_test = rng.permutation(np.repeat(np.arange(10, dtype=np.int32), 20))
  ds = sources.Dataset(
      name='toy', x_train=np.zeros((100, 2, 2, 1), np.uint8), y_train=y_train,
      x_test=np.zeros((200, 2, 2, 1), np.uint8), y_test=y_test, num_classes=10,
      scale=255.0, mean=(0.0,), std=(1.0,))
  fd, info = federated.make_federated_data(ds, 1, 'iid', seed=0)
  (test_idx,) = _rows(fd.client_test_index, fd.client_test_size)
  assert len(test_idx) == 200 and info.max_test_size == 200
  # Train has 50/50 of classes 3 and 7 but test has only 20 of each: the client gets all 20
  # of both and then draws more with replacement, as evenly as the cycle allows.
  assert set(y_test[test_idx]) == {3, 7}
  np.testing.assert_array_equal(np.bincount(y_test[test_idx], minlength=10)[[3, 7]], [100, 100])
  assert set(test_idx) == set(np.flatnonzero(np.isin(y_test, [3, 7])))


def test_explicit_test_fraction(digits):
  fd, info = federated.make_federated_data(digits, 6, 'iid', seed=0, test_fraction=0.05)
  sizes = np.asarray(fd.client_size)
  np.testing.assert_array_equal(fd.client_test_size, np.maximum(1, np.round(sizes * 0.05)))
  assert info.min_test_size == int(np.asarray(fd.client_test_size).min())
  with pytest.raises(ValueError, match='test_fraction'):
    federated.make_federated_data(digits, 6, 'iid', seed=0, test_fraction=0.0)


def test_clients_spread_over_test_set(digits):
  # Many small clients: their test draws together reach most of the test set.
  fd, _ = federated.make_federated_data(digits, 300, 'iid', seed=0)
  drawn = np.concatenate(_rows(fd.client_test_index, fd.client_test_size))
  assert drawn.max() < digits.y_test.size
  assert np.unique(drawn).size > 0.5 * digits.y_test.size


def test_determinism(digits):
  a, _ = federated.make_federated_data(digits, 9, 'dirichlet', seed=3, alpha=0.5)
  b, _ = federated.make_federated_data(digits, 9, 'dirichlet', seed=3, alpha=0.5)
  c, _ = federated.make_federated_data(digits, 9, 'dirichlet', seed=4, alpha=0.5)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not (a.client_index.shape == c.client_index.shape
              and np.array_equal(a.client_index, c.client_index))


def test_jit_argument_does_not_retrace(digits):
  a, _ = federated.make_federated_data(digits, 8, 'iid', seed=0)
  b, _ = federated.make_federated_data(digits, 8, 'iid', seed=0)
  traces = []

  @jax.jit
  def total(d):
    traces.append(None)
    return d.x_train.sum()

  assert int(total(a)) == int(digits.x_train.sum(dtype=np.int64))
  total(b)
  assert len(traces) == 1
  # Different static metadata is a different tree structure: a new trace, as it must be.
  total(a.replace(name='other'))
  assert len(traces) == 2


def test_gather_client_batch_inside_jit(digits):
  fd, _ = federated.make_federated_data(digits, 4, 'iid', seed=0)

  @jax.jit
  def client_batch(d, k):
    idx = d.client_index[k, :5]
    x = sources.normalize(d.x_train[idx], d.scale, d.mean, d.std)
    return x, d.y_train[idx]

  x, y = client_batch(fd, 2)
  idx = np.asarray(fd.client_index[2, :5])
  np.testing.assert_array_equal(y, digits.y_train[idx])
  np.testing.assert_allclose(
      x, sources.normalize(digits.x_train[idx], digits.scale, digits.mean, digits.std),
      rtol=1e-6, atol=1e-6)


def test_large_population_costs_indices_only():
  rng = np.random.default_rng(0)
  y_train = rng.integers(0, 10, 300_000).astype(np.int32)
  y_test = rng.integers(0, 10, 50_000).astype(np.int32)
  ds = sources.Dataset(
      name='big', x_train=np.zeros((300_000, 1, 1, 1), np.uint8), y_train=y_train,
      x_test=np.zeros((50_000, 1, 1, 1), np.uint8), y_test=y_test, num_classes=10,
      scale=255.0, mean=(0.0,), std=(1.0,))
  fd, info = federated.make_federated_data(ds, 100_000, 'iid', seed=0)
  assert fd.x_train.shape == (300_000, 1, 1, 1)  # The images are not copied per client.
  assert fd.client_index.shape == (100_000, 3)
  assert info.num_clients == 100_000 and info.min_test_size == 1


def test_bad_method_propagates(digits):
  with pytest.raises(ValueError, match='dirichlet_balanced'):
    federated.make_federated_data(digits, 4, 'nope', seed=0)
  with pytest.raises(ValueError, match='fewer examples than clients'):
    federated.make_federated_data(digits, 10_000, 'iid', seed=0)


def test_real_mnist(mnist_npz):
  ds = sources.load_dataset(f'npz:{mnist_npz}')
  fd, info = federated.make_federated_data(ds, 100, 'shards', seed=0)
  assert info.min_size == info.max_size == 600
  assert fd.client_test_index.shape == (100, 100)
  test_rows = _rows(fd.client_test_index, fd.client_test_size)
  train_rows = _rows(fd.client_index, fd.client_size)
  for train_idx, test_idx in zip(train_rows, test_rows):
    assert set(ds.y_test[test_idx]) <= set(ds.y_train[train_idx])
