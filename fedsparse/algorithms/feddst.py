"""FedDST: federated dynamic sparse training -- clients prune and regrow, the server merges masks.

Reference: S. Bibikar, H. Vikalo, Z. Wang, X. Chen. "Federated Dynamic Sparse Training: Computing
Less, Communicating Less, Yet Learning Better." AAAI 2022. arXiv:2112.09824. Official PyTorch
code: github.com/bibikar/feddst.

The model stays sparse throughout: at sparsity ``S`` every prunable layer (conv and dense
kernels; biases stay dense) keeps a fixed number ``k_l`` of weights, allocated over the layers
by RigL's Erdős–Rényi-Kernel rule. Both directions carry only the kept weights.

* **Init.** Magnitude-prune ``w0`` layer by layer to the ``k_l`` largest ``|w|``
  (``initial_mask='random'``: a uniformly random mask with the same counts -- the RandomMask
  baseline, registered as ``random_mask``).
* **Round t.** Sample ``K`` clients; each starts from the global sparse weights and runs ``E``
  local epochs of SGD, re-masking after every step (``mask_enforcement='step'``, the official
  code; ``'forward'`` trains ``w ⊙ m`` instead). On a readjustment round -- ``t = 1, 1 + ΔR,
  1 + 2ΔR, …`` while ``t < R_end`` (``R_end = R / 2`` by default; ``t`` counts from 0 as the
  official code's ``server_round``, so ``metrics.jsonl``'s 1-based rounds 2, 12, 22, …) -- the
  client readjusts its mask at the end of its last local epoch: in every layer it prunes the
  ``n_l = k_l - floor((1 - α_t) k_l)`` smallest-``|w|`` active weights, then regrows ``n_l``
  inactive entries with the largest ``|∂L/∂w|`` of its last minibatch (the dense gradient, also
  at pruned positions), so each layer again holds exactly ``k_l``. Regrown weights start at 0
  and their optimizer moments are reset. ``α_t = (α / 2)(1 + cos(π t / R_end))``.
* **Server.** Per entry, ``w̄ = Σ_k n_k m_k w_k / Σ_k n_k m_k`` over the clients that hold the
  entry (0 where none does); the new mask keeps the entries whose sample-weighted vote
  ``Σ_k n_k m_k / Σ_k n_k`` exceeds ``vote_threshold`` (0: the union of the client masks; 0.5:
  a majority), magnitude-pruned back to ``k_l`` per layer where that is more (equal magnitudes
  by their votes: weights regrown at the end of local training arrive as 0, and the ones more
  clients regrew win) -- and, where a strict threshold leaves fewer, topped up with the largest
  ``|w̄|`` -- so after every round the global mask holds exactly ``k_l`` in every layer.

Communication (exact, per participant and round; `fedsparse.comm`): the kept weights go down and
up as float32 (``32 Σ_l k_l`` bits) with every dense bias; positions are free while both sides
hold the same mask. A mask travels with its per-layer counts known to the receiver, in the
cheapest of `fedsparse.comm.MASK_ENCODINGS`, which both sides know from the counts (in
practice the enumerative code, ``Σ_l ceil(log2 C(n_l, k_l))`` bits, a real coder:
`fedsparse.comm.enumerative_encode`): every client uploads its readjusted mask
on a readjustment round, and downloads the global mask whenever it changed since the client last
received it -- the server keeps, per client of the population, which version of the mask it
holds (every client starts with the initial mask, rebuilt from the shared seed for free, as
``w0``). The metrics ``mask_bits`` (one mask message) and ``mask_encoding`` (its index in
`fedsparse.comm.MASK_ENCODINGS`) state the encoding.

Choices and deviations from the paper and its official code; the official code's behaviour is an
option where it changes results:

* ``constant_alpha=True`` prunes with ``α`` on every readjustment round, as the official code
  does (it computes the annealed ``α_t`` but never passes it to the clients).
* ``allocation='proportional'`` is the official code's ERK variant (layer sparsity proportional
  to ``1 - ERK score``); the default ``'erk'`` is RigL's, which the paper cites.
* The official code regrows the top ``|∂L/∂w|`` over *all* entries of a layer, so it re-zeroes
  active weights and regrows fewer than it pruned; here only inactive entries regrow (the
  entries pruned a moment before included) and the counts are exact.
* The server's magnitude re-prune breaks ties by votes; in the official code, ``torch.topk``
  picks among the equal (zero) regrown weights in no defined order.
* The official code recomputes the last minibatch's gradient after the epoch's last SGD step;
  here the gradient is that step's own (one SGD step earlier), which the loop already has.
* Sampling is without replacement unless the config's ``sample_with_replacement`` (the official
  code samples with replacement); the official models' double softmax is not reproduced.
* Mask traffic: the official code charges a readjusted mask's upload as ``(1 - S)`` bits per
  prunable weight, which no decodable code achieves, and a stale mask's download as one bit
  per prunable weight; here both are the enumerative code's exact length (a real coder:
  `fedsparse.comm.enumerative_encode`). Accounting is per cohort slot: with replacement, a
  client drawn twice in a round counts as two participants, each paying its traffic.
* Per-layer prune counts: every layer prunes ``α_t`` of its kept weights. The official code
  re-prunes each layer to its allocation at sparsity ``S + (1 - S) α``, which under its
  proportional allocation takes a slightly different fraction from each layer (the same
  overall count).
* Not included: PruneFL (Jiang et al., 2022), the paper's other baseline. Its server-side
  readjustment needs per-round aggregated gradients and measured per-layer compute times, more
  than the few lines that would make it a fair baseline here.

Config: ``algorithm='feddst'`` with the section ``config.feddst`` holding :class:`FedDSTHparams`'s
fields, e.g. ``--config.feddst.sparsity=0.8``; ``algorithm='random_mask'`` for the RandomMask
baseline (section ``config.random_mask``). FedDST averages weights, not deltas: the server
optimizer must stay plain averaging.

Example:

  >>> import jax
  >>> from fedsparse import data as data_lib, engine, masks, models
  >>> from fedsparse.algorithms import feddst
  >>> fd, _ = data_lib.make_federated_data(data_lib.load_dataset('digits'), 8, 'iid', seed=0)
  >>> model = models.get_model('mlp', 10)
  >>> params = model.init(jax.random.key(0), jax.numpy.zeros((1, 8, 8, 1)))['params']
  >>> alg = feddst(model.apply, cohort=engine.CohortConfig(4),
  ...              local=engine.LocalConfig(batch_size=32), learning_rate=0.05,
  ...              sparsity=0.8, alpha=0.2, readjust_every=1, readjust_end=4)
  >>> state = alg.init(jax.random.key(1), params, fd)
  >>> round_fn = engine.jit(alg.round)
  >>> for t in range(3):
  ...   state, metrics = round_fn(state, fd, jax.random.key(t))
  ...   print(t, bool(metrics['readjusted']), float(metrics['density']) < 0.21)
  0 False True
  1 True True
  2 True True
"""

import dataclasses
import math
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
                              LocalConfig, aggregation_weights, cohort_metrics, draw_cohort,
                              masked_client,
                              run_clients)

__all__ = ['INITIAL_MASKS', 'FedDSTBroadcast', 'FedDSTHparams', 'FedDSTState',
           'RandomMaskHparams', 'alpha_schedule', 'client_readjust', 'feddst', 'feddst_layout',
           'prune_counts', 'readjust_rounds', 'server_merge']

INITIAL_MASKS = ('magnitude', 'random')


_check = registry.check_choice
_check_int = registry.check_int


@dataclasses.dataclass(frozen=True)
class FedDSTHparams:
  """FedDST's own hyperparameters (the config section ``feddst``); defaults: the paper's CIFAR-10.

  Attributes:
    sparsity: ``S``, the fraction of prunable weights pruned, in [0, 1).
    allocation: per-layer densities (`fedsparse.masks.ALLOCATIONS`): ``'erk'`` (RigL's ERK),
      ``'proportional'`` (the official code's variant) or ``'uniform'``.
    initial_mask: one of `INITIAL_MASKS`: ``'magnitude'`` (largest ``|w0|`` per layer) or
      ``'random'``.
    alpha: ``α``, the readjustment ratio, in [0, 1): ``α_t = (α / 2)(1 + cos(π t / R_end))`` is
      the fraction of each layer's kept weights a client prunes and regrows on readjustment
      round ``t`` (``α`` itself with ``constant_alpha``).
    readjust_every: ``ΔR``, rounds between readjustments; 0 never readjusts (a static mask).
    readjust_end: ``R_end``, the round from which no readjustment happens; 0 means half the run
      (``num_rounds // 2``, the official default; a run config records the resolved value, so
      a resume with another ``num_rounds`` cannot silently move it).
    readjust_epoch: the local epoch at whose end clients readjust; -1 is the last one (the
      paper's and the official code's choice).
    constant_alpha: prune with ``α`` on every readjustment round, as the official code does,
      instead of the annealed ``α_t``.
    vote_threshold: the sample-weighted fraction of the cohort that must hold an entry for it to
      enter the global mask, in [0, 1): 0 is the union of the client masks (the official
      default), 0.5 a majority.
    mask_enforcement: one of `fedsparse.engine.ENFORCEMENTS`: ``'step'`` trains ``w`` and
      re-masks after every step (the official code), ``'forward'`` trains ``w ⊙ m``.
  """
  sparsity: float = 0.8
  allocation: str = 'erk'
  initial_mask: str = 'magnitude'
  alpha: float = 0.01
  readjust_every: int = 15
  readjust_end: int = 0
  readjust_epoch: int = -1
  constant_alpha: bool = False
  vote_threshold: float = 0.0
  mask_enforcement: str = 'step'

  def __post_init__(self):
    for name in ('sparsity', 'alpha', 'vote_threshold'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f'{name} must be in [0, 1), got {value!r}.')
    _check('allocation', self.allocation, masks.ALLOCATIONS)
    _check('initial_mask', self.initial_mask, INITIAL_MASKS)
    _check('mask_enforcement', self.mask_enforcement, ENFORCEMENTS)
    _check_int('readjust_every', self.readjust_every, 0)
    _check_int('readjust_end', self.readjust_end, 0)
    _check_int('readjust_epoch', self.readjust_epoch, -1)
    if not isinstance(self.constant_alpha, bool):
      raise ValueError(f'constant_alpha must be a bool, got {self.constant_alpha!r}.')


@dataclasses.dataclass(frozen=True)
class RandomMaskHparams:
  """The RandomMask baseline (config section ``random_mask``): a static random sparse mask.

  Attributes: as the fields of :class:`FedDSTHparams` with the same names.
  """
  sparsity: float = 0.8
  allocation: str = 'erk'
  mask_enforcement: str = 'step'

  def __post_init__(self):
    FedDSTHparams(sparsity=self.sparsity, allocation=self.allocation,
                 mask_enforcement=self.mask_enforcement)


class FedDSTState(NamedTuple):
  """Server state."""
  params: Any  # global weights, exactly 0 outside ``mask``
  mask: Any  # bool pytree: exactly k_l True entries per prunable leaf, all True elsewhere
  round: jax.Array  # int32 scalar, 0-based
  mask_version: jax.Array  # int32 scalar: how many times the global mask has changed
  client_mask_version: jax.Array  # [N] int32: the version each client of the population holds


class FedDSTBroadcast(NamedTuple):
  """What the server broadcasts to the cohort (the mask's bits count only for stale copies)."""
  params: Any
  learning_rate: jax.Array  # float32 scalar
  mask: Any
  readjust: jax.Array  # bool scalar: clients readjust their masks this round
  prune_counts: Any  # int32 scalar per leaf: n_l this round (0 at non-prunable leaves)


def alpha_schedule(t: int, alpha: float, end: int, constant: bool = False) -> float:
  """``α_t = (α / 2)(1 + cos(π t / R_end))`` for ``t < R_end`` (``α`` if ``constant``), else 0."""
  if t >= end:
    return 0.0
  return float(alpha) if constant else alpha / 2 * (1 + math.cos(math.pi * t / end))


def readjust_rounds(num_rounds: int, every: int, end: int) -> list[int]:
  """The 0-based rounds on which clients readjust: ``1, 1 + ΔR, …`` below ``R_end``."""
  if every <= 0:
    return []
  return [t for t in range(1, min(num_rounds, end)) if (t - 1) % every == 0]


def prune_counts(counts: list[int], alpha_t: float) -> list[int]:
  """Per layer, how many of its ``k_l`` weights a client prunes (and regrows) at ``α_t``.

  A layer keeps ``floor((1 - α_t) k_l)`` (`fedsparse.masks.keep_count`), i.e. it is pruned from
  sparsity ``s_l`` up to ``s_l + (1 - s_l) α_t``; the count is exact integer arithmetic on the
  host, so no float32 round-off inside the round can move it. (The round caps it at the layer's
  inactive entries: a dense layer does not readjust.)
  """
  if alpha_t <= 0:
    return [0] * len(counts)
  return [k - masks.keep_count(1.0 - alpha_t, k) for k in counts]


def client_readjust(params: Any, mask: Any, grad: Any, n: Any, prunable: Any
                    ) -> tuple[Any, Any, Any]:
  """A client's mask readjustment: prune ``n_l`` by magnitude, regrow ``n_l`` by gradient.

  Args:
    params: the client's weights (0 outside ``mask``).
    mask: its bool mask.
    grad: ``∂L/∂w`` of its last minibatch, dense (also at inactive entries).
    n: per-leaf counts (a pytree of int32 scalars or one int), traced values allowed.
    prunable: the prunable flags.

  Returns:
    ``(params, mask, grown)``: in every prunable leaf the ``n_l`` smallest-``|w|`` active
    entries are dropped and the ``n_l`` largest-``|grad|`` entries inactive after the drop
    (those just dropped included) are activated at weight 0, so the count is unchanged; ties by
    flat index. ``grown`` marks the activated entries (their optimizer moments must be reset).
  """
  kept = masks.prune_smallest(params, mask, n, prunable)
  new_mask, grown = masks.regrow(kept, n, prunable, scores=jax.tree.map(jnp.abs, grad))
  return masks.apply(masks.zero_regrown(params, grown), new_mask), new_mask, grown


def server_merge(client_params: Any, client_masks: Any, weights: jax.Array, targets: Any,
                 prunable: Any, vote_threshold: float = 0.0) -> tuple[Any, Any]:
  """The server's aggregation: per-entry average over holders, voted mask of exact size.

  Args:
    client_params: the uploaded weights, leaves with a leading ``[K]`` client axis.
    client_masks: the uploaded bool masks, same shapes.
    weights: ``[K]`` aggregation weights (``n_k``, normalised or not).
    targets: per-leaf kept counts ``k_l`` (ints or int32 scalars, traced allowed; non-prunable
      leaves are ignored).
    prunable: the prunable flags.
    vote_threshold: an entry is voted in when ``Σ_k a_k m_k / Σ_k a_k`` exceeds it.

  Returns:
    ``(params, mask)``: ``w̄ = Σ a_k m_k w_k / Σ a_k m_k`` (0 where no client holds an entry),
    zeroed outside the new mask; the mask holds exactly ``k_l`` entries per prunable leaf: the
    voted entries, magnitude-pruned to ``k_l`` (equal ``|w̄|`` by votes, then index) or topped up
    with the largest ``|w̄|`` of the others. Non-prunable leaves are plain weighted means.
  """
  averaged = masks.masked_weighted_mean(client_params, client_masks, weights)
  total = jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)
  votes = jax.tree.map(
      lambda m: jnp.tensordot(weights.astype(jnp.float32), m.astype(jnp.float32), axes=(0, 0))
      / total, client_masks)
  voted = jax.tree.map(lambda v, f: v > vote_threshold if f else jnp.ones(v.shape, bool),
                       votes, prunable)
  have = masks.layer_count_tree(voted, prunable)
  excess = jax.tree.map(lambda c, k: c - k, have, targets)
  # Equal magnitudes -- above all the weights regrown at the end of local training, which
  # arrive as 0 -- go by their votes: an entry more clients regrew survives first.
  mask = masks.prune_smallest(averaged, voted, excess, prunable, tiebreak=votes)
  short = jax.tree.map(lambda c, k: k - c, masks.layer_count_tree(mask, prunable), targets)
  mask, _ = masks.regrow(mask, short, prunable, scores=jax.tree.map(jnp.abs, averaged))
  return masks.apply(averaged, mask), mask


def _feddst_program(apply_fn: Callable[..., jax.Array], local: LocalConfig, hp: FedDSTHparams,
                    is_prunable: Callable[..., bool] | None) -> ClientProgram:
  """The client: masked local SGD, readjusting its mask at the end of one local epoch."""

  def readjust(state, ctx, steps_done, key):
    del steps_done, key
    return client_readjust(state.params, state.mask, state.grad, ctx.shared.prune_counts,
                           masks.prunable_leaves(state.params, is_prunable))

  def at(ctx, info):
    return ctx.shared.readjust & (info.last if hp.readjust_epoch < 0
                                  else info.epoch == hp.readjust_epoch)

  return masked_client(apply_fn, local, enforce=hp.mask_enforcement,
                       start=lambda ctx: (ctx.shared.params, ctx.shared.mask),
                       rewire=readjust, rewire_at_epoch_end=at, keep_grad=True)


def feddst(apply_fn: Callable[..., jax.Array], *, cohort: CohortConfig, local: LocalConfig,
           learning_rate: float, lr_decay: float = 1.0,
           server_optimizer: optax.GradientTransformation | None = None,
           mapping: ClientMapping = ClientMapping(), num_rounds: int | None = None,
           is_prunable: Callable[..., bool] | None = None, layout: Any = None,
           **hparams: Any) -> Algorithm:
  """FedDST (Bibikar et al., AAAI 2022): dynamic sparse training with server-side mask merging.

  Args:
    apply_fn: the flax ``Module.apply`` of the model.
    cohort: cohort size, sampling and aggregation weighting (``weighted=True``: ``n_k``, as
      the paper).
    local: local training settings (SGD with momentum and weight decay in the paper; the
      optimizer state restarts every round).
    learning_rate: client learning rate at round 0.
    lr_decay: per-round decay of the client learning rate.
    server_optimizer: must be None: FedDST averages weights entry by entry (no server step).
    mapping: how clients are mapped.
    num_rounds: the run's length; ``R_end`` defaults to half of it.
    is_prunable: optional predicate ``(path, leaf) -> bool`` overriding which leaves are pruned.
    layout: :func:`feddst_layout`'s numbers, possibly traced, to use instead of deriving them
      from ``sparsity`` (a sweep over sparsities sets it).
    **hparams: the fields of :class:`FedDSTHparams`.

  Returns:
    An :class:`~fedsparse.engine.Algorithm` with :class:`FedDSTState`.
  """
  hp = FedDSTHparams(**hparams)
  registry.check_weight_averaging('FedDST', server_optimizer)
  registry.check_learning_rates(learning_rate, lr_decay)
  end = hp.readjust_end
  if hp.readjust_every > 0 and end == 0:
    if num_rounds is None:
      raise ValueError('readjust_end=0 means half the run: pass num_rounds, or set readjust_end.')
    end = num_rounds // 2
  _check_readjust_epoch(hp.readjust_epoch, local.num_epochs)
  program = _feddst_program(apply_fn, local, hp, is_prunable)

  def counts(params):
    return layout if layout is not None else feddst_layout(hp, params, is_prunable, end)

  def init(key: jax.Array, params: Any, data: FederatedData | None = None) -> FedDSTState:
    if data is None:
      raise ValueError('FedDST.init needs the federated data: the server tracks which mask '
                       'version every client of the population holds.')
    prunable = masks.prunable_leaves(params, is_prunable)
    targets = counts(params)['targets']
    if hp.initial_mask == 'magnitude':
      scores = jax.tree.map(jnp.abs, params)
    else:
      scores = masks.random_scores(key, params, prunable)
    mask = masks.layerwise_topk_traced(scores, prunable, targets)
    return FedDSTState(params=masks.apply(params, mask), mask=mask,
                       round=jnp.zeros((), jnp.int32), mask_version=jnp.zeros((), jnp.int32),
                       client_mask_version=jnp.zeros((data.num_clients,), jnp.int32))

  def round_fn(state: FedDSTState, data: FederatedData, key: jax.Array
               ) -> tuple[FedDSTState, dict[str, jax.Array]]:
    prunable = masks.prunable_leaves(state.params, is_prunable)
    plan = counts(state.params)
    targets = plan['targets']
    table = jnp.asarray(plan['schedule'])
    row = table[jnp.clip(state.round, 0, table.shape[0] - 1)]
    row = jnp.where(state.round < end, row, 0)
    readjust = jnp.any(row > 0)
    counts_ = masks.layer_tree(row, state.params, prunable)

    drawn = draw_cohort(key, data.num_clients, cohort)
    lr = client_learning_rate(learning_rate, lr_decay, state.round)
    shared = FedDSTBroadcast(state.params, lr, state.mask, readjust, counts_)
    result = run_clients(program, shared, drawn.clients, drawn.keys, data, local, mapping)
    client_params, client_masks = result.outputs

    weights = aggregation_weights(data.client_size[drawn.clients], cohort.weighted)
    params, mask = server_merge(client_params, client_masks, weights, targets, prunable,
                                hp.vote_threshold)

    entered, turnover = masks.turnover(mask, state.mask, prunable)
    changed = entered > 0
    stale = masks.stale_copies(state.client_mask_version, state.mask_version, drawn.clients)
    client_version = masks.delivered(state.client_mask_version, state.mask_version,
                                     drawn.clients)

    # Bits: formulas of the per-layer counts (the layout's), selected by traced flags.
    values, mask_bits = plan['value_bits'], plan['mask_bits']
    bits_up = values + jnp.where(readjust, mask_bits, 0)
    bits_down = values + jnp.where(stale, mask_bits, 0)
    t = state.round.astype(jnp.float32)
    alpha_t = (jnp.float32(hp.alpha) if hp.constant_alpha
               else hp.alpha / 2 * (1 + jnp.cos(jnp.pi * t / max(end, 1))))
    metrics = cohort_metrics(result, drawn.clients, weights, bits_up=bits_up,
                             bits_down=bits_down)
    metrics.update({
        'density': masks.density(mask, prunable),
        'readjusted': readjust.astype(jnp.float32),
        'alpha': jnp.where(readjust, alpha_t, 0.0),
        'mask_turnover': turnover,
        'mask_bits': jnp.asarray(mask_bits, jnp.int32),
        'mask_encoding': jnp.asarray(plan['mask_encoding'], jnp.int32),
    })
    new_state = FedDSTState(params=params, mask=mask, round=state.round + 1,
                            mask_version=state.mask_version + changed.astype(jnp.int32),
                            client_mask_version=client_version)
    return new_state, metrics

  return Algorithm(init=init, round=round_fn, eval_params=lambda state, key: state.params,
                   layout=lambda params: feddst_layout(hp, params, is_prunable, end))


def feddst_layout(hp: FedDSTHparams, params: Any, is_prunable: Callable[..., bool] | None,
                  end: int) -> dict[str, Any]:
  """What FedDST derives from its sparsity and the model's shapes, exactly, on the host.

  Args:
    hp: the hyperparameters (``sparsity``, ``allocation``, the readjustment schedule).
    params: the model's params (only shapes are read).
    is_prunable: the prunable predicate (None: conv and dense kernels).
    end: ``R_end``, the round from which no readjustment happens.

  Returns:
    ``targets``: per-leaf kept counts ``k_l`` (a pytree of ints like ``params``);
    ``schedule``: ``[max(R_end, 1), L]`` int32, row ``t`` the per-prunable-layer counts a
    client prunes and regrows on round ``t`` (0 off the readjustment rounds), capped at each
    layer's inactive entries -- a dense layer (ERK makes small layers dense) has nothing to
    regrow into, and pruning it would only regrow the same entries at 0, wiping their weights
    (RigL skips dense layers the same way); ``value_bits``: a round's
    float32 values (kept weights and dense leaves); ``mask_bits`` and ``mask_encoding``: the
    mask message's size under its cheapest encoding (`fedsparse.comm.mask_message_bits`).

  Raises:
    ValueError: when the sparsity keeps no prunable weight.
  """
  prunable = masks.prunable_leaves(params, is_prunable)
  densities = masks.allocate_densities(params, prunable, 1.0 - hp.sparsity, hp.allocation)
  targets = masks.layer_counts(params, prunable, densities)
  ks = [kk for kk, f in zip(jax.tree.leaves(targets), jax.tree.leaves(prunable)) if f]
  sizes = masks.prunable_sizes(params, prunable)
  if sum(ks) < 1:
    raise ValueError(f'sparsity {hp.sparsity} keeps no prunable weight; lower it.')
  on = set(readjust_rounds(end, hp.readjust_every, end))
  rows = [[min(n, size - kk) for n, size, kk in zip(
              prune_counts(ks, alpha_schedule(t, hp.alpha, end, hp.constant_alpha)), sizes, ks)]
          if t in on else [0] * len(ks)
          for t in range(max(end, 1))]
  dense = comm.num_elements(params) - sum(sizes)
  value_bits = comm.check_int32(comm.FLOAT_BITS * (sum(ks) + dense))
  mask_bits, encoding = comm.mask_message_bits(sizes, ks)
  comm.check_int32(value_bits + mask_bits)
  return {'targets': targets,
          'schedule': np.asarray(rows, np.int32).reshape(max(end, 1), len(ks)),
          'value_bits': value_bits, 'mask_bits': mask_bits,
          'mask_encoding': comm.MASK_ENCODINGS.index(encoding)}


def _check_readjust_epoch(readjust_epoch: int, epochs: int) -> None:
  if readjust_epoch >= epochs:
    raise ValueError(f'feddst.readjust_epoch must be -1 (the last) or below the {epochs} local '
                     f'epoch(s) of a round, got {readjust_epoch}.')


def _check_run(hp: Any, config: Any) -> None:
  registry.check_weight_averaging('FedDST', config=config)
  _check_readjust_epoch(getattr(hp, 'readjust_epoch', -1),
                        1 if config.local_steps > 0 else config.local_epochs)


def _resolve(hp: Any, config: Any) -> Any:
  # R_end = num_rounds // 2 is part of the experiment: recorded, a resume cannot change it.
  # At least 1: a recorded 0 would mean "half the run" again on a resume (rounds below 1 never
  # readjust, so R_end = 1 and 0 behave alike).
  if hp.readjust_end == 0 and hp.readjust_every > 0:
    return dataclasses.replace(hp, readjust_end=max(1, config.num_rounds // 2))
  return hp


def _build(hp: Any, common: registry.Common, **overrides: Any) -> Algorithm:
  kwargs = common.kwargs()
  kwargs['server_optimizer'] = None  # plain averaging: _check_run refused anything else
  return feddst(common.apply_fn, num_rounds=common.num_rounds, **kwargs,
                **{**dataclasses.asdict(hp), **overrides})


registry.register(registry.Spec(
    name='feddst', hparams=FedDSTHparams, check=_check_run, resolve=_resolve,
    traceable=('sparsity',),
    summary='FedDST (Bibikar et al., 2022): federated dynamic sparse training',
    build=_build))
registry.register(registry.Spec(
    name='random_mask', hparams=RandomMaskHparams, check=_check_run, traceable=('sparsity',),
    summary='RandomMask: FedDST\'s baseline, a static random sparse mask',
    build=lambda hp, common: _build(hp, common, initial_mask='random', readjust_every=0)))
