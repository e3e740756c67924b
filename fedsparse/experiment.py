"""Building an experiment from a config: validation, data, model, algorithm, keys, evaluation.

One builder serves every way of running: `fedsparse.train.run` (one run, one or several
processes) and `fedsparse.sweep` (many runs mapped over a member axis) call the same pieces --
`federated_split`, `client_mapping`, `make_model`, `init_params`, `batch_cap`,
`build_algorithm`, the key streams and `evaluate` -- so a sweep member computes what its
separate run computes.

Key streams, all from ``root = key(seed)``: model init ``fold_in(root, 0)`` (`model_key`);
round ``t`` ``fold_in(fold_in(root, 1), t)`` (`round_key`; inside it,
`fedsparse.engine.draw_cohort` separates the cohort, the clients and the server); algorithm
init ``fold_in(root, 2)`` (`algorithm_key`); the evaluation after round ``t``
``fold_in(fold_in(root, 3), t)`` (`eval_key`). Every key depends on (seed, t) only, so a run
killed mid-way resumes from its last checkpoint to the same numbers as an uninterrupted run, and
every algorithm at the same seed trains the same cohorts.

Config keys. Shared keys are flat (see ``experiments/configs`` for complete examples):
``algorithm``, ``dataset``,
``data_dir``, ``model``, ``conv_impl``, ``partition``, ``dirichlet_alpha``,
``classes_per_client``, ``shards_per_client``, ``num_clients``, ``clients_per_round``,
``sample_with_replacement``, ``weighted_aggregation``, ``num_rounds``, ``local_epochs``,
``local_steps``, ``batch_size``, ``learning_rate``, ``lr_decay``, ``momentum``,
``weight_decay``, ``clip_norm``, ``lr_schedule``, ``cosine_epochs``, ``cosine_min_lr``,
``server_optimizer``, ``server_learning_rate``, ``server_momentum``, ``strategy``,
``chunk_size``, ``eval_every``, ``eval_batch_size``, ``checkpoint_every``, ``tensorboard``,
``seed``, ``partial_batches``, ``size_groups``. An algorithm's own hyperparameters live in a
section named after it, with the fields of its registered dataclass (e.g.
``config.ssfl.density``; `fedsparse.algorithms.SSFLHparams`). A section may be left out (the
paper's defaults apply); a non-empty section of another algorithm, or a key the section's
dataclass lacks, is an error naming the valid keys.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedsparse import algorithms
from fedsparse import checks
from fedsparse import data as data_lib
from fedsparse import engine
from fedsparse import models
from fedsparse import workdir as workdir_lib

__all__ = ['SERVER_OPTIMIZERS', 'TRACEABLE_KEYS', 'Experiment', 'algorithm_hparams',
           'algorithm_key', 'batch_cap', 'build_algorithm', 'build_experiment', 'client_mapping',
           'eval_key', 'eval_stream', 'evaluate', 'federated_split', 'init_params',
           'make_model', 'model_key', 'round_key', 'round_stream', 'saved_config',
           'traced_keys', 'validate_config']

# Server optimizer: 'auto' = what the algorithm's paper uses (FedAvgM: momentum; else SGD).
SERVER_OPTIMIZERS = ('auto', 'sgd', 'momentum')


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built from a config before anything is compiled."""
  config: ml_collections.ConfigDict
  data: data_lib.FederatedData
  partition_info: Any
  model: Any
  hparams: Any
  mapping: engine.ClientMapping
  params: Any
  algorithm: engine.Algorithm
  evaluate: Any
  batch_size: int  # the static minibatch size: `batch_cap`


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any data is loaded or anything compiles, on a bad config."""
  algorithms.registry.get(config.algorithm)  # fails with the valid names
  for key, value in workdir_lib.flatten(config.to_dict()).items():
    # Every number must be finite (inf passes `> 0`, and NaN fails every comparison silently).
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{key} must be a finite number, got {value}.')
  for key, valid in (('model', models.MODELS), ('partition', data_lib.PARTITIONERS),
                     ('strategy', engine.STRATEGIES), ('lr_schedule', engine.LR_SCHEDULES),
                     ('server_optimizer', SERVER_OPTIMIZERS),
                     ('partial_batches', engine.PARTIAL_BATCHES)):
    checks.check_choice(key, config[key], tuple(valid))
  for key in ('num_clients', 'clients_per_round', 'num_rounds', 'batch_size', 'eval_every',
              'eval_batch_size', 'chunk_size', 'classes_per_client', 'shards_per_client'):
    value = config[key]
    _require(isinstance(value, int) and value > 0,
             f'{key} must be a positive integer, got {value!r}.')
  for key in ('local_steps', 'local_epochs', 'cosine_epochs', 'checkpoint_every'):
    value = config[key]
    _require(isinstance(value, int) and value >= 0,
             f'{key} must be an integer >= 0, got {value!r}.')
  _require(isinstance(config.seed, int) and 0 <= config.seed < 2**32,
           f'seed must be an integer in [0, 2**32), got {config.seed!r}.')
  _require(config.local_steps > 0 or config.local_epochs > 0,
           f'local_epochs must be positive when local_steps is 0, got {config.local_epochs}.')
  algorithms.registry.check_learning_rates(config.learning_rate, config.lr_decay)
  _require(config.server_learning_rate > 0,
           f'server_learning_rate must be positive, got {config.server_learning_rate}.')
  for key in ('momentum', 'server_momentum'):
    _require(0 <= config[key] < 1, f'{key} must be in [0, 1), got {config[key]}.')
  for key in ('weight_decay', 'clip_norm'):
    _require(config[key] >= 0, f'{key} must be >= 0, got {config[key]}.')
  _require(config.dirichlet_alpha > 0,
           f'dirichlet_alpha must be > 0, got {config.dirichlet_alpha}.')
  if config.lr_schedule == 'cosine':
    _require(0 <= config.cosine_min_lr < config.learning_rate,
             f'cosine_min_lr must be in [0, learning_rate), got {config.cosine_min_lr}.')
    _require(config.local_steps == 0 or config.cosine_epochs > 0,
             'lr_schedule=cosine with local_steps > 0 needs cosine_epochs > 0.')
  _require(isinstance(config.get('tensorboard', True), bool),
           f'tensorboard must be true or false, got {config.get("tensorboard")!r}.')
  _require(isinstance(config.size_groups, int) and config.size_groups > 0,
           f'size_groups must be a positive integer, got {config.size_groups!r}.')
  hparams = algorithm_hparams(config)
  spec = algorithms.registry.get(config.algorithm)
  if spec.check is not None:
    spec.check(hparams, config)  # the algorithm's checks against the shared keys
  _require(config.sample_with_replacement or config.clients_per_round <= config.num_clients,
           f'clients_per_round ({config.clients_per_round}) exceeds num_clients '
           f'({config.num_clients}); lower it or set sample_with_replacement=True.')


def algorithm_hparams(config: ml_collections.ConfigDict) -> Any:
  """The algorithm's hyperparameters from its config section (defaults where it is absent).

  Raises:
    ValueError: for an unknown algorithm, a key its section does not have (naming the valid
      ones), a non-empty section of another algorithm, or a value its dataclass rejects.
  """
  spec = algorithms.registry.get(config.algorithm)
  fields = [f.name for f in dataclasses.fields(spec.hparams)]
  for other in algorithms.registry.names():
    if other != spec.name and other in config and len(config[other]):
      raise ValueError(
          f'The config has a section {other!r} with keys {sorted(config[other].keys())} but '
          f'algorithm is {spec.name!r}, which would ignore them; use a config file written for '
          f'{spec.name!r} (one without that section), or keep algorithm={other}.')
  section = config.get(spec.name) or {}
  if not isinstance(section, (dict, ml_collections.ConfigDict)):
    raise ValueError(f'config.{spec.name} must be a section of keys '
                     f'({", ".join(fields) or "none"}), got {section!r}.')
  values = dict(section.items())
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f'Unknown key(s) {", ".join(unknown)} in config section {spec.name!r}; '
                     f'valid: {", ".join(fields) or "none (this algorithm has no own keys)"}.')
  try:
    hparams = spec.hparams(**values)
    return hparams if spec.resolve is None else spec.resolve(hparams, config)
  except ValueError as e:
    raise ValueError(f'config.{spec.name}: {e}') from None


# Shared keys a sweep may trace: numbers that enter the round only as values, never as shapes,
# counts or branches, so that members differing in them share one compiled round.
TRACEABLE_KEYS = ('learning_rate', 'lr_decay', 'momentum', 'weight_decay',
                  'server_learning_rate', 'server_momentum')


def traced_keys(config: ml_collections.ConfigDict, swept: Any) -> tuple[str, ...]:
  """The keys among ``swept`` that a sweep traces: `TRACEABLE_KEYS` and, as dotted section
  keys (``ssfl.density``), the algorithm's `fedsparse.algorithms.registry.Spec.traceable`."""
  spec = algorithms.registry.get(config.algorithm)
  section = tuple(f'{spec.name}.{name}' for name in spec.traceable)
  return tuple(k for k in TRACEABLE_KEYS + section if k in swept)


def build_algorithm(config: ml_collections.ConfigDict, hparams: Any, apply_fn: Any,
                     mapping: engine.ClientMapping, batch_size: int,
                    traced: dict[str, jax.Array] | None = None,
                    layout: Any = None) -> engine.Algorithm:
  """The config's algorithm.

  Args:
    config: the run config.
    hparams: its algorithm's hyperparameters (`algorithm_hparams`).
    apply_fn: the model's ``apply``.
    mapping: how clients are mapped (`client_mapping`).
    batch_size: the static minibatch size (`batch_cap`).
    traced: replaces some `TRACEABLE_KEYS` with (traced) arrays.
    layout: the algorithm's layout (`fedsparse.engine.Algorithm.layout`) as (traced) arrays,
      replacing what it would derive from its `traceable` hyperparameters.
  """
  spec = algorithms.registry.get(config.algorithm)
  momentum = (config.server_optimizer == 'momentum'
              or (config.server_optimizer == 'auto' and spec.server_momentum))
  unknown = sorted(set(traced or ()) - set(TRACEABLE_KEYS))
  if unknown:
    raise ValueError(f'Cannot trace {", ".join(unknown)}; traceable keys: '
                     f'{", ".join(TRACEABLE_KEYS)}.')
  config = _Values(config, traced or {})
  common = algorithms.registry.Common(
      apply_fn=apply_fn,
      cohort=engine.CohortConfig(clients_per_round=config.clients_per_round,
                                 replace=config.sample_with_replacement,
                                 weighted=config.weighted_aggregation),
      local=engine.LocalConfig(batch_size=batch_size, local_epochs=config.local_epochs,
                               local_steps=config.local_steps, momentum=config.momentum,
                               weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                               lr_schedule=config.lr_schedule,
                               cosine_epochs=config.cosine_epochs,
                               cosine_min_lr=config.cosine_min_lr,
                               partial_batches=config.partial_batches),
      learning_rate=config.learning_rate, lr_decay=config.lr_decay,
      server_optimizer=optax.sgd(config.server_learning_rate,
                                 momentum=config.server_momentum if momentum else None),
      mapping=mapping, num_rounds=config.num_rounds, layout=layout)
  return spec.build(hparams, common)


class _Values:
  """A config's values with some replaced (by traced arrays); read-only, item and attribute."""

  def __init__(self, config: ml_collections.ConfigDict, overrides: dict[str, Any]):
    self._config, self._overrides = config, overrides

  def __getattr__(self, key: str) -> Any:
    return self._overrides[key] if key in self._overrides else getattr(self._config, key)

  __getitem__ = __getattr__


def federated_split(config: ml_collections.ConfigDict, dataset: data_lib.Dataset
                    ) -> tuple[data_lib.FederatedData, Any]:
  """The config's partition of ``dataset`` over its clients (seeded by ``config.seed``).

  Raises:
    ValueError: when fewer clients than ``clients_per_round`` are left after dropping empty
      ones (and sampling is without replacement).
  """
  fed_data, info = data_lib.make_federated_data(
      dataset, config.num_clients, config.partition, seed=config.seed,
      alpha=config.dirichlet_alpha, classes_per_client=config.classes_per_client,
      shards_per_client=config.shards_per_client)
  if config.clients_per_round > fed_data.num_clients and not config.sample_with_replacement:
    raise ValueError(
        f'clients_per_round ({config.clients_per_round}) exceeds the {fed_data.num_clients} '
        f'clients left after dropping {info.dropped_clients} empty ones.')
  return fed_data, info


def client_mapping(config: ml_collections.ConfigDict) -> engine.ClientMapping:
  """How the config maps clients over the cohort axis."""
  return engine.ClientMapping(config.strategy, chunk_size=config.chunk_size,
                              size_groups=config.size_groups)


def make_model(config: ml_collections.ConfigDict, num_classes: int, batched_clients: bool) -> Any:
  """The config's model, its convolutions in the form that suits the client mapping."""
  conv_impl = models.resolve_impl(config.conv_impl, batched_clients=batched_clients)
  return models.get_model(config.model, num_classes, conv_impl=conv_impl)


def init_params(model: Any, config: ml_collections.ConfigDict, input_shape: Any) -> Any:
  """The model's initial params from the seed's model stream (`model_key`).

  Raises:
    ValueError: when the model cannot take inputs of ``input_shape``.
  """
  dummy = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  try:
    return _jitted_init(model)(model_key(config.seed), dummy)['params']
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'Model {config.model!r} cannot take {config.dataset!r} inputs of shape '
        f'{tuple(input_shape)} ({str(e).splitlines()[0]}); choose a model for this '
        f'input size (valid models: {", ".join(models.MODELS)}).') from None


@functools.lru_cache(maxsize=8)
def _jitted_init(model: Any) -> Any:
  """One jitted ``model.init`` per model: a sweep initialises every member's seed with it."""
  return jax.jit(model.init)


def batch_cap(config: ml_collections.ConfigDict, info: Any) -> int:
  """The static minibatch size: ``batch_size``, capped at the largest client.

  A larger static size would only add padded example slots (the same numbers at unbounded
  cost).
  """
  return min(config.batch_size, int(info.max_size))


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Validates the config, loads and partitions the data, and builds model and algorithm."""
  validate_config(config)
  dataset = data_lib.load_dataset(config.dataset, data_dir=config.get('data_dir') or None)
  fed_data, info = federated_split(config, dataset)
  mapping = client_mapping(config)
  model = make_model(config, dataset.num_classes, mapping.batches_clients)
  params = init_params(model, config, fed_data.input_shape)
  hparams = algorithm_hparams(config)
  batch_size = batch_cap(config, info)
  algorithm = build_algorithm(config, hparams, model.apply, mapping, batch_size)
  # Abstract init: checks that need the params' shapes (e.g. a density that keeps no weight)
  # fail here, before the run writes anything.
  jax.eval_shape(algorithm.init, algorithm_key(config.seed), params, fed_data)
  evaluator = engine.make_evaluator(model.apply, config.eval_batch_size)
  return Experiment(config, fed_data, info, model, hparams, mapping, params, algorithm,
                    evaluator, batch_size)


# --------------------------------------------------------------------------------------------------
# Key streams (see the module docstring).


def model_key(seed: int) -> jax.Array:
  """The model's init key."""
  return jax.random.fold_in(jax.random.key(seed), 0)


def round_stream(seed: int) -> jax.Array:
  """The stream of round keys: round t's key is ``fold_in(round_stream(seed), t)``."""
  return jax.random.fold_in(jax.random.key(seed), 1)


def round_key(seed: int, round_index: int) -> jax.Array:
  """Round t's key depends on (seed, t) only, so resumed runs replay the same randomness."""
  return jax.random.fold_in(round_stream(seed), round_index)


def algorithm_key(seed: int) -> jax.Array:
  """The algorithm's init key: its own stream, distinct from model init and rounds."""
  return jax.random.fold_in(jax.random.key(seed), 2)


def eval_stream(seed: int) -> jax.Array:
  """The stream of evaluation keys: ``fold_in(eval_stream(seed), t)`` after round t."""
  return jax.random.fold_in(jax.random.key(seed), 3)


def eval_key(seed: int, round_index: int) -> jax.Array:
  """The key of the evaluation after round t (stochastic models sample with it)."""
  return jax.random.fold_in(eval_stream(seed), round_index)


# --------------------------------------------------------------------------------------------------
# Evaluation and the recorded config.


def evaluate(evaluator: Any, algorithm: engine.Algorithm, state: Any, key: jax.Array,
             data: data_lib.FederatedData) -> dict[str, jax.Array]:
  """The global model's test metrics, and each of the algorithm's variants' as ``name/metric``.

  Args:
    evaluator: `fedsparse.engine.make_evaluator`'s function.
    algorithm: the algorithm whose state is evaluated.
    state: its state.
    key: the evaluation's key (`eval_key`).
    data: the federated data (its test set and the clients' test splits).

  Returns:
    Scalar arrays, on the device (traceable: a sweep maps it over members).
  """
  out = dict(evaluator(algorithm.eval_params(state, key), data))
  if algorithm.eval_variants is not None:
    for name, params in algorithm.eval_variants(state, key).items():
      out.update({f'{name}/{k}': v for k, v in evaluator(params, data).items()})
  return out


def saved_config(config: ml_collections.ConfigDict, hparams: Any) -> dict[str, Any]:
  """The config as the run resolves it: the algorithm's section with its defaults, and an npz
  dataset's absolute path (a relative one would name another file from another directory)."""
  saved = json.loads(config.to_json_best_effort())
  saved[config.algorithm] = dataclasses.asdict(hparams)
  if not saved.get(config.algorithm):
    del saved[config.algorithm]
  if saved['dataset'].startswith(data_lib.NPZ_PREFIX):
    path = saved['dataset'][len(data_lib.NPZ_PREFIX):]
    saved['dataset'] = data_lib.NPZ_PREFIX + os.path.abspath(os.path.expanduser(path))
  return saved
