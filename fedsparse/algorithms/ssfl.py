"""SalientGrads / SSFL: one global mask from the saliency of every client, then sparse FedAvg.

References:

* R. Ohib, B. Thapaliya, P. Gaggenapalli, J. Liu, V. Calhoun, S. Plis. "SalientGrads: Sparse
  Models for Communication Efficient and Data Aware Distributed Federated Training."
  arXiv:2304.07488, 2023.
* R. Ohib, B. Thapaliya, G. Dziugaite, J. Liu, V. Calhoun, S. Plis. "SSFL: Discovering Sparse
  Unified Subnetworks at Initialization for Efficient Federated Learning." arXiv:2405.09037,
  2024 (TMLR 2025).

Once, at the start of round ``warmup_rounds`` (0 by default), **every** client of the
population scores the prunable weights (conv and dense kernels) on one minibatch of its own
data, ``s_k = |∂L/∂w ⊙ w|``; the server averages the scores (uniformly, or weighted by n_k) and
keeps the global top ``k = ⌊d · P_prunable⌋`` over all prunable tensors at once, so layers get
the densities their saliency earns. From then on the mask is static: clients train ``w ⊙ m``,
the server averages as FedAvg (or FedAvgM) and re-applies ``m``. The random-mask baselines of
the SSFL code replace the saliency with a uniformly random global or per-layer mask at the same
density.

Scoring runs inside the jitted round under ``lax.cond`` -- it costs compile time once and no run
time on later rounds -- and sums over clients with `fedsparse.engine.sum_clients`, so its
memory is one client's (``sequential``) or one chunk's (``chunked``) gradients whatever the
population size.

Communication (``fedsparse.comm``): in the scoring round every client uploads its dense
float32 scores (32 bits per prunable weight) and downloads the mask (1 bit per prunable weight);
these population-wide one-time costs are reported as ``bits_up_all`` / ``bits_down_all`` (one
entry per client). With ``warmup_rounds > 0`` scoring happens at the current, trained weights,
which every client must first download (32 bits per parameter, counted); at round 0 the weights
are w0, which clients rebuild from the shared seed for free. The cohort's usual download of the
kept weights in the scoring round is counted as in any other round (conservatively: w0 is
free). Each training round the cohort
exchanges 32 bits per kept weight plus the dense non-prunable parameters, both ways: positions
cost nothing because both sides hold ``m``. Warm-up rounds are dense.

Choices and deviations from the paper and its official code:

* ``saliency_score='ssfl'`` (default) differentiates the cross-entropy; ``'salientgrads'`` the
  NLL of the raw logits, ``-mean(logit_y)``, as SalientGrads' published code did. SalientGrads
  reports the mean of per-client test accuracies (``client_accuracy_mean`` in metrics.jsonl),
  SSFL the pooled one (``test_accuracy``); both are always logged.
* ``ties='index'`` keeps exactly k weights (ties broken by index); ``ties='keep'`` is the SSFL
  code's ``score >= k-th largest``, which may keep more.
* Scoring is merged into the first training round rather than being a round of its own, so
  ``num_rounds`` counts training rounds as for FedAvg (the official code scores in round 0 and
  trains in rounds 1..T-1). The scores use the client's first minibatch(es) of a shuffled epoch.
* ``mask_enforcement='forward'`` trains ``w ⊙ m`` (pruned weights get no gradient, so neither
  weight decay nor momentum can move them); ``'step'`` trains dense and re-masks after every
  step, so gradient-norm clipping sees the dense gradient.

Config: ``algorithm='ssfl'`` with the section ``config.ssfl`` holding :class:`SSFLHparams`'s
fields, e.g. ``--config.ssfl.density=0.05``.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsparse import comm
from fedsparse import masks
from fedsparse.algorithms import registry
from fedsparse.algorithms.fedavg import fedavg_round_core
from fedsparse.data import FederatedData
from fedsparse.engine import (ENFORCEMENTS, Algorithm, ClientMapping, CohortConfig, LocalConfig,
                              example_orders, gather_batch, server_key,
                              sum_clients)

__all__ = ['MASKS', 'SCORES', 'WEIGHTINGS', 'SSFLHparams', 'SSFLState', 'population_saliency',
           'ssfl', 'ssfl_layout']

MASKS = ('saliency', 'random_global', 'random_layerwise')
SCORES = ('ssfl', 'salientgrads')
WEIGHTINGS = ('uniform', 'weighted')


_check = registry.check_choice


@dataclasses.dataclass(frozen=True)
class SSFLHparams:
  """SSFL's own hyperparameters (the config section ``ssfl``); defaults: the paper's CIFAR-10.

  Attributes:
    density: fraction d of prunable weights kept, in (0, 1].
    mask: one of `MASKS`: ``'saliency'`` (SSFL), or the random global / per-layer baselines.
    ties: `fedsparse.masks.TIES`: ``'index'`` (exactly ⌊d·P⌋ kept) or ``'keep'`` (SSFL code:
      score ≥ k-th largest).
    saliency_score: one of `SCORES`: ``'ssfl'`` (cross-entropy) or ``'salientgrads'`` (NLL of
      raw logits).
    saliency_batches: minibatches each client scores on.
    saliency_weighting: one of `WEIGHTINGS`: mean over clients, uniform or by client size.
    layerwise_allocation: per-layer densities of ``'random_layerwise'``
      (`fedsparse.masks.ALLOCATIONS`); unused by the other masks.
    mask_enforcement: one of `fedsparse.engine.ENFORCEMENTS`.
    warmup_rounds: dense FedAvg rounds before scoring.
  """
  density: float = 0.5
  mask: str = 'saliency'
  ties: str = 'index'
  saliency_score: str = 'ssfl'
  saliency_batches: int = 1
  saliency_weighting: str = 'uniform'
  layerwise_allocation: str = 'uniform'
  mask_enforcement: str = 'forward'
  warmup_rounds: int = 0

  def __post_init__(self):
    if isinstance(self.density, bool) or not 0 < self.density <= 1:
      raise ValueError(f'density must be in (0, 1], got {self.density!r}.')
    _check('mask', self.mask, MASKS)
    _check('ties rule', self.ties, masks.TIES)
    _check('saliency score', self.saliency_score, SCORES)
    _check('saliency weighting', self.saliency_weighting, WEIGHTINGS)
    _check('layer-wise allocation', self.layerwise_allocation, masks.ALLOCATIONS)
    _check('mask enforcement', self.mask_enforcement, ENFORCEMENTS)
    if isinstance(self.warmup_rounds, bool) or not isinstance(self.warmup_rounds, int) or (
        self.warmup_rounds < 0):
      raise ValueError(f'warmup_rounds must be an integer >= 0, got {self.warmup_rounds!r}.')
    if isinstance(self.saliency_batches, bool) or not isinstance(self.saliency_batches, int) or (
        self.saliency_batches < 1):
      raise ValueError(f'saliency_batches must be a positive integer, got '
                       f'{self.saliency_batches!r}.')


class SSFLState(NamedTuple):
  """Server state: global params (pruned entries exactly 0), optimizer state, mask, round."""
  params: Any
  opt_state: optax.OptState
  mask: Any  # boolean pytree like params; all True before scoring and for non-prunable leaves
  round: jax.Array  # int32 scalar


def _score_loss(score: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example loss whose gradient defines the saliency."""
  if score == 'ssfl':
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  # SalientGrads: F.nll_loss applied to raw logits, i.e. minus the true-class logit.
  return -jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def population_saliency(apply_fn: Callable[..., jax.Array], params: Any, data: FederatedData,
                        key: jax.Array, *, prunable: Any, batch_size: int,
                        num_batches: int = 1, score: str = 'ssfl',
                        weighting: str = 'uniform',
                        mapping: ClientMapping = ClientMapping()) -> Any:
  """The server's aggregate ``S = Σ_k a_k |∂L_k/∂w ⊙ w|`` over every client of ``data``.

  Args:
    apply_fn: the flax ``Module.apply``.
    params: the weights scored (w0, or the warm-up weights).
    data: the federated data; every one of its clients scores.
    key: PRNG key; client k shuffles its data with ``fold_in(key, k)``.
    prunable: pytree of Python bools (`fedsparse.masks.prunable_leaves`).
    batch_size: examples per minibatch (the training batch size).
    num_batches: minibatches per client; the loss is the mean over all their examples.
    score: one of `SCORES`.
    weighting: ``'uniform'`` (``a_k = 1/N``) or ``'weighted'`` (``a_k = n_k / Σ n``).
    mapping: how clients are mapped; use a bounded-memory strategy (not ``vmap``) for large
      populations.

  Returns:
    A pytree like ``params``: the aggregated saliency on prunable leaves, zeros elsewhere.
  """
  _check('saliency score', score, SCORES)
  _check('saliency weighting', weighting, WEIGHTINGS)
  if batch_size < 1 or num_batches < 1:
    raise ValueError(f'batch_size and num_batches must be positive, got {batch_size}, '
                     f'{num_batches}.')
  n = data.num_clients
  sizes = data.client_size.astype(jnp.float32)
  if weighting == 'uniform':
    weights = jnp.full((n,), 1.0 / n, jnp.float32)
  else:
    weights = sizes / jnp.sum(sizes)
  # One shuffled epoch of the client's data; its first `num_batches` minibatches are the
  # scoring data (partial or empty ones are masked).
  config = LocalConfig(batch_size=batch_size, local_epochs=1)
  width = num_batches * batch_size

  def one_client(shared, client_id, weight):
    params_, data_ = shared
    size = data_.client_size[client_id]
    order = example_orders(jax.random.fold_in(key, client_id), data_.client_index[client_id],
                           size, config)[0]
    order = jnp.pad(order, (0, max(0, width - order.shape[0])))[:width]
    index = order.reshape(num_batches, batch_size)
    valid = (jnp.arange(width) < size).reshape(num_batches, batch_size)

    def summed_loss(p, index, example_mask):
      batch = gather_batch(data_, index, example_mask)
      logits = apply_fn({'params': p}, batch.x, train=True)
      losses = _score_loss(score, logits, batch.y)
      return jnp.sum(jnp.where(batch.mask, losses, 0.0))

    def body(grad_sum, xs):
      g = jax.grad(summed_loss)(params_, *xs)
      return jax.tree.map(jnp.add, grad_sum, g), None

    grad_sum, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params_), (index, valid))
    count = jnp.maximum(jnp.sum(valid, dtype=jnp.int32), 1).astype(jnp.float32)
    return jax.tree.map(
        lambda g, w, p: weight * jnp.abs(g / count * w) if p else jnp.zeros_like(w),
        grad_sum, params_, prunable)

  return sum_clients(one_client, (params, data), jnp.arange(n, dtype=jnp.int32), weights,
                     mapping=mapping)


def _scoring_mapping(mapping: ClientMapping) -> ClientMapping:
  """``mapping`` with an unbounded ``vmap`` over the population replaced by ``chunked``.

  Also for ``sharded``, whose devices would otherwise each vmap their whole share.
  """
  strategy = mapping.resolved()
  if strategy == 'vmap':
    return ClientMapping('chunked', chunk_size=mapping.chunk_size)
  if strategy == 'sharded' and mapping.local_strategy == 'vmap':
    return ClientMapping('sharded', chunk_size=mapping.chunk_size, inner='chunked')
  return mapping


def ssfl(apply_fn: Callable[..., jax.Array], *, cohort: CohortConfig, local: LocalConfig,
         learning_rate: float, lr_decay: float = 1.0,
         server_optimizer: optax.GradientTransformation | None = None,
         mapping: ClientMapping = ClientMapping(), is_prunable: Callable[..., bool] | None = None,
         layout: Any = None, **hparams: Any) -> Algorithm:
  """SSFL / SalientGrads: a static global mask from aggregated client saliency.

  Args:
    apply_fn: the flax ``Module.apply`` of the model.
    cohort: cohort size, sampling and aggregation weighting of the training rounds.
    local: local training settings; its ``batch_size`` is also the scoring minibatch size.
    learning_rate: client learning rate at round 0.
    lr_decay: per-round decay of the client learning rate.
    server_optimizer: optax optimizer on −Δ̄ (``sgd(1.0)``: FedAvg; with momentum: FedAvgM).
    mapping: how clients are mapped (training rounds; scoring uses it too, with ``vmap``
      replaced by ``chunked`` to bound memory over the whole population).
    is_prunable: optional predicate ``(path, leaf) -> bool`` overriding which leaves are pruned
      (default: conv and dense kernels; see `fedsparse.masks.prunable_leaves`).
    layout: the keep counts of ``density`` (see :func:`ssfl_layout`), possibly traced, to use
      instead of deriving them from ``density`` (a sweep over densities sets it).
    **hparams: the fields of :class:`SSFLHparams` (``density``, ``mask``, ...).

  Returns:
    An :class:`~fedsparse.engine.Algorithm` with :class:`SSFLState`.
  """
  hp = SSFLHparams(**hparams)
  core, server_optimizer = fedavg_round_core(
      apply_fn, cohort=cohort, local=local, learning_rate=learning_rate, lr_decay=lr_decay,
      server_optimizer=server_optimizer, mapping=mapping, enforce=hp.mask_enforcement)
  k = cohort.clients_per_round
  scoring_mapping = _scoring_mapping(mapping)

  def counts(params):
    return layout if layout is not None else ssfl_layout(hp, params, is_prunable)

  def init(key: jax.Array, params: Any, data: FederatedData | None = None) -> SSFLState:
    del key, data  # the mask is drawn in the scoring round, from that round's key
    counts(params)  # fails on nothing to prune, or a density that keeps no weight
    return SSFLState(params=params, opt_state=server_optimizer.init(params),
                     mask=masks.ones_like(params), round=jnp.zeros((), jnp.int32))

  def make_mask(params, data, key, prunable):
    kept = counts(params)
    if hp.mask == 'saliency':
      scores = population_saliency(
          apply_fn, params, data, key, prunable=prunable, batch_size=local.batch_size,
          num_batches=hp.saliency_batches, score=hp.saliency_score,
          weighting=hp.saliency_weighting, mapping=scoring_mapping)
      return masks.global_topk_traced(scores, prunable, kept, hp.ties)
    scores = masks.random_scores(key, params, prunable)
    if hp.mask == 'random_global':
      return masks.global_topk_traced(scores, prunable, kept)
    return masks.layerwise_topk_traced(scores, prunable, kept)

  def round_fn(state: SSFLState, data: FederatedData, key: jax.Array
               ) -> tuple[SSFLState, dict[str, jax.Array]]:
    prunable = masks.prunable_leaves(state.params, is_prunable)
    scoring = state.round == hp.warmup_rounds

    def score():
      new_mask = make_mask(state.params, data, server_key(key), prunable)
      return new_mask, masks.apply(state.params, new_mask)

    # After scoring, the params are already masked (the core re-masks after every update), so
    # only the scoring round applies the mask to them.
    mask_, params = jax.lax.cond(scoring, score, lambda: (state.mask, state.params))
    # The cohort comes from the round key exactly as FedAvg's does: paired comparisons.
    params, opt_state, metrics = core(params, state.opt_state, state.round, data, key,
                                      mask=mask_)

    # Training traffic: kept prunable values + dense non-prunable leaves (mask all True there).
    bits = comm.known_positions_bits(mask_)
    p_prunable = masks.num_prunable(state.params, prunable)
    # One-time, every client: dense float32 scores up; the mask (and warm-up weights) down.
    once_up = comm.FLOAT_BITS * p_prunable if hp.mask == 'saliency' else 0
    once_down = comm.raw_mask_bits(p_prunable) + (
        comm.dense_bits(state.params) if hp.warmup_rounds > 0 else 0)
    n = data.num_clients
    metrics.update(
        bits_up=comm.per_client(bits, k), bits_down=comm.per_client(bits, k),
        bits_up_all=jnp.where(scoring, comm.per_client(once_up, n), 0),
        bits_down_all=jnp.where(scoring, comm.per_client(once_down, n), 0),
        density=masks.density(mask_, prunable))
    return SSFLState(params, opt_state, mask_, state.round + 1), metrics

  return Algorithm(init=init, round=round_fn, eval_params=lambda state, key: state.params,
                   layout=lambda params: ssfl_layout(hp, params, is_prunable))


def ssfl_layout(hp: SSFLHparams, params: Any,
                is_prunable: Callable[..., bool] | None = None) -> Any:
  """The keep counts of ``hp.density`` on ``params``' shapes, exact (host integers).

  Returns:
    ``k = keep_count(d, P)`` over all prunable weights (an int) for the global masks; for
    ``'random_layerwise'`` a pytree like ``params`` of per-leaf counts ``keep_count(d_l, n_l)``
    under ``hp.layerwise_allocation``.

  Raises:
    ValueError: when nothing is is_prunable or the density keeps no weight.
  """
  prunable = masks.prunable_leaves(params, is_prunable)  # fails on nothing to prune
  p_prunable = masks.num_prunable(params, prunable)
  if masks.keep_count(hp.density, p_prunable) < 1:
    raise ValueError(f'density {hp.density} keeps no weight of the {p_prunable} prunable '
                     f'ones; use at least {masks.smallest_density(p_prunable)}.')
  if hp.mask == 'random_layerwise':
    densities = masks.allocate_densities(params, prunable, hp.density, hp.layerwise_allocation)
    return masks.layer_counts(params, prunable, densities)
  return masks.keep_count(hp.density, p_prunable)


def _check_run(hp: SSFLHparams, config: Any) -> None:
  if hp.warmup_rounds >= config.num_rounds:
    raise ValueError(f'ssfl.warmup_rounds must be in [0, num_rounds = {config.num_rounds}), got '
                     f'{hp.warmup_rounds}: the mask would never be chosen.')


registry.register(registry.Spec(
    name='ssfl', hparams=SSFLHparams, check=_check_run, traceable=('density',),
    summary='SalientGrads / SSFL: static global mask from every client\'s saliency',
    build=lambda hp, common: ssfl(common.apply_fn, **common.kwargs(), **dataclasses.asdict(hp))))
