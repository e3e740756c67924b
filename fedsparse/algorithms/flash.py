"""FLASH: lottery-aware sparsity hunting -- SPDST, JMWST, hetero-FLASH and the PDST baseline.

Reference: S. Babakniya, S. Kundu, S. Prakash, Y. Niu, S. Avestimehr. "Revisiting Sparsity
Hunting in Federated Learning: Why does Sparsity Consensus Matter?" TMLR 2023. arXiv:2208.13092.
Official PyTorch code: github.com/SaraBabakN/flash_fl.

Every mode trains a sparse model at density ``d`` of the prunable weights, both ways; they differ
in how the mask is found.

* **NST** (the clients' sparse training, used by stage 1 and JMWST). Plain local SGD, re-masked
  after every step. At the end of every local epoch but the last (with one local epoch: once,
  after its step of 0-based index ``floor(s_k / 2)``, as the official code), the client
  prunes and regrows: the prune rate decays linearly over the client's local run,
  ``r = r0 (1 - steps done / steps of the run)`` (``r0 = 0.25``); every prunable layer drops its
  ``ceil(r · nnz_l)`` smallest-``|w|`` active weights; the total dropped is regrown across the
  layers in proportion to each layer's mean ``|w|`` over its active entries (measured before
  the drop), capped at a layer's inactive entries with what the cap cuts shared again
  (`fedsparse.masks.apportion`: exact counts, largest remainders), uniformly at random among the
  layer's inactive entries (the ones just dropped included); regrown weights start at 0. So a
  client's total count never changes, while its per-layer densities move toward the layers
  whose weights grow.
* **Stage 1** (SPDST and JMWST; once, in ``init``). ``max(floor(f · N), 1)`` clients
  (``f = hunt_fraction = 0.1``), drawn uniformly without replacement, start from one uniformly
  random mask at density ``d`` in every layer and run NST for ``hunt_epochs = 10`` local epochs;
  each uploads only its mask. The server averages the per-layer counts, rescales them to the
  budget ``K = floor(d · P)`` (``δ'_l = min(δ_l · ratio, 1)``, with what the cap at 1 cuts
  shared again over the other layers: `fedsparse.masks.apportion`), and draws a uniformly
  random mask with exactly those counts (the hunters' positions are not used). The global model
  starts from the unmodified ``w0`` under that mask (the hunters' weights are discarded; the
  official code draws new initial weights instead, which here would only add noise between
  paired runs of one seed).
* **SPDST** then trains with that static mask (static-mask FedAvg of the weights).
* **JMWST**: after stage 1, every round (every ``mask_interval`` rounds) the clients run NST and
  upload weights and masks; the server averages the weights and builds the next mask per layer:
  count = the clients' mean count, rescaled to ``K`` (as in stage 1), positions = the largest
  ``|w̄|`` of the averaged weights (ties by index). On other rounds the mask stays.
* **PDST** (the baseline): a uniformly random static mask at density ``d`` in every layer
  (``floor(d · n_l)`` each, so its total can fall short of ``K`` by fewer than ``L`` weights).
* **hetero-FLASH** (``hetero=True``): clients have density budgets ``β d`` with ``β`` in
  ``budgets`` (``0.5, 0.75, 1``). Every round the server derives a budget's mask from the global
  one: per layer the ``floor(β k_l)`` largest-``|w|`` entries of the global mask's ``k_l`` (the
  official code ranks the whole layer of its averaged weights, whose support can exceed the
  mask; here the global weights are always masked, so the two coincide up to that); each
  client trains under its budget's mask. Budgets belong to clients (``budget_assignment=
  'client'``: a seeded, balanced assignment drawn at init, fixed for the run: a device's
  capacity does not change) or to cohort slots (``'slot'``, the official code: slot ``i`` of
  ``K`` gets ``budgets[min(i // (K // B), B - 1)]``, for ``K = 10`` three of 0.5, three of 0.75,
  four of 1). The metrics after each evaluation include every smaller budget's global model
  (``budget_0.5/test_accuracy``, ...).

Aggregation: ``aggregation='mean'`` averages the uploaded sparse weights with zeros where a client
does not hold an entry (the paper and the official code), ``'masked_mean'`` over the clients that
hold each entry; uniform over the cohort (``weighted_aggregation=False``, the paper) or by
sample count (``True``).

Communication (exact, per participant and round; `fedsparse.comm`): the kept weights travel as
float32 both ways (``32 Σ_l k_l`` bits of the client's own mask, plus every dense leaf);
positions are free while both sides hold the mask. A mask message carries its per-layer counts
(``ceil(log2(n_l + 1))`` bits each: FLASH's counts change) and the enumerative code of each
layer (`fedsparse.comm.counted_mask_bits`; the cheapest exact code for a mask of known counts).
Sent: every hunter's stage-1 mask, once, at round 0 (``bits_up_all``; hunters rebuild ``w0``
and the initial random mask from the shared seed, as every client does ``w0``, so the hunters'
download is not counted, while stage 2 counts ``w0 ⊙ m`` down to every participant); the
global mask to a participant that does not hold its current version (SPDST: at its first
participation; JMWST: whenever it changed); a smaller budget's mask to its client every round
(it is derived from the current weights); in JMWST's NST rounds every client's mask, up.
PDST's random mask comes from the shared seed, free. These lengths depend on traced counts, so
the round returns the counts (``payload_*``) and ``host_bits`` computes them on the host.

Choices and deviations from the paper and its official code:

* Mask counts are exact: a prune drops ``ceil(r · nnz)`` computed in integers (`prune_counts`),
  the rate being the fraction ``r0 · (T - s) / T`` after ``s`` of ``T`` steps. The official
  code regrows with Bernoulli draws (about, not exactly, the count), caps each layer's regrowth
  at 99 % of its inactive entries, does not redistribute what stage 1's cap at density 1 cuts,
  and draws Bernoulli random masks; it also keeps just-pruned weights at their old values when
  they are regrown (here 0), adds an "adjusted growth" term to later prunes of a local run and
  lowers the rate of layers below 20 % sparsity. Those refinements of the sparse-learning
  library it builds on are not reproduced. One consequence: a layer that is dense (``conv1``
  and ``conv2`` of MNIST JMWST after a few rounds) still drops its ``ceil(r · n)`` smallest
  weights at every prune and, with no other room, regrows those same entries at 0; the
  official code would leave such a layer alone (rate ``min(sparsity, r) = 0`` when its mean-|w| share is above ``1/L``).
* The official server evaluates the averaged model before re-masking it (its support can exceed
  ``d``); here the global model always holds exactly the mask.
* hetero: the official code trains every client at full budget in round 0 and requires its
  "aggregate" rule for JMWST's next counts (the counts of the averaged weights' support); here
  budgets apply from round 0, and JMWST's counts are always the clients' mean rescaled to ``K``.
* The official SPDST always averages plainly; ``aggregation='masked_mean'`` is offered for
  every mode.
* Which layers are masked: the prunable leaves (conv and dense kernels) minus
  ``exclude_layers`` (comma-separated regular expressions matched against the ``/``-joined
  parameter path). The official code masks every conv of ResNet-18 but not the classifier, and
  only ``conv2`` and ``fc1`` of the MNIST CNN; both configs follow the paper's rule (every
  kernel but the classifier's), ``mnist_flash`` documents the official MNIST choice.
* The learning rate of round ``t`` is ``lr · decay^t`` (the official code sets round ``t``'s
  value after round ``t`` and uses it from round ``t + 1``: one round later).
* Cost under batched strategies: with one local epoch the prune happens after a step whose index
  differs between clients; under ``vmap`` that ``lax.cond`` becomes a select, so every step pays
  for the ranking. Clients run one after another (the CPU default) pay it once.

Config: ``algorithm='flash'`` with the section ``config.flash`` holding :class:`FLASHHparams`'s
fields, e.g. ``--config.flash.mode=jmwst --config.flash.density=0.05``. FLASH averages weights,
not deltas: the server optimizer must stay plain averaging.

Example:

  >>> import jax
  >>> from fedsparse import data as data_lib, engine, models
  >>> from fedsparse.algorithms import flash
  >>> fd, _ = data_lib.make_federated_data(data_lib.load_dataset('digits'), 10, 'iid', seed=0)
  >>> model = models.get_model('mlp', 10)
  >>> params = model.init(jax.random.key(0), jax.numpy.zeros((1, 8, 8, 1)))['params']
  >>> alg = flash(model.apply, cohort=engine.CohortConfig(4, weighted=False),
  ...             local=engine.LocalConfig(batch_size=32, local_epochs=2), learning_rate=0.05,
  ...             mode='jmwst', density=0.2, hunt_epochs=3)
  >>> state = alg.init(jax.random.key(1), params, fd)
  >>> round_fn = engine.jit(alg.round)
  >>> for t in range(2):
  ...   state, metrics = round_fn(state, fd, jax.random.key(t))
  ...   print(t, round(float(metrics['density']), 3))
  0 0.2
  1 0.2
"""

import dataclasses
import fractions as fractions_lib
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsparse import comm
from fedsparse import masks
from fedsparse.algorithms import registry
from fedsparse.algorithms.fedavg import client_learning_rate
from fedsparse.data import FederatedData
from fedsparse.engine import (ENFORCEMENTS, Algorithm, ClientMapping, ClientProgram, CohortConfig,
                              LocalConfig, aggregation_weights, cohort_metrics, draw_cohort, jit,
                              masked_client,
                              run_clients, weighted_mean)

__all__ = ['AGGREGATIONS', 'BUDGET_ASSIGNMENTS', 'MODES', 'FLASHBroadcast', 'FLASHHparams',
           'FLASHState', 'budget_masks', 'budget_models', 'flash', 'flash_layout',
           'hunted_counts', 'mask_consensus', 'mask_message_bits', 'nst_prune_regrow',
           'prune_counts', 'rate_fraction', 'server_average', 'slot_budgets']

MODES = ('spdst', 'jmwst', 'pdst')
AGGREGATIONS = ('mean', 'masked_mean')
BUDGET_ASSIGNMENTS = ('client', 'slot')


_check = registry.check_choice
_check_int = registry.check_int


def _fraction(name: str, value: Any, closed: bool) -> None:
  ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (
      0 < value <= 1 if closed else 0 <= value < 1)
  if not ok:
    raise ValueError(f'{name} must be in {"(0, 1]" if closed else "[0, 1)"}, got {value!r}.')


@dataclasses.dataclass(frozen=True)
class FLASHHparams:
  """FLASH's own hyperparameters (the config section ``flash``); defaults: the paper's (but see
  ``exclude_layers``).

  Attributes:
    mode: one of `MODES`: ``'spdst'`` (hunted densities, static random mask), ``'jmwst'``
      (hunted densities, then a mask rebuilt every round from the clients' NST) or ``'pdst'``
      (the baseline: a random static mask at density ``d`` in every layer).
    density: ``d``, the fraction of prunable weights kept, in (0, 1].
    hunt_fraction: the fraction of the clients that hunt densities in stage 1, in (0, 1].
    hunt_epochs: local epochs of NST in stage 1.
    prune_rate: ``r0``, NST's initial prune rate, decaying linearly to 0 over a client's local
      run, in [0, 1); taken as the exact fraction it denotes (`rate_fraction`).
    aggregation: one of `AGGREGATIONS`: ``'mean'`` (zeros where a client does not hold an entry;
      the paper) or ``'masked_mean'`` (over the clients holding each entry).
    mask_interval: JMWST rebuilds the mask (and its clients run NST) every this many rounds.
    hetero: hetero-FLASH: clients train under density budgets ``β d``.
    budgets: the budget fractions ``β``, comma-separated, each in (0, 1], the largest 1.
    budget_assignment: one of `BUDGET_ASSIGNMENTS`: a budget per client (fixed for the run) or
      per cohort slot (the official code).
    exclude_layers: comma-separated regular expressions; prunable leaves whose ``/``-joined path
      (e.g. ``Dense_1/kernel``) matches one (``re.search``) stay dense. The default ``''``
      masks every kernel, the classifier's too; the paper's rule (not the classifier) needs the
      classifier's name, which depends on the model (``'^Dense_1/'`` for MNISTNet, as the FLASH
      configs set it).
    mask_enforcement: one of `fedsparse.engine.ENFORCEMENTS`: ``'step'`` trains ``w`` and
      re-masks after every step (the official code), ``'forward'`` trains ``w ⊙ m``.
  """
  mode: str = 'spdst'
  density: float = 0.05
  hunt_fraction: float = 0.1
  hunt_epochs: int = 10
  prune_rate: float = 0.25
  aggregation: str = 'mean'
  mask_interval: int = 1
  hetero: bool = False
  budgets: str = '0.5,0.75,1'
  budget_assignment: str = 'client'
  exclude_layers: str = ''
  mask_enforcement: str = 'step'

  def __post_init__(self):
    _check('mode', self.mode, MODES)
    _fraction('density', self.density, closed=True)
    _fraction('hunt_fraction', self.hunt_fraction, closed=True)
    _fraction('prune_rate', self.prune_rate, closed=False)
    _check_int('hunt_epochs', self.hunt_epochs, 1)
    _check_int('mask_interval', self.mask_interval, 1)
    _check('aggregation', self.aggregation, AGGREGATIONS)
    _check('budget_assignment', self.budget_assignment, BUDGET_ASSIGNMENTS)
    _check('mask_enforcement', self.mask_enforcement, ENFORCEMENTS)
    if not isinstance(self.hetero, bool):
      raise ValueError(f'hetero must be a bool, got {self.hetero!r}.')
    fractions = self._parsed_budgets()  # validated even when unused: a typo fails now
    if sorted(set(fractions)) != list(fractions) or fractions[-1] != 1:
      raise ValueError(f'budgets must be increasing fractions of the density ending at 1, got '
                       f'{self.budgets!r}.')
    for pattern in self.exclude_patterns:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f'exclude_layers: {pattern!r} is not a regular expression ({e}).') from e

  @property
  def budget_fractions(self) -> tuple[float, ...]:
    """The budgets ``β`` as floats (``(1.0,)`` unless ``hetero``)."""
    return self._parsed_budgets() if self.hetero else (1.0,)

  def _parsed_budgets(self) -> tuple[float, ...]:
    try:
      values = tuple(float(v) for v in str(self.budgets).split(','))
    except ValueError:
      raise ValueError(f'budgets must be comma-separated numbers, e.g. "0.5,0.75,1", got '
                       f'{self.budgets!r}.') from None
    for v in values:
      _fraction('every budget', v, closed=True)
    return values

  @property
  def exclude_patterns(self) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(self.exclude_layers).split(',') if p.strip())


class FLASHState(NamedTuple):
  """Server state."""
  params: Any  # global weights, exactly 0 outside ``mask``
  mask: Any  # bool pytree: the global (full-budget) mask
  round: jax.Array  # int32 scalar, 0-based
  mask_version: jax.Array  # int32: how many times the global mask has changed since stage 1
  client_mask_version: jax.Array  # [N] int32: the version each client holds (-1: none)
  client_budget: jax.Array  # [N] int32: each client's budget index (budget_assignment='client')
  hunters: jax.Array  # [H] int32: the stage-1 clients (PDST: [-1], none)
  hunt_counts: jax.Array  # [H, L] int32: their uploaded masks' per-layer counts


class FLASHBroadcast(NamedTuple):
  """What the server sends the cohort."""
  params: Any
  learning_rate: jax.Array  # float32 scalar
  masks: Any  # bool pytree, every leaf with a leading [B] budget axis
  budget: jax.Array  # [K] int32: each cohort slot's budget index
  nst: jax.Array  # bool scalar: clients prune and regrow this round


# --------------------------------------------------------------------------------------------------
# The pieces, public for tests and reuse.


def rate_fraction(rate: float) -> fractions_lib.Fraction:
  """A prune rate as the exact fraction it denotes: ``0.225`` is 9/40 (not float32's 0.2249999).

  The nearest fraction with a denominator of at most 1,000, so every rate written with up to
  three decimals is exact.
  """
  return fractions_lib.Fraction(str(rate)).limit_denominator(1000)


def prune_counts(nnz: jax.Array, numerator: Any, denominator: Any) -> jax.Array:
  """``ceil(nnz · numerator / denominator)`` exactly, in int32 (jit-safe, traced values allowed).

  Float32 alone cannot decide it: ``9/40 · 400`` is exactly 90, but ``0.225 · 400`` rounds to
  either side, and above ~10^5 weights a true value a hair above an integer is indistinguishable
  from one a hair below. So float32 only estimates ``x``; the integer remainder
  ``nnz · numerator - estimate · denominator`` -- small, since the estimate is within a few units
  of ``x``, so int32's wrap-around in the two products cancels -- then decides exactly. Exact
  while layers hold fewer than 2^24 weights and ``denominator`` stays below 10^8.

  Args:
    nnz: int32 counts (any shape).
    numerator: int, ``>= 0``.
    denominator: int, ``> 0``.

  Returns:
    int32 counts of ``nnz``'s shape.
  """
  nnz = jnp.asarray(nnz, jnp.int32)
  num, den = jnp.asarray(numerator, jnp.int32), jnp.asarray(denominator, jnp.int32)
  ratio = num.astype(jnp.float32) / den.astype(jnp.float32)
  estimate = jnp.round(nnz.astype(jnp.float32) * ratio).astype(jnp.int32)
  remainder = nnz * num - estimate * den
  return estimate - jnp.floor_divide(-remainder, den)  # estimate + ceil(remainder / den)


def nst_prune_regrow(params: Any, mask: Any, rate: float | tuple[Any, Any], prunable: Any,
                     key: jax.Array) -> tuple[Any, Any, Any]:
  """One NST prune-and-regrow of a client (FLASH's epoch-end step).

  Args:
    params: the client's weights (0 outside ``mask``).
    mask: its bool mask.
    rate: the prune rate ``r``: a Python number (taken as `rate_fraction`) or a pair
      ``(numerator, denominator)`` of int scalars, traced allowed.
    prunable: the prunable flags.
    key: PRNG key of the random regrowth.

  Returns:
    ``(params, mask, grown)``: every prunable layer dropped its ``ceil(r · nnz_l)``
    smallest-``|w|`` active weights; their total regrew across the layers in proportion to each
    layer's mean ``|w|`` over its active entries before the drop, capped at the layer's
    inactive entries (`fedsparse.masks.apportion`), uniformly at random among them, at weight 0.
    ``grown`` marks the regrown entries (their optimizer moments must be reset). The total
    count is unchanged.
  """
  nnz = masks.count_vector(mask, prunable)
  if not isinstance(rate, tuple):
    rate = rate_fraction(rate)
    rate = (rate.numerator, rate.denominator)
  drop = jnp.minimum(prune_counts(nnz, *rate), nnz)
  mean_abs = jnp.stack([
      jnp.sum(jnp.where(m, jnp.abs(w), 0.0)) / jnp.maximum(jnp.sum(m), 1).astype(jnp.float32)
      for w, m, f in zip(jax.tree.leaves(params), jax.tree.leaves(mask), jax.tree.leaves(prunable))
      if f])
  kept = masks.prune_smallest(params, mask, masks.layer_tree(drop, params, prunable), prunable)
  room = jnp.asarray(masks.prunable_sizes(params, prunable), jnp.int32) - (nnz - drop)
  grow = masks.apportion(jnp.sum(drop), mean_abs, room)
  new_mask, grown = masks.regrow(kept, masks.layer_tree(grow, params, prunable), prunable, key=key)
  return masks.apply(masks.zero_regrown(params, grown), new_mask), new_mask, grown


def hunted_counts(client_counts: jax.Array, sizes: Any, total: Any) -> jax.Array:
  """Stage 1's (and JMWST's) per-layer counts: the clients' mean count, rescaled to the budget.

  Args:
    client_counts: ``[C, L]`` per-layer counts of the clients' masks.
    sizes: the ``L`` layer sizes ``n_l``.
    total: the budget ``K = floor(d · Σ n_l)`` (`fedsparse.masks.keep_count`), traced allowed.

  Returns:
    ``[L]`` int32 counts summing to ``K = floor(d · Σ n_l)``: in proportion to the mean counts
    (``δ'_l = δ_l · ratio``), each at most ``n_l``, with what that cap cuts shared over the other
    layers (`fedsparse.masks.apportion`).
  """
  sizes = [int(n) for n in sizes]
  mean = jnp.mean(jnp.asarray(client_counts).astype(jnp.float32), axis=0)
  return masks.apportion(total, mean, jnp.asarray(sizes, jnp.int32))


def budget_masks(params: Any, mask: Any, fractions: tuple[float, ...], prunable: Any) -> Any:
  """hetero-FLASH's budget masks: per layer the ``floor(β k_l)`` largest ``|w|`` of the mask.

  Args:
    params: the global weights.
    mask: the global mask (``k_l`` entries per prunable layer).
    fractions: the budgets ``β`` (1 gives ``mask`` itself).
    prunable: the prunable flags.

  Returns:
    A bool pytree whose leaves have a leading ``[B]`` axis, one mask per budget (non-prunable
    leaves all True).
  """
  counts = masks.layer_count_tree(mask, prunable)
  out = []
  for beta in fractions:
    if beta == 1:
      out.append(mask)
      continue
    # floor(β k) in integers (β as the fraction p / q it was written as): exact for any k.
    ratio = fractions_lib.Fraction(str(beta)).limit_denominator(10_000)
    ks = jax.tree.map(lambda k, p=ratio.numerator, q=ratio.denominator: (k * p) // q, counts)
    scores = jax.tree.map(lambda w, m: jnp.where(m, jnp.abs(w), -1.0), params, mask)
    out.append(masks.layerwise_topk_traced(scores, prunable, ks))
  return jax.tree.map(lambda *ms: jnp.stack(ms), *out)


def slot_budgets(cohort_size: int, num_budgets: int) -> np.ndarray:
  """The official code's budgets by cohort slot: slot ``i`` gets ``min(i // (K // B), B - 1)``."""
  if cohort_size < num_budgets:
    raise ValueError(f'budget_assignment=slot needs at least one cohort slot per budget: '
                     f'{cohort_size} clients per round, {num_budgets} budgets.')
  return np.minimum(np.arange(cohort_size) // (cohort_size // num_budgets),
                    num_budgets - 1).astype(np.int32)


def _client_budgets(key: jax.Array, num_clients: int, num_budgets: int) -> jax.Array:
  """A balanced assignment of budgets to the population, in a seeded random order."""
  position = jnp.argsort(jax.random.permutation(key, num_clients))
  return jnp.minimum(position * num_budgets // num_clients, num_budgets - 1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# The client.


def _flash_program(apply_fn: Callable[..., jax.Array], local: LocalConfig, hp: FLASHHparams,
                   is_prunable: Callable[..., bool]) -> ClientProgram:
  """The client: SGD under its budget's mask, with NST's prune and regrow when ``shared.nst``.

  NST prunes at the end of every local epoch but the last; with one local epoch there is no
  epoch boundary, and the official code prunes once, after the step in the middle of the
  client's run.
  """
  r0 = rate_fraction(hp.prune_rate)

  def start(ctx):
    budget = ctx.shared.budget[ctx.client.slot]
    mask = jax.tree.map(lambda m: m[budget], ctx.shared.masks)
    return masks.apply(ctx.shared.params, mask), mask

  def prune_regrow(state, ctx, steps_done, key):
    # r0 · (1 - s / T) as an exact fraction, so that the prune count is exactly ceil(r · nnz).
    total = jnp.maximum(ctx.client.num_steps, 1)
    rate = (r0.numerator * jnp.maximum(total - steps_done, 0), r0.denominator * total)
    return nst_prune_regrow(state.params, state.mask, rate,
                            masks.prunable_leaves(state.params, is_prunable), key)

  one_epoch = local.num_epochs == 1
  return masked_client(
      apply_fn, local, enforce=hp.mask_enforcement, start=start, rewire=prune_regrow,
      rewire_at_epoch_end=None if one_epoch else lambda ctx, info: ctx.shared.nst & ~info.last,
      rewire_after_step=None if not one_epoch else lambda ctx, info: ctx.shared.nst & (
          info.step_in_epoch == ctx.client.steps_per_epoch // 2))


def _prunable_predicate(hp: FLASHHparams, is_prunable: Callable[..., bool] | None
                        ) -> Callable[[tuple[str, ...], Any], bool]:
  base = is_prunable or masks.default_prunable
  patterns = [re.compile(p) for p in hp.exclude_patterns]

  def predicate(path, leaf):
    return base(path, leaf) and not any(p.search('/'.join(path)) for p in patterns)
  return predicate


def _check_exclusions(hp: FLASHHparams, params: Any, is_prunable: Callable[..., bool] | None
                      ) -> None:
  """Raises for an ``exclude_layers`` pattern that matches no prunable leaf (e.g. a typo)."""
  base = is_prunable or masks.default_prunable
  paths = ['/'.join(path) for path, leaf in zip(masks.leaf_paths(params), jax.tree.leaves(params))
           if base(path, leaf)]
  for pattern in hp.exclude_patterns:
    if not any(re.search(pattern, path) for path in paths):
      raise ValueError(f'exclude_layers: {pattern!r} matches none of the prunable leaves '
                       f'({", ".join(paths)}).')
  if paths and all(any(re.search(p, path) for p in hp.exclude_patterns) for path in paths):
    raise ValueError(f'exclude_layers {hp.exclude_layers!r} excludes every prunable leaf '
                     f'({", ".join(paths)}): FLASH needs at least one masked layer.')


def _prunable_names(params: Any, predicate: Callable[..., bool]) -> list[str]:
  """The ``/``-joined paths of the masked leaves, in `jax.tree.leaves` order."""
  flags = jax.tree.leaves(masks.prunable_leaves(params, predicate))
  return ['/'.join(path) for path, f in zip(masks.leaf_paths(params), flags) if f]


# --------------------------------------------------------------------------------------------------
# The algorithm.


def flash(apply_fn: Callable[..., jax.Array], *, cohort: CohortConfig, local: LocalConfig,
          learning_rate: float, lr_decay: float = 1.0,
          server_optimizer: optax.GradientTransformation | None = None,
          mapping: ClientMapping = ClientMapping(),
          is_prunable: Callable[..., bool] | None = None, layout: Any = None,
          **hparams: Any) -> Algorithm:
  """FLASH (Babakniya et al., TMLR 2023): SPDST, JMWST, hetero-FLASH and PDST.

  Args:
    apply_fn: the flax ``Module.apply`` of the model.
    cohort: cohort size, sampling and aggregation weighting (``weighted=False``: the paper).
    local: local training settings (plain SGD in the paper).
    learning_rate: client learning rate at round 0 (also stage 1's).
    lr_decay: per-round decay of the client learning rate.
    server_optimizer: must be None: FLASH averages weights (no server step).
    mapping: how clients are mapped (stage 1 too).
    is_prunable: optional predicate ``(path, leaf) -> bool`` of the prunable leaves
      (default: conv and dense kernels), before ``exclude_layers``.
    layout: :func:`flash_layout`'s counts, possibly traced, to use instead of deriving them
      from ``density`` (a sweep over densities sets it).
    **hparams: the fields of :class:`FLASHHparams`.

  Returns:
    An :class:`~fedsparse.engine.Algorithm` with :class:`FLASHState`.
  """
  hp = FLASHHparams(**hparams)
  registry.check_weight_averaging('FLASH', server_optimizer)
  registry.check_learning_rates(learning_rate, lr_decay)
  fractions = hp.budget_fractions
  k = cohort.clients_per_round
  by_slot = None
  if hp.hetero and hp.budget_assignment == 'slot':
    by_slot = slot_budgets(k, len(fractions))
  predicate = _prunable_predicate(hp, is_prunable)
  program = _flash_program(apply_fn, local, hp, predicate)
  hunt_local = dataclasses.replace(local, local_epochs=hp.hunt_epochs, local_steps=0)
  hunt_program = _flash_program(apply_fn, hunt_local, hp, predicate)

  def shapes(params):
    prunable = masks.prunable_leaves(params, predicate)
    sizes = masks.prunable_sizes(params, prunable)
    return prunable, sizes, comm.num_elements(params) - sum(sizes)

  def counts(params):
    return layout if layout is not None else flash_layout(hp, params, predicate)

  def hunt(params, start, hunters, keys, data):
    """Stage 1: the hunters' NST from the start mask; their masks' per-layer counts [H, L]."""
    prunable = masks.prunable_leaves(params, predicate)
    shared = FLASHBroadcast(params, jnp.float32(learning_rate),
                            jax.tree.map(lambda m: m[None], start),
                            jnp.zeros((hunters.shape[0],), jnp.int32), jnp.bool_(True))
    result = run_clients(hunt_program, shared, hunters, keys, data, hunt_local, mapping)
    _, client_masks = result.outputs
    return jax.vmap(lambda m: masks.count_vector(m, prunable))(client_masks)

  def init(key: jax.Array, params: Any, data: FederatedData | None = None) -> FLASHState:
    if data is None:
      raise ValueError('FLASH.init needs the federated data: stage 1 trains on it, and the '
                       'server tracks which mask every client of the population holds.')
    _check_exclusions(hp, params, is_prunable)
    counts(params)  # fails for a density that keeps no weight
    # Under a trace (the run loop's eval_shape check) the caller compiles: no nested options.
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((params, key)))
    return (init_state if traced else init_jit)(key, params, data)

  def init_state(key: jax.Array, params: Any, data: FederatedData) -> FLASHState:
    prunable, sizes, _ = shapes(params)
    plan = counts(params)
    n = data.num_clients
    start_key, hunter_key, client_key, final_key, budget_key = jax.random.split(key, 5)
    start = masks.layerwise_topk_traced(masks.random_scores(start_key, params, prunable),
                                        prunable, plan['start'])
    if hp.mode == 'pdst':
      mask = start
      # No hunters: one placeholder row with id -1 (checkpoints cannot hold empty arrays).
      hunters = jnp.full((1,), -1, jnp.int32)
      hunt_counts = jnp.zeros((1, len(sizes)), jnp.int32)
    else:
      num_hunters = max(int(math.floor(hp.hunt_fraction * n + 1e-9)), 1)
      hunters = jax.random.permutation(hunter_key, n)[:num_hunters].astype(jnp.int32)
      keys = jax.random.split(client_key, num_hunters)
      hunt_counts = hunt(params, start, hunters, keys, data)
      hunted = hunted_counts(hunt_counts, sizes, plan['total'])
      empty = jax.tree.map(lambda m, f: jnp.zeros_like(m) if f else m, start, prunable)
      mask, _ = masks.regrow(empty, masks.layer_tree(hunted, params, prunable), prunable,
                             key=final_key)
    # PDST's mask comes from the shared seed (every client holds it); a hunted one must travel.
    held = 0 if hp.mode == 'pdst' else -1
    budgets = (_client_budgets(budget_key, n, len(fractions)) if hp.hetero
               else jnp.zeros((n,), jnp.int32))
    return FLASHState(params=masks.apply(params, mask), mask=mask,
                      round=jnp.zeros((), jnp.int32), mask_version=jnp.zeros((), jnp.int32),
                      client_mask_version=jnp.full((n,), held, jnp.int32),
                      client_budget=budgets, hunters=hunters, hunt_counts=hunt_counts)

  # Stage 1 and the masks around it in one program: run eagerly, its hundred small operations
  # would each compile on their own.
  init_jit = jit(init_state, batched_clients=mapping.batches_clients)

  def round_fn(state: FLASHState, data: FederatedData, key: jax.Array
               ) -> tuple[FLASHState, dict[str, jax.Array]]:
    prunable, sizes, dense = shapes(state.params)
    budget_total = counts(state.params)['total']
    drawn = draw_cohort(key, data.num_clients, cohort)
    lr = client_learning_rate(learning_rate, lr_decay, state.round)
    nst = jnp.bool_(hp.mode == 'jmwst') & (state.round % hp.mask_interval == 0)
    stacked = budget_masks(state.params, state.mask, fractions, prunable)
    budget = (jnp.asarray(by_slot) if by_slot is not None
              else state.client_budget[drawn.clients])
    shared = FLASHBroadcast(state.params, lr, stacked, budget, nst)
    result = run_clients(program, shared, drawn.clients, drawn.keys, data, local, mapping)
    client_params, client_masks = result.outputs

    weights = aggregation_weights(data.client_size[drawn.clients], cohort.weighted)
    averaged = server_average(client_params, client_masks, weights, hp.aggregation)
    count_vectors = jax.vmap(lambda m: masks.count_vector(m, prunable))
    up_counts = count_vectors(client_masks)  # [K, L]
    # A cond, not a select: the consensus ranks every layer, which rounds without NST skip.
    mask = jax.lax.cond(nst, lambda: mask_consensus(averaged, up_counts, budget_total,
                                                    prunable), lambda: state.mask)
    params = masks.apply(averaged, mask)
    # Every mask keeps exactly K entries, so it changed iff it gained one.
    gained, turnover = masks.turnover(mask, state.mask, prunable)

    # Bits: values in jit; mask messages (counts + enumerative code) on the host.
    down_counts = count_vectors(stacked)[budget]  # [K, L]
    full = budget == len(fractions) - 1
    stale = masks.stale_copies(state.client_mask_version, state.mask_version, drawn.clients)
    down_sent = jnp.where(full, stale, True)
    up_sent = jnp.broadcast_to(nst, (k,))
    values_up = comm.FLOAT_BITS * (jnp.sum(up_counts, axis=1) + dense)
    values_down = comm.FLOAT_BITS * (jnp.sum(down_counts, axis=1) + dense)
    # The largest message: every value, and a mask costs at most a bitmap plus its counts.
    comm.check_int32(comm.FLOAT_BITS * (sum(sizes) + dense) + sum(sizes)
                     + comm.counted_mask_bits(sizes, sizes))
    # Clients that downloaded the full mask now hold its version (a smaller budget's mask is
    # derived anew every round, so holding it is never enough).
    client_version = masks.delivered(state.client_mask_version, state.mask_version,
                                     drawn.clients, full)
    n = data.num_clients
    metrics = cohort_metrics(result, drawn.clients, weights, bits_up=values_up,
                             bits_down=values_down)
    metrics.update({
        'bits_up_all': jnp.zeros((n,), jnp.int32), 'bits_down_all': jnp.zeros((n,), jnp.int32),
        'density': masks.density(mask, prunable),
        'mask_turnover': turnover,
        'payload_sizes': jnp.asarray(sizes, jnp.int32),
        'payload_up_counts': up_counts, 'payload_up_sent': up_sent,
        'payload_down_counts': down_counts, 'payload_down_sent': down_sent,
        'payload_hunt': state.round == 0, 'payload_hunters': state.hunters,
        'payload_hunt_counts': state.hunt_counts,
    })
    # Per-layer densities of the global mask (stage 1's hunted ones from round 1 on; JMWST's as
    # its mask moves), logged as scalars named by the layer's path.
    masked = [m for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(prunable)) if f]
    for name, n, m in zip(_prunable_names(state.params, predicate), sizes, masked):
      metrics[f'layer_density/{name}'] = jnp.sum(m, dtype=jnp.float32) / n
    new_state = state._replace(params=params, mask=mask, round=state.round + 1,
                               mask_version=state.mask_version + (gained > 0).astype(jnp.int32),
                               client_mask_version=client_version)
    return new_state, metrics

  return Algorithm(init=init, round=round_fn, eval_params=lambda state, key: state.params,
                   host_bits=mask_message_bits,
                   eval_variants=lambda state, key: budget_models(state, fractions, predicate),
                   layout=lambda params: flash_layout(hp, params, predicate))


def budget_models(state: FLASHState, fractions: tuple[float, ...],
                  predicate: Callable[..., bool]) -> dict[str, Any]:
  """hetero-FLASH's global model at each smaller budget, named ``budget_β`` (evaluated beside
  the full model, `fedsparse.engine.Algorithm.eval_variants`)."""
  if len(fractions) == 1:
    return {}
  prunable = masks.prunable_leaves(state.params, predicate)
  stacked = budget_masks(state.params, state.mask, fractions, prunable)
  return {f'budget_{beta:g}': masks.apply(state.params, jax.tree.map(lambda m: m[i], stacked))
          for i, beta in enumerate(fractions[:-1])}


def server_average(client_params: Any, client_masks: Any, weights: jax.Array,
                   aggregation: str) -> Any:
  """The server's average of the uploaded weights: plain (``'mean'``, the official code), or
  per entry over the clients that hold it (``'masked'``)."""
  if aggregation == 'mean':
    return weighted_mean(client_params, weights)
  return masks.masked_weighted_mean(client_params, client_masks, weights)


def mask_consensus(averaged: Any, client_counts: jax.Array, total: Any, prunable: Any) -> Any:
  """JMWST's new global mask: per layer the clients' mean count rescaled to the budget
  (`hunted_counts`), filled with the largest ``|w̄|`` of the averaged weights."""
  sizes = masks.prunable_sizes(averaged, prunable)
  hunted = hunted_counts(client_counts, sizes, total)
  return masks.layerwise_topk_traced(jax.tree.map(jnp.abs, averaged), prunable,
                                     masks.layer_tree(hunted, averaged, prunable))


def mask_message_bits(metrics: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The round's mask messages in bits, on the host (`fedsparse.engine.Algorithm.host_bits`).

  Each message is a mask's per-layer counts plus its enumerative code
  (`fedsparse.comm.counted_mask_bits`): the cohort's uploads in NST rounds, the downloads of
  stale or budget masks, and stage 1's hunters' uploads in round 0.
  """
  sizes = [int(s) for s in metrics['payload_sizes']]

  def message(counts):
    return comm.counted_mask_bits(sizes, [int(c) for c in counts])

  up = np.array([message(c) if s else 0 for c, s in zip(metrics['payload_up_counts'],
                                                       metrics['payload_up_sent'])], np.int64)
  down = np.array([message(c) if s else 0 for c, s in zip(metrics['payload_down_counts'],
                                                         metrics['payload_down_sent'])],
                  np.int64)
  up_all = np.zeros(np.shape(metrics['bits_up_all']), np.int64)
  if bool(metrics['payload_hunt']):
    for client, counts in zip(metrics['payload_hunters'], metrics['payload_hunt_counts']):
      if client >= 0:  # -1: PDST's placeholder
        up_all[int(client)] += message(counts)
  return {'bits_up': up, 'bits_down': down, 'bits_up_all': up_all}


def flash_layout(hp: FLASHHparams, params: Any, predicate: Callable[..., bool]) -> dict[str, Any]:
  """What FLASH derives from its density and the model's shapes, exactly, on the host.

  The budgets ``β`` are not part of it: their number is an axis of the round's arrays and their
  values name the logged models (``budget_0.5/test_accuracy``), so members of a sweep that
  differ in ``budgets`` compile apart.

  Args:
    hp: the hyperparameters.
    params: the model's params (only shapes are read).
    predicate: the prunable predicate, ``exclude_layers`` applied.

  Returns:
    ``total``: ``K = keep_count(d, P)`` over the prunable weights (stage 1's and JMWST's
    budget); ``start``: per-leaf counts ``keep_count(d, n_l)`` of the uniform random start mask
    (PDST's static mask).

  Raises:
    ValueError: when the density keeps no weight (for PDST: of some layer).
  """
  prunable = masks.prunable_leaves(params, predicate)
  sizes = masks.prunable_sizes(params, prunable)
  if masks.keep_count(hp.density, sum(sizes)) < 1:
    raise ValueError(f'density {hp.density} keeps no weight of the {sum(sizes)} prunable ones; '
                     f'use at least {masks.smallest_density(sum(sizes))}.')
  if hp.mode == 'pdst':
    empty = [name for name, n in zip(_prunable_names(params, predicate), sizes)
             if masks.keep_count(hp.density, n) < 1]
    if empty:
      raise ValueError(f'density {hp.density} keeps no weight of {", ".join(empty)} under '
                       f'PDST\'s uniform per-layer density; use at least '
                       f'{masks.smallest_density(min(sizes))}.')
  return {'total': masks.keep_count(hp.density, sum(sizes)),
          'start': masks.layer_counts(params, prunable, hp.density)}


def _check_run(hp: FLASHHparams, config: Any) -> None:
  registry.check_weight_averaging('FLASH', config=config)
  if hp.hetero and hp.budget_assignment == 'slot':
    slot_budgets(config.clients_per_round, len(hp.budget_fractions))


def _build(hp: FLASHHparams, common: registry.Common) -> Algorithm:
  kwargs = common.kwargs()
  kwargs['server_optimizer'] = None  # plain averaging: _check_run refused anything else
  return flash(common.apply_fn, **kwargs, **dataclasses.asdict(hp))


registry.register(registry.Spec(
    name='flash', hparams=FLASHHparams, check=_check_run, build=_build, traceable=('density',),
    summary='FLASH (Babakniya et al., 2023): sparsity hunting -- SPDST, JMWST, hetero, PDST'))
