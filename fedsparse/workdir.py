"""A run's working directory: one run at a time, and never out of step with what produced it.

A workdir holds ``config.json`` (the resolved config of the run), ``metrics.jsonl`` (one JSON
line per round) and ``checkpoints/``. The run loop (`fedsparse.loop`, driven by
`fedsparse.train.run` and `fedsparse.sweep`) keeps them consistent with the helpers here:

* `lock`: an exclusive, non-blocking lock (``fcntl.flock`` on ``.lock``), so a second run on the
  same workdir fails at once, naming the process that holds it. The OS releases the lock when
  its holder dies, even by ``kill -9``.
* `config_differences`: resuming is allowed only with the same results-determining config.
  `OPERATIONAL_KEYS` may change between invocations: they decide how often the run evaluates
  or checkpoints, or where the data lives, not what it computes. ``num_rounds`` may grow
  (continue training) but never drop below the rounds already in ``metrics.jsonl``.
* `write_atomic` and `json_row`: files are replaced whole (write, fsync, rename), and metric
  rows are strict JSON (non-finite values as ``null``, named in a ``nonfinite`` list).
* `EventWriter`: the same rows as TensorBoard scalars (tensorboardX event files beside
  ``metrics.jsonl``), so ``tensorboard --logdir DIR`` shows a run, or every member of a sweep.
"""

import contextlib
import fcntl
import json
import math
import os
import pathlib
import shutil
import socket
import time
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

from fedsparse import distributed
from fedsparse.algorithms import registry

__all__ = ['CHECKPOINT_DIR', 'CONFIG_FILE', 'EVENTS_GLOB', 'METRICS_FILE', 'MODEL_FILE',
           'OPERATIONAL_KEYS', 'EventWriter', 'UsageError', 'WorkdirBusy', 'check_resumable',
           'check_shared', 'checkpoint_manager', 'checkpoint_steps', 'clear',
           'config_differences', 'flatten', 'json_row', 'lock', 'make_workdir', 'on_primary',
           'read_metrics', 'write_atomic']

# Keys that may differ between a workdir's config.json and a resumed run's config.
OPERATIONAL_KEYS = frozenset({'num_rounds', 'eval_every', 'eval_batch_size',
                              'checkpoint_every', 'data_dir', 'tensorboard'})
LOCK_FILE = '.lock'
METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
MODEL_FILE = 'model.npz'  # the algorithm's compact export of the final model, if it has one
EVENTS_GLOB = 'events.out.tfevents.*'  # TensorBoard event files (`EventWriter`)


class UsageError(ValueError):
  """A config, data or workdir problem the user must fix; reported as one line (exit code 2)."""


class WorkdirBusy(UsageError):
  """Another run holds the workdir's lock."""


@contextlib.contextmanager
def lock(workdir: pathlib.Path) -> Iterator[None]:
  """Holds the workdir's exclusive lock for the duration of the block.

  Raises:
    WorkdirBusy: at once (no waiting) when another process holds the lock; the message names
      it (pid, host, start time) as that process wrote it into the lock file.
  """
  path = workdir / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = ''
      for _ in range(20):  # the holder writes its name just after locking: give it a moment
        holder = os.pread(fd, 512, 0).decode(errors='replace').strip()
        if holder:
          break
        time.sleep(0.01)
      raise WorkdirBusy(
          f'Workdir {str(workdir)!r} is in use by another run ({holder or "another process"}); wait for it to '
          'finish, stop it, or use another --workdir.') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()} since '
                  f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (config sections become dotted keys)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """``'key: saved -> new'`` for every results-determining key that differs (sorted)."""
  old_flat, new_flat = flatten(saved), flatten(new)
  diffs = []
  for key in sorted(set(old_flat) | set(new_flat)):
    if key in OPERATIONAL_KEYS:
      continue
    missing = '(absent)'
    a, b = old_flat.get(key, missing), new_flat.get(key, missing)
    if a != b:
      diffs.append(f'{key}: {a!r} -> {b!r}')
  return diffs


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
  """The complete rows of ``metrics.jsonl`` as long as they number rounds 1, 2, 3, ...

  Reading stops at a torn last line (a run killed mid-write) or at the first row out of
  sequence, so the result is always a consistent prefix of a run.
  """
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      break
    if not isinstance(row, dict) or row.get('round') != len(rows) + 1:
      break
    rows.append(row)
  return rows


def json_row(row: dict[str, Any]) -> str:
  """One strict-JSON line: non-finite floats become ``null`` and are listed in ``nonfinite``."""
  bad = sorted(k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v))
  if bad:
    row = {k: (None if k in bad else v) for k, v in row.items()}
    row['nonfinite'] = bad
  return json.dumps(row, allow_nan=False)


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Replaces ``path`` with ``text`` whole: readers and crashes never see a partial file."""
  tmp = path.with_name(f'.{path.name}.tmp')
  with tmp.open('w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class EventWriter:
  """Writes metric rows as TensorBoard scalars: every numeric entry, at step = its round.

  A context manager writing a tensorboardX event file into the workdir itself, synchronously:
  each row is on disk when `write` returns, with its ``metrics.jsonl`` line, so a run killed
  after a checkpoint keeps the events of the rounds it resumes after. Each (re)start opens a
  new file that begins with a purge marker at its first round: TensorBoard then drops the
  events a killed run wrote past its last checkpoint, so a resumed run shows each round once,
  as ``metrics.jsonl`` does. TensorBoard stores scalars as float32.

  Example:
    >>> import tempfile
    >>> with EventWriter(pathlib.Path(tempfile.mkdtemp()), start_round=0) as events:
    ...   events.write({'round': 1, 'train_loss': 0.5, 'cum_bits_up': 1024})
  """

  def __init__(self, workdir: pathlib.Path, start_round: int):
    # pylint: disable=g-import-not-at-top  (slow imports, needed only when events are written)
    from tensorboardX import event_file_writer
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto import summary_pb2
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    # tensorboardX's SummaryWriter queues events for a background thread, whose flush does not
    # wait for the queue; its synchronous record writer does. The file name's timestamp has
    # whole seconds: the suffix (nanoseconds, fixed width) keeps two starts within a second
    # from sharing a file, and files sort in the order they were written, as TensorBoard reads
    # them.
    self._writer = event_file_writer.EventsWriter(str(workdir / 'events'),
                                                  filename_suffix=f'.{time.time_ns():020d}')
    self._writer.write_event(event_pb2.Event(
        wall_time=time.time(), step=start_round + 1,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._writer.flush()

  def write(self, row: dict[str, Any]) -> None:
    """Adds every int or float of ``row`` but its ``round`` (the step) as a scalar."""
    values = [self._summary_pb2.Summary.Value(tag=key, simple_value=float(value))
              for key, value in row.items()
              if key != 'round' and isinstance(value, (int, float))
              and not isinstance(value, bool)]
    self._writer.write_event(self._event_pb2.Event(
        wall_time=time.time(), step=row['round'], summary=self._summary_pb2.Summary(value=values)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()

  def __enter__(self) -> 'EventWriter':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


# --------------------------------------------------------------------------------------------------
# Starting and resuming.


def make_workdir(workdir: pathlib.Path) -> bool:
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


def clear(workdir: pathlib.Path) -> None:
  """Removes what a run writes into ``workdir`` (and nothing else)."""
  for name in (METRICS_FILE, CONFIG_FILE, MODEL_FILE, MODEL_FILE + '.tmp'):
    (workdir / name).unlink(missing_ok=True)
  for events in workdir.glob(EVENTS_GLOB):
    events.unlink()
  shutil.rmtree(workdir / CHECKPOINT_DIR, ignore_errors=True)


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """The rounds after which ``workdir`` holds a checkpoint, ascending."""
  folder = workdir / CHECKPOINT_DIR
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _resolved_hint(prior: dict[str, Any], saved: dict[str, Any],
                   config: ml_collections.ConfigDict) -> str:
  """Where an algorithm resolved defaults from shared keys (e.g. FedDST's ``readjust_end`` from
  ``num_rounds``), how to keep the recorded values while changing those keys."""
  spec = registry.get(config.algorithm)
  old, new = prior.get(config.algorithm), saved.get(config.algorithm)
  if spec.resolve is None or not isinstance(old, dict) or not isinstance(new, dict):
    return ''
  keep = [f'--config.{config.algorithm}.{k}={v!r}' for k, v in sorted(old.items())
          if k in new and new[k] != v]
  if not keep:
    return ''
  return (f' (the run resolved some {config.algorithm} defaults from keys such as num_rounds; '
          f'to continue it, pass its recorded values: {" ".join(keep)})')


def check_resumable(workdir: pathlib.Path, saved: dict[str, Any],
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
  steps = checkpoint_steps(workdir)
  if not config_path.exists():
    if metrics_path.exists() or steps:
      raise UsageError(f'Workdir {str(workdir)!r} holds metrics or checkpoints but no '
                       f'{CONFIG_FILE}, so what produced them is unknown; {way_out}.')
    return 0, []
  rows = read_metrics(metrics_path)
  if not steps and not (metrics_path.exists() and metrics_path.read_text().strip()):
    return 0, []  # nothing ran (e.g. the last attempt failed to compile): a fresh start
  try:
    prior = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise UsageError(f'{config_path} is not valid JSON ({e}); {way_out}.') from None
  diffs = config_differences(prior, saved)
  if diffs:
    raise UsageError(
        f'Workdir {str(workdir)!r} holds a run with a different config ({"; ".join(diffs)}). '
        f'Only {", ".join(sorted(OPERATIONAL_KEYS))} may change when resuming'
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


def checkpoint_manager(workdir: pathlib.Path, every: int):
  """An orbax manager of ``workdir/checkpoints`` keeping the latest save."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (slow import; optional)
  # Saves are requested explicitly (every `checkpoint_every` rounds and after the last round).
  # In a multi-process job every process creates the manager on the same (shared, absolute)
  # path and takes part in every save and restore: orbax writes each array once, from the
  # process that owns it, and synchronises the processes itself.
  options = ocp.CheckpointManagerOptions(max_to_keep=1, save_interval_steps=max(every, 1),
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def on_primary(fn: Any, others: Any, what: str = 'create or lock the workdir') -> Any:
  """``fn()`` in process 0 (returned there), ``others`` in the other processes.

  An error of ``fn`` is raised in every process: the others would otherwise go on to wait in a
  collective that process 0 never reaches. Process 0 raises it as it is; the others raise a
  `UsageError` saying that process 0 could not do ``what``. Used for what process 0 alone does
  to a workdir (create, lock and read it), by `fedsparse.train.run` and by `fedsparse.sweep`.
  """
  result, error = others, None
  if distributed.is_primary():
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except -- raised below, in every process
      error = e
  failed = distributed.broadcast(np.int32(error is not None))
  if error is not None:
    raise error
  if failed:
    raise UsageError(f'Process 0 could not {what}; its output says why.')
  return result


def check_shared(workdir: pathlib.Path) -> None:
  """Checks that every process sees the workdir that process 0 locked (a run's or a sweep's).

  Every process reads the workdir (to resume) and writes checkpoints into it (orbax saves in
  concert): it must be one directory, on a filesystem every host shares. The lock file, which
  names process 0's pid, host and start time, is what they compare.
  """
  if jax.process_count() == 1:
    return
  path = workdir / LOCK_FILE
  try:
    distributed.check_same(path.read_text() if path.exists() else None,
                           f'{str(path)!r} (--workdir must be one directory on a filesystem '
                           'that every host shares)')
  except ValueError as e:
    raise UsageError(str(e)) from None
