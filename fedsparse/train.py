"""The run loop: build an experiment from a config, run its rounds, log and checkpoint.

The jitted round does all the numerical work; this loop only evaluates, writes
``metrics.jsonl`` (one complete JSON line per round), checkpoints with orbax, and shows progress
with an ETA. It holds no code for any particular algorithm: it builds the one the config names
through `fedsparse.algorithms.registry`.

Key streams, all from ``root = key(seed)``: model init ``fold_in(root, 0)``; round ``t``
``fold_in(fold_in(root, 1), t)`` (inside it, `fedsparse.engine.draw_cohort` separates the
cohort, the clients and the server); algorithm init ``fold_in(root, 2)``; the evaluation after
round ``t`` ``fold_in(fold_in(root, 3), t)``. Every key depends on (seed, t) only, so a run
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
``config.ssfl.density``; `fedsparse.algorithms.SSFLConfig`). A section may be left out (the
paper's defaults apply); a non-empty section of another algorithm, or a key the section's
dataclass lacks, is an error naming the valid keys.

Workdirs (`run`): one run at a time (`fedsparse.workdir.lock`); a workdir is resumed only with
the config that produced it (``num_rounds`` may grow; `fedsparse.workdir.OPERATIONAL_KEYS` may
change); checkpoints carry the cumulative bit counters, so totals stay true across resumes.
Config, data and workdir problems raise `UsageError` before anything is written.
"""

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedsparse import algorithms
from fedsparse import data as data_lib
from fedsparse import distributed
from fedsparse import engine
from fedsparse import models
from fedsparse import workdir as workdir_lib
from fedsparse.workdir import UsageError

__all__ = ['Experiment', 'UsageError', 'algorithm_hparams', 'build_experiment', 'run',
           'validate_config']

# Server optimizer: 'auto' = what the algorithm's paper uses (FedAvgM: momentum; else SGD).
SERVER_OPTIMIZERS = ('auto', 'sgd', 'momentum')
# Per-client metrics; scalar metrics other than these go into metrics.jsonl as they are.
_VECTOR_METRICS = ('client_loss', 'clients', 'bits_up', 'bits_down', 'bits_up_all',
                   'bits_down_all')
_PAYLOAD_PREFIX = engine.algorithm.PAYLOAD_PREFIX

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
MODEL_FILE = 'model.npz'  # the algorithm's compact export of the final model, if it has one


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
  batch_size: int  # the static minibatch size: config.batch_size capped at the largest client


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
  _require(config.model in models.MODELS,
           f'Unknown model {config.model!r}; valid: {", ".join(models.MODELS)}.')
  _require(config.partition in data_lib.PARTITIONERS,
           f'Unknown partition {config.partition!r}; valid: {", ".join(data_lib.PARTITIONERS)}.')
  _require(config.strategy in engine.STRATEGIES,
           f'Unknown strategy {config.strategy!r}; valid: {", ".join(engine.STRATEGIES)}.')
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
  for key in ('learning_rate', 'server_learning_rate'):
    _require(config[key] > 0, f'{key} must be positive, got {config[key]}.')
  _require(0 < config.lr_decay <= 1, f'lr_decay must be in (0, 1], got {config.lr_decay}.')
  for key in ('momentum', 'server_momentum'):
    _require(0 <= config[key] < 1, f'{key} must be in [0, 1), got {config[key]}.')
  for key in ('weight_decay', 'clip_norm'):
    _require(config[key] >= 0, f'{key} must be >= 0, got {config[key]}.')
  _require(config.dirichlet_alpha > 0,
           f'dirichlet_alpha must be > 0, got {config.dirichlet_alpha}.')
  _require(config.lr_schedule in engine.LR_SCHEDULES,
           f'Unknown lr_schedule {config.lr_schedule!r}; valid: {", ".join(engine.LR_SCHEDULES)}.')
  if config.lr_schedule == 'cosine':
    _require(0 <= config.cosine_min_lr < config.learning_rate,
             f'cosine_min_lr must be in [0, learning_rate), got {config.cosine_min_lr}.')
    _require(config.local_steps == 0 or config.cosine_epochs > 0,
             'lr_schedule=cosine with local_steps > 0 needs cosine_epochs > 0.')
  _require(config.server_optimizer in SERVER_OPTIMIZERS,
           f'Unknown server_optimizer {config.server_optimizer!r}; valid: '
           f'{", ".join(SERVER_OPTIMIZERS)}.')
  _require(config.partial_batches in engine.PARTIAL_BATCHES,
           f'Unknown partial_batches {config.partial_batches!r}; valid: '
           f'{", ".join(engine.PARTIAL_BATCHES)}.')
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


def _build_algorithm(config: ml_collections.ConfigDict, hparams: Any, apply_fn: Any,
                     mapping: engine.ClientMapping, batch_size: int,
                     traced: dict[str, jax.Array] | None = None) -> engine.Algorithm:
  """The config's algorithm; ``traced`` replaces some `TRACEABLE_KEYS` with (traced) arrays."""
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
      mapping=mapping, num_rounds=config.num_rounds)
  return spec.build(hparams, common)


class _Values:
  """A config's values with some replaced (by traced arrays); read-only, item and attribute."""

  def __init__(self, config: ml_collections.ConfigDict, overrides: dict[str, Any]):
    self._config, self._overrides = config, overrides

  def __getattr__(self, key: str) -> Any:
    return self._overrides[key] if key in self._overrides else getattr(self._config, key)

  __getitem__ = __getattr__


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Validates the config, loads and partitions the data, and builds model and algorithm."""
  validate_config(config)
  dataset = data_lib.load_dataset(config.dataset, data_dir=config.get('data_dir') or None)
  fed_data, info = data_lib.make_federated_data(
      dataset, config.num_clients, config.partition, seed=config.seed,
      alpha=config.dirichlet_alpha, classes_per_client=config.classes_per_client,
      shards_per_client=config.shards_per_client)
  if config.clients_per_round > fed_data.num_clients and not config.sample_with_replacement:
    raise ValueError(
        f'clients_per_round ({config.clients_per_round}) exceeds the {fed_data.num_clients} '
        f'clients left after dropping {info.dropped_clients} empty ones.')
  mapping = engine.ClientMapping(config.strategy, chunk_size=config.chunk_size,
                                 size_groups=config.size_groups)
  conv_impl = models.resolve_impl(config.conv_impl, batched_clients=mapping.batches_clients)
  model = models.get_model(config.model, dataset.num_classes, conv_impl=conv_impl)
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
  dummy = jnp.zeros((1,) + tuple(fed_data.input_shape), jnp.float32)
  try:
    params = jax.jit(model.init)(init_key, dummy)['params']
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'Model {config.model!r} cannot take {config.dataset!r} inputs of shape '
        f'{tuple(fed_data.input_shape)} ({str(e).splitlines()[0]}); choose a model for this '
        f'input size (valid models: {", ".join(models.MODELS)}).') from None
  hparams = algorithm_hparams(config)
  # A minibatch never exceeds the largest client: a larger static size would only add padded
  # example slots (the same numbers at unbounded cost).
  batch_size = min(config.batch_size, int(info.max_size))
  algorithm = _build_algorithm(config, hparams, model.apply, mapping, batch_size)
  # Abstract init: checks that need the params' shapes (e.g. a density that keeps no weight)
  # fail here, before the run writes anything.
  jax.eval_shape(algorithm.init, _algorithm_key(config.seed), params, fed_data)
  evaluate = engine.make_evaluator(model.apply, config.eval_batch_size)
  return Experiment(config, fed_data, info, model, hparams, mapping, params, algorithm,
                    evaluate, batch_size)


def _round_key(seed: int, round_index: int) -> jax.Array:
  """Round t's key depends on (seed, t) only, so resumed runs replay the same randomness."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), round_index)


def _algorithm_key(seed: int) -> jax.Array:
  """The algorithm's init key: its own stream, distinct from model init and rounds."""
  return jax.random.fold_in(jax.random.key(seed), 2)


def _eval_key(seed: int, round_index: int) -> jax.Array:
  """The key of the evaluation after round t (stochastic models sample with it)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), round_index)


def _format_eta(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _checkpoint_manager(workdir: pathlib.Path, every: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (slow import; optional)
  # Saves are requested explicitly (every `checkpoint_every` rounds and after the last round).
  # In a multi-process job every process creates the manager on the same (shared, absolute)
  # path and takes part in every save and restore: orbax writes each array once, from the
  # process that owns it, and synchronises the processes itself.
  options = ocp.CheckpointManagerOptions(max_to_keep=1, save_interval_steps=max(every, 1),
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def _saved_config(config: ml_collections.ConfigDict, hparams: Any) -> dict[str, Any]:
  """The config as the run resolves it: the algorithm's section with its defaults, and an npz
  dataset's absolute path (a relative one would name another file from another directory)."""
  saved = json.loads(config.to_json_best_effort())
  saved[config.algorithm] = dataclasses.asdict(hparams)
  if not saved.get(config.algorithm):
    del saved[config.algorithm]
  npz = data_lib.sources._NPZ_PREFIX  # pylint: disable=protected-access
  if saved['dataset'].startswith(npz):
    saved['dataset'] = npz + os.path.abspath(os.path.expanduser(saved['dataset'][len(npz):]))
  return saved


def _make_workdir(workdir: pathlib.Path) -> bool:
  """Creates ``workdir`` if needed (returns whether it did) and checks that it is writable."""
  if workdir.exists() and not workdir.is_dir():
    raise UsageError(f'--workdir {str(workdir)!r} is a file, not a directory; pass a directory '
                     '(it is created if missing).')
  created = not workdir.exists()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / '.write_test'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise UsageError(f'Cannot use workdir {str(workdir)!r}: {e.strerror or e}; pass a '
                     '--workdir in a writable location.') from None
  return created


def _clear(workdir: pathlib.Path) -> None:
  """Removes what a run writes into ``workdir`` (and nothing else)."""
  for name in (METRICS_FILE, CONFIG_FILE, MODEL_FILE, MODEL_FILE + '.tmp'):
    (workdir / name).unlink(missing_ok=True)
  for events in workdir.glob(workdir_lib.EVENTS_GLOB):
    events.unlink()
  shutil.rmtree(workdir / CHECKPOINT_DIR, ignore_errors=True)


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  folder = workdir / CHECKPOINT_DIR
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _resolved_hint(prior: dict[str, Any], saved: dict[str, Any],
                   config: ml_collections.ConfigDict) -> str:
  """Where an algorithm resolved defaults from shared keys (e.g. FedDST's ``readjust_end`` from
  ``num_rounds``), how to keep the recorded values while changing those keys."""
  spec = algorithms.registry.get(config.algorithm)
  old, new = prior.get(config.algorithm), saved.get(config.algorithm)
  if spec.resolve is None or not isinstance(old, dict) or not isinstance(new, dict):
    return ''
  keep = [f'--config.{config.algorithm}.{k}={v!r}' for k, v in sorted(old.items())
          if k in new and new[k] != v]
  if not keep:
    return ''
  return (f' (the run resolved some {config.algorithm} defaults from keys such as num_rounds; '
          f'to continue it, pass its recorded values: {" ".join(keep)})')


def _check_resumable(workdir: pathlib.Path, saved: dict[str, Any],
                     config: ml_collections.ConfigDict, *, log: bool = True
                     ) -> tuple[int, list[dict[str, Any]]]:
  """Decides where a run in ``workdir`` starts: (checkpointed round to restore, metric rows).

  Raises:
    UsageError: when the workdir was produced by a different results-determining config,
      ``num_rounds`` is below the rounds already run, or the checkpoint and the metrics
      disagree -- before anything in the workdir changes.
  """
  way_out = ('use a new --workdir, or pass --overwrite (overwrite=True in train.run) to '
             'delete its metrics and checkpoints and start over')
  config_path, metrics_path = workdir / CONFIG_FILE, workdir / METRICS_FILE
  steps = _checkpoint_steps(workdir)
  if not config_path.exists():
    if metrics_path.exists() or steps:
      raise UsageError(f'Workdir {str(workdir)!r} holds metrics or checkpoints but no '
                       f'{CONFIG_FILE}, so what produced them is unknown; {way_out}.')
    return 0, []
  rows = workdir_lib.read_metrics(metrics_path)
  if not steps and not (metrics_path.exists() and metrics_path.read_text().strip()):
    return 0, []  # nothing ran (e.g. the last attempt failed to compile): a fresh start
  try:
    prior = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise UsageError(f'{config_path} is not valid JSON ({e}); {way_out}.') from None
  diffs = workdir_lib.config_differences(prior, saved)
  if diffs:
    raise UsageError(
        f'Workdir {str(workdir)!r} holds a run with a different config ({"; ".join(diffs)}). '
        f'Only {", ".join(sorted(workdir_lib.OPERATIONAL_KEYS))} may change when resuming'
        f'{_resolved_hint(prior, saved, config)}; {way_out}.')
  if config.num_rounds < len(rows):
    raise UsageError(
        f'num_rounds={config.num_rounds} is below the {len(rows)} rounds this workdir already '
        f'holds; num_rounds may only grow when resuming ({way_out}).')
  start = steps[-1] if steps else 0
  if start > len(rows):
    raise UsageError(
        f'The checkpoint after round {start} in {str(workdir)!r} has metrics for only '
        f'{len(rows)} rounds, so the totals it continues from cannot be checked; {way_out}.')
  if not start and rows and log:
    logging.info('No checkpoint in the workdir: running from round 1 again (the %d rounds '
                 'there are recomputed to the same numbers).', len(rows))
  return start, rows[:start]


class Program:
  """The device side of a run loop: the jitted work of one run, or of a group of runs.

  `run` drives one experiment (`_SingleProgram`); `fedsparse.sweep` drives a group of sweep
  members whose rounds are mapped over a member axis and compiled once. The loop
  (`run_members`) only sees this interface, so logging, checkpointing, resuming and exporting
  are the same code for both.

  Attributes:
    num_members: how many runs the program computes.
    multiprocess: whether it can run in every process of a multi-process `jax.distributed`
      job (its state, inputs and outputs global arrays, see `fedsparse.distributed`).
  """
  num_members: int = 1
  multiprocess: bool = False

  def init(self) -> Any:
    """The initial state of every member (stacked for groups)."""
    raise NotImplementedError

  def abstract_state(self) -> Any:
    """`init`'s shapes, without running it (a resume restores into them)."""
    raise NotImplementedError

  def member_state(self, state: Any, i: int) -> Any:
    """Member ``i``'s state (for its checkpoint and export)."""
    raise NotImplementedError

  def stack(self, states: list[Any]) -> Any:
    """The inverse of `member_state` over all members."""
    raise NotImplementedError

  def compile(self, state: Any) -> None:
    """Compiles the round for ``state``'s shapes (timed by the loop)."""
    raise NotImplementedError

  def step(self, state: Any, t: int) -> tuple[Any, list[dict[str, np.ndarray]]]:
    """Round ``t`` of every member: the new state and each member's metrics on the host."""
    raise NotImplementedError

  def evaluate(self, state: Any, t: int) -> list[dict[str, float]]:
    """Every member's evaluation after round ``t`` (`_evaluate`'s keys)."""
    raise NotImplementedError

  def key(self, key: jax.Array) -> jax.Array:
    """``key`` placed where the program's state lives (for work outside `step`)."""
    return key


class _SingleProgram(Program):
  """One experiment: its algorithm's round jitted as it is.

  Where the state lives (`placement`): on one device, unless the clients are sharded over
  several devices or processes. Then the state, the data and every key are replicated over
  the global mesh (`fedsparse.distributed.replicated`), and the round returns its state and
  metrics replicated: every process holds the whole state (to checkpoint it, evaluate it,
  export it) and reads the metrics from its own copy. One program serves one process with
  several devices and several processes alike, so both compute the same numbers.
  """
  multiprocess = True

  def __init__(self, exp: Experiment):
    self.on_mesh = jax.process_count() > 1 or exp.mapping.resolved() == 'sharded'
    if self.on_mesh:
      # A computation over the global mesh takes global arrays only.
      exp = dataclasses.replace(exp, params=distributed.to_global(exp.params),
                                data=distributed.to_global(exp.data))
    self.exp = exp
    self.round_fn = None

  @property
  def placement(self) -> jax.sharding.Sharding:
    """Where the state lives, and where a resume restores it (whatever devices wrote it)."""
    if self.on_mesh:
      return distributed.replicated()
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def key(self, key):
    return distributed.to_global(key) if self.on_mesh else key

  def _init_args(self):
    return self.key(_algorithm_key(self.exp.config.seed)), self.exp.params, self.exp.data

  def init(self):
    state = self.exp.algorithm.init(*self._init_args())
    return jax.device_put(state, self.placement) if self.on_mesh else state

  def abstract_state(self):
    # Explicit shardings: orbax restores into them, not into the devices of the run that wrote
    # the checkpoint (e.g. two, when this run has one: a topology mismatch otherwise).
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.placement),
                        jax.eval_shape(self.exp.algorithm.init, *self._init_args()))

  def member_state(self, state, i):
    return state

  def stack(self, states):
    (state,) = states
    return state

  def compile(self, state):
    exp = self.exp
    # Replicated outputs by contract, not by the compiler's choice (which today is replication
    # for every algorithm's state and metrics): every process then holds the whole state, to
    # checkpoint, evaluate and export it, and reads the metrics from its own copy.
    kwargs = {'out_shardings': self.placement} if self.on_mesh else {}
    self.round_fn = engine.jit(exp.algorithm.round, batched_clients=exp.mapping.batches_clients,
                               donate_argnums=0, **kwargs).lower(
        state, exp.data, self.key(_round_key(exp.config.seed, 0))).compile()

  def step(self, state, t):
    state, metrics = self.round_fn(state, self.exp.data,
                                   self.key(_round_key(self.exp.config.seed, t)))
    return state, [distributed.to_host(metrics)]

  def evaluate(self, state, t):
    return [_evaluate(self.exp, state, self.key(_eval_key(self.exp.config.seed, t)))]


@dataclasses.dataclass
class Member:
  """The workdir side of one run in the loop: its files, bit counters and fate.

  Attributes:
    config: the run's config.
    workdir: its directory (locked by the caller).
    saved: the resolved config written as ``config.json``.
    history: the metric rows a resume keeps (those up to its checkpoint).
    algorithm: the run's algorithm built with its own values (host-side coding and export).
    error: set when the run failed (a non-finite loss); the loop stops writing its rows.
  """
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  saved: dict[str, Any]
  history: list[dict[str, Any]]
  algorithm: engine.Algorithm
  error: Exception | None = None
  cum: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2, np.int64))
  last: dict[str, Any] = dataclasses.field(default_factory=dict)
  manager: Any = None
  metrics_file: Any = None
  events: Any = None


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *,
        overwrite: bool = False) -> dict[str, Any]:
  """Runs (or resumes) an experiment and returns its last metrics row.

  A workdir belongs to one config: re-running it resumes from its latest checkpoint (or
  starts over where it has none), provided the config differs at most in
  `fedsparse.workdir.OPERATIONAL_KEYS` and ``num_rounds`` has not dropped below the rounds
  already run. Anything else raises `UsageError` before the workdir changes. One run at a
  time holds a workdir (`fedsparse.workdir.lock`).

  Args:
    config: a flat experiment config (see the module docstring).
    workdir: receives ``config.json``, ``metrics.jsonl``, TensorBoard event files and
      ``checkpoints/``.
    overwrite: delete the workdir's previous metrics, checkpoints and config first.

  Returns:
    The metrics of the final round, including the last evaluation.

  Raises:
    UsageError: bad config, data or workdir (nothing is written).
    FloatingPointError: the training loss became non-finite (its row is written, with
      ``null`` values).
  """
  workdir = pathlib.Path(workdir)
  primary = distributed.is_primary()
  with _usage_errors():
    validate_config(config)  # cheap checks first: nothing is created for a bad config
    # The processes of a multi-process job must run the same experiment into the same workdir
    # (the same flags everywhere): otherwise their collectives would not match.
    distributed.check_same([config.to_dict(), str(workdir.absolute()), overwrite],
                           'the config, --workdir or --overwrite')
  with contextlib.ExitStack() as held:
    # Only process 0 creates and locks the workdir; the others learn whether it could.
    created, had_lock_file = _on_primary(lambda: _open_workdir(workdir, held), (False, True))
    try:
      _check_shared(workdir)
      with _usage_errors():
        exp = build_experiment(config)  # data, model, abstract init: may still reject input
      saved = _saved_config(config, exp.hparams)
      if overwrite and primary:
        _clear(workdir)
      distributed.barrier('workdir cleared')  # before any process reads it
      start_round, history = _check_resumable(workdir, saved, config)
      with _usage_errors():
        distributed.check_same([start_round, history], f'the state of {str(workdir)!r}')
    except UsageError:
      # Leave no trace of a run that never started (the lock is still held meanwhile).
      if primary and not had_lock_file:
        (workdir / workdir_lib.LOCK_FILE).unlink(missing_ok=True)
      if created:
        with contextlib.suppress(OSError):
          workdir.rmdir()
      raise
    _log_experiment(exp)
    member = Member(config, workdir, saved, history, exp.algorithm)
    run_members(_SingleProgram(exp), [member], start_round)
    if member.error is not None:
      raise member.error
    return member.last


def _open_workdir(workdir: pathlib.Path, held: contextlib.ExitStack) -> tuple[bool, bool]:
  """Creates ``workdir`` if needed and locks it until ``held`` closes.

  Returns:
    Whether it was created, and whether it had a lock file before.
  """
  created = _make_workdir(workdir)
  had_lock_file = (workdir / workdir_lib.LOCK_FILE).exists()
  held.enter_context(workdir_lib.lock(workdir))
  return created, had_lock_file


def _on_primary(fn: Any, others: Any) -> Any:
  """``fn()`` in process 0 (returned there), ``others`` in the other processes.

  A `UsageError` of ``fn`` is raised in every process: the others would otherwise go on to
  wait in a collective that process 0 never reaches.
  """
  result, error = others, None
  if distributed.is_primary():
    try:
      result = fn()
    except UsageError as e:
      error = e
  failed = distributed.broadcast(np.int32(error is not None))
  if error is not None:
    raise error
  if failed:
    raise UsageError('Process 0 could not create or lock the workdir; its output says why.')
  return result


def _check_shared(workdir: pathlib.Path) -> None:
  """Checks that every process sees the workdir that process 0 locked.

  Every process reads the workdir (to resume) and writes checkpoints into it (orbax saves in
  concert): it must be one directory, on a filesystem every host shares. The lock file, which
  names process 0's pid, host and start time, is what they compare.
  """
  if jax.process_count() == 1:
    return
  path = workdir / workdir_lib.LOCK_FILE
  with _usage_errors():
    distributed.check_same(path.read_text() if path.exists() else None,
                           f'{str(path)!r} (--workdir must be one directory on a filesystem '
                           'that every host shares)')


@contextlib.contextmanager
def _usage_errors():
  """Re-raises config, data and file problems as `UsageError` (one line for the CLI)."""
  try:
    yield
  except UsageError:
    raise
  except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
          PermissionError) as e:
    raise UsageError(str(e)) from e


def _log_experiment(exp: Experiment) -> None:
  config, info = exp.config, exp.partition_info
  logging.info('%s: %d clients (%d empty dropped), %s examples per client (min/mean/max), '
               'model %s with %s params, strategy %s.', config.dataset, info.num_clients,
               info.dropped_clients, f'{info.min_size}/{info.mean_size:.1f}/{info.max_size}',
               config.model, f'{sum(x.size for x in jax.tree.leaves(exp.params)):,}',
               exp.mapping.resolved())
  if config.batch_size > info.max_size:
    logging.info('batch_size %d exceeds the largest client (%d examples): minibatches hold at '
                 'most %d examples.', config.batch_size, info.max_size, info.max_size)


def run_members(program: Program, members: list[Member], start_round: int) -> None:
  """The round loop over one run or a group of runs that start at the same round.

  Each member's workdir gets its rows, checkpoints, TensorBoard events and export as if it
  had run alone. A member whose loss becomes non-finite gets its row (with ``null`` values)
  and ``member.error``; the others go on (the group's rounds still compute it, unlogged).

  Args:
    program: the device side (one `Program` member per entry of ``members``).
    members: the runs, their workdirs locked and checked by `_check_resumable`.
    start_round: the round every member resumes after (0: a fresh start).
  """
  num_rounds = members[0].config.num_rounds
  if jax.process_count() > 1 and not program.multiprocess:
    raise UsageError(f'{type(program).__name__} runs in one process only, but this is process '
                     f'{jax.process_index()} of {jax.process_count()}; run it without '
                     'jax.distributed (drop --coordinator_address and the like).')
  try:
    with contextlib.ExitStack() as stack:
      state = _start(program, members, start_round, stack)
      if start_round < num_rounds:
        _rounds(program, members, state, start_round, num_rounds)
      else:
        _finish(program, members, state)
  finally:
    for m in members if distributed.is_primary() else ():
      folder = m.workdir / CHECKPOINT_DIR
      if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # no empty checkpoints/ left behind (e.g. a NaN in the first rounds)


def _start(program: Program, members: list[Member], start_round: int,
           stack: contextlib.ExitStack) -> Any:
  """Initial or restored state; each member's files made consistent with it."""
  if start_round:
    # A resume restores into the state's shapes: no need to redo init's work (FLASH's stage 1).
    abstract = program.abstract_state()
    states = []
  else:
    # Timed on its own (FLASH's stage 1 trains here), so that round 1's time is its own.
    t0 = time.perf_counter()
    state = jax.block_until_ready(program.init())
    logging.info('Algorithm initialised in %.1f s (compile and one-time work such as FLASH\'s '
                 'stage 1).', time.perf_counter() - t0)
  # In a multi-process job, process 0 writes the files; every process checkpoints (orbax
  # coordinates the processes' saves and restores itself).
  primary = distributed.is_primary()
  if not start_round:
    for m in members:
      m.history = []
      if primary:
        shutil.rmtree(m.workdir / CHECKPOINT_DIR, ignore_errors=True)  # stale or partial saves
        (m.workdir / MODEL_FILE).unlink(missing_ok=True)  # an earlier run's export is not ours
    distributed.barrier('stale checkpoints removed')  # before any process opens checkpoints/
  for i, m in enumerate(members):
    every = m.config.checkpoint_every
    if every or start_round:
      m.manager = _checkpoint_manager(m.workdir, every)
      stack.callback(m.manager.close)  # also on errors: restore, compile, a non-finite loss
    if start_round:
      states.append(_restore(m, program.member_state(abstract, i), start_round))
    m.last = m.history[-1] if m.history else {}
    if not primary:
      continue
    workdir_lib.write_atomic(m.workdir / CONFIG_FILE,
                             json.dumps(m.saved, indent=2, sort_keys=True) + '\n')
    # Only the rounds the restored state has seen (drops any torn or later line).
    workdir_lib.write_atomic(m.workdir / METRICS_FILE, ''.join(
        workdir_lib.json_row(r) + '\n' for r in m.history))
    if m.config.get('tensorboard', True):
      # A last row that `_finish` will evaluate is written again whole: its round's earlier
      # events are purged with the rest.
      redo_last = start_round >= m.config.num_rounds and not _evaluated(m.history)
      m.events = stack.enter_context(
          workdir_lib.EventWriter(m.workdir, start_round - 1 if redo_last else start_round))
  return program.stack(states) if start_round else state


def _restore(m: Member, abstract: Any, start_round: int) -> Any:
  """Member ``m``'s state and bit counters from its checkpoint after ``start_round``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (slow import; optional)
  try:
    restored = m.manager.restore(start_round, args=ocp.args.StandardRestore(
        {'state': abstract, 'cum_bits': m.cum}))
  except Exception as e:  # pylint: disable=broad-except -- orbax raises many types
    raise UsageError(
        f'The checkpoint after round {start_round} in {str(m.workdir)!r} does not match this '
        f'run\'s state ({type(e).__name__}: {(str(e).splitlines() or [""])[0][:200]}); it was '
        'written by another version of fedsparse, by a sweep whose members trace other '
        'hyperparameters, or damaged. Use a new --workdir, or --overwrite to start over.') from e
  m.cum = np.asarray(restored['cum_bits'], np.int64)
  expected = [m.history[-1].get('cum_bits_up'), m.history[-1].get('cum_bits_down')]
  if m.cum.tolist() != expected:
    raise UsageError(
        f'The checkpoint after round {start_round} counts {m.cum.tolist()} bits up/down but '
        f'metrics.jsonl {expected}; the workdir was modified outside fedsparse. Use a new '
        '--workdir, or --overwrite to start over.')
  logging.info('Resumed %s from the checkpoint after round %d.', m.workdir, start_round)
  return restored['state']


def _metrics_row(m: Member, metrics: dict[str, Any], t: int, seconds: float) -> dict[str, Any]:
  """Member ``m``'s row for round ``t`` from the round's metrics (host coding added)."""
  host_seconds = None
  if m.algorithm.host_bits is not None:
    # Data-dependent encodings: lengths computed on the host from the round's payloads.
    t_host = time.perf_counter()
    host = m.algorithm.host_bits(metrics)
    host_seconds = time.perf_counter() - t_host
    seconds += host_seconds
    metrics = dict(metrics)
    for name, value in host.items():
      if name in metrics:  # bits, added to the round's in-jit counts
        metrics[name] = np.asarray(metrics[name], np.int64) + np.asarray(value, np.int64)
      else:  # a host-computed statistic (e.g. FedPM's entropy estimate), logged as it is
        metrics[name] = value
  # Cohort traffic plus any population-wide one-time traffic (e.g. SSFL's scoring round),
  # summed in int64: per-client counts are int32, totals are not.
  up = sum(int(np.sum(metrics[k], dtype=np.int64)) for k in ('bits_up', 'bits_up_all')
           if k in metrics)
  down = sum(int(np.sum(metrics[k], dtype=np.int64)) for k in ('bits_down', 'bits_down_all')
             if k in metrics)
  m.cum += np.array([up, down], np.int64)
  row = {'round': t + 1, 'train_loss': float(metrics['train_loss']), 'bits_up': up,
         'bits_down': down, 'cum_bits_up': int(m.cum[0]), 'cum_bits_down': int(m.cum[1]),
         'round_seconds': seconds}
  if host_seconds is not None:
    row['host_bits_seconds'] = host_seconds  # of round_seconds: coding on the host
  row.update({k: float(v) for k, v in metrics.items()
              if k not in _VECTOR_METRICS and k not in row and np.ndim(v) == 0
              and not k.startswith(_PAYLOAD_PREFIX)})
  return row


def _rounds(program: Program, members: list[Member], state: Any, start_round: int,
            num_rounds: int) -> None:
  """Rounds ``start_round + 1 .. num_rounds`` of every member, then the exports."""
  t0 = time.perf_counter()
  program.compile(state)
  compile_seconds = time.perf_counter() - t0
  logging.info('Round compiled in %.1f s%s.', compile_seconds,
               f' for {len(members)} runs' if len(members) > 1 else '')
  config = members[0].config
  with contextlib.ExitStack() as stack:
    for m in members if distributed.is_primary() else ():
      m.metrics_file = stack.enter_context((m.workdir / METRICS_FILE).open('a'))
    elapsed = 0.0
    for t in range(start_round, num_rounds):
      alive = [i for i, m in enumerate(members) if m.error is None]
      if not alive:
        break
      t0 = time.perf_counter()
      state, metrics = program.step(state, t)
      seconds = time.perf_counter() - t0
      rows = {}
      for i in alive:
        try:
          rows[i] = _metrics_row(members[i], metrics[i], t, seconds)
        except Exception as e:  # pylint: disable=broad-except -- this member's host work only
          members[i].error = e
      alive = list(rows)
      if not alive:
        break
      if t == start_round:
        for row in rows.values():
          row['compile_seconds'] = compile_seconds
      finite = {i for i in alive if math.isfinite(rows[i]['train_loss'])}
      if finite and ((t + 1) % config.eval_every == 0 or t + 1 == num_rounds):
        evals = program.evaluate(state, t)
        for i in finite:
          rows[i].update(evals[i])
      for i in alive:
        try:
          _log_row(members[i], rows[i], t, state, program, i)
        except Exception as e:  # pylint: disable=broad-except -- e.g. a failed checkpoint save
          members[i].error = e
      elapsed += time.perf_counter() - t0
      eta = elapsed / (t + 1 - start_round) * (num_rounds - t - 1)
      best = max(alive, key=lambda i: rows[i].get('test_accuracy', -1.0))
      row = rows[best]
      acc = f' test_acc {row["test_accuracy"]:.4f}' if 'test_accuracy' in row else ''
      who = (f' ({len(alive)} runs, best {members[best].workdir.name})'
             if len(members) > 1 else '')
      logging.info('round %d/%d  loss %.4f%s  up %.2f MB  %.2f s/round  ETA %s%s', t + 1,
                   num_rounds, row['train_loss'], acc, members[best].cum[0] / 8e6, seconds,
                   _format_eta(eta), who)
  for i, m in enumerate(members):
    if m.manager is not None:
      m.manager.wait_until_finished()
    if m.error is None:
      try:
        _export(program, m, state, i)
      except Exception as e:  # pylint: disable=broad-except -- this member's export only
        m.error = e


def _log_row(m: Member, row: dict[str, Any], t: int, state: Any, program: Program,
             i: int) -> None:
  """Writes member ``m``'s row (metrics.jsonl, TensorBoard) and its checkpoint if due."""
  if m.metrics_file is not None:  # process 0's (the only one in a single-process run)
    m.metrics_file.write(workdir_lib.json_row(row) + '\n')  # one write per line: never torn
    m.metrics_file.flush()
  if m.events is not None:
    m.events.write(row)
  m.last = row
  if not math.isfinite(row['train_loss']):
    m.error = FloatingPointError(
        f'The training loss became {row["train_loss"]} in round {t + 1} (the data were '
        f'checked finite, so training diverged); lower learning_rate (now '
        f'{m.config.learning_rate}) or set clip_norm (now {m.config.clip_norm}).')
    return
  every = m.config.checkpoint_every
  if m.manager is not None and every and (
      (t + 1) % every == 0 or t + 1 == m.config.num_rounds):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    m.manager.save(t + 1, args=ocp.args.StandardSave(
        {'state': program.member_state(state, i), 'cum_bits': m.cum}), force=True)


def _export(program: Program, m: Member, state: Any, i: int) -> None:
  """Writes the algorithm's export of member ``m``'s final model (atomically), if it has one."""
  if m.algorithm.export is None or not m.last:
    return
  # Computed in every process (on global arrays it is a collective), written by process 0.
  arrays = distributed.to_host(m.algorithm.export(
      program.member_state(state, i), program.key(_eval_key(m.config.seed, m.last['round'] - 1))))
  if not distributed.is_primary():
    return
  tmp = m.workdir / (MODEL_FILE + '.tmp')
  with tmp.open('wb') as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, m.workdir / MODEL_FILE)


def _evaluate(exp: Experiment, state: Any, key: jax.Array) -> dict[str, float]:
  """The global model's test metrics, and each of the algorithm's variants' as ``name/metric``."""
  ev = distributed.to_host(exp.evaluate(exp.algorithm.eval_params(state, key), exp.data))
  out = {k: float(v) for k, v in ev.items()}
  if exp.algorithm.eval_variants is not None:
    for name, params in exp.algorithm.eval_variants(state, key).items():
      ev = distributed.to_host(exp.evaluate(params, exp.data))
      out.update({f'{name}/{k}': float(v) for k, v in ev.items()})
  return out


def _evaluated(history: list[dict[str, Any]]) -> bool:
  return bool(history) and 'test_accuracy' in history[-1]


def _finish(program: Program, members: list[Member], state: Any) -> None:
  """Resumed runs with no rounds left: each last row, evaluated if it was not yet."""
  last_round = members[0].history[-1]['round']
  pending = [m for m in members if not _evaluated(m.history)]
  evals = program.evaluate(state, last_round - 1) if pending else None
  for i, m in enumerate(members):
    m.last = dict(m.history[-1])
    if not _evaluated(m.history):
      # E.g. a run cut to the round of its last checkpoint: the final round is always evaluated.
      m.last.update(evals[i])
      if distributed.is_primary():
        workdir_lib.write_atomic(m.workdir / METRICS_FILE, ''.join(
            workdir_lib.json_row(r) + '\n' for r in m.history[:-1] + [m.last]))
      if m.events is not None:
        m.events.write(m.last)
    logging.info('%s already holds all %d rounds.', m.workdir, m.last['round'])
    # Always rewritten (it is cheap): a file left by a run cut before its export, or by an
    # earlier run in this workdir, must not stand for this state.
    _export(program, m, state, i)
