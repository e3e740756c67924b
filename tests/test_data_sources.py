"""Tests for fedsparse.data.sources."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsparse.data import sources


@pytest.fixture(scope='module')
def digits():
  return sources.load_dataset('digits')


def test_digits_loads_offline(digits):
  assert digits.name == 'digits'
  assert digits.x_train.shape == (1437, 8, 8, 1)
  assert digits.x_test.shape == (360, 8, 8, 1)
  assert digits.x_train.dtype == np.uint8 and digits.x_test.dtype == np.uint8
  assert digits.y_train.dtype == np.int32 and digits.y_test.dtype == np.int32
  assert digits.num_classes == 10
  assert digits.scale == 16.0
  assert digits.x_train.max() == 16 and digits.x_train.min() == 0
  assert set(np.unique(digits.y_train)) == set(range(10))
  # Stratified: each class keeps its share of the data in the test split.
  train_share = np.bincount(digits.y_train) / digits.y_train.size
  test_share = np.bincount(digits.y_test) / digits.y_test.size
  np.testing.assert_allclose(train_share, test_share, atol=0.01)
  assert len(digits.mean) == len(digits.std) == 1
  assert all(isinstance(v, float) for v in digits.mean + digits.std)


def test_digits_split_is_deterministic(digits):
  again = sources.load_dataset('digits')
  np.testing.assert_array_equal(again.x_train, digits.x_train)
  np.testing.assert_array_equal(again.y_test, digits.y_test)


def test_normalize_numpy_gives_zero_mean_unit_std(digits):
  x = sources.normalize(digits.x_train, digits.scale, digits.mean, digits.std)
  assert isinstance(x, np.ndarray) and x.dtype == np.float32
  assert x.shape == digits.x_train.shape
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_normalize_jax_under_strict_promotion_and_jit(digits):
  # conftest makes dtype promotion strict and rank promotion an error: both must pass here.
  expected = sources.normalize(digits.x_train[:5], digits.scale, digits.mean, digits.std)
  fn = jax.jit(lambda x: sources.normalize(x, digits.scale, digits.mean, digits.std))
  got = fn(jnp.asarray(digits.x_train[:5]))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
  # A single example [H, W, C] works too.
  one = sources.normalize(jnp.asarray(digits.x_train[0]), digits.scale, digits.mean, digits.std)
  np.testing.assert_allclose(np.asarray(one), expected[0], rtol=1e-6, atol=1e-6)


def test_normalize_per_channel():
  x = np.stack([np.full((2, 2), 10, np.uint8), np.full((2, 2), 20, np.uint8)], axis=-1)[None]
  out = sources.normalize(x, 10.0, (1.0, 1.0), (1.0, 0.5))
  np.testing.assert_allclose(out[..., 0], 0.0)
  np.testing.assert_allclose(out[..., 1], 2.0)


def _write_npz(path, x_train, y_train, x_test, y_test):
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return f'npz:{path}'


@pytest.mark.parametrize('channels', [None, 3])
def test_npz_round_trip(tmp_path, channels):
  rng = np.random.default_rng(0)
  shape = (5, 5) if channels is None else (5, 5, channels)
  x_train = rng.integers(0, 256, (40,) + shape, dtype=np.uint8)
  x_test = rng.integers(0, 256, (12,) + shape, dtype=np.uint8)
  y_train = rng.integers(0, 4, 40).astype(np.uint8)
  y_test = np.full(12, 6, np.int64)  # The largest label only in the test split.
  name = _write_npz(tmp_path / 'd.npz', x_train, y_train, x_test, y_test)
  ds = sources.load_dataset(name)
  expected_shape = (40, 5, 5, 1 if channels is None else channels)
  assert ds.x_train.shape == expected_shape
  assert ds.x_test.shape == (12,) + expected_shape[1:]
  assert ds.x_train.dtype == np.uint8
  assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
  np.testing.assert_array_equal(ds.x_train.reshape(x_train.shape), x_train)
  np.testing.assert_array_equal(ds.y_test, y_test)
  assert ds.num_classes == 7
  assert ds.scale == 255.0
  flat = ds.x_train.reshape(-1, expected_shape[-1]).astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, flat.mean(axis=0))
  np.testing.assert_allclose(ds.std, flat.std(axis=0))


def test_npz_float_scale_is_max(tmp_path):
  x = np.linspace(0, 2.0, 4 * 9, dtype=np.float32).reshape(4, 3, 3)
  name = _write_npz(tmp_path / 'f.npz', x, np.arange(4), x, np.arange(4))
  ds = sources.load_dataset(name)
  assert ds.scale == pytest.approx(2.0)
  assert ds.x_train.dtype == np.float32


def test_npz_missing_keys(tmp_path):
  path = tmp_path / 'bad.npz'
  np.savez(path, x_train=np.zeros((2, 3, 3), np.uint8), y_train=np.zeros(2, np.int32))
  with pytest.raises(ValueError, match='x_test') as err:
    sources.load_dataset(f'npz:{path}')
  for key in ('x_train', 'y_train', 'x_test', 'y_test'):
    assert key in str(err.value)


def test_npz_missing_file(tmp_path):
  with pytest.raises(ValueError, match='not found'):
    sources.load_dataset(f'npz:{tmp_path / "nope.npz"}')


def test_npz_label_count_mismatch(tmp_path):
  name = _write_npz(tmp_path / 'm.npz', np.zeros((3, 2, 2), np.uint8), np.zeros(2, np.int32),
                    np.zeros((1, 2, 2), np.uint8), np.zeros(1, np.int32))
  with pytest.raises(ValueError, match='y_train'):
    sources.load_dataset(name)


def test_unknown_name_lists_choices():
  with pytest.raises(ValueError) as err:
    sources.load_dataset('imagenet')
  message = str(err.value)
  assert 'imagenet' in message
  for name in sources.DATASETS:
    assert name in message
  assert 'npz:PATH' in message


def test_unknown_emnist_config_lists_configs():
  with pytest.raises(ValueError, match='emnist/balanced'):
    sources.load_dataset('emnist/nope')


def test_tfds_not_prepared_says_how_to_download(tmp_path):
  with pytest.raises(ValueError, match='not prepared') as err:
    sources.load_dataset('mnist', data_dir=str(tmp_path))
  assert 'download' in str(err.value) and 'npz:PATH' in str(err.value)
  assert err.value.__cause__ is not None


@pytest.mark.parametrize('name, image_shape, num_classes', [
    ('mnist', (28, 28, 1), 10),
    ('cifar10', (32, 32, 3), 10),
    ('emnist', (28, 28, 1), 47),
])
def test_tfds_data_source_without_tensorflow(tmp_path, monkeypatch, name, image_shape,
                                             num_classes):
  tfds = pytest.importorskip('tensorflow_datasets')
  # A None entry makes any `import tensorflow` fail (and find_spec report it absent), so the
  # load below proves that TensorFlow is not needed, even where it is installed.
  had_tf = 'tensorflow' in sys.modules
  monkeypatch.setitem(sys.modules, 'tensorflow', None)
  with tfds.testing.mock_data(num_examples=24):
    ds = sources.load_dataset(name, data_dir=str(tmp_path))
  assert ds.x_train.shape == (24,) + image_shape
  assert ds.x_test.shape == (24,) + image_shape
  assert ds.x_train.dtype == np.uint8 and ds.x_test.dtype == np.uint8
  assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
  assert ds.num_classes == num_classes
  assert 0 <= ds.y_train.min() and ds.y_train.max() < num_classes
  assert ds.scale == 255.0
  assert len(ds.mean) == image_shape[-1]
  monkeypatch.undo()
  assert had_tf or 'tensorflow' not in sys.modules


def test_real_mnist_npz(mnist_npz):
  ds = sources.load_dataset(f'npz:{mnist_npz}')
  assert ds.x_train.shape == (60000, 28, 28, 1)
  assert ds.x_test.shape == (10000, 28, 28, 1)
  assert ds.x_train.dtype == np.uint8
  assert ds.num_classes == 10
  assert np.bincount(ds.y_train)[1] == 6742
  assert np.bincount(ds.y_test)[1] == 1135
  # The well-known MNIST statistics.
  assert ds.mean[0] == pytest.approx(0.1307, abs=1e-4)
  assert ds.std[0] == pytest.approx(0.3081, abs=1e-4)
