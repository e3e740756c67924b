"""FedPM: federated probabilistic masks over a frozen random network.

Reference: B. Isik, F. Pase, D. Gunduz, T. Weissman, M. Zorzi. "Sparse Random Networks for
Communication-Efficient Federated Learning." ICLR 2023, arXiv:2209.15328. Official code:
BerivanIsik/sparse-random-networks.

The network's weights never train and never travel: every kernel and bias is frozen at a
signed constant ``±c``, ``c = e · sqrt(1 / fan_in)`` (the kernel's fan-in, shared by its bias),
drawn from the run's seed, which every client holds. What trains is one real score ``s`` per
parameter; the model computes with ``W ⊙ m``, a fresh mask ``m ~ Bernoulli(θ)``, ``θ =
sigmoid(s)``, at every forward pass (`fedsparse.engine.bernoulli_mask`, whose backward is the
θ-scaled straight-through estimator ``∂L/∂θ = θ · ∂L/∂m``).

A round: each client starts from the global scores, runs its local epochs of Adam on them and
uploads one sample ``m̂ ~ Bernoulli(sigmoid(s))`` -- one bit per parameter before coding. The
server smooths every sample to ``m̃ ∈ {ε, 1 − ε}`` and takes the mode of a Beta posterior per
parameter: ``α = λ0 + Σ_k m̃_k``, ``β = λ0 + Σ_k (1 − m̃_k)``, ``θ_g = (α − 1) / (α + β − 2)``,
``s_g = logit(θ_g)``. The prior is reset every round (the official code) or, with
``prior_reset='periodic'``, in each of the first 15 rounds and then every 5th, the posterior
accumulating in between (the official code's commented-out alternative).

Communication. Up: the sampled mask, arithmetic-coded for real on the host
(`fedsparse.comm.bernoulli_encode`, a range coder of the ``constriction`` library) under
``uplink_coder``:

* ``'empirical'`` (the paper's): every bit under the client's own frequency of ones ``p̂``,
  whose count travels first (``ceil(log2(P + 1))`` bits). Its length is within a few words of
  the paper's estimate ``P · H2(p̂) + log2 P`` (logged beside it as ``uplink_entropy_bits``).
* ``'global'``: each bit under its own probability ``θ_g,i = sigmoid(s_g,i)``, the global model
  both sides already hold, so nothing else travels. Its cost is about the cross-entropy of the
  sample under ``θ_g``, which beats ``P · H2(p̂)`` once the scores polarise.

Both lengths are logged every round (``uplink_bits_empirical``, ``uplink_bits_global``, totals
over the cohort) with ``uplink_bits_per_param`` of the coder in use; ``bits_up`` counts the one
in use. The frozen weights never travel.

Down: 32 bits per score (``downlink='dense'``, the paper's), or with ``downlink='counts'`` the
exact message that determines them: with the prior reset every round, ``θ_g`` is a function of
the cohort's count of ones per parameter (``0..K``), which the server range-codes under its
own histogram (`fedsparse.comm.categorical_encode`; at most ``log2(K + 1)`` bits per parameter,
lossless). Round 0's scores come from the seed and cost nothing under ``'counts'``.

Evaluation (the run loop's ``test_accuracy``) samples one mask from ``θ_g`` with the evaluation
key, as the paper reports; ``deterministic/test_accuracy`` is the model ``W ⊙ [θ_g > 0.5]``.

Choices and deviations from the paper and its official code:

* Leaves that are neither a kernel nor a kernel's bias (normalisation scales and offsets) keep
  their flax initial values frozen, and are scored and masked like every other parameter.
* The official client's ``p̂`` is the mean of the *smoothed* sample (``0.01 + 0.98 p̂``), which
  inflates its entropy estimate; here ``p̂`` is the sample's own frequency.
* Adam's moments: ``adam_state='reset'`` starts each client's round from fresh moments (the
  paper's stateless client); ``'client'`` keeps each client's moments across rounds, stacked
  over the population (memory: two float32 copies of the scores per client). The official code
  behaves as ``'client'``: each client object keeps its ``torch.optim.Adam`` and
  ``load_state_dict`` copies new scores into the same parameters, so their moments persist.
  The default is ``'reset'``: on MNIST (``mnist_fedpm`` at one local epoch, IID) kept moments
  learned much more slowly (81.6 / 90.3 % sampled-mask accuracy at rounds 10 / 20, against
  90.7 / 96.5 % with fresh ones): the second moments of round 1, when the scores were near 0
  and their gradients large, shrink the steps of every later round on saturated scores.
* Evaluation samples one mask (keyed) for the whole test set; the official evaluation draws a
  new one for every test batch. Both estimate the same expected accuracy of a sampled mask.
* ``downlink='dense'`` charges round 0's download (32 bits per score) although those scores
  also follow from the seed, as the paper's accounting does; ``'counts'`` charges nothing then.

Config: ``algorithm='fedpm'`` with the section ``config.fedpm`` holding :class:`FedPMHparams`'s
fields, e.g. ``--config.fedpm.uplink_coder=global``. The client optimizer is Adam at the run's
``learning_rate`` (0.1 in the paper); FedPM has no server optimizer.

Example:

  >>> import jax, jax.numpy as jnp
  >>> from fedsparse import data as data_lib, engine, models
  >>> fd, _ = data_lib.make_federated_data(data_lib.load_dataset('digits'), 4, 'iid', seed=0)
  >>> model = models.get_model('mlp', 10, hidden_sizes=(16,))
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  >>> alg = fedpm(model.apply, cohort=engine.CohortConfig(4), learning_rate=0.1,
  ...             local=engine.LocalConfig(batch_size=32, local_epochs=1))
  >>> state = alg.init(jax.random.key(1), params, fd)
  >>> # ±e·sqrt(1/fan_in) = ±e/8 for the 64 inputs; the bias takes its kernel's constant.
  >>> sorted({round(float(w), 4) for w in state.weights['Dense_0']['bias']})
  [-0.3398, 0.3398]
  >>> state, metrics = jax.jit(alg.round)(state, fd, jax.random.key(2))
  >>> bits = alg.host_bits(jax.device_get(metrics))
  >>> int(bits['bits_up'].shape[0]), bool(bits['uplink_bits_per_param'] < 1.2)
  (4, True)
"""

from collections.abc import Mapping
import dataclasses
import json
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsparse import comm
from fedsparse.algorithms import registry
from fedsparse.algorithms.fedavg import client_learning_rate
from fedsparse.data import FederatedData
from fedsparse.engine import (Algorithm, ClientMapping, ClientProgram, CohortConfig, LocalConfig,
                              bernoulli_mask, cohort_metrics, draw_cohort, run_clients,
                              supervised_loss)

__all__ = ['ADAM_STATES', 'DOWNLINKS', 'EXPORT_FORMAT', 'PRIOR_RESETS', 'UPLINK_CODERS', 'FedPMBroadcast',
           'FedPMCarry', 'FedPMHparams', 'FedPMState', 'beta_posterior', 'export_model',
           'exported_bits', 'fedpm', 'flatten_mask', 'load_model', 'prior_is_reset',
           'signed_constants', 'unflatten_mask']

PRIOR_RESETS = ('every_round', 'periodic')
UPLINK_CODERS = ('empirical', 'global')
DOWNLINKS = ('dense', 'counts')
ADAM_STATES = ('reset', 'client')

_check = registry.check_choice


@dataclasses.dataclass(frozen=True)
class FedPMHparams:
  """FedPM's own hyperparameters (the config section ``fedpm``).

  The defaults are the paper's and the official code's, but for ``adam_state``: the official
  clients keep their Adam moments (``'client'``), the paper describes stateless clients
  (``'reset'``, the default), which also learned faster on MNIST (see the module docstring).

  Attributes:
    smoothing: ``ε``: the server reads a sampled 1 as ``1 − ε`` and a 0 as ``ε``, in (0, 0.5).
    prior: ``λ0``, the Beta prior's parameters (α = β = λ0), at least 1 (the mode needs it).
    prior_reset: one of `PRIOR_RESETS`.
    uplink_coder: one of `UPLINK_CODERS`: the coder ``bits_up`` counts (both are logged).
    downlink: one of `DOWNLINKS`: ``'dense'`` (32 bits per score) or ``'counts'`` (the
      cohort's count of ones per parameter, range-coded: lossless, needs
      ``prior_reset='every_round'``).
    adam_state: one of `ADAM_STATES`.
    adam_b1: Adam's ``β1``.
    adam_b2: Adam's ``β2``.
    adam_eps: Adam's ``ε``.
  """
  smoothing: float = 0.01
  prior: float = 1.0
  prior_reset: str = 'every_round'
  uplink_coder: str = 'empirical'
  downlink: str = 'dense'
  adam_state: str = 'reset'
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8

  def __post_init__(self):
    if isinstance(self.smoothing, bool) or not 0 < self.smoothing < 0.5:
      raise ValueError(f'smoothing must be in (0, 0.5), got {self.smoothing!r}.')
    if isinstance(self.prior, bool) or not 1 <= self.prior < math.inf:
      raise ValueError(f'prior must be finite and >= 1 (the Beta mode needs α, β >= 1), got '
                       f'{self.prior!r}.')
    _check('prior_reset', self.prior_reset, PRIOR_RESETS)
    _check('uplink_coder', self.uplink_coder, UPLINK_CODERS)
    _check('downlink', self.downlink, DOWNLINKS)
    if self.downlink == 'counts' and self.prior_reset != 'every_round':
      raise ValueError("downlink='counts' sends one round's counts of ones, which determine the "
                       "global scores only when the prior is reset every round; use "
                       "prior_reset='every_round' or downlink='dense'.")
    _check('adam_state', self.adam_state, ADAM_STATES)
    for name in ('adam_b1', 'adam_b2'):
      value = getattr(self, name)
      if isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f'{name} must be in [0, 1), got {value!r}.')
    if isinstance(self.adam_eps, bool) or not 0 < self.adam_eps < math.inf:
      raise ValueError(f'adam_eps must be positive and finite, got {self.adam_eps!r}.')


class FedPMState(NamedTuple):
  """Server state."""
  weights: Any  # the frozen signed constants (never trained, never sent)
  scores: Any  # the global scores s_g
  alpha: Any  # the Beta posterior's α per parameter (kept for prior_reset='periodic')
  beta: Any  # and its β
  client_opt: Any  # adam_state='client': [N]-stacked Adam states; otherwise None
  round: jax.Array  # int32 scalar, 0-based
  weights_key: jax.Array  # uint32 key data the weights were drawn from (the exported "seed")
  counts: jax.Array  # [P] int32: last round's Σ_k m̂_k (-1 before round 0: scores from the seed)


class FedPMBroadcast(NamedTuple):
  """What a round's clients receive: the scores (the weights they rebuild from the seed)."""
  weights: Any
  scores: Any
  learning_rate: jax.Array
  client_opt: Any  # [N]-stacked Adam states, or None


class FedPMCarry(NamedTuple):
  """A client's carry: its scores and their Adam state."""
  scores: Any
  opt_state: optax.OptState


def signed_constants(key: jax.Array, params: Any) -> Any:
  """Frozen weights ``±e·sqrt(1/fan_in)`` (random signs) in place of every kernel and its bias.

  A kernel's fan-in is the product of all its axes but the last (inputs, or kernel window ×
  input channels); the ``bias`` beside it takes the same constant, as the official layers do.
  Other leaves (normalisation parameters) keep their values.

  Args:
    key: PRNG key; leaf ``i`` (in `jax.tree.leaves` order) draws its signs from ``fold_in(key,
      i)``.
    params: the model's initial params (a nest of dicts, flax style).

  Returns:
    A tree like ``params``.
  """
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  fan_in = {}
  for path, leaf in paths_leaves:
    if _name(path) == 'kernel':
      fan_in[_parent(path)] = int(np.prod(np.shape(leaf)[:-1]))
  out = []
  for i, (path, leaf) in enumerate(paths_leaves):
    n = fan_in.get(_parent(path)) if _name(path) in ('kernel', 'bias') else None
    if n is None:
      out.append(leaf)
      continue
    c = math.e * math.sqrt(1.0 / n)
    signs = jax.random.rademacher(jax.random.fold_in(key, i), np.shape(leaf), jnp.float32)
    out.append((c * signs).astype(jnp.asarray(leaf).dtype))
  return jax.tree.unflatten(treedef, out)


def _name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def _parent(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, 'key', getattr(p, 'name', p))) for p in path[:-1])


def prior_is_reset(round_: jax.Array, prior_reset: str) -> jax.Array:
  """Whether round ``round_`` (0-based) starts from the prior: always, or periodically."""
  if prior_reset == 'every_round':
    return jnp.bool_(True)
  return (round_ < 15) | (round_ % 5 == 0)


def beta_posterior(samples: Any, alpha: Any, beta: Any, smoothing: float
                   ) -> tuple[Any, Any, Any]:
  """The server's Beta–Bernoulli update from the cohort's sampled masks.

  Args:
    samples: a tree of ``[K, ...]`` bool masks, one per client.
    alpha: α per parameter before this round (the prior ``λ0`` after a reset).
    beta: β likewise.
    smoothing: ``ε``.

  Returns:
    ``(theta, alpha, beta)``: the posterior mode ``(α − 1) / (α + β − 2)`` per parameter and
    the updated ``α = α + Σ_k m̃_k``, ``β = β + Σ_k (1 − m̃_k)``.
  """
  def smoothed_sum(m):
    return jnp.sum(jnp.where(m, 1.0 - smoothing, smoothing), axis=0)
  ones = jax.tree.map(smoothed_sum, samples)
  k = jax.tree.leaves(samples)[0].shape[0]
  alpha = jax.tree.map(jnp.add, alpha, ones)
  beta = jax.tree.map(lambda b, o: b + (k - o), beta, ones)
  theta = jax.tree.map(lambda a, b: (a - 1.0) / (a + b - 2.0), alpha, beta)
  return theta, alpha, beta


def flatten_mask(tree: Any) -> jax.Array:
  """A tree of ``[K, ...]`` masks as one ``[K, P]`` array (leaves in `jax.tree.leaves` order)."""
  leaves = jax.tree.leaves(tree)
  return jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)


def unflatten_mask(flat: np.ndarray, like: Any) -> Any:
  """The inverse of :func:`flatten_mask` for one client: ``[P]`` back to a tree like ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  out, start = [], 0
  for leaf in leaves:
    size = int(np.prod(np.shape(leaf)))
    out.append(np.asarray(flat[start:start + size]).reshape(np.shape(leaf)))
    start += size
  return jax.tree.unflatten(treedef, out)


def _masked(weights: Any, scores: Any, key: jax.Array) -> Any:
  """``W ⊙ m``, ``m ~ Bernoulli(sigmoid(s))`` drawn per leaf from its own key."""
  leaves, treedef = jax.tree.flatten(scores)
  keys = jax.random.split(key, len(leaves))
  masks_ = jax.tree.unflatten(treedef, [bernoulli_mask(s, k) for s, k in zip(leaves, keys)])
  return jax.tree.map(lambda w, m: w * m.astype(w.dtype), weights, masks_)


def _sample(scores: Any, key: jax.Array) -> Any:
  """One bool mask ``m̂ ~ Bernoulli(sigmoid(s))`` per leaf, each leaf from its own key."""
  leaves, treedef = jax.tree.flatten(scores)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.uniform(k, s.shape) < jax.nn.sigmoid(s) for s, k in zip(leaves, keys)])


def _fedpm_program(apply_fn: Callable[..., jax.Array], hp: FedPMHparams) -> ClientProgram:
  """The client: Adam on the scores of ``W ⊙ Bernoulli(sigmoid(s))``, then one sample."""

  def make_optimizer(ctx):
    return optax.adam(ctx.shared.learning_rate, b1=hp.adam_b1, b2=hp.adam_b2, eps=hp.adam_eps)

  def init(ctx, key):
    del key
    if ctx.shared.client_opt is None:
      opt_state = make_optimizer(ctx).init(ctx.shared.scores)
    else:
      opt_state = jax.tree.map(lambda x: x[ctx.client.id], ctx.shared.client_opt)
    return FedPMCarry(ctx.shared.scores, opt_state)

  def transform(trainable, carry, ctx, key):
    del carry
    return _masked(ctx.shared.weights, trainable, key)

  def update(carry, grads, ctx, info, key):
    del info, key
    # optax's Adam mixes its int step count with float decays: fine under any promotion rule.
    with jax.numpy_dtype_promotion('standard'):
      updates, opt_state = make_optimizer(ctx).update(grads.params, carry.opt_state,
                                                      carry.scores)
    return FedPMCarry(optax.apply_updates(carry.scores, updates), opt_state)

  def final(carry, ctx, key):
    kept = carry.opt_state if ctx.shared.client_opt is not None else None
    return _sample(carry.scores, key), kept

  return ClientProgram(init=init, trainable=lambda carry: carry.scores, transform=transform,
                       loss=supervised_loss(apply_fn), update=update, final=final)


def fedpm(apply_fn: Callable[..., jax.Array], *, cohort: CohortConfig, local: LocalConfig,
          learning_rate: float, lr_decay: float = 1.0,
          server_optimizer: optax.GradientTransformation | None = None,
          mapping: ClientMapping = ClientMapping(), **hparams: Any) -> Algorithm:
  """FedPM: Bernoulli masks over frozen signed constants, Beta–Bernoulli aggregation.

  Args:
    apply_fn: the flax ``Module.apply`` of the model.
    cohort: cohort size and sampling (aggregation is over the cohort's samples, unweighted, as
      the paper's posterior counts one sample per client).
    local: local training settings (epochs or steps, batch size); the optimizer is Adam.
    learning_rate: Adam's learning rate at round 0 (the paper: 0.1).
    lr_decay: per-round decay of it.
    server_optimizer: must be None (the server computes a posterior, not a step).
    mapping: how clients are mapped.
    **hparams: the fields of :class:`FedPMHparams`.

  Returns:
    An :class:`~fedsparse.engine.Algorithm` with :class:`FedPMState`.
  """
  hp = FedPMHparams(**hparams)
  registry.check_weight_averaging('FedPM', server_optimizer)
  registry.check_learning_rates(learning_rate, lr_decay)
  program = _fedpm_program(apply_fn, hp)
  k = cohort.clients_per_round

  def init(key: jax.Array, params: Any, data: FederatedData | None = None) -> FedPMState:
    weights_key, scores_key = jax.random.split(key)
    weights = signed_constants(weights_key, params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(scores_key, len(leaves))
    scores = jax.tree.unflatten(treedef, [
        jax.random.normal(k_, np.shape(w), jnp.float32) for w, k_ in zip(leaves, keys)])
    comm.check_int32(comm.dense_bits(scores))
    def prior():  # α and β: two buffers (the run loop donates the state)
      return jax.tree.map(lambda s: jnp.full(s.shape, hp.prior, jnp.float32), scores)
    client_opt = None
    if hp.adam_state == 'client':
      if data is None:
        raise ValueError("adam_state='client' needs the federated data (its population size).")
      fresh = optax.adam(learning_rate).init(scores)
      client_opt = jax.tree.map(
          lambda x: jnp.broadcast_to(x, (data.num_clients,) + x.shape), fresh)
    return FedPMState(weights=weights, scores=scores, alpha=prior(), beta=prior(),
                      client_opt=client_opt, round=jnp.zeros((), jnp.int32),
                      weights_key=jax.random.key_data(weights_key),
                      counts=jnp.full((comm.num_elements(scores),), -1, jnp.int32))

  def round_fn(state: FedPMState, data: FederatedData, key: jax.Array
               ) -> tuple[FedPMState, dict[str, jax.Array]]:
    drawn = draw_cohort(key, data.num_clients, cohort)
    lr = client_learning_rate(learning_rate, lr_decay, state.round)
    shared = FedPMBroadcast(state.weights, state.scores, lr, state.client_opt)
    result = run_clients(program, shared, drawn.clients, drawn.keys, data, local, mapping)
    samples, client_opt = result.outputs

    reset = prior_is_reset(state.round, hp.prior_reset)
    start_alpha = jax.tree.map(lambda a: jnp.where(reset, hp.prior, a), state.alpha)
    start_beta = jax.tree.map(lambda b: jnp.where(reset, hp.prior, b), state.beta)
    theta, alpha, beta = beta_posterior(samples, start_alpha, start_beta, hp.smoothing)
    scores = jax.tree.map(jax.scipy.special.logit, theta)
    if client_opt is not None:
      client_opt = _keep_client_states(state.client_opt, client_opt, drawn.clients)

    flat = flatten_mask(samples)  # [K, P] bool: what each client sends, coded on the host
    down = comm.dense_bits(state.scores) if hp.downlink == 'dense' else 0  # else: on the host
    # The uplink's bits are the coded masks' lengths, added on the host (`host_bits`).
    metrics = cohort_metrics(result, drawn.clients, None, bits_up=0,
                             bits_down=comm.per_client(down, k))
    metrics.update({
        'density': jnp.mean(flat.astype(jnp.float32)),
        'theta_mean': jnp.mean(jnp.concatenate([t.reshape(-1) for t in jax.tree.leaves(theta)])),
        'payload_masks': flat,
        'payload_counts': state.counts,  # what made the scores the cohort downloads
        'payload_theta': jnp.concatenate([jax.nn.sigmoid(s).reshape(-1)
                                          for s in jax.tree.leaves(state.scores)]),
    })
    new_state = state._replace(scores=scores, alpha=alpha, beta=beta, client_opt=client_opt,
                               round=state.round + 1,
                               counts=jnp.sum(flat, axis=0, dtype=jnp.int32))
    return new_state, metrics

  def host_bits(metrics: dict[str, np.ndarray]) -> dict[str, Any]:
    masks_ = np.asarray(metrics['payload_masks'])
    theta = np.asarray(metrics['payload_theta'], np.float64)
    num_clients, p = masks_.shape
    empirical = np.array([comm.bernoulli_encode(m).bits for m in masks_], np.int64)
    global_ = np.array([comm.bernoulli_encode(m, theta).bits for m in masks_], np.int64)
    entropy = sum(comm.bernoulli_entropy_bits(p, int(m.sum())) for m in masks_)
    used = empirical if hp.uplink_coder == 'empirical' else global_
    out = {}
    if hp.downlink == 'counts':
      counts = np.asarray(metrics['payload_counts'])
      # Round 0's scores come from the seed (free); later ones from the counts of ones, 0..K.
      down = 0 if counts[0] < 0 else comm.categorical_encode(counts, num_clients + 1).bits
      out['bits_down'] = np.full(num_clients, down, np.int64)
    return out | {'bits_up': used,
            'uplink_bits_empirical': float(empirical.sum()),
            'uplink_bits_global': float(global_.sum()),
            'uplink_entropy_bits': float(entropy),
            'uplink_bits_per_param': float(used.sum() / (num_clients * p))}

  def eval_params(state: FedPMState, key: jax.Array) -> Any:
    sample = _sample(state.scores, key)
    return jax.tree.map(lambda w, m: w * m.astype(w.dtype), state.weights, sample)

  def eval_variants(state: FedPMState, key: jax.Array) -> dict[str, Any]:
    del key
    return {'deterministic': jax.tree.map(lambda w, s: w * (s > 0).astype(w.dtype),
                                          state.weights, state.scores)}

  return Algorithm(init=init, round=round_fn, eval_params=eval_params, host_bits=host_bits,
                   eval_variants=eval_variants, export=export_model)


def _keep_client_states(stacked: Any, new: Any, clients: jax.Array) -> Any:
  """Writes each cohort slot's Adam state into its client's row of the population's stack.

  A client drawn into several slots (sampling with replacement) keeps its first slot's state:
  a scatter with repeated indices leaves the winner to the backend, so the later slots are
  sent out of range and dropped, which makes the result the same on every device.
  """
  out_of_range = jax.tree.leaves(stacked)[0].shape[0]
  earlier = jnp.tril(clients[:, None] == clients[None, :], k=-1)  # [i, j]: slot j < i, same client
  rows = jnp.where(jnp.any(earlier, axis=1), out_of_range, clients)
  return jax.tree.map(lambda all_, x: all_.at[rows].set(x, mode='drop'), stacked, new)


EXPORT_FORMAT = 'fedpm-seed-and-coded-mask-v1'


def _leaf_names(tree: Any) -> list[str]:
  return ['/'.join(_parent(path) + (_name(path),))
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def export_model(state: FedPMState, key: jax.Array) -> dict[str, np.ndarray]:
  """The final model as the weights' seed and one coded mask (what `load_model` rebuilds).

  The mask is ``eval_params``'s sample with ``key`` (the run loop passes the key of its last
  evaluation, so the file reproduces the last logged ``test_accuracy``), coded as the uplink's
  empirical coder codes it. The payload is 64 bits of key data plus the coded mask
  (``exported_bits``); the arrays also name every leaf and its shape, so a file is never loaded
  into another network.

  Args:
    state: a FedPM state.
    key: the sampling key.

  Returns:
    Arrays for `numpy.savez`.
  """
  # Jitted: eagerly, every leaf shape would compile its sampling on its own.
  sample = jax.jit(_sample)(state.scores, key)
  flat = np.asarray(flatten_mask(jax.tree.map(lambda m: m[None], sample)))[0]
  code = comm.bernoulli_encode(flat)
  return {'format': np.array(EXPORT_FORMAT), 'weights_key': np.asarray(state.weights_key),
          # The PRNG the key data belongs to (the run's, JAX's default unless configured).
          'key_impl': np.array(str(jax.config.jax_default_prng_impl)),
          'words': code.words, 'ones': np.int64(code.ones), 'num_params': np.int64(flat.size),
          'names': np.array(_leaf_names(state.scores)),
          'shapes': np.array([json.dumps(list(np.shape(s))) for s in
                              jax.tree.leaves(state.scores)])}


def exported_bits(exported: Mapping[str, np.ndarray]) -> int:
  """The payload of an exported model: its seed (64 bits under JAX's default PRNG) plus its coded
  mask's length."""
  code = comm.BernoulliCode(np.asarray(exported['words'], np.uint32), int(exported['ones']), 0)
  n = int(exported['num_params'])
  return 32 * np.size(exported['weights_key']) + 32 * code.words.size + math.ceil(math.log2(n + 1))


def load_model(exported: Mapping[str, np.ndarray] | str | os.PathLike, params: Any) -> Any:
  """Rebuilds the exported network ``W ⊙ m`` from its seed and coded mask.

  Args:
    exported: `export_model`'s arrays, or the path of the ``.npz`` file holding them (a run
      writes ``model.npz`` into its workdir).
    params: the model's freshly initialised params (their structure, shapes and the values of
      any normalisation leaves, which stay frozen at their initial values).

  Returns:
    The effective params, ready for ``model.apply``.

  Raises:
    ValueError: for a file of another format or another network.
  """
  if not isinstance(exported, Mapping):
    with np.load(exported) as f:
      exported = {k: f[k] for k in f.files}
  if str(exported.get('format', '')) != EXPORT_FORMAT:
    raise ValueError(f'Not a FedPM export (format {exported.get("format")!r}; expected '
                     f'{EXPORT_FORMAT!r}).')
  names = [str(n) for n in exported['names']]
  shapes = [tuple(json.loads(str(s))) for s in exported['shapes']]
  want = list(zip(_leaf_names(params), [tuple(np.shape(w)) for w in jax.tree.leaves(params)]))
  if list(zip(names, shapes)) != want:
    raise ValueError(f'The export is of another network: its leaves {list(zip(names, shapes))} '
                     f'differ from the params given, {want}.')
  n = int(exported['num_params'])
  code = comm.BernoulliCode(np.asarray(exported['words'], np.uint32), int(exported['ones']), 0)
  mask = unflatten_mask(comm.bernoulli_decode(code, n), params)
  impl = str(exported['key_impl']) if 'key_impl' in exported else None
  key = jax.random.wrap_key_data(jnp.asarray(exported['weights_key'], jnp.uint32), impl=impl)
  weights = signed_constants(key, params)
  return jax.tree.map(lambda w, m: w * jnp.asarray(m, w.dtype), weights, mask)


def _check_run(hp: FedPMHparams, config: Any) -> None:
  del hp
  if config.server_optimizer == 'momentum' or config.server_learning_rate != 1.0:
    raise ValueError('FedPM\'s server takes a Beta posterior of the clients\' masks and has no '
                     'server optimizer: use server_optimizer=auto or sgd with '
                     f'server_learning_rate=1.0, got {config.server_optimizer!r} with '
                     f'{config.server_learning_rate}.')
  if config.weighted_aggregation:
    # Refused rather than ignored: config.json would otherwise say "weighted" of a run that was not.
    raise ValueError('FedPM\'s posterior counts each client\'s sampled mask once (the paper\'s '
                     'Beta-Bernoulli aggregation has no client weights): set '
                     'weighted_aggregation=False.')
  sgd_only = {'momentum': 0.0, 'weight_decay': 0.0, 'clip_norm': 0.0, 'lr_schedule': 'constant'}
  for name, default in sgd_only.items():
    if config.get(name, default) != default:
      raise ValueError(f'FedPM\'s clients run Adam on their scores (fedpm.adam_b1, adam_b2, '
                       f'adam_eps): {name} is a setting of the SGD clients and must stay '
                       f'{default!r}, got {config.get(name)!r}.')


def _build(hp: FedPMHparams, common: registry.Common) -> Algorithm:
  kwargs = common.kwargs()
  kwargs['server_optimizer'] = None  # a posterior, no step: _check_run refused anything else
  return fedpm(common.apply_fn, **kwargs, **dataclasses.asdict(hp))


registry.register(registry.Spec(
    name='fedpm', hparams=FedPMHparams, check=_check_run, build=_build,
    summary='FedPM (Isik et al., 2023): Bernoulli masks over a frozen random network'))
