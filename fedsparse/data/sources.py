"""Dataset sources: sklearn digits, TFDS array_record data sources, and `.npz` files.

Every source is read once into host NumPy arrays in their RAW dtype (uint8 images): the
federated layer puts them on device as they are and normalises inside jit with `normalize`,
which keeps device memory at one byte per pixel.

Example:

  >>> ds = load_dataset('digits')
  >>> ds.x_train.shape[1:], ds.x_train.dtype, ds.num_classes
  ((8, 8, 1), dtype('uint8'), 10)
  >>> x = normalize(ds.x_train, ds.scale, ds.mean, ds.std)
  >>> x.dtype
  dtype('float32')

TFDS datasets are read through `tensorflow_datasets.data_source`, which serves array_record
files with NumPy decoding, so TensorFlow is never imported. They must have been prepared once
on a machine with network access (see `load_dataset`).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = ['DATASETS', 'NPZ_PREFIX', 'Dataset', 'load_dataset', 'normalize']

# Short names mapped to TFDS names. EMNIST defaults to the class-balanced split used in the
# FL literature (47 classes); any `emnist/<config>` is also accepted.
_TFDS_NAMES = {
    'mnist': 'mnist',
    'fashion_mnist': 'fashion_mnist',
    'emnist': 'emnist/balanced',
    'cifar10': 'cifar10',
    'cifar100': 'cifar100',
}

DATASETS = ('digits',) + tuple(_TFDS_NAMES)
"""Accepted dataset names; `emnist/<config>` and `npz:PATH` are accepted as well."""

NPZ_PREFIX = 'npz:'
_NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
# Without a declared `num_classes` array, an npz's class count is its largest label + 1; a
# label beyond this cap is far more likely a corrupt value than a real class (the model's last
# layer would have that many outputs). Files with more classes declare `num_classes`.
MAX_OBSERVED_CLASSES = 10_000

# Rows per chunk when computing statistics, so that a float64 copy of a whole image set
# (376 MB for MNIST) is never materialised.
_STATS_CHUNK = 8192


class Dataset(NamedTuple):
  """A train/test image classification dataset held in host memory.

  Attributes:
    name: The name it was loaded under.
    x_train: `[N, H, W, C]` raw images (uint8 for image datasets).
    y_train: `[N]` int32 labels in `[0, num_classes)`.
    x_test: `[M, H, W, C]` raw images.
    y_test: `[M]` int32 labels.
    num_classes: Number of classes.
    scale: Raw value of "white" (255 for uint8 images, 16 for digits).
    mean: Per-channel mean of `x_train / scale`.
    std: Per-channel standard deviation of `x_train / scale`.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  scale: float
  mean: tuple[float, ...]
  std: tuple[float, ...]


def normalize(x: Any, scale: float, mean: Any, std: Any) -> Any:
  """Maps raw inputs to float32 `(x / scale - mean) / std`, channel-wise.

  This is the one place input normalisation happens. It accepts NumPy arrays (returns NumPy)
  and JAX arrays or tracers (returns JAX), and is safe under
  `jax_numpy_dtype_promotion='strict'` and `jax_numpy_rank_promotion='raise'`.

  Args:
    x: `[..., C]` raw inputs of any real dtype.
    scale: Raw value of "white", e.g. `Dataset.scale`.
    mean: `C` per-channel means of `x / scale`.
    std: `C` per-channel standard deviations of `x / scale`.

  Returns:
    float32 array with the shape of `x`.
  """
  xp = np if isinstance(x, np.ndarray) else jnp
  x = xp.asarray(x).astype(xp.float32)
  # Constants are cast to float32 explicitly (strict promotion rejects mixing dtypes) and
  # given x's rank (rank promotion is an error under the strict config).
  shape = (1,) * (x.ndim - 1) + (-1,)
  mean = xp.asarray(np.asarray(mean, np.float32).reshape(shape))
  std = xp.asarray(np.asarray(std, np.float32).reshape(shape))
  scale = xp.asarray(scale, dtype=xp.float32)
  return (x / scale - mean) / std


def load_dataset(name: str, *, data_dir: str | None = None) -> Dataset:
  """Loads a dataset into host memory.

  Args:
    name: One of `DATASETS`, `emnist/<config>` (a TFDS EMNIST config), or `npz:PATH` for a
      `.npz` file with arrays `x_train, y_train, x_test, y_test` (images `[N, H, W]` or
      `[N, H, W, C]`).
    data_dir: TFDS data directory (default: TFDS's own, `~/tensorflow_datasets` or
      `$TFDS_DATA_DIR`). Ignored for `digits` and `npz:`.

  Returns:
    The `Dataset`, images in their raw dtype, labels int32.

  Raises:
    ValueError: For an unknown name, a TFDS dataset not prepared in `data_dir`, or a
      malformed `.npz` file.
  """
  if not isinstance(name, str):
    raise ValueError(f'Dataset name must be a string, got {name!r}.')
  if name == 'digits':
    arrays = _load_digits()
    scale = 16.0
  elif name.startswith(NPZ_PREFIX):
    arrays = _load_npz(name[len(NPZ_PREFIX):])
    x_train = arrays[0]
    if x_train.dtype == np.uint8:
      scale = 255.0
    else:
      scale = float(np.max(x_train)) if x_train.size else 1.0
      if not np.isfinite(scale) or scale <= 0:
        # An all-zero (or non-positive) input has no meaningful "white"; leave it unscaled.
        scale = 1.0
  elif name in _TFDS_NAMES or name.startswith('emnist/'):
    arrays = _load_tfds(_TFDS_NAMES.get(name, name), data_dir)
    scale = 255.0
  else:
    raise ValueError(
        f'Unknown dataset {name!r}; valid choices: {", ".join(DATASETS)}, '
        "'emnist/<config>', or 'npz:PATH' for a .npz file with arrays "
        f'{", ".join(_NPZ_KEYS)}.')
  x_train, y_train, x_test, y_test, num_classes = arrays
  mean, std = _channel_stats(x_train, scale)
  return Dataset(
      name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
      num_classes=int(num_classes), scale=float(scale), mean=mean, std=std)


def _channel_stats(x: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of `x / scale`, in float64, two-pass for accuracy."""
  channels = x.shape[-1]
  count = x.size // channels
  if count == 0:
    return (0.0,) * channels, (1.0,) * channels
  flat = x.reshape(-1, channels)
  total = np.zeros(channels, np.float64)
  for start in range(0, flat.shape[0], _STATS_CHUNK):
    total += flat[start:start + _STATS_CHUNK].sum(axis=0, dtype=np.float64)
  mean = total / count
  sq = np.zeros(channels, np.float64)
  for start in range(0, flat.shape[0], _STATS_CHUNK):
    sq += np.square(flat[start:start + _STATS_CHUNK].astype(np.float64) - mean).sum(axis=0)
  std = np.sqrt(sq / count)
  # A constant channel would turn normalisation into a division by zero; dividing by one
  # instead maps it to zero, which is what a constant input carries anyway.
  std = np.where(std > 0, std, scale)
  return tuple(float(v) for v in mean / scale), tuple(float(v) for v in std / scale)


def _load_digits():
  """sklearn's 8x8 digits, split 80/20 stratified with a fixed seed (ships with sklearn)."""
  # Imported here so that importing fedsparse does not pay for sklearn.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  # Values are integers 0..16 stored as float64: uint8 keeps them exactly, like real images.
  x = digits.images.astype(np.uint8)[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=0.2, random_state=0, stratify=y)
  return (np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test, 10)


def _load_npz(path: str):
  """Reads `x_train, y_train, x_test, y_test` from a `.npz` file."""
  if not path:
    raise ValueError("Dataset 'npz:PATH' needs a path, e.g. 'npz:/data/mnist.npz'.")
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ValueError(
        f'npz dataset file {path!r} not found; it must be a .npz file with arrays '
        f'{", ".join(_NPZ_KEYS)}.')
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f'npz dataset file {path!r} is not a .npz (zip) archive; write it with '
        f'numpy.savez(path, {", ".join(f"{k}=..." for k in _NPZ_KEYS)}).')
  try:
    with np.load(path, allow_pickle=False) as f:  # a zip archive: always an NpzFile
      missing = [k for k in _NPZ_KEYS if k not in f.files]
      if missing:
        raise ValueError(
            f'npz dataset file {path!r} lacks arrays {missing}; it needs all of '
            f'{", ".join(_NPZ_KEYS)} (it has {sorted(f.files)}).')
      arrays = {k: f[k] for k in _NPZ_KEYS}
      declared = f['num_classes'] if 'num_classes' in f.files else None
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    if str(e).startswith('npz dataset file'):
      raise
    if 'allow_pickle' in str(e):
      raise ValueError(f'npz dataset file {path!r} holds object (pickled) arrays; save plain '
                       'numeric arrays (numpy.savez of integer or float arrays).') from None
    raise ValueError(
        f'npz dataset file {path!r} is not a readable .npz archive ({e}); write it with '
        f'numpy.savez(path, {", ".join(f"{k}=..." for k in _NPZ_KEYS)}).') from None
  out = {}
  for split in ('train', 'test'):
    x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
    if x.ndim == 3:
      x = x[..., None]  # Grayscale [N, H, W]: add the channel axis models expect.
    if x.ndim != 4:
      raise ValueError(
          f'npz dataset {path!r}: x_{split} must have shape [N, H, W] or [N, H, W, C], '
          f'got {x.shape}.')
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
      raise ValueError(f'npz dataset {path!r}: x_{split} must hold integer or floating point '
                       f'pixels, got dtype {x.dtype}.')
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
      bad = np.argwhere(~np.isfinite(x))[0]
      raise ValueError(
          f'npz dataset {path!r}: x_{split} holds non-finite values ({x[tuple(bad)]} in '
          f'example {bad[0]}, and {int(np.sum(~np.isfinite(x)))} in all); training on them '
          'gives NaN losses. Clean or drop those examples.')
    y = np.asarray(y).reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
      raise ValueError(
          f'npz dataset {path!r}: y_{split} must have shape [{x.shape[0]}] (one label per '
          f'image), got {y.shape}.')
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
      raise ValueError(
          f'npz dataset {path!r}: y_{split} must hold non-negative integer labels, got '
          f'dtype {y.dtype} with minimum {y.min()}.')
    out[split] = (x, y.astype(np.int64))
  (x_train, y_train), (x_test, y_test) = out['train'], out['test']
  if x_train.shape[1:] != x_test.shape[1:]:
    raise ValueError(
        f'npz dataset {path!r}: x_train and x_test image shapes differ: '
        f'{x_train.shape[1:]} vs {x_test.shape[1:]}.')
  largest = int(max(y_train.max(initial=-1), y_test.max(initial=-1)))
  if declared is not None:
    if declared.ndim != 0 or not np.issubdtype(declared.dtype, np.integer) or declared < 1:
      raise ValueError(f'npz dataset {path!r}: num_classes must be a positive integer scalar, '
                       f'got {declared!r}.')
    limit, what = int(declared), f'the {int(declared)} classes the file declares'
  else:
    limit = MAX_OBSERVED_CLASSES
    what = (f'at most {MAX_OBSERVED_CLASSES:,} classes without a declared count (store a '
            'num_classes array in the file for more)')
  if largest >= limit:
    split, y = ('train', y_train) if y_train.max(initial=-1) == largest else ('test', y_test)
    raise ValueError(
        f'npz dataset {path!r}: label {largest} (y_{split}[{int(np.argmax(y))}]) is out of '
        f'range: labels must be in [0, {limit}), {what}.')
  num_classes = limit if declared is not None else largest + 1
  return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32), num_classes


def _load_tfds(tfds_name: str, data_dir: str | None):
  """Reads the train and test splits of a prepared TFDS dataset without TensorFlow."""
  # Imported lazily: tensorflow_datasets is slow to import and only needed here.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if tfds_name.startswith('emnist/'):
    # Check the config ourselves: TFDS's own error buries the valid names in a long text.
    configs = list(tfds.builder_cls('emnist').builder_configs)
    config = tfds_name.split('/', 1)[1].split(':', 1)[0]  # Drop a ':version' suffix.
    if config not in configs:
      raise ValueError(
          f'Unknown EMNIST config {config!r}; valid choices: '
          f'{", ".join("emnist/" + c for c in configs)}.')
  try:
    sources = tfds.data_source(
        tfds_name, split=['train', 'test'], data_dir=data_dir,
        # Never download implicitly: a run must fail fast offline rather than hang on retries.
        download=False,
        # data_source only defaults to array_record when no data_dir is given.
        builder_kwargs={'file_format': 'array_record'})
  except NotImplementedError as e:
    raise ValueError(
        f'TFDS dataset {tfds_name!r} in {data_dir or "the default TFDS data_dir"} is prepared '
        'in a format without random access (tfrecord, e.g. by tfds.load). Prepare it once as '
        f"array_record: tfds.builder({tfds_name!r}, data_dir=..., "
        "file_format='array_record').download_and_prepare(), or pass 'npz:PATH'.") from e
  except (KeyError, FileNotFoundError) as e:
    # TFDS reports an unprepared dataset as a KeyError on its (empty) splits.
    raise ValueError(
        f'TFDS dataset {tfds_name!r} is not prepared in '
        f'{data_dir or "the default TFDS data_dir"}. It must be downloaded once with network '
        f'access: tfds.data_source({tfds_name!r}, data_dir=...) or '
        f"tfds.builder({tfds_name!r}, data_dir=..., file_format='array_record')"
        '.download_and_prepare(); then pass that data_dir. Or load an offline copy with '
        "'npz:PATH'.") from e
  train, test = sources
  num_classes = train.dataset_info.features['label'].num_classes
  x_train, y_train = _read_all(train)
  x_test, y_test = _read_all(test)
  return x_train, y_train, x_test, y_test, num_classes


def _read_all(source) -> tuple[np.ndarray, np.ndarray]:
  """Reads every record of a TFDS data source into `(images uint8, labels int32)`."""
  n = len(source)
  image_shape = tuple(source.dataset_info.features['image'].shape)
  x = np.empty((n,) + image_shape, np.uint8)
  y = np.empty((n,), np.int32)
  # Element-wise reads are enough: decoding the PNG of each record (~80 us for MNIST with
  # PIL) dominates, and batched `__getitems__` only parallelises the file reads.
  for i in range(n):
    example = source[i]
    x[i] = example['image']
    y[i] = example['label']
  return x, y
