"""FedAvg and FedAvgM: dense federated averaging, with plain or momentum server updates.

* H. B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas. "Communication-Efficient
  Learning of Deep Networks from Decentralized Data." AISTATS 2017. arXiv:1602.05629.
* T.-M. H. Hsu, H. Qi, M. Brown. "Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification." arXiv:1909.06335, 2019 (FedAvgM: server momentum).

Each round: sample K clients; each starts from the global params and runs local SGD; it uploads
its model delta Δ_k = w_k − w (dense float32). The server averages the deltas (weights ∝ n_k, or
uniform) and feeds −Δ̄ as a pseudo-gradient to an optax server optimizer: ``sgd(1.0)`` recovers
plain averaging, ``sgd(lr, momentum)`` is FedAvgM.

Example:

  >>> import jax
  >>> from fedsparse import data as data_lib, engine, models
  >>> fd, _ = data_lib.make_federated_data(data_lib.load_dataset('digits'), 10, 'iid', seed=0)
  >>> model = models.get_model('mlp', 10)
  >>> params = model.init(jax.random.key(0), jax.numpy.zeros((1, 8, 8, 1)))['params']
  >>> alg = fedavg(model.apply, cohort=engine.CohortConfig(5),
  ...              local=engine.LocalConfig(batch_size=32), learning_rate=0.05)
  >>> state = alg.init(jax.random.key(1), params, fd)
  >>> state, metrics = engine.jit(alg.round)(state, fd, jax.random.key(2))
  >>> int(state.round), metrics['bits_up'].shape, float(metrics['padding_ratio'])
  (1, (5,), 1.0)
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsparse import comm
from fedsparse import masks
from fedsparse.algorithms import registry
from fedsparse.data import FederatedData
from fedsparse.engine import (Algorithm, Broadcast, ClientMapping, CohortConfig, LocalConfig,
                              aggregation_weights, cohort_metrics, draw_cohort, run_clients,
                              sgd_client,
                              weighted_mean)

__all__ = ['FedAvgHparams', 'FedAvgMHparams', 'FedAvgState', 'RoundCore', 'client_learning_rate',
           'fedavg', 'fedavg_round_core']


class FedAvgState(NamedTuple):
  """Server state: global params, server optimizer state and the round counter."""
  params: Any
  opt_state: optax.OptState
  round: jax.Array  # int32 scalar


def client_learning_rate(learning_rate: float, lr_decay: float, round_: jax.Array) -> jax.Array:
  """Per-round decayed client learning rate ``lr · decay^t`` (a traced scalar)."""
  return jnp.float32(learning_rate) * jnp.float32(lr_decay) ** round_.astype(jnp.float32)


RoundCore = Callable[..., tuple[Any, optax.OptState, dict[str, jax.Array]]]


def fedavg_round_core(apply_fn: Callable[..., jax.Array], *, cohort: CohortConfig,
                      local: LocalConfig, learning_rate: float, lr_decay: float = 1.0,
                      server_optimizer: optax.GradientTransformation | None = None,
                      mapping: ClientMapping = ClientMapping(), enforce: str = 'forward'
                      ) -> tuple[RoundCore, optax.GradientTransformation]:
  """The body of a FedAvg round, optionally under a static mask; shared by the sparse variants.

  Returns ``(core, server_optimizer)`` where ``core(params, opt_state, round_, data, key,
  mask=None) -> (params, opt_state, metrics)`` draws the round's cohort
  (`fedsparse.engine.draw_cohort`), trains every client from ``params`` with
  `fedsparse.engine.sgd_client` (under ``mask`` with the given enforcement, if any), averages the
  deltas and applies the server optimizer to −Δ̄. With a mask the new global params are
  re-masked, so pruned entries stay exactly zero whatever the server optimizer does.
  ``metrics`` holds ``train_loss``, ``client_loss``, ``clients`` and ``padding_ratio``; bit
  counts are the caller's (they depend on the encoding).

  Args: as :func:`fedavg`, plus ``enforce``: how a mask is enforced during local training (see
  `fedsparse.engine.ENFORCEMENTS`).
  """
  registry.check_learning_rates(learning_rate, lr_decay)
  server_optimizer = server_optimizer or optax.sgd(1.0)
  dense_program = sgd_client(apply_fn, local)
  masked_program = sgd_client(apply_fn, local, enforce=enforce)

  def core(params, opt_state, round_, data, key, mask=None):
    drawn = draw_cohort(key, data.num_clients, cohort)
    lr = client_learning_rate(learning_rate, lr_decay, round_)
    program = dense_program if mask is None else masked_program
    result = run_clients(program, Broadcast(params, lr, mask), drawn.clients, drawn.keys, data,
                         local, mapping)
    weights = aggregation_weights(data.client_size[drawn.clients], cohort.weighted)
    pseudo_grad = jax.tree.map(jnp.negative, weighted_mean(result.outputs, weights))
    updates, opt_state = server_optimizer.update(pseudo_grad, opt_state, params)
    params = optax.apply_updates(params, updates)
    if mask is not None:
      params = masks.apply(params, mask)
    metrics = cohort_metrics(result, drawn.clients, weights)
    return params, opt_state, metrics

  return core, server_optimizer


def fedavg(apply_fn: Callable[..., jax.Array], *, cohort: CohortConfig, local: LocalConfig,
           learning_rate: float, lr_decay: float = 1.0,
           server_optimizer: optax.GradientTransformation | None = None,
           mapping: ClientMapping = ClientMapping()) -> Algorithm:
  """FedAvg with an optax server optimizer (default: plain averaging, ``optax.sgd(1.0)``).

  Args:
    apply_fn: the flax ``Module.apply`` of the model.
    cohort: cohort size, sampling and aggregation weighting.
    local: local training settings (batch size, epochs or steps, client SGD options).
    learning_rate: client learning rate at round 0.
    lr_decay: multiplicative per-round decay of the client learning rate.
    server_optimizer: applied to the pseudo-gradient −Δ̄.
    mapping: how clients are mapped over the cohort axis.

  Returns:
    An :class:`~fedsparse.engine.Algorithm`.
  """
  core, server_optimizer = fedavg_round_core(
      apply_fn, cohort=cohort, local=local, learning_rate=learning_rate, lr_decay=lr_decay,
      server_optimizer=server_optimizer, mapping=mapping)
  k = cohort.clients_per_round

  def init(key: jax.Array, params: Any, data: FederatedData | None = None) -> FedAvgState:
    del key, data  # deterministic, data-free
    return FedAvgState(params=params, opt_state=server_optimizer.init(params),
                       round=jnp.zeros((), jnp.int32))

  def round_fn(state: FedAvgState, data: FederatedData, key: jax.Array
               ) -> tuple[FedAvgState, dict[str, jax.Array]]:
    params, opt_state, metrics = core(state.params, state.opt_state, state.round, data, key)
    bits = comm.dense_bits(state.params)
    metrics.update(bits_up=comm.per_client(bits, k), bits_down=comm.per_client(bits, k))
    return FedAvgState(params, opt_state, state.round + 1), metrics

  return Algorithm(init=init, round=round_fn, eval_params=lambda state, key: state.params)


@dataclasses.dataclass(frozen=True)
class FedAvgHparams:
  """FedAvg has no hyperparameters of its own: its server optimizer is the shared one."""


@dataclasses.dataclass(frozen=True)
class FedAvgMHparams:
  """FedAvgM has no hyperparameters of its own: ``server_optimizer='auto'`` means momentum.

  From Python, FedAvgM is `fedavg` with ``server_optimizer=optax.sgd(lr, momentum=β)``.
  """


registry.register(registry.Spec(
    name='fedavg', hparams=FedAvgHparams, summary='FedAvg (McMahan et al., 2017), dense',
    build=lambda hp, common: fedavg(common.apply_fn, **common.kwargs())))
registry.register(registry.Spec(
    name='fedavgm', hparams=FedAvgMHparams, server_momentum=True,
    summary='FedAvgM (Hsu et al., 2019): FedAvg with server momentum, dense',
    build=lambda hp, common: fedavg(common.apply_fn, **common.kwargs())))
