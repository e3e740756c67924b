"""The algorithm contract, checked on toy data: what every registered algorithm must satisfy.

An algorithm added through `fedsparse.algorithms.registry.register` -- in this repository or
in a user's own module -- is run by the same loop, sweeps and mapping strategies as the
built-in ones, which rely on a few promises. :func:`check_algorithm` runs one toy experiment of
a registered algorithm and checks each of them, raising an ``AssertionError`` that names the
broken clause:

* ``metrics``: a round returns ``train_loss`` (float32 scalar), ``client_loss`` ([K] float32),
  ``clients`` ([K] int32 ids of the population), ``bits_up`` and ``bits_down`` ([K] int32,
  non-negative); ``bits_up_all`` and ``bits_down_all``, where present, are [N] int32.
* ``round``: the state holds an int32 scalar ``round`` that each round advances by one.
* ``determinism``: the same key gives the same initial state; the same state and key give the
  same state and metrics, also from a second compilation of the round.
* ``retrace``: the jitted round traces once; later rounds reuse the compiled program.
* ``strategies``: every client mapping strategy (``vmap``, ``chunked``, ``sequential``)
  computes the same round (within float32 reordering; `STRATEGY_METRICS` aside).
* ``lr_decay``: on round ``t`` the clients train at ``learning_rate · lr_decay^t``: the round
  of a state at ``t`` under ``(η, γ)`` equals the round of that state under ``(η γ^t, 1)``.
* ``layout`` (algorithms with `fedsparse.algorithms.registry.Spec.traceable` hyperparameters):
  built with hyperparameters A but the layout of B (as traced arrays), the algorithm computes
  B's initial state and round -- what a sweep relies on to run members of different densities
  through one compiled round. B halves each traceable value.

Strategies are compared on round 1 of the ``vmap``, ``chunked`` and ``sequential`` mappings (not
``sharded``, which needs several devices, nor ``size_groups``).

The repository's tests run it over `fedsparse.algorithms.registry.names`, so a new algorithm
gets these checks by registering.

Example:
  >>> from fedsparse import testing
  >>> testing.check_algorithm('fedavg')
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsparse import data as data_lib
from fedsparse import engine
from fedsparse import models
from fedsparse.algorithms import registry

__all__ = ['CLAUSES', 'STRATEGY_METRICS', 'check_algorithm', 'tiny_dataset', 'tiny_federated']

CLAUSES = ('metrics', 'round', 'determinism', 'retrace', 'strategies', 'lr_decay', 'layout')
_STRATEGIES = ('vmap', 'chunked', 'sequential')
# Metrics that describe how a round was computed, not what: they may differ between strategies.
STRATEGY_METRICS = ('padding_ratio',)


def tiny_dataset(n_train: int = 60, n_test: int = 30, num_classes: int = 3,
                 seed: int = 0) -> data_lib.Dataset:
  """A 4×4×1 toy image set whose label is readable from the pixels (learnable)."""
  rng = np.random.default_rng(seed)

  def make(n):
    y = rng.integers(0, num_classes, n).astype(np.int32)
    x = rng.integers(0, 60, (n, 4, 4, 1))
    x[np.arange(n), y, 0, 0] = 255  # class c lights up pixel (c, 0)
    return x.astype(np.uint8), y
  x_train, y_train = make(n_train)
  x_test, y_test = make(n_test)
  return data_lib.Dataset(name='tiny', x_train=x_train, y_train=y_train, x_test=x_test,
                          y_test=y_test, num_classes=num_classes, scale=255.0,
                          mean=(0.2,), std=(0.3,))


def tiny_federated(num_clients: int = 6, method: str = 'dirichlet', alpha: float = 0.5,
                   seed: int = 0) -> data_lib.FederatedData:
  """`tiny_dataset` split over ``num_clients`` (uneven sizes under the default Dirichlet)."""
  fd, _ = data_lib.make_federated_data(tiny_dataset(), num_clients, method, seed=seed,
                                       alpha=alpha)
  return fd


def _build(name: str, hparams: Any, apply_fn: Any, strategy: str, learning_rate: float,
           lr_decay: float, clients_per_round: int, num_rounds: int,
           layout: Any = None) -> engine.Algorithm:
  spec = registry.get(name)
  common = registry.Common(
      apply_fn=apply_fn,
      cohort=engine.CohortConfig(clients_per_round, weighted=True),
      local=engine.LocalConfig(batch_size=4, local_epochs=2),
      learning_rate=learning_rate, lr_decay=lr_decay,
      server_optimizer=optax.sgd(1.0, momentum=0.9 if spec.server_momentum else None),
      mapping=engine.ClientMapping(strategy, chunk_size=2), num_rounds=num_rounds,
      layout=layout)
  return spec.build(hparams, common)


def _check(clause: str, condition: bool, message: str) -> None:
  if not condition:
    raise AssertionError(f'{clause}: {message}')


def _numbers(x: Any) -> np.ndarray:
  """An array (typed PRNG keys as their raw data) on the host."""
  if jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _results(output: tuple[Any, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
  """A round's state and metrics less the metrics of how it computed (`STRATEGY_METRICS`)."""
  state, metrics = output
  return state, {k: v for k, v in metrics.items() if k not in STRATEGY_METRICS}


def _close(clause: str, got: Any, want: Any, rtol: float, what: str) -> None:
  """Trees equal: integers and bools exactly, floats within ``rtol``."""
  got_leaves, got_def = jax.tree.flatten(got)
  want_leaves, want_def = jax.tree.flatten(want)
  _check(clause, got_def == want_def, f'{what}: structures differ ({got_def} vs {want_def}).')
  for path_leaf, g, w in zip(jax.tree_util.tree_leaves_with_path(want), got_leaves,
                             want_leaves):
    path = jax.tree_util.keystr(path_leaf[0])
    g, w = _numbers(g), _numbers(w)
    _check(clause, g.shape == w.shape, f'{what}{path}: shapes {g.shape} vs {w.shape}.')
    if np.issubdtype(w.dtype, np.floating):
      ok = np.allclose(g, w, rtol=rtol, atol=rtol, equal_nan=True)
    else:
      ok = np.array_equal(g, w)
    _check(clause, bool(ok), f'{what}{path} differs (max |diff| '
           f'{np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))) if g.size else 0}).')


def check_algorithm(name: str, hparams: dict[str, Any] | None = None, *,
                    rtol: float = 1e-5) -> None:
  """Runs a toy experiment of the registered algorithm ``name`` and checks the contract.

  Args:
    name: a registered algorithm (`fedsparse.algorithms.registry.names`).
    hparams: overrides of its hyperparameters' defaults (e.g. to reach a code path that the
      paper's defaults leave off on three toy rounds).
    rtol: the tolerance of float comparisons between mapping strategies and learning rates.

  Raises:
    AssertionError: naming the first clause of `CLAUSES` the algorithm breaks.
  """
  spec = registry.get(name)
  hp = spec.hparams(**(hparams or {}))
  data = tiny_federated(num_clients=6)
  model = models.get_model('mlp', 3, hidden_sizes=(8,))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1), jnp.float32))['params']
  k, n, rounds, lr, decay = 3, data.num_clients, 6, 0.1, 0.5

  def build(strategy='sequential', learning_rate=lr, lr_decay=decay, hparams=hp, layout=None):
    return _build(name, hparams, model.apply, strategy, learning_rate, lr_decay, k, rounds,
                  layout)

  algorithm = build()
  traces = []

  def round_fn(state, data_, key):
    traces.append(None)
    return algorithm.round(state, data_, key)
  jitted = jax.jit(round_fn)
  state = algorithm.init(jax.random.key(1), params, data)
  states, keys = [state], [jax.random.key(10 + t) for t in range(3)]
  for t in range(3):
    state, metrics = jitted(state, data, keys[t])
    states.append(state)

    # metrics
    for key_, shape, dtype in (('train_loss', (), jnp.float32),
                               ('client_loss', (k,), jnp.float32),
                               ('clients', (k,), jnp.int32), ('bits_up', (k,), jnp.int32),
                               ('bits_down', (k,), jnp.int32)):
      _check('metrics', key_ in metrics, f'round {t} returns no {key_!r}.')
      value = metrics[key_]
      _check('metrics', value.shape == shape and value.dtype == dtype,
             f'{key_!r} is {value.dtype}{list(value.shape)}, not {jnp.dtype(dtype)}'
             f'{list(shape)}.')
    for key_ in ('bits_up_all', 'bits_down_all'):
      if key_ in metrics:
        _check('metrics', metrics[key_].shape == (n,) and metrics[key_].dtype == jnp.int32,
               f'{key_!r} is {metrics[key_].dtype}{list(metrics[key_].shape)}, not int32[{n}].')
    clients = np.asarray(metrics['clients'])
    _check('metrics', bool(np.all((clients >= 0) & (clients < n))),
           f'clients {clients.tolist()} are not ids of the {n} clients.')
    for key_ in ('bits_up', 'bits_down'):
      _check('metrics', bool(np.all(np.asarray(metrics[key_]) >= 0)), f'negative {key_!r}.')

    # round
    counter = getattr(state, 'round', None)
    _check('round', counter is not None and counter.shape == () and counter.dtype == jnp.int32,
           'the state has no int32 scalar `round`.')
    _check('round', int(counter) == t + 1, f'after {t + 1} rounds the state says {int(counter)}.')

  # retrace
  _check('retrace', len(traces) == 1, f'the jitted round traced {len(traces)} times in 3 rounds '
         '(a state whose dtypes, shapes or structure change from round to round).')

  # determinism: init again; a second compilation of the round.
  _close('determinism', algorithm.init(jax.random.key(1), params, data), states[0], 0.0,
         'a repeated init')
  fresh = jax.jit(algorithm.round)
  _close('determinism', fresh(states[2], data, keys[2]), jitted(states[2], data, keys[2]), 0.0,
         'a recompiled round')

  # strategies
  want = fresh(states[1], data, keys[1])
  for strategy in _STRATEGIES[:-1]:  # the last, sequential, is `fresh`'s
    got = jax.jit(build(strategy).round)(states[1], data, keys[1])
    _close('strategies', _results(got), _results(want), rtol,
           f'strategy {strategy!r} vs sequential:')

  # lr_decay: the state after t rounds at (η, γ) trains round t at η γ^t (exact in float32:
  # γ = 1/2 scales by a power of two). The undecayed rate is traced: one compilation.
  undecayed = jax.jit(lambda state_, key_, lr_: build(learning_rate=lr_, lr_decay=1.0).round(
      state_, data, key_))
  for t in (0, 2):
    _close('lr_decay', fresh(states[t], data, keys[t]),
           undecayed(states[t], keys[t], jnp.float32(lr * decay ** t)), rtol,
           f'round {t} at (learning_rate={lr}, lr_decay={decay}) vs at '
           f'(learning_rate={lr * decay ** t}, lr_decay=1):')

  # layout
  if spec.traceable:
    _check('layout', algorithm.layout is not None,
           f'the spec names traceable hyperparameters {spec.traceable} but the algorithm has '
           'no layout.')
    other = dataclasses.replace(hp, **{f: getattr(hp, f) / 2 for f in spec.traceable})
    target = build(hparams=other)
    arrays = jax.tree.map(jnp.asarray, target.layout(params))
    borrowed = build(layout=arrays)
    init_b = target.init(jax.random.key(1), params, data)
    _close('layout', borrowed.init(jax.random.key(1), params, data), init_b, 0.0,
           f'init with the layout of {other}:')
    via_layout = jax.jit(lambda state_, key_, layout_: build(layout=layout_).round(
        state_, data, key_))
    _close('layout', via_layout(init_b, keys[0], arrays),
           jax.jit(target.round)(init_b, data, keys[0]), rtol,
           f'the round with the (traced) layout of {other}:')
