"""`FederatedData`: a dataset on device plus a padded per-client index structure.

The images live on device once, in their raw dtype. A federated split is only indices:
`client_index[C, Nmax]` into the train set and `client_test_index[C, Tmax]` into the pooled
test set, padded with 0 and masked by `client_size` / `client_test_size`. Batches are gathered
inside jit, so a population of 10^5 clients costs indices, never copies of images.

Example:

  >>> ds = sources.load_dataset('digits')
  >>> fd, info = make_federated_data(ds, 10, 'dirichlet_balanced', seed=0, alpha=0.5)
  >>> fd.num_clients, fd.input_shape, info.min_size == info.max_size
  (10, (8, 8, 1), True)
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fedsparse.data import sources
# The function, not the module: `fedsparse.data` re-exports `partition` (the function) under
# the module's own name, so `fedsparse.data.partition` is not reliably the module.
from fedsparse.data.partition import partition as partition_examples

__all__ = ['FederatedData', 'PartitionInfo', 'make_federated_data']


@flax.struct.dataclass
class FederatedData:
  """A dataset on device and its split among clients (a pytree).

  Arrays are pytree leaves; the metadata fields are static (part of the tree structure), so a
  jitted function taking `FederatedData` retraces only when shapes or metadata change.

  Attributes:
    x_train: `[N, H, W, C]` raw train images (dtype as loaded, uint8 for images).
    y_train: `[N]` int32 train labels.
    x_test: `[M, H, W, C]` raw test images.
    y_test: `[M]` int32 test labels.
    client_index: `[C, Nmax]` int32 train indices per client; entries at and beyond
      `client_size[k]` are padding (0).
    client_size: `[C]` int32 number of train examples per client.
    client_test_index: `[C, Tmax]` int32 indices into the pooled test set per client, padded
      with 0 beyond `client_test_size[k]`.
    client_test_size: `[C]` int32 number of test examples per client.
    num_classes: Number of classes (static).
    scale: Raw value of "white", for `normalize` (static).
    mean: Per-channel mean of `x / scale` (static).
    std: Per-channel std of `x / scale` (static).
    name: Dataset name (static).
  """
  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  client_index: jax.Array
  client_size: jax.Array
  client_test_index: jax.Array
  client_test_size: jax.Array
  num_classes: int = flax.struct.field(pytree_node=False)
  scale: float = flax.struct.field(pytree_node=False)
  mean: tuple[float, ...] = flax.struct.field(pytree_node=False)
  std: tuple[float, ...] = flax.struct.field(pytree_node=False)
  name: str = flax.struct.field(pytree_node=False)

  @property
  def num_clients(self) -> int:
    return self.client_index.shape[0]

  @property
  def input_shape(self) -> tuple[int, ...]:
    """`(H, W, C)` of one example."""
    return tuple(self.x_train.shape[1:])

  @property
  def max_client_size(self) -> int:
    """`Nmax`, the padded width of `client_index`."""
    return self.client_index.shape[1]


class PartitionInfo(NamedTuple):
  """Summary of a federated split, for logging.

  Attributes:
    num_clients: Clients kept (`FederatedData.num_clients`).
    dropped_clients: Clients dropped because they were left empty (`'dirichlet'` only).
    min_size: Smallest client train set.
    mean_size: Mean client train set size.
    max_size: Largest client train set.
    min_test_size: Smallest client test set.
    mean_test_size: Mean client test set size.
    max_test_size: Largest client test set.
  """
  num_clients: int
  dropped_clients: int
  min_size: int
  mean_size: float
  max_size: int
  min_test_size: int
  mean_test_size: float
  max_test_size: int


def make_federated_data(
    dataset: sources.Dataset,
    num_clients: int,
    method: str,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    shards_per_client: int = 2,
    test_fraction: float | None = None,
) -> tuple[FederatedData, PartitionInfo]:
  """Partitions `dataset` among clients and puts it on device.

  Client k's test set follows its train class mix: it has
  `t_k = max(1, round(n_k * test_fraction))` examples (`test_fraction` defaults to
  `N_test / N_train`), split over classes in proportion to the client's train class histogram
  (largest-remainder rounding; classes absent from the test set are left out), and drawn from
  the pooled test set of each class without replacement within the client. Different clients
  may share test examples.

  Args:
    dataset: A loaded `Dataset`.
    num_clients: Number of clients before any are dropped.
    method: A partitioner, one of `PARTITIONERS`.
    seed: Seed of the partition and of the per-client test draws.
    alpha: Dirichlet concentration, see `fedsparse.data.partition`.
    classes_per_client: See `fedsparse.data.partition`.
    shards_per_client: See `fedsparse.data.partition`.
    test_fraction: Per-client test size relative to its train size; `None` uses the
      dataset's test/train ratio.

  Returns:
    `(FederatedData, PartitionInfo)`.

  Raises:
    ValueError: For invalid partition arguments or `test_fraction`.
  """
  num_train = dataset.y_train.shape[0]
  num_test = dataset.y_test.shape[0]
  if test_fraction is None:
    if num_train == 0:
      raise ValueError(f'Dataset {dataset.name!r} has no train examples (x_train is empty).')
    test_fraction = num_test / num_train
  elif not (np.isfinite(test_fraction) and test_fraction > 0):
    raise ValueError(f'test_fraction must be a finite number > 0 or None, got {test_fraction!r}.')
  if num_test == 0:
    raise ValueError(f'Dataset {dataset.name!r} has no test examples to give clients.')

  part = partition_examples(
      dataset.y_train, num_clients, method, seed=seed, alpha=alpha,
      classes_per_client=classes_per_client, shards_per_client=shards_per_client)
  sizes = np.array([len(idx) for idx in part.client_indices], np.int64)
  flat = (np.concatenate(part.client_indices) if part.client_indices
          else np.zeros(0, np.int64))

  # The test draw gets its own stream so that it never shifts the partition's randomness.
  rng = np.random.default_rng([seed, 1])
  test_index, test_sizes = _client_test_sets(
      dataset.y_train[flat], sizes, np.asarray(dataset.y_test), dataset.num_classes,
      test_fraction, rng)

  data = FederatedData(
      x_train=jnp.asarray(dataset.x_train),
      y_train=jnp.asarray(np.asarray(dataset.y_train, np.int32)),
      x_test=jnp.asarray(dataset.x_test),
      y_test=jnp.asarray(np.asarray(dataset.y_test, np.int32)),
      client_index=jnp.asarray(_pad_rows(flat, sizes)),
      client_size=jnp.asarray(sizes.astype(np.int32)),
      client_test_index=jnp.asarray(_pad_rows(test_index, test_sizes)),
      client_test_size=jnp.asarray(test_sizes.astype(np.int32)),
      num_classes=int(dataset.num_classes),
      scale=float(dataset.scale),
      mean=tuple(float(m) for m in dataset.mean),
      std=tuple(float(s) for s in dataset.std),
      name=str(dataset.name),
  )
  info = PartitionInfo(
      num_clients=len(sizes),
      dropped_clients=part.dropped_clients,
      min_size=int(sizes.min()),
      mean_size=float(sizes.mean()),
      max_size=int(sizes.max()),
      min_test_size=int(test_sizes.min()),
      mean_test_size=float(test_sizes.mean()),
      max_test_size=int(test_sizes.max()),
  )
  return data, info


def _pad_rows(flat: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """Packs consecutive runs of `flat` (lengths `sizes`) into a 0-padded int32 matrix."""
  width = max(int(sizes.max(initial=0)), 1)
  out = np.zeros((len(sizes), width), np.int32)
  rows = np.repeat(np.arange(len(sizes)), sizes)
  starts = np.cumsum(sizes) - sizes
  cols = np.arange(flat.size) - np.repeat(starts, sizes)
  out[rows, cols] = flat
  return out


def _largest_remainder(quota: np.ndarray, totals: np.ndarray) -> np.ndarray:
  """Rounds each row of `quota` to integers summing to `totals` (largest remainder)."""
  base = np.floor(quota).astype(np.int64)
  short = totals - base.sum(axis=1)
  frac = quota - base
  # Rank classes by remainder, ties to the lower class index (stable), and give one extra
  # example to the `short` largest.
  order = np.argsort(-frac, axis=1, kind='stable')
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(quota.shape[1])[None, :], axis=1)
  return base + (rank < short[:, None])


def _client_test_sets(train_labels, sizes, y_test, num_classes, test_fraction, rng):
  """Draws each client's test indices following its train class histogram.

  Args:
    train_labels: Train labels of all clients' examples, concatenated client after client.
    sizes: `[C]` client train sizes.
    y_test: `[M]` pooled test labels.
    num_classes: Number of classes.
    test_fraction: Test size relative to train size.
    rng: NumPy generator.

  Returns:
    `(flat test indices, client after client, sorted within a client; [C] test sizes)`.
  """
  num_clients = len(sizes)
  client_of = np.repeat(np.arange(num_clients), sizes)
  hist = np.bincount(client_of * num_classes + train_labels,
                     minlength=num_clients * num_classes).reshape(num_clients, num_classes)
  pool_size = np.bincount(y_test, minlength=num_classes)[:num_classes]
  # Classes the test set lacks cannot be drawn: renormalise over the ones it has.
  hist = np.where(pool_size[None, :] > 0, hist, 0)
  weight = hist.sum(axis=1)
  if np.any(weight == 0):
    k = int(np.flatnonzero(weight == 0)[0])
    raise ValueError(
        f'client {k} holds only classes that have no test examples; cannot build its test set.')
  test_sizes = np.maximum(1, np.round(sizes * test_fraction)).astype(np.int64)
  counts = _largest_remainder(hist * (test_sizes / weight)[:, None], test_sizes)

  # Per class, one random order of its test examples; a (client, class) pair takes a cyclic
  # window of that order starting at a random offset. The window is a uniformly random subset
  # (distinct examples while it fits the pool), and independent offsets let clients overlap,
  # i.e. draws are without replacement within a client and with replacement across clients.
  # Vectorised over all pairs, so 10^5 clients cost one pass over the drawn indices.
  pool_order = np.argsort(y_test, kind='stable')
  pool_start = np.cumsum(pool_size) - pool_size
  for c in range(num_classes):
    seg = slice(pool_start[c], pool_start[c] + pool_size[c])
    pool_order[seg] = rng.permutation(pool_order[seg])
  pair_client, pair_class = np.nonzero(counts)  # Row-major: client after client.
  pair_count = counts[pair_client, pair_class]
  offset = rng.integers(0, pool_size[pair_class])
  pair_of = np.repeat(np.arange(pair_count.size), pair_count)
  within = np.arange(pair_of.size) - np.repeat(np.cumsum(pair_count) - pair_count, pair_count)
  position = (offset[pair_of] + within) % pool_size[pair_class[pair_of]]
  drawn = pool_order[pool_start[pair_class[pair_of]] + position]
  # Sort within each client (canonical order; batches are drawn from permutations anyway).
  drawn = drawn[np.lexsort((drawn, pair_client[pair_of]))]
  return drawn.astype(np.int64), test_sizes
