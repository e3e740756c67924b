"""The run loop: rounds, evaluation, metrics.jsonl, TensorBoard, checkpoints and exports.

The jitted round does all the numerical work; this loop only evaluates, writes
``metrics.jsonl`` (one complete JSON line per round), checkpoints with orbax, and shows progress
with an ETA. It drives a `Program` -- the device side: one run (`SingleProgram`), or a group of
sweep members mapped over a member axis (`fedsparse.sweep`) -- and a `Member` per run -- the
workdir side: its files, bit counters and fate. So a single run and every member of a sweep
share one loop: logging, checkpointing, resuming and exporting are the same code.

Checkpoints carry the cumulative bit counters, so totals stay true across resumes. In a
multi-process job process 0 writes the files and every process checkpoints (orbax coordinates
the processes' saves and restores).
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from fedsparse import distributed
from fedsparse import engine
from fedsparse import experiment
from fedsparse import workdir as workdir_lib
from fedsparse.workdir import CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, MODEL_FILE, UsageError

__all__ = ['Member', 'Program', 'SingleProgram', 'log_experiment', 'run_members']

# Per-client metrics; scalar metrics other than these go into metrics.jsonl as they are.
_VECTOR_METRICS = ('client_loss', 'clients', 'bits_up', 'bits_down', 'bits_up_all',
                   'bits_down_all')
_PAYLOAD_PREFIX = engine.algorithm.PAYLOAD_PREFIX


class Program:
  """The device side of a run loop: the jitted work of one run, or of a group of runs.

  `fedsparse.train.run` drives one experiment (`SingleProgram`); `fedsparse.sweep` drives a
  group of sweep members whose rounds are mapped over a member axis and compiled once. The loop
  (`run_members`) only sees this interface, so logging, checkpointing, resuming and exporting
  are the same code for both.

  Attributes:
    num_members: how many runs the program computes.
    multiprocess: whether it can run in every process of a multi-process `jax.distributed`
      job (its state, inputs and outputs global arrays, see `fedsparse.distributed`).
    on_mesh: whether it runs over the global mesh (global arrays in and out).
    placement: where its state lives (a sharding of the mesh when `on_mesh`).
    batched_clients: whether clients or members run under ``vmap`` (compiler options).
  """
  num_members: int = 1
  multiprocess: bool = False
  # Set by subclasses (see Attributes).
  on_mesh: bool = False
  placement: jax.sharding.Sharding | None = None
  batched_clients: bool = False

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
    """Every member's evaluation after round ``t`` (`fedsparse.experiment.evaluate` with
    `fedsparse.experiment.eval_key`)."""
    raise NotImplementedError

  def key(self, key: jax.Array) -> jax.Array:
    """``key`` placed where the program's state lives (for work outside `step`)."""
    return distributed.to_global(key) if self.on_mesh else key

  def jit(self, fun: Any, out_shardings: Any = None, **kwargs: Any) -> Any:
    """`fedsparse.engine.jit` with the program's compiler options.

    On the mesh the outputs' placement is part of the contract, not left to the compiler
    (``out_shardings``, default `placement`): every process must hold what it reads,
    checkpoints or exports. Off the mesh the compiler chooses.
    """
    if self.on_mesh:
      kwargs['out_shardings'] = self.placement if out_shardings is None else out_shardings
    return engine.jit(fun, batched_clients=self.batched_clients, **kwargs)


class SingleProgram(Program):
  """One experiment: its algorithm's round jitted as it is.

  Where the state lives (`placement`): on one device, unless the clients are sharded over
  several devices or processes. Then the state, the data and every key are replicated over
  the global mesh (`fedsparse.distributed.replicated`), and the round returns its state and
  metrics replicated: every process holds the whole state (to checkpoint it, evaluate it,
  export it) and reads the metrics from its own copy. One program serves one process with
  several devices and several processes alike, so both compute the same numbers.
  """
  multiprocess = True

  def __init__(self, exp: experiment.Experiment):
    self.on_mesh = jax.process_count() > 1 or exp.mapping.resolved() == 'sharded'
    if self.on_mesh:
      # A computation over the global mesh takes global arrays only.
      exp = dataclasses.replace(exp, params=distributed.to_global(exp.params),
                                data=distributed.to_global(exp.data))
    self.exp = exp
    self.batched_clients = exp.mapping.batches_clients
    self.round_fn = self.evaluate_fn = None

  @property
  def placement(self) -> jax.sharding.Sharding:
    """Where the state lives, and where a resume restores it (whatever devices wrote it)."""
    if self.on_mesh:
      return distributed.replicated()
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def _init_args(self):
    return self.key(experiment.algorithm_key(self.exp.config.seed)), self.exp.params, self.exp.data

  def init(self):
    # One program. Run eagerly, an initialisation that works leaf by leaf (FedPM's signed
    # constants and scores, FedDST's random mask) compiles every operation for every leaf shape
    # on its own: tens of seconds for a ResNet on a CPU.
    return self.jit(self.exp.algorithm.init)(*self._init_args())

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
    self.round_fn = self.jit(exp.algorithm.round, donate_argnums=0).lower(
        state, exp.data, self.key(experiment.round_key(exp.config.seed, 0))).compile()

  def step(self, state, t):
    state, metrics = self.round_fn(state, self.exp.data,
                                   self.key(experiment.round_key(self.exp.config.seed, t)))
    return state, [distributed.to_host(metrics)]

  def evaluate(self, state, t):
    exp = self.exp
    if self.evaluate_fn is None:
      # The evaluation model (FedPM's sampled mask, FLASH's budget models) and the evaluator in
      # one program, as a sweep compiles them: eagerly, every operation would compile alone.
      evaluator = engine.make_evaluator(exp.model.apply, exp.config.eval_batch_size,
                                        jitted=False)
      self.evaluate_fn = self.jit(functools.partial(experiment.evaluate, evaluator,
                                                     exp.algorithm))
    out = self.evaluate_fn(state, self.key(experiment.eval_key(exp.config.seed, t)), exp.data)
    return [{k: float(v) for k, v in distributed.to_host(out).items()}]


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


def log_experiment(exp: experiment.Experiment) -> None:
  """Logs what the run trains: the data split, the model's size, the client mapping."""
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
    members: the runs, their workdirs locked and checked by `fedsparse.workdir.check_resumable`.
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
      m.manager = workdir_lib.checkpoint_manager(m.workdir, every)
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
          _log_row(members[i], rows[i], t)
        except Exception as e:  # pylint: disable=broad-except -- e.g. a full disk
          members[i].error = e
      # Agreed before the checkpoints: orbax saves a member in every process together.
      _agree_on_member_errors(members)
      for i in alive:
        if members[i].error is None:
          try:
            _save_checkpoint(members[i], t, state, program, i)
          except Exception as e:  # pylint: disable=broad-except -- this member's save only
            members[i].error = e
      _agree_on_member_errors(members)
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


def _agree_on_member_errors(members: list[Member]) -> None:
  """Makes a member's error, raised in some processes only, every process's.

  Process 0 alone writes the files, so a failed write (a full disk) fails a member there only;
  the other processes would go on checkpointing it with orbax, which waits for process 0, or
  run rounds that process 0 has left. One gather of flags per call (two per round), and an
  agreed message per failed member.
  """
  if jax.process_count() == 1:
    return
  failed = distributed.any_process(np.array([m.error is not None for m in members]))
  for m, f in zip(members, failed):
    if f:
      m.error = distributed.agree_on_error(m.error)


def _log_row(m: Member, row: dict[str, Any], t: int) -> None:
  """Writes member ``m``'s row (metrics.jsonl, TensorBoard); a non-finite loss fails it."""
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


def _save_checkpoint(m: Member, t: int, state: Any, program: Program, i: int) -> None:
  """Saves member ``m`` (``i`` of the program) after round ``t`` if a checkpoint is due."""
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
      program.member_state(state, i),
      program.key(experiment.eval_key(m.config.seed, m.last['round'] - 1))))
  if not distributed.is_primary():
    return
  tmp = m.workdir / (MODEL_FILE + '.tmp')
  with tmp.open('wb') as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, m.workdir / MODEL_FILE)


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


def _format_eta(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
