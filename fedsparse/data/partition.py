"""Partitioners: split a labelled train set among federated clients.

Pure NumPy, seeded through `np.random.default_rng(seed)`: the same inputs and seed give the
same partition on every machine. Every partitioner first decides an owner for each example and
then groups examples by owner, so the cost is linear in the number of examples plus the number
of clients (10^5 clients are fine).

Methods (`PARTITIONERS`):

* `'iid'`: shuffle and split into near-equal parts.
* `'dirichlet_balanced'` (SSFL, FLASH): every client gets `N // num_clients` examples, drawn
  from the class pools with client-specific proportions `p_k ~ Dir(alpha)`.
* `'dirichlet'` (FedDST): each class is split among clients with proportions
  `q_c ~ Dir(alpha)` over clients; sizes are very uneven, and clients left empty are dropped.
* `'classes'` (FedPM): each client holds exactly `classes_per_client` classes.
* `'shards'` (McMahan et al. 2017): sort by label, cut into equal shards, deal
  `shards_per_client` random shards to each client.

Example:

  >>> labels = np.repeat(np.arange(10), 100)
  >>> part = partition(labels, 20, 'classes', seed=0, classes_per_client=2)
  >>> len(part.client_indices), part.dropped_clients
  (20, 0)
  >>> sorted(set(labels[part.client_indices[0]].tolist())).__len__()
  2
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ['PARTITIONERS', 'Partition', 'partition']

PARTITIONERS = ('iid', 'dirichlet_balanced', 'dirichlet', 'classes', 'shards')


class Partition(NamedTuple):
  """The result of `partition`.

  Attributes:
    client_indices: One sorted int64 array of train-set indices per kept client.
    dropped_clients: Clients removed because they were left empty (only `'dirichlet'`).
  """
  client_indices: list[np.ndarray]
  dropped_clients: int


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    shards_per_client: int = 2,
) -> Partition:
  """Splits examples among clients.

  Args:
    labels: `[N]` integer class labels of the train set.
    num_clients: Number of clients, `1 <= num_clients <= N`.
    method: One of `PARTITIONERS`.
    seed: Seed of the NumPy generator; the result is a deterministic function of it.
    alpha: Dirichlet concentration (`'dirichlet_balanced'`, `'dirichlet'`); small values give
      skewed clients, large values approach IID.
    classes_per_client: Classes per client (`'classes'`), between 1 and the number of
      distinct labels.
    shards_per_client: Shards per client (`'shards'`).

  Returns:
    A `Partition`. Indices are disjoint across clients and sorted within each client (order
    carries no meaning; batches are drawn from per-client permutations). Every example is
    used, except the `N mod num_clients` left over by `'dirichlet_balanced'`, the remainder
    of the equal cut by `'shards'`, and classes no client was dealt by `'classes'` when
    `num_clients * classes_per_client` is below the number of classes.

  Raises:
    ValueError: For an unknown method or an invalid argument, with the valid choices.
  """
  if method not in PARTITIONERS:
    raise ValueError(
        f'Unknown partition method {method!r}; valid choices: {", ".join(PARTITIONERS)}.')
  labels = np.asarray(labels)
  if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
    raise ValueError(
        f'labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}.')
  if labels.size and labels.min() < 0:
    raise ValueError(f'labels must be non-negative, got minimum {labels.min()}.')
  num_examples = labels.shape[0]
  if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
    raise ValueError(f'num_clients must be an integer, got {num_clients!r}.')
  num_clients = int(num_clients)
  if num_clients < 1:
    raise ValueError(f'num_clients must be at least 1, got {num_clients}.')
  if num_clients > num_examples:
    raise ValueError(
        f'fewer examples than clients: {num_examples} examples cannot be split among '
        f'{num_clients} clients; use at most {num_examples} clients.')

  rng = np.random.default_rng(seed)
  dropped = 0
  if method == 'iid':
    owner = _iid(num_examples, num_clients, rng)
  elif method == 'dirichlet_balanced':
    _check_alpha(alpha)
    owner = _dirichlet_balanced(labels, num_clients, alpha, rng)
  elif method == 'dirichlet':
    _check_alpha(alpha)
    owner = _dirichlet_over_clients(labels, num_clients, alpha, rng)
  elif method == 'classes':
    owner = _classes(labels, num_clients, classes_per_client, rng)
  else:
    owner = _shards(labels, num_clients, shards_per_client, rng)

  client_indices = _group_by_owner(owner, num_clients)
  if method == 'dirichlet':
    # Empty clients cannot train or be evaluated; FedDST drops them, and so do we, reporting
    # how many so that a run can log it.
    kept = [idx for idx in client_indices if idx.size]
    dropped = len(client_indices) - len(kept)
    client_indices = kept
  return Partition(client_indices=client_indices, dropped_clients=dropped)


def _check_alpha(alpha: float) -> None:
  if not (isinstance(alpha, (int, float, np.floating, np.integer)) and np.isfinite(alpha)
          and alpha > 0):
    raise ValueError(f'alpha must be a finite number > 0, got {alpha!r}.')


def _group_by_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
  """Turns an owner per example (-1: unused) into sorted index arrays per client."""
  # A stable sort keeps example indices ascending within each client.
  order = np.argsort(owner, kind='stable')
  counts = np.bincount(owner[owner >= 0], minlength=num_clients)
  order = order[order.size - counts.sum():]  # Unused examples (-1) sort first.
  return [a.astype(np.int64) for a in np.split(order, np.cumsum(counts)[:-1])]


def _iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
  owner = np.empty(num_examples, np.int64)
  sizes = np.full(num_clients, num_examples // num_clients)
  sizes[:num_examples % num_clients] += 1
  owner[rng.permutation(num_examples)] = np.repeat(np.arange(num_clients), sizes)
  return owner


def _class_pools(labels: np.ndarray, rng: np.random.Generator):
  """Shuffled example indices of every present class, as (classes, pools)."""
  classes = np.unique(labels)
  pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  return classes, pools


def _dirichlet_balanced(labels, num_clients, alpha, rng) -> np.ndarray:
  """Equal sizes `N // num_clients`; client k samples classes with `p_k ~ Dir(alpha)`."""
  classes, pools = _class_pools(labels, rng)
  num_classes = len(classes)
  remaining = np.array([len(p) for p in pools])
  taken = np.zeros(num_classes, np.int64)
  per_client = labels.shape[0] // num_clients
  owner = np.full(labels.shape[0], -1, np.int64)
  for k in range(num_clients):
    p = rng.dirichlet(np.full(num_classes, float(alpha)))
    counts = np.zeros(num_classes, np.int64)
    need = per_client
    # Drawing `need` samples one by one from p, skipping exhausted classes, has the same law as
    # a multinomial draw whose overflow beyond each pool is redrawn from p renormalised over
    # the classes that still have samples; this loop does the latter, vectorised.
    while need > 0:
      open_ = remaining - counts > 0
      q = np.where(open_, p, 0.0)
      if q.sum() <= 0:
        # p can underflow to exactly zero on every open class when alpha is tiny; fall back
        # to what is left in the pools so that the client can still be filled.
        q = np.where(open_, remaining - counts, 0).astype(np.float64)
      draw = rng.multinomial(need, q / q.sum())
      counts += np.minimum(draw, remaining - counts)
      need = per_client - counts.sum()
    for c in np.flatnonzero(counts):
      owner[pools[c][taken[c]:taken[c] + counts[c]]] = k
    taken += counts
    remaining -= counts
  return owner


def _dirichlet_over_clients(labels, num_clients, alpha, rng) -> np.ndarray:
  """Each class split among all clients with proportions `q_c ~ Dir(alpha)` over clients."""
  _, pools = _class_pools(labels, rng)
  owner = np.full(labels.shape[0], -1, np.int64)
  for pool in pools:
    q = rng.dirichlet(np.full(num_clients, float(alpha)))
    # The same cut points np.split would use: floor of cumulative proportions.
    cuts = (np.cumsum(q) * len(pool)).astype(np.int64)[:-1]
    sizes = np.diff(np.concatenate([[0], np.minimum(cuts, len(pool)), [len(pool)]]))
    owner[pool] = np.repeat(np.arange(num_clients), sizes)
  return owner


def _classes(labels, num_clients, classes_per_client, rng) -> np.ndarray:
  """Each client holds `classes_per_client` classes; each class split among its holders."""
  classes, pools = _class_pools(labels, rng)
  num_classes = len(classes)
  if (isinstance(classes_per_client, bool)
      or not isinstance(classes_per_client, (int, np.integer))
      or not 1 <= classes_per_client <= num_classes):
    raise ValueError(
        f'classes_per_client must be an integer in [1, {num_classes}] (the number of distinct '
        f'labels), got {classes_per_client!r}.')
  # Walking one shuffled cycle of the classes round-robin deals every class to
  # floor or ceil of num_clients * c / num_classes clients, and the c consecutive entries a
  # client gets are distinct because c <= num_classes.
  cycle = rng.permutation(num_classes)
  slots = np.arange(num_clients * classes_per_client) % num_classes
  held = cycle[slots].reshape(num_clients, classes_per_client)
  owner = np.full(labels.shape[0], -1, np.int64)
  for c in range(num_classes):
    holders = np.flatnonzero((held == c).any(axis=1))
    if holders.size == 0:
      continue
    pool = pools[c]
    if len(pool) < holders.size:
      raise ValueError(
          f'class {classes[c]} has {len(pool)} examples but is dealt to {holders.size} '
          f'clients; use fewer clients or fewer classes_per_client.')
    # Uniformly random cut points give every holder at least one example with Dirichlet(1)-
    # like random sizes (all compositions of the class into non-empty parts equally likely).
    cuts = np.sort(rng.choice(len(pool) - 1, holders.size - 1, replace=False) + 1)
    sizes = np.diff(np.concatenate([[0], cuts, [len(pool)]]))
    owner[pool] = np.repeat(holders, sizes)
  return owner


def _shards(labels, num_clients, shards_per_client, rng) -> np.ndarray:
  """McMahan et al.'s pathological non-IID split: label-sorted equal shards."""
  if (isinstance(shards_per_client, bool)
      or not isinstance(shards_per_client, (int, np.integer)) or shards_per_client < 1):
    raise ValueError(f'shards_per_client must be an integer >= 1, got {shards_per_client!r}.')
  num_examples = labels.shape[0]
  num_shards = num_clients * shards_per_client
  shard_size = num_examples // num_shards
  if shard_size == 0:
    raise ValueError(
        f'fewer examples than shards: {num_examples} examples cannot be cut into '
        f'{num_clients} clients x {shards_per_client} shards; use fewer clients or shards.')
  # The remainder that does not fill a shard is left out at random, not from the end of the
  # sorted order (which would always hit the last class).
  used = rng.permutation(num_examples)[:num_shards * shard_size]
  # Sorting a random subset by label (stably) makes each shard a random sample of its class.
  used = used[np.argsort(labels[used], kind='stable')]
  shard_owner = np.empty(num_shards, np.int64)
  shard_owner[rng.permutation(num_shards)] = np.repeat(np.arange(num_clients), shards_per_client)
  owner = np.full(num_examples, -1, np.int64)
  owner[used] = np.repeat(shard_owner, shard_size)
  return owner
