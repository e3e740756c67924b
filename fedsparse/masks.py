"""Binary sparsity masks over parameter pytrees: which leaves to prune, how many to keep, which.

A mask is a boolean pytree with exactly the structure of the parameters: every leaf is a bool array
of its parameter's shape (True = kept). Leaves that are never pruned (biases, normalisation scales
and offsets by default) carry all-True masks, so applying a mask never needs to know which leaves
are prunable, and masks aggregate, compare and travel leaf by leaf like the parameters themselves.

Which leaves are prunable is a separate, static pytree of Python bools of the same structure
(:func:`prunable_leaves`). It is never traced: every count it implies (how many entries a layer
keeps) is a Python int computed exactly from shapes (:func:`keep_count`, :func:`layer_counts`).
The selections the algorithms run take those counts as (possibly traced) int32 scalars and select
by rank: the number of weights to prune and regrow anneals from round to round, and a sweep runs
members of different densities -- different counts -- through one compiled round.

The density budget ``d`` always refers to the prunable entries only: a mask of density ``d`` keeps
``keep_count(d, P)`` of the ``P`` prunable entries, plus every non-prunable one.

Building blocks:

* :func:`keep_count` -- ``floor(d * n)``, robust to floating-point noise (0.29 * 100 keeps 29).
* :func:`allocate_densities` -- per-layer densities for a global budget: ``'uniform'``, RigL's
  Erdős–Rényi-Kernel (``'erk'``; Evci et al., "Rigging the Lottery: Making All Tickets Winners",
  ICML 2020), which gives layers with few parameters per fan a higher density, or the FedDST
  code's ``'proportional'`` variant of it (sparsity proportional to ``1 - ERK score``).
* :func:`topk_mask` -- exactly ``k`` entries of one array, ties broken by index (or SSFL's
  ``'keep'`` rule: everything at least the k-th largest score).
* :func:`global_topk` / :func:`layerwise_topk` -- one top-k over all prunable entries, or one per
  layer, at a density.
* :func:`random_mask` -- uniformly random masks of exact size (the usual sparse initialisation);
  :func:`random_scores` -- the scores it selects by, for count-based selections.

Traced counts (every selection exact, ties broken by index):

* :func:`topk_traced` / :func:`layerwise_topk_traced` / :func:`global_topk_traced` -- top-k with
  a traced ``k``.
* :func:`prune_smallest` -- drop the ``n_l`` smallest-magnitude active entries of each layer.
* :func:`regrow` -- activate ``n_l`` inactive entries per layer, by score (RigL's gradient
  magnitude) or uniformly at random (SET); :func:`zero_regrown` and :func:`reset_moments` then
  start the regrown weights and their optimizer moments at 0.
* :func:`masked_weighted_mean` -- aggregate sparse client models entry by entry, over the clients
  that hold each entry.
* :func:`apportion` -- split an integer budget over layers in proportion to shares, capped at
  each layer's room, summing exactly to the budget (FLASH's regrowth and density rescaling).
* Per-layer bookkeeping: :func:`prunable_sizes`, :func:`count_vector`, :func:`layer_vector` /
  :func:`layer_tree` (per-layer scalars as an ``[L]`` vector and back), :func:`turnover` (how
  much a mask changed), :func:`stale_copies` / :func:`delivered` (which clients hold an outdated
  copy of a versioned mask).

Example::

  >>> import jax.numpy as jnp
  >>> params = {'Dense_0': {'kernel': jnp.ones((4, 2)), 'bias': jnp.ones(2)}}
  >>> prunable = prunable_leaves(params)
  >>> prunable
  {'Dense_0': {'bias': False, 'kernel': True}}
  >>> mask = global_topk(params, prunable, 0.5)
  >>> int(count(mask, prunable)), int(count(mask))
  (4, 6)
"""

import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsparse.checks import check_choice

__all__ = [
    'ALLOCATIONS',
    'TIES',
    'smallest_density',
    'SCOPES',
    'prunable_leaves',
    'global_topk_traced',
    'random_scores',
    'default_prunable',
    'leaf_paths',
    'ones_like',
    'apply',
    'count',
    'density',
    'num_prunable',
    'layer_counts',
    'layer_count_tree',
    'layer_tree',
    'layer_vector',
    'prunable_sizes',
    'turnover',
    'count_vector',
    'stale_copies',
    'delivered',
    'keep_count',
    'allocate_densities',
    'topk_mask',
    'global_topk',
    'layerwise_topk',
    'random_mask',
    'topk_traced',
    'layerwise_topk_traced',
    'prune_smallest',
    'regrow',
    'zero_regrown',
    'reset_moments',
    'masked_weighted_mean',
    'apportion',
]

ALLOCATIONS = ('uniform', 'erk', 'proportional')
TIES = ('index', 'keep')
SCOPES = ('global', 'layerwise')


# --------------------------------------------------------------------------------------------------
# Internal helpers.


def _shape(leaf: Any) -> tuple[int, ...]:
  """Static shape of an array, tracer or ``jax.ShapeDtypeStruct`` (anything with ``.shape``)."""
  return tuple(leaf.shape) if hasattr(leaf, 'shape') else tuple(np.shape(leaf))


def _size(leaf: Any) -> int:
  return math.prod(_shape(leaf))


def _key_str(key: Any) -> str:
  """One entry of a pytree path as a string: dict key, sequence index or attribute name."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _prunable_flags(tree: Any, prunable: Any) -> tuple[list[Any], list[bool], Any]:
  """Leaves of ``tree``, the matching prunable flags, and the tree's structure.

  Raises early with both structures when they differ: a mismatch would otherwise surface as an
  opaque error from ``jax.tree.map`` (or, worse, pair leaves up wrongly).
  """
  leaves, treedef = jax.tree.flatten(tree)
  flags, pdef = jax.tree.flatten(prunable)
  if pdef != treedef:
    raise ValueError(f'prunable must have the structure of the tree: {pdef} vs {treedef}.')
  return leaves, [bool(f) for f in flags], treedef


def _check_density(density: Any) -> float:
  if isinstance(density, bool) or not isinstance(density, numbers.Real):
    raise ValueError(f'density must be a real number in (0, 1], got {density!r}.')
  d = float(density)
  # `not (0 < d <= 1)` also rejects NaN.
  if not 0.0 < d <= 1.0:
    raise ValueError(f'density must be in (0, 1], got {density!r}.')
  return d


def _density_tree(densities: Any, treedef: Any) -> list[Any]:
  """Per-leaf densities from a single number or a pytree of numbers shaped like the params."""
  if isinstance(densities, numbers.Real) and not isinstance(densities, bool):
    return [densities] * treedef.num_leaves
  leaves, ddef = jax.tree.flatten(densities)
  if ddef != treedef:
    raise ValueError(f'densities must be a number or have the structure of the params: '
                     f'{ddef} vs {treedef}.')
  return leaves


def _descending_key(x: jax.Array) -> jax.Array:
  """An order-reversing map of ``x``, so an ascending stable sort lists the largest first.

  Integers use bitwise NOT (``~x = -x - 1``), which reverses their order without the overflow of
  ``-x`` at the most negative value (and works for unsigned types and bools too).
  """
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return -x
  return jnp.invert(x)


def _flat_topk(flat: jax.Array, k: int, ties: str) -> jax.Array:
  """Top-k of a 1-D array as a boolean vector (see :func:`topk_mask`)."""
  n = flat.shape[0]
  if k <= 0:
    return jnp.zeros((n,), jnp.bool_)
  if k >= n:
    return jnp.ones((n,), jnp.bool_)
  # A stable sort keeps equal scores in index order, so the lower index wins ties.
  order = jnp.argsort(_descending_key(flat), stable=True)
  if ties == 'keep':
    kth = flat[order[k - 1]]
    return flat >= kth
  return jnp.zeros((n,), jnp.bool_).at[order[:k]].set(True)


def _leaves_like(tree: Any, treedef: Any, name: str) -> list[Any]:
  """Leaves of ``tree``, which must have the structure ``treedef`` (raises with both if not)."""
  leaves, tdef = jax.tree.flatten(tree)
  if tdef != treedef:
    raise ValueError(f'{name} must have the structure of the params and mask: {tdef} vs '
                     f'{treedef}.')
  return leaves


def _as_count(n: Any, name: str) -> jax.Array:
  """An integer scalar (Python int, array or tracer) as an int32 scalar.

  Only the dtype and shape are checked, both static, so a traced count passes through ``jax.jit``.
  """
  n = jnp.asarray(n)
  # issubdtype(bool, integer) is False: a stray True is not a count of 1.
  if n.ndim != 0 or not jnp.issubdtype(n.dtype, jnp.integer):
    raise ValueError(f'{name} must be an integer scalar, got {n.dtype} of shape {n.shape}.')
  return n.astype(jnp.int32)


def _count_leaves(counts: Any, treedef: Any, flags: list[bool], name: str) -> list[Any]:
  """Per-leaf int32 counts from one integer or a pytree of them; None at non-prunable leaves."""
  cdef = jax.tree.structure(counts)
  if cdef == treedef:
    leaves = jax.tree.leaves(counts)
  elif jax.tree_util.treedef_is_leaf(cdef):
    leaves = [counts] * treedef.num_leaves
  else:
    raise ValueError(f'{name} must be an integer or have the structure of the params and mask: '
                     f'{cdef} vs {treedef}.')
  return [_as_count(c, name) if f else None for c, f in zip(leaves, flags)]


def _flat_ranks(flat: jax.Array, eligible: jax.Array | None = None,
                tiebreak: jax.Array | None = None) -> jax.Array:
  """Each entry's position (int32) in the descending order of a 1-D array, ties by index.

  NaN ranks below every number. With a boolean ``eligible`` the eligible entries come first, in
  descending order among themselves: they take ranks ``0 .. E - 1``, so ``rank < k`` with
  ``k <= E`` selects the ``k`` largest eligible entries and nothing else, whatever the scores of
  the others (even NaN eligible scores stay ahead of every ineligible one). A ``tiebreak``
  array orders equal scores (larger first) before the index does.
  """
  n = flat.shape[0]
  iota = jnp.arange(n, dtype=jnp.int32)
  # The index as the last key makes the order total, so no stability is needed for the ties.
  keys = (_descending_key(flat), iota)
  if tiebreak is not None:
    keys = (keys[0], _descending_key(tiebreak.reshape(-1)), iota)
  if eligible is not None:
    keys = (jnp.logical_not(eligible),) + keys  # False sorts first.
  order = jax.lax.sort(keys, num_keys=len(keys))[-1]
  # Invert the permutation: the entry at order[r] has rank r.
  return jnp.zeros((n,), jnp.int32).at[order].set(iota, unique_indices=True)


# --------------------------------------------------------------------------------------------------
# Structure and bookkeeping.


def default_prunable(path: tuple[str, ...], leaf: Any) -> bool:
  """The default predicate of :func:`prunable_leaves`: conv and dense kernels.

  Biases and normalisation scales and offsets are tiny and sensitive, so they stay dense.
  """
  return bool(path) and path[-1] == 'kernel' and len(_shape(leaf)) >= 2


def prunable_leaves(params: Any,
                    predicate: Callable[[tuple[str, ...], Any], bool] | None = None) -> Any:
  """Which leaves of ``params`` may be pruned, as a pytree of Python bools.

  Args:
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``; only shapes are read).
    predicate: ``predicate(path, leaf) -> bool`` with ``path`` the tuple of the leaf's keys as
      strings (e.g. ``('Conv_0', 'kernel')``). Defaults to: the last key is ``'kernel'`` and the
      leaf has at least two dimensions (conv and dense kernels).

  Returns:
    A pytree of bools with the structure of ``params``.

  Raises:
    ValueError: when no leaf is prunable (a sparsity budget would then mean nothing).
  """
  predicate = default_prunable if predicate is None else predicate
  leaves, treedef = jax.tree_util.tree_flatten(params)
  flags = [bool(predicate(path, leaf)) for path, leaf in zip(leaf_paths(params), leaves)]
  if not any(flags):
    raise ValueError('No prunable leaf: the predicate selected none of the parameters.')
  return jax.tree_util.tree_unflatten(treedef, flags)


def leaf_paths(params: Any) -> list[tuple[str, ...]]:
  """Every leaf's path as a tuple of strings (``('Conv_0', 'kernel')``), in leaf order."""
  return [tuple(_key_str(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def ones_like(params: Any) -> Any:
  """The dense mask: all True, one bool leaf per parameter leaf."""
  return jax.tree.map(lambda w: jnp.ones(_shape(w), jnp.bool_), params)


def apply(params: Any, mask: Any) -> Any:
  """Zeroes the pruned entries (exactly 0, not merely small); kept entries and dtypes unchanged."""
  return jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), params, mask)


def count(mask: Any, prunable: Any = None) -> jax.Array:
  """Number of True entries of ``mask`` (an int32 scalar), over prunable leaves when given."""
  if prunable is None:
    leaves = jax.tree.leaves(mask)
  else:
    masks, flags, _ = _prunable_flags(mask, prunable)
    leaves = [m for m, f in zip(masks, flags) if f]
  total = jnp.zeros((), jnp.int32)
  for m in leaves:
    total = total + jnp.sum(m, dtype=jnp.int32)
  return total


def num_prunable(params: Any, prunable: Any) -> int:
  """Number of prunable entries ``P`` (static: from shapes only)."""
  leaves, flags, _ = _prunable_flags(params, prunable)
  return sum(_size(w) for w, f in zip(leaves, flags) if f)


def density(mask: Any, prunable: Any) -> jax.Array:
  """Fraction of the prunable entries that ``mask`` keeps, a float32 scalar."""
  return count(mask, prunable).astype(jnp.float32) / jnp.float32(num_prunable(mask, prunable))


def layer_count_tree(mask: Any, prunable: Any) -> Any:
  """Active entries per prunable leaf, as a pytree of int32 scalars (traced under ``jax.jit``).

  Unlike :func:`layer_counts` (static keep counts from shapes), this counts a concrete mask, e.g.
  to turn a prune fraction into per-layer counts for :func:`prune_smallest` and :func:`regrow`.

  Args:
    mask: a bool mask pytree.
    prunable: the prunable flags (see :func:`prunable_leaves`).

  Returns:
    A pytree with the structure of ``mask``: each prunable leaf's number of True entries, and 0 at
    non-prunable leaves (so the leaves sum to ``count(mask, prunable)``).
  """
  leaves, flags, treedef = _prunable_flags(mask, prunable)
  return jax.tree_util.tree_unflatten(treedef, [
      jnp.sum(m, dtype=jnp.int32) if f else jnp.zeros((), jnp.int32)
      for m, f in zip(leaves, flags)])


def prunable_sizes(params: Any, prunable: Any) -> list[int]:
  """The sizes ``n_l`` of the prunable leaves, in ``jax.tree.leaves`` order (Python ints)."""
  leaves, flags, _ = _prunable_flags(params, prunable)
  return [_size(w) for w, f in zip(leaves, flags) if f]


def layer_vector(tree: Any, prunable: Any) -> jax.Array:
  """The prunable leaves' scalars of a per-leaf tree (e.g. `layer_count_tree`) as ``[L]``."""
  leaves, flags, _ = _prunable_flags(tree, prunable)
  return jnp.stack([x for x, f in zip(leaves, flags) if f])


def layer_tree(vector: jax.Array, like: Any, prunable: Any) -> Any:
  """An ``[L]`` per-layer vector back to a per-leaf tree shaped like ``like``'s structure.

  The inverse of `layer_vector`: the prunable leaves get the vector's entries in order, the
  others an int32 0 (e.g. counts to prune or regrow, which no non-prunable leaf has).
  """
  _, flags, treedef = _prunable_flags(like, prunable)
  out, i = [], 0
  for f in flags:
    out.append(vector[i] if f else jnp.zeros((), jnp.int32))
    i += f
  return jax.tree_util.tree_unflatten(treedef, out)


def count_vector(mask: Any, prunable: Any) -> jax.Array:
  """The ``[L]`` int32 counts of the prunable leaves of a mask (`layer_count_tree` as a vector)."""
  return layer_vector(layer_count_tree(mask, prunable), prunable)


def stale_copies(held: jax.Array, version: jax.Array, clients: jax.Array) -> jax.Array:
  """Which clients hold an outdated copy of a mask that the server versions.

  Algorithms whose global mask changes (FedDST, FLASH's JMWST) count a mask download only for a
  client whose copy is stale: the server keeps ``version`` (how many times the mask changed)
  and, per client of the population, the version it ``held`` last.

  Args:
    held: ``[N]`` int32, the version each client holds (-1: none).
    version: the int32 scalar version of the current mask.
    clients: ``[K]`` ids of the cohort.

  Returns:
    ``[K]`` bool: True where the client's copy is not the current one.
  """
  return held[clients] != version


def delivered(held: jax.Array, version: jax.Array, clients: jax.Array,
              sent: jax.Array | bool = True) -> jax.Array:
  """``held`` after the cohort's clients where ``sent`` received the current mask version."""
  return held.at[clients].set(jnp.where(sent, version, held[clients]))


def turnover(new: Any, old: Any, prunable: Any) -> tuple[jax.Array, jax.Array]:
  """How much of a mask changed: entries ``new`` holds that ``old`` did not.

  Returns:
    ``(entered, fraction)``: the int32 count of entries that entered (for masks of equal
    counts, as many left), and it as a float32 fraction of ``old``'s prunable entries.
  """
  entered = sum(jnp.sum(m & ~o, dtype=jnp.int32)
                for m, o in zip(jax.tree.leaves(new), jax.tree.leaves(old)))
  kept = jnp.maximum(count(old, prunable), 1).astype(jnp.float32)
  return entered, entered.astype(jnp.float32) / kept


def keep_count(density: float, n: int) -> int:
  """How many of ``n`` entries a layer of this density keeps: ``floor(density * n)``.

  The product is rounded to 6 decimals before the floor because it is computed in floating point:
  ``0.29 * 100 == 28.999999999999996`` must keep 29 entries, not 28.

  Args:
    density: the kept fraction, in (0, 1].
    n: the number of entries.

  Returns:
    A Python int in [0, n].

  Raises:
    ValueError: when ``density`` is outside (0, 1] or ``n`` is negative.
  """
  d = _check_density(density)
  n = int(n)
  if n < 0:
    raise ValueError(f'n must be non-negative, got {n}.')
  return min(max(math.floor(round(d * n, 6)), 0), n)



def smallest_density(n: int) -> float:
  """The smallest density of two significant digits that keeps at least one of ``n`` entries.

  For error messages: ``1 / n`` printed to two digits rounds down as often as up (``3.8e-06``
  for ``n = 261250`` keeps none), so the hint is rounded up, then checked with `keep_count`.

  Example:
    >>> smallest_density(261250)
    3.9e-06
  """
  x = 1.0 / n
  scale = 10.0 ** (math.floor(math.log10(x)) - 1)
  d = float(f'{math.ceil(x / scale) * scale:.2g}')
  while keep_count(d, n) < 1:
    d = float(f'{d + scale:.2g}')
  return d

def layer_counts(params: Any, prunable: Any, densities: Any) -> Any:
  """Entries kept per leaf: ``keep_count(d_l, n_l)`` when prunable, ``n_l`` otherwise.

  Args:
    params: the parameter pytree (only shapes are read).
    prunable: the prunable flags (see :func:`prunable_leaves`).
    densities: one density for every prunable leaf, or a pytree of densities shaped like
      ``params`` (e.g. from :func:`allocate_densities`); entries at non-prunable leaves are ignored.

  Returns:
    A pytree of Python ints with the structure of ``params``.
  """
  leaves, flags, treedef = _prunable_flags(params, prunable)
  ds = _density_tree(densities, treedef)
  counts = [keep_count(d, _size(w)) if f else _size(w) for w, f, d in zip(leaves, flags, ds)]
  return jax.tree_util.tree_unflatten(treedef, counts)


# --------------------------------------------------------------------------------------------------
# Per-layer density allocation.


def _erk_densities(shapes: list[tuple[int, ...]], density: float,
                   power_scale: float) -> list[float]:
  """RigL's Erdős–Rényi-Kernel densities (``sparse_utils.get_sparsities_erdos_renyi``).

  Derivation. Layer ``l`` has ``n_l = prod(shape_l)`` entries and the raw score
  ``r_l = (sum(shape_l) / n_l) ** power_scale`` (for a dense kernel ``(fan_in + fan_out) /
  (fan_in * fan_out)``, Erdős–Rényi; for a conv kernel the spatial sizes join the sum, ERK). The
  sparse layers get ``d_l = eps * r_l`` for one scale ``eps``. Let ``D`` be the layers already
  made dense. The budget ``sum_l d_l n_l = d * N`` (``N = sum_l n_l``) reads

    sum_{l in D} n_l + eps * sum_{l not in D} r_l n_l = d * N
    =>  eps = (d * N - sum_{l in D} n_l) / sum_{l not in D} r_l n_l.

  (RigL writes the numerator as ``sum_{not D} d n_l - sum_{D} (1 - d) n_l``; it is the same.) If
  the largest ``eps * r_l`` exceeds 1, the layer(s) with the largest raw score cannot reach their
  share: they become dense, join ``D``, and ``eps`` is solved again. Each pass makes at least one
  more layer dense, so the loop ends after at most ``len(shapes)`` passes; since ``d <= 1`` the
  numerator stays >= 0 and the remaining densities stay >= 0.
  """
  sizes = [math.prod(s) for s in shapes]
  total = sum(sizes)
  # Empty leaves keep nothing and would divide by zero in r_l: call them dense and leave them out.
  dense = {i for i, n in enumerate(sizes) if n == 0}
  raw = {i: (sum(s) / sizes[i]) ** power_scale for i, s in enumerate(shapes) if i not in dense}
  eps = 0.0
  while True:
    sparse = [i for i in raw if i not in dense]
    if not sparse:
      break
    numerator = density * total - sum(sizes[i] for i in dense)
    divisor = sum(raw[i] * sizes[i] for i in sparse)
    eps = numerator / divisor
    max_raw = max(raw[i] for i in sparse)
    if max_raw * eps <= 1.0:
      break
    dense.update(i for i in sparse if raw[i] == max_raw)
  # The min only clips round-off: the loop guarantees eps * r_l <= 1 for the sparse layers.
  return [1.0 if i in dense else min(float(eps * raw[i]), 1.0) for i in range(len(shapes))]


def _proportional_densities(shapes: list[tuple[int, ...]], density: float,
                            power_scale: float) -> list[float]:
  """The FedDST code's ERK variant (``PrunableNet._weights_by_layer``): ``s_l = c (1 - r_l)``.

  Each layer's *sparsity* is proportional to ``1 - r_l`` (``r_l`` the ERK score of
  :func:`_erk_densities`), scaled by one ``c`` so that ``sum_l s_l n_l = (1 - d) N``: unlike RigL's
  ERK, small layers are not made dense and the allocation stays close to uniform. A layer whose
  scaled sparsity would be negative (a score above 1) is kept dense, and the total then misses
  the budget by that amount; a budget that would prune a whole layer raises. The FedDST code
  counts a layer's biases in ``n_l``; here only the prunable entries are counted.
  """
  sizes = [math.prod(s) for s in shapes]
  raw = [1.0 - (sum(s) / n) ** power_scale if n else 0.0 for s, n in zip(shapes, sizes)]
  divisor = sum(r * n for r, n in zip(raw, sizes))
  c = (1.0 - density) * sum(sizes) / divisor if divisor > 0 else 0.0
  densities = [min(1.0 - c * r, 1.0) for r in raw]
  for shape, n, d in zip(shapes, sizes, densities):
    if n and d <= 0:
      raise ValueError(f"The 'proportional' allocation at density {density:.6g} (sparsity "
                       f'{1 - density:.6g}) prunes the whole layer of shape {shape} (its density '
                       f"would be {d:.3g}); use a higher density or the 'erk' allocation.")
  return densities


def allocate_densities(params: Any, prunable: Any, density: float,
                       method: str = 'uniform', erk_power_scale: float = 1.0) -> Any:
  """Per-leaf densities that spend a global budget over the prunable leaves.

  The budget is ``density`` times the number of prunable entries: ``sum_l d_l n_l = density *
  sum_l n_l`` over prunable leaves (up to float round-off; :func:`keep_count` then floors each
  layer).

  Args:
    params: the parameter pytree (only shapes are read).
    prunable: the prunable flags (see :func:`prunable_leaves`).
    density: the overall density of the prunable entries, in (0, 1].
    method: ``'uniform'`` (every prunable leaf gets ``density``), ``'erk'`` (RigL's
      Erdős–Rényi-Kernel: ``d_l ∝ (sum(shape_l) / prod(shape_l)) ** erk_power_scale``, layers
      that would exceed density 1 made dense) or ``'proportional'`` (the FedDST code's variant:
      sparsity ``1 - d_l ∝ 1 - (sum(shape_l) / prod(shape_l)) ** erk_power_scale``).
    erk_power_scale: the exponent of the ERK score (RigL's ``erk_power_scale``; 0 is uniform).

  Returns:
    A pytree of Python floats with the structure of ``params``: 1.0 at non-prunable leaves, every
    value in (0, 1] (a prunable leaf can get 0 only if it is empty).

  Raises:
    ValueError: for an unknown ``method``, a ``density`` outside (0, 1], or a ``'proportional'``
      budget that would prune a whole layer.
  """
  check_choice('allocation method', method, ALLOCATIONS)
  d = _check_density(density)
  leaves, flags, treedef = _prunable_flags(params, prunable)
  idx = [i for i, f in enumerate(flags) if f]
  out = [1.0] * len(leaves)
  if method == 'uniform':
    for i in idx:
      out[i] = d
  else:
    allocate = _erk_densities if method == 'erk' else _proportional_densities
    for i, d_l in zip(idx, allocate([_shape(leaves[i]) for i in idx], d,
                                    float(erk_power_scale))):
      out[i] = d_l
  return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------------------------------
# Selections.


def topk_mask(scores: jax.Array, k: int, ties: str = 'index') -> jax.Array:
  """The ``k`` largest entries of ``scores`` as a boolean array of the same shape.

  Args:
    scores: any real (or bool) array. NaN ranks below every number.
    k: static number of entries to keep; 0 keeps none and ``k >= scores.size`` keeps all.
    ties: ``'index'`` keeps exactly ``k``, equal scores ordered by flat index (the lower index
      wins); ``'keep'`` (SSFL's rule) keeps every entry at least the k-th largest score, so ties
      at the threshold may keep more than ``k``.

  Returns:
    A bool array shaped like ``scores``.

  Raises:
    ValueError: for an unknown ``ties`` or a negative or non-integer ``k``.
  """
  check_choice('ties', ties, TIES)
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
    raise ValueError(f'k must be a non-negative (static) integer, got {k!r}.')
  scores = jnp.asarray(scores)
  return _flat_topk(scores.reshape(-1), int(k), ties).reshape(scores.shape)


def global_topk(scores: Any, prunable: Any, density: float,
                ties: str = 'index') -> Any:
  """One top-k over all prunable entries together.

  Args:
    scores: a pytree shaped like the params; values at non-prunable leaves are ignored. Leaves of
      different dtypes are compared as float32 (strict promotion has no common type for them).
    prunable: the prunable flags (see :func:`prunable_leaves`).
    density: the kept fraction of the prunable entries, in (0, 1]; ``k = keep_count(density, P)``.
    ties: as in :func:`topk_mask`; ``'index'`` orders the concatenation of the prunable leaves in
      ``jax.tree.leaves`` order.

  Returns:
    A bool mask pytree; non-prunable leaves all True.
  """
  check_choice('ties', ties, TIES)
  leaves, flags, _ = _prunable_flags(scores, prunable)
  p = sum(_size(s) for s, f in zip(leaves, flags) if f)
  return global_topk_traced(scores, prunable, keep_count(density, p), ties)


def global_topk_traced(scores: Any, prunable: Any, k: Any, ties: str = 'index') -> Any:
  """One top-k over all prunable entries together, for a count ``k`` that may be traced.

  The selection is by rank (as :func:`topk_traced`), so one compilation serves every ``k``: a
  sweep over densities maps its members' counts through one compiled round.

  Args:
    scores: a pytree shaped like the params; values at non-prunable leaves are ignored. Leaves of
      different dtypes are compared as float32.
    prunable: the prunable flags (see :func:`prunable_leaves`).
    k: an integer scalar, traced or not, clipped to ``[0, P]``.
    ties: as in :func:`topk_mask`: ``'index'`` keeps exactly ``k`` (ties by index in the
      concatenation of the prunable leaves in ``jax.tree.leaves`` order); ``'keep'`` keeps every
      entry at least the k-th largest score.

  Returns:
    A bool mask pytree; non-prunable leaves all True.
  """
  check_choice('ties', ties, TIES)
  leaves, flags, treedef = _prunable_flags(scores, prunable)
  chosen = [jnp.asarray(s) for s, f in zip(leaves, flags) if f]
  if len({s.dtype for s in chosen}) > 1:
    chosen = [s.astype(jnp.float32) for s in chosen]
  flat = jnp.concatenate([s.reshape(-1) for s in chosen])
  n = flat.shape[0]
  k = jnp.clip(_as_count(k, 'k'), 0, n)
  rank = _flat_ranks(flat)
  keep = rank < k
  if ties == 'keep':
    # Every score at least the k-th largest (the entry of rank k - 1); k = n keeps all.
    kth = flat[jnp.argmax(rank == k - 1)]
    keep = jnp.where(k >= n, True, (flat >= kth) & (k > 0))
  out, offset = [], 0
  for s, f in zip(leaves, flags):
    if f:
      size = _size(s)
      out.append(keep[offset:offset + size].reshape(_shape(s)))
      offset += size
    else:
      out.append(jnp.ones(_shape(s), jnp.bool_))
  return jax.tree_util.tree_unflatten(treedef, out)


def layerwise_topk(scores: Any, prunable: Any, densities: Any, ties: str = 'index') -> Any:
  """A separate top-k in every prunable leaf, keeping ``keep_count(d_l, n_l)`` entries.

  Args:
    scores: a pytree shaped like the params; values at non-prunable leaves are ignored.
    prunable: the prunable flags (see :func:`prunable_leaves`).
    densities: one density for all prunable leaves or a pytree of them (e.g. from
      :func:`allocate_densities`).
    ties: as in :func:`topk_mask`.

  Returns:
    A bool mask pytree; non-prunable leaves all True.
  """
  check_choice('ties', ties, TIES)
  leaves, flags, treedef = _prunable_flags(scores, prunable)
  ds = _density_tree(densities, treedef)
  out = [topk_mask(s, keep_count(d, _size(s)), ties) if f else jnp.ones(_shape(s), jnp.bool_)
         for s, f, d in zip(leaves, flags, ds)]
  return jax.tree_util.tree_unflatten(treedef, out)


def random_mask(key: jax.Array, params: Any, prunable: Any, density: float,
                scope: str = 'global', allocation: str = 'uniform') -> Any:
  """A uniformly random mask of exact size.

  Args:
    key: a PRNG key; the same key gives the same mask.
    params: the parameter pytree (only shapes are read).
    prunable: the prunable flags (see :func:`prunable_leaves`).
    density: the kept fraction of the prunable entries, in (0, 1].
    scope: ``'global'`` keeps exactly ``keep_count(density, P)`` entries chosen uniformly among all
      prunable ones (layers end up with binomial-like counts); ``'layerwise'`` keeps exactly
      ``keep_count(d_l, n_l)`` in each leaf with ``d_l`` from :func:`allocate_densities`.
    allocation: the ``method`` of :func:`allocate_densities` for ``'layerwise'``; must be
      ``'uniform'`` for ``'global'``, where no per-layer allocation takes place.

  Returns:
    A bool mask pytree; non-prunable leaves all True.
  """
  check_choice('scope', scope, SCOPES)
  check_choice('allocation', allocation, ALLOCATIONS)
  if scope == 'global' and allocation != 'uniform':
    raise ValueError(f"allocation={allocation!r} needs scope='layerwise': a global selection has "
                     'no per-layer allocation.')
  _check_density(density)
  scores = random_scores(key, params, prunable)
  if scope == 'global':
    return global_topk(scores, prunable, density)
  densities = allocate_densities(params, prunable, density, method=allocation)
  return layerwise_topk(scores, prunable, densities)


def random_scores(key: jax.Array, params: Any, prunable: Any) -> Any:
  """I.i.d. uniform float32 scores at the prunable leaves (0 elsewhere), for random masks.

  Top-k of i.i.d. uniform scores is a uniformly random subset of size k (float ties, resolved
  by index, are too rare to bias it measurably); :func:`random_mask` and any count-based
  selection (:func:`global_topk_traced`, :func:`layerwise_topk_traced`) of these scores draw
  the same mask from the same key. One key per leaf keeps the leaves independent.
  """
  leaves, flags, treedef = _prunable_flags(params, prunable)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      jax.random.uniform(k, _shape(w), jnp.float32) if f else jnp.zeros(_shape(w), jnp.float32)
      for k, w, f in zip(keys, leaves, flags)])


# --------------------------------------------------------------------------------------------------
# Dynamic sparse training: traced counts.


def topk_traced(scores: jax.Array, k: Any) -> jax.Array:
  """The ``k`` largest entries of ``scores`` for a traced ``k``, as a boolean array.

  Every entry gets its rank in the descending order (ties by flat index, the lower index first;
  NaN below every number) and the mask is ``rank < k``: the shapes never depend on ``k``, so one
  compilation serves every ``k``, and ``jax.vmap`` maps over a batch of arrays and counts.

  Args:
    scores: any real (or bool) array.
    k: an integer scalar, traced or not; clipped to ``[0, scores.size]``.

  Returns:
    A bool array shaped like ``scores`` with exactly ``clip(k, 0, scores.size)`` True entries, the
    same as ``topk_mask(scores, k)`` for a static ``k``.

  Raises:
    ValueError: when ``k`` is not an integer scalar.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> s = jnp.array([3.0, 1.0, 3.0, 2.0])
    >>> jax.jit(topk_traced)(s, jnp.int32(3)).tolist()
    [True, False, True, True]
    >>> jax.vmap(topk_traced)(jnp.stack([s, -s]), jnp.array([1, 2])).tolist()
    [[True, False, False, False], [False, True, False, True]]
  """
  scores = jnp.asarray(scores)
  k = jnp.clip(_as_count(k, 'k'), 0, scores.size)
  return (_flat_ranks(scores.reshape(-1)) < k).reshape(scores.shape)


def layerwise_topk_traced(scores: Any, prunable: Any, counts: Any) -> Any:
  """A separate top-k in every prunable leaf, with traced per-leaf counts.

  Args:
    scores: a pytree shaped like the params; values at non-prunable leaves are ignored.
    prunable: the prunable flags (see :func:`prunable_leaves`).
    counts: one integer for every prunable leaf, or a pytree of integer scalars with the structure
      of ``scores`` (e.g. :func:`layer_counts` or :func:`layer_count_tree`); only the prunable
      leaves are read. Each is clipped to its leaf's size.

  Returns:
    A bool mask pytree keeping exactly the clipped count in every prunable leaf (as
    :func:`topk_traced`); non-prunable leaves all True.
  """
  leaves, flags, treedef = _prunable_flags(scores, prunable)
  ks = _count_leaves(counts, treedef, flags, 'counts')
  out = [topk_traced(s, k) if f else jnp.ones(_shape(s), jnp.bool_)
         for s, f, k in zip(leaves, flags, ks)]
  return jax.tree_util.tree_unflatten(treedef, out)


def prune_smallest(params: Any, mask: Any, n: Any, prunable: Any, *,
                   tiebreak: Any = None) -> Any:
  """Drops the ``n_l`` smallest-magnitude active entries of every prunable leaf.

  The magnitude-pruning step of RigL, SET, FedDST and FLASH. Only active entries are candidates:
  a pruned weight is usually already 0 and would otherwise be "pruned" again, keeping the count.

  Args:
    params: the parameter pytree; ``|w|`` ranks the entries (NaN below every number, so pruned
      first).
    mask: the current bool mask pytree, shaped like ``params``.
    n: how many entries to drop: one integer for every prunable leaf, or a pytree of integer
      scalars shaped like ``params`` (only prunable leaves are read); traced values are fine. Each
      is clipped to ``[0, active_l]``, the leaf's number of active entries.
    prunable: the prunable flags (see :func:`prunable_leaves`).
    tiebreak: optional pytree shaped like ``params``: among equal magnitudes the smaller
      ``tiebreak`` is dropped first (e.g. FedDST's server breaks ties between regrown weights,
      all 0, by the clients' votes).

  Returns:
    The new mask: every prunable leaf keeps exactly ``active_l - clip(n_l, 0, active_l)`` entries,
    the largest-magnitude active ones; among equal magnitudes (and tiebreaks) the higher flat
    index is dropped first (the lower index survives, as in :func:`topk_mask`). Non-prunable
    leaves are unchanged.
  """
  ws, flags, treedef = _prunable_flags(params, prunable)
  ms = _leaves_like(mask, treedef, 'mask')
  ns = _count_leaves(n, treedef, flags, 'n')
  ts = [None] * len(ws) if tiebreak is None else _leaves_like(tiebreak, treedef, 'tiebreak')
  out = []
  for w, m, f, n_l, tb in zip(ws, ms, flags, ns, ts):
    if not f:
      out.append(m)
      continue
    active = m.reshape(-1)
    n_active = jnp.sum(active, dtype=jnp.int32)
    keep = n_active - jnp.clip(n_l, 0, n_active)
    # Active entries take ranks 0 .. n_active - 1 by descending |w|: keeping the first `keep`
    # drops the smallest and never revives an inactive entry.
    rank = _flat_ranks(jnp.abs(w).reshape(-1), eligible=active,
                       tiebreak=None if tb is None else jnp.asarray(tb))
    out.append((rank < keep).reshape(m.shape))
  return jax.tree_util.tree_unflatten(treedef, out)


def regrow(mask: Any, n: Any, prunable: Any, *, scores: Any = None, key: jax.Array | None = None,
           exclude: Any = None) -> tuple[Any, Any]:
  """Activates ``n_l`` inactive entries in every prunable leaf, by score or at random.

  The growth step of dynamic sparse training: RigL and FedDST grow the largest gradient
  magnitudes (``scores``), SET grows uniformly at random (``key``).

  Args:
    mask: the current bool mask pytree.
    n: how many entries to activate: one integer for every prunable leaf, or a pytree of integer
      scalars shaped like ``mask`` (only prunable leaves are read); traced values are fine. Each is
      clipped to ``[0, c_l]``, the leaf's number of candidates.
    prunable: the prunable flags (see :func:`prunable_leaves`).
    scores: a pytree shaped like ``mask`` (e.g. ``|gradient|``): the largest candidate scores grow,
      ties by flat index (the lower index first), NaN last.
    key: a PRNG key: the candidates grow uniformly at random (every subset of size ``n_l`` equally
      likely, up to ties between 32-bit random draws, which are resolved by index).
    exclude: an optional bool pytree shaped like ``mask``; True entries are not candidates (e.g.
      the entries just pruned, so that a round does not regrow what it dropped).

  Returns:
    ``(new_mask, grown)``: ``grown`` marks the newly activated entries (exactly
    ``clip(n_l, 0, c_l)`` per prunable leaf, none elsewhere), ``new_mask = mask | grown``. The
    candidates ``c_l`` are the entries inactive in ``mask`` and not in ``exclude``.

  Raises:
    ValueError: unless exactly one of ``scores`` and ``key`` is given.
  """
  if (scores is None) == (key is None):
    raise ValueError('regrow needs exactly one of scores (grow the largest) and key (grow at '
                     'random).')
  ms, flags, treedef = _prunable_flags(mask, prunable)
  ns = _count_leaves(n, treedef, flags, 'n')
  excl = [None] * len(ms) if exclude is None else _leaves_like(exclude, treedef, 'exclude')
  if scores is None:
    # One key per leaf keeps the leaves independent (as in random_mask). Random bits ranked by
    # the top-k give a uniform subset; 32 bits rather than a float32 uniform (23 bits) make the
    # ties resolved by index rarer.
    keys = jax.random.split(key, len(ms))
    ss = [jax.random.bits(k, _shape(m), jnp.uint32) if f else None
          for k, m, f in zip(keys, ms, flags)]
  else:
    ss = _leaves_like(scores, treedef, 'scores')
  new, grown = [], []
  for m, f, n_l, e, s in zip(ms, flags, ns, excl, ss):
    if not f:
      new.append(m)
      grown.append(jnp.zeros(_shape(m), jnp.bool_))
      continue
    candidate = jnp.logical_not(m)
    if e is not None:
      candidate = candidate & jnp.logical_not(e)
    candidate = candidate.reshape(-1)
    n_l = jnp.clip(n_l, 0, jnp.sum(candidate, dtype=jnp.int32))
    g = (_flat_ranks(jnp.asarray(s).reshape(-1), eligible=candidate) < n_l).reshape(m.shape)
    new.append(m | g)
    grown.append(g)
  return (jax.tree_util.tree_unflatten(treedef, new),
          jax.tree_util.tree_unflatten(treedef, grown))


def zero_regrown(params: Any, grown: Any) -> Any:
  """The params with the regrown entries set to exactly 0 (a regrown weight starts from 0).

  Args:
    params: the parameter pytree.
    grown: a bool pytree shaped like ``params`` (the second output of :func:`regrow`).

  Returns:
    ``params`` with every True entry of ``grown`` zeroed; other entries and dtypes unchanged.
  """
  return jax.tree.map(lambda w, g: jnp.where(g, jnp.zeros_like(w), w), params, grown)


def reset_moments(optimizer: optax.GradientTransformation, opt_state: Any, grown: Any) -> Any:
  """Zeroes the optimizer's per-parameter state at the regrown entries.

  A regrown weight restarts from 0, and so must its momentum and Adam moments: the stale ones
  belong to the weight pruned there before (or to nothing) and would kick it on the first step.

  The params-shaped parts of the state are found by ``optax.tree_utils.tree_map_params``, which
  re-runs ``optimizer.init`` on a placeholder: this covers SGD's ``trace``, Adam's ``mu`` and
  ``nu``, ``optax.chain`` and ``optax.inject_hyperparams`` alike, and leaves step counts and
  hyperparameters alone. (``optax.masked`` states, whose params-shaped parts hold
  ``optax.MaskedNode`` leaves, are not supported.)

  Args:
    optimizer: the optax transformation that made ``opt_state``.
    opt_state: its state.
    grown: a bool pytree shaped like the params (the second output of :func:`regrow`).

  Returns:
    ``opt_state`` with every params-shaped leaf zeroed where ``grown`` is True.
  """
  return optax.tree_utils.tree_map_params(
      optimizer, lambda x, g: jnp.where(g, jnp.zeros_like(x), x), opt_state, grown)


def masked_weighted_mean(trees: Any, masks: Any, weights: jax.Array) -> Any:
  """Entry-wise weighted mean over a leading client axis, over the clients holding each entry.

  For every entry, ``sum_k a_k m_k x_k / sum_k a_k m_k`` (FedDST's and FLASH's sparse
  aggregation): a client contributes only where its mask is True, and the result is exactly 0
  where no client with positive weight holds the entry. Masked-out values never enter the sums,
  not even as ``0 * x`` (which would turn an inf or NaN there into NaN).

  Args:
    trees: a pytree whose leaves have a leading client axis of size ``K``.
    masks: a bool pytree of the same structure and shapes.
    weights: the ``K`` client weights ``a_k`` (e.g. sample counts); a client of weight <= 0
      counts as holding nothing.

  Returns:
    A pytree with the structure of ``trees`` and the client axis reduced; every leaf keeps its
    dtype (the sums run in float32 for narrower leaves, in the leaf's dtype otherwise).

  Raises:
    ValueError: when ``weights`` is not 1-D or a leaf's leading axis or mask shape disagrees.
  """
  weights = jnp.asarray(weights)
  if weights.ndim != 1:
    raise ValueError(f'weights must be 1-D (one per client), got shape {weights.shape}.')
  k = weights.shape[0]

  def mean(x, m):
    x, m = jnp.asarray(x), jnp.asarray(m)
    if x.shape[:1] != (k,) or m.shape != x.shape:
      raise ValueError(f'Every leaf needs a leading client axis of {k} and a mask of its shape, '
                       f'got {x.shape} and a mask of {m.shape}.')
    # Sum in float32 at least: bfloat16 sums of many clients lose the weights' precision (and
    # strict promotion has no bfloat16 + float32 rule to lean on).
    wide = jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits >= 32
    dtype = x.dtype if wide else jnp.dtype(jnp.float32)
    # Same rank as x: strict rank promotion allows broadcasting its size-1 axes.
    a = weights.astype(dtype).reshape((k,) + (1,) * (x.ndim - 1))
    zero = jnp.zeros((), dtype)
    # A zero-weight client counts as not holding the entry: 0 * inf would still be NaN.
    use = m.astype(jnp.bool_) & (a > zero)
    num = jnp.sum(jnp.where(use, a * x.astype(dtype), zero), axis=0)
    den = jnp.sum(jnp.where(use, a, zero), axis=0)
    covered = den > zero
    return jnp.where(covered, num / jnp.where(covered, den, jnp.ones((), dtype)), zero
                     ).astype(x.dtype)

  return jax.tree.map(mean, trees, masks)


def apportion(total: Any, shares: jax.Array, caps: jax.Array) -> jax.Array:
  """Splits an integer ``total`` over ``L`` parts in proportion to ``shares``, capped, exactly.

  The quota of part ``l`` is ``shares_l · T / Σ shares`` over the parts not at their cap, where
  ``T`` is what the capped parts leave; a part whose quota reaches its cap is fixed at the cap
  and the rest is shared again (at most ``L`` times: FLASH's "redistribute what the cap cuts").
  Every part gets the floor of its quota, and the parts with the largest remainders one more
  (Hamilton's largest-remainder method; ties by index), so the parts sum exactly to the total.
  If every uncapped share is 0 (or not finite), the rest is shared in proportion to the caps.
  All of it is jit-safe: ``total``, ``shares`` and ``caps`` may be traced.

  Args:
    total: an integer scalar, clipped to ``[0, Σ caps]``.
    shares: ``[L]`` non-negative weights (negative or non-finite ones count as 0).
    caps: ``[L]`` integer upper bounds (e.g. a layer's inactive entries).

  Returns:
    ``[L]`` int32 parts with ``0 <= part_l <= caps_l`` and ``Σ part = clip(total, 0, Σ caps)``.

  Example::

    >>> apportion(10, jnp.array([1.0, 1.0, 2.0]), jnp.array([100, 100, 100])).tolist()
    [3, 2, 5]
    >>> apportion(10, jnp.array([1.0, 1.0, 8.0]), jnp.array([100, 100, 4])).tolist()
    [3, 3, 4]
  """
  shares = jnp.asarray(shares, jnp.float32)
  caps = jnp.maximum(jnp.asarray(caps), 0).astype(jnp.int32)
  if shares.ndim != 1 or caps.shape != shares.shape:
    raise ValueError(f'shares and caps must be 1-D of one length, got {shares.shape} and '
                     f'{caps.shape}.')
  num = shares.shape[0]
  total = jnp.clip(_as_count(total, 'total'), 0, jnp.sum(caps))
  shares = jnp.where(jnp.isfinite(shares) & (shares > 0), shares, 0.0)
  capsf = caps.astype(jnp.float32)
  capped = caps <= 0
  quota = jnp.zeros_like(shares)
  # Each pass fixes the parts whose quota reaches the cap; L + 1 passes reach the fixed point
  # (the last recomputes the quotas after the last new cap).
  for _ in range(num + 1):
    free = (total - jnp.sum(jnp.where(capped, caps, 0))).astype(jnp.float32)
    s = jnp.where(capped, 0.0, shares)
    s = jnp.where(jnp.sum(s) > 0, s, jnp.where(capped, 0.0, capsf))
    quota = jnp.where(capped, capsf, s * free / jnp.maximum(jnp.sum(s), jnp.float32(1e-30)))
    capped = capped | (quota >= capsf)
  quota = jnp.minimum(quota, capsf)
  base = jnp.minimum(jnp.floor(quota).astype(jnp.int32), caps)
  remainder = quota - base.astype(jnp.float32)
  # Float32 quotas sum to the total up to rounding, so the deficit lies in [-1, L]: hand it out
  # by largest remainder (or, if negative, take it back by smallest).
  deficit = total - jnp.sum(base)
  up = _flat_ranks(remainder, eligible=base < caps) < deficit
  down = _flat_ranks(-remainder, eligible=base > 0) < -deficit
  return base + up.astype(jnp.int32) - down.astype(jnp.int32)
