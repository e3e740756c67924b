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
``server_optimizer``, ``server_learning_rate``,
``server_momentum``, ``strategy``, ``chunk_size``, ``eval_every``, ``eval_batch_size``,
``checkpoint_every``, ``seed``, ``partial_batches``, ``size_groups``. An algorithm's own
hyperparameters live in a section named after it, with the fields of its registered dataclass
(e.g. ``config.ssfl.density``; `fedsparse.algorithms.SSFLConfig`). A section may be left out
(the paper's defaults apply); a non-empty section of another algorithm, or a key the section's
dataclass lacks, is an error naming the valid keys.
"""

import dataclasses
import json
import math
import os
import pathlib
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
from fedsparse import engine
from fedsparse import models

__all__ = ['Experiment', 'algorithm_hparams', 'build_experiment', 'run', 'validate_config']

# Server optimizer: 'auto' = what the algorithm's paper uses (FedAvgM: momentum; else SGD).
SERVER_OPTIMIZERS = ('auto', 'sgd', 'momentum')
# Per-client metrics; scalar metrics other than these go into metrics.jsonl as they are.
_VECTOR_METRICS = ('client_loss', 'clients', 'bits_up', 'bits_down', 'bits_up_all',
                   'bits_down_all')
_PAYLOAD_PREFIX = engine.algorithm.PAYLOAD_PREFIX

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


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


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any data is loaded or anything compiles, on a bad config."""
  algorithms.registry.get(config.algorithm)  # fails with the valid names
  _require(config.model in models.MODELS,
           f'Unknown model {config.model!r}; valid: {", ".join(models.MODELS)}.')
  _require(config.partition in data_lib.PARTITIONERS,
           f'Unknown partition {config.partition!r}; valid: {", ".join(data_lib.PARTITIONERS)}.')
  _require(config.strategy in engine.STRATEGIES,
           f'Unknown strategy {config.strategy!r}; valid: {", ".join(engine.STRATEGIES)}.')
  for key in ('num_clients', 'clients_per_round', 'num_rounds', 'batch_size', 'eval_every',
              'eval_batch_size', 'chunk_size'):
    value = config[key]
    _require(isinstance(value, int) and value > 0,
             f'{key} must be a positive integer, got {value!r}.')
  _require(config.local_steps >= 0, f'local_steps must be >= 0, got {config.local_steps}.')
  _require(config.local_steps > 0 or config.local_epochs > 0,
           f'local_epochs must be positive when local_steps is 0, got {config.local_epochs}.')
  for key in ('learning_rate', 'server_learning_rate'):
    _require(config[key] > 0, f'{key} must be positive, got {config[key]}.')
  _require(0 < config.lr_decay <= 1, f'lr_decay must be in (0, 1], got {config.lr_decay}.')
  for key in ('momentum', 'server_momentum'):
    _require(0 <= config[key] < 1, f'{key} must be in [0, 1), got {config[key]}.')
  for key in ('weight_decay', 'clip_norm', 'checkpoint_every'):
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
    return spec.hparams(**values)
  except ValueError as e:
    raise ValueError(f'config.{spec.name}: {e}') from None


def _build_algorithm(config: ml_collections.ConfigDict, hparams: Any, apply_fn: Any,
                     mapping: engine.ClientMapping) -> engine.Algorithm:
  spec = algorithms.registry.get(config.algorithm)
  momentum = (config.server_optimizer == 'momentum'
              or (config.server_optimizer == 'auto' and spec.server_momentum))
  common = algorithms.registry.Common(
      apply_fn=apply_fn,
      cohort=engine.CohortConfig(clients_per_round=config.clients_per_round,
                                 replace=config.sample_with_replacement,
                                 weighted=config.weighted_aggregation),
      local=engine.LocalConfig(batch_size=config.batch_size, local_epochs=config.local_epochs,
                               local_steps=config.local_steps, momentum=config.momentum,
                               weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                               lr_schedule=config.lr_schedule,
                               cosine_epochs=config.cosine_epochs,
                               cosine_min_lr=config.cosine_min_lr,
                               partial_batches=config.partial_batches),
      learning_rate=config.learning_rate, lr_decay=config.lr_decay,
      server_optimizer=optax.sgd(config.server_learning_rate,
                                 momentum=config.server_momentum if momentum else None),
      mapping=mapping)
  return spec.build(hparams, common)


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
  params = jax.jit(model.init)(init_key, dummy)['params']
  hparams = algorithm_hparams(config)
  algorithm = _build_algorithm(config, hparams, model.apply, mapping)
  # Abstract init: checks that need the params' shapes (e.g. a density that keeps no weight)
  # fail here, before the run writes anything.
  jax.eval_shape(algorithm.init, _algorithm_key(config.seed), params, fed_data)
  evaluate = engine.make_evaluator(model.apply, config.eval_batch_size)
  return Experiment(config, fed_data, info, model, hparams, mapping, params, algorithm,
                    evaluate)


def _round_key(seed: int, round_index: int) -> jax.Array:
  """Round t's key depends on (seed, t) only, so resumed runs replay the same randomness."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), round_index)


def _algorithm_key(seed: int) -> jax.Array:
  """The algorithm's init key: its own stream, distinct from model init and rounds."""
  return jax.random.fold_in(jax.random.key(seed), 2)


def _eval_key(seed: int, round_index: int) -> jax.Array:
  """The key of the evaluation after round t (stochastic models sample with it)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), round_index)


def _read_metrics(path: pathlib.Path, upto_round: int) -> list[dict[str, Any]]:
  """Complete metric lines with ``round <= upto_round`` (a torn last line is dropped)."""
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      break
    if row.get('round', math.inf) > upto_round:
      break
    rows.append(row)
  return rows


def _format_eta(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _checkpoint_manager(workdir: pathlib.Path, every: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (slow import; optional)
  options = ocp.CheckpointManagerOptions(max_to_keep=1, save_interval_steps=every,
                                         enable_async_checkpointing=False)
  return ocp, ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """Runs (or resumes) an experiment and returns its last metrics row.

  Args:
    config: a flat experiment config (see the module docstring).
    workdir: receives ``config.json``, ``metrics.jsonl`` and ``checkpoints/``.

  Returns:
    The metrics of the final round, including the last evaluation.
  """
  exp = build_experiment(config)  # all validation happens here, before anything is written
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # The algorithm's section as it ran, defaults included (also when the config had none).
  saved = config.copy_and_resolve_references()
  with saved.unlocked():
    saved[config.algorithm] = dataclasses.asdict(exp.hparams)
  (workdir / CONFIG_FILE).write_text(saved.to_json_best_effort(indent=2, sort_keys=True) + '\n')
  info = exp.partition_info
  logging.info('%s: %d clients (%d empty dropped), %s examples per client (min/mean/max), '
               'model %s with %s params, strategy %s.', config.dataset, info.num_clients,
               info.dropped_clients, f'{info.min_size}/{info.mean_size:.1f}/{info.max_size}',
               config.model, f'{sum(x.size for x in jax.tree.leaves(exp.params)):,}',
               exp.mapping.resolved())

  state = exp.algorithm.init(_algorithm_key(config.seed), exp.params, exp.data)
  start_round = 0
  manager = None
  if config.checkpoint_every:
    ocp, manager = _checkpoint_manager(workdir, config.checkpoint_every)
    if manager.latest_step() is not None:
      start_round = manager.latest_step()
      state = manager.restore(start_round, args=ocp.args.StandardRestore(state))
      logging.info('Resumed from the checkpoint after round %d.', start_round)

  metrics_path = workdir / METRICS_FILE
  history = _read_metrics(metrics_path, start_round)
  # Rewrite the file with only the rounds the restored state has seen (drops any torn line).
  metrics_path.write_text(''.join(json.dumps(row) + '\n' for row in history))
  cum_up = history[-1]['cum_bits_up'] if history else 0
  cum_down = history[-1]['cum_bits_down'] if history else 0

  t0 = time.perf_counter()
  round_fn = engine.jit(exp.algorithm.round, batched_clients=exp.mapping.batches_clients,
                        donate_argnums=0).lower(
      state, exp.data, _round_key(config.seed, 0)).compile()
  compile_seconds = time.perf_counter() - t0
  logging.info('Round compiled in %.1f s.', compile_seconds)

  last: dict[str, Any] = history[-1] if history else {}
  elapsed = 0.0
  with metrics_path.open('a') as metrics_file:
    for t in range(start_round, config.num_rounds):
      t0 = time.perf_counter()
      state, metrics = round_fn(state, exp.data, _round_key(config.seed, t))
      metrics = jax.device_get(metrics)
      if exp.algorithm.host_bits is not None:
        # Data-dependent encodings: lengths computed on the host from the round's payloads.
        for name, bits in exp.algorithm.host_bits(metrics).items():
          metrics[name] = np.asarray(metrics[name], np.int64) + np.asarray(bits, np.int64)
      seconds = time.perf_counter() - t0
      elapsed += seconds
      # Cohort traffic plus any population-wide one-time traffic (e.g. SSFL's scoring round),
      # summed in int64: per-client counts are int32, totals are not.
      up = sum(int(np.sum(metrics[k], dtype=np.int64)) for k in ('bits_up', 'bits_up_all')
               if k in metrics)
      down = sum(int(np.sum(metrics[k], dtype=np.int64)) for k in ('bits_down', 'bits_down_all')
                 if k in metrics)
      cum_up += up
      cum_down += down
      row = {'round': t + 1, 'train_loss': float(metrics['train_loss']), 'bits_up': up,
             'bits_down': down, 'cum_bits_up': cum_up, 'cum_bits_down': cum_down,
             'round_seconds': seconds}
      row.update({k: float(v) for k, v in metrics.items()
                  if k not in _VECTOR_METRICS and k not in row and np.ndim(v) == 0
                  and not k.startswith(_PAYLOAD_PREFIX)})
      if t == start_round:
        row['compile_seconds'] = compile_seconds
      if (t + 1) % config.eval_every == 0 or t + 1 == config.num_rounds:
        params = exp.algorithm.eval_params(state, _eval_key(config.seed, t))
        ev = jax.device_get(exp.evaluate(params, exp.data))
        row.update({k: float(v) for k, v in ev.items()})
      metrics_file.write(json.dumps(row) + '\n')  # one write per line: never a torn row
      metrics_file.flush()
      last = row
      if not math.isfinite(row['train_loss']):
        raise FloatingPointError(
            f'The training loss became {row["train_loss"]} in round {t + 1}; lower learning_rate '
            f'(now {config.learning_rate}) or set clip_norm.')
      if manager is not None:
        manager.save(t + 1, args=ocp.args.StandardSave(state))
      done = t + 1 - start_round
      eta = elapsed / done * (config.num_rounds - t - 1)
      acc = f' test_acc {row["test_accuracy"]:.4f}' if 'test_accuracy' in row else ''
      logging.info('round %d/%d  loss %.4f%s  up %.2f MB  %.2f s/round  ETA %s', t + 1,
                   config.num_rounds, row['train_loss'], acc, cum_up / 8e6, seconds,
                   _format_eta(eta))
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return last
