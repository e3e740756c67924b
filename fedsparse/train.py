"""Running an experiment into a workdir: `run` (or resume) one config, in one or many processes.

`run` builds the experiment (`fedsparse.experiment`), opens and checks its workdir
(`fedsparse.workdir`) and drives the round loop (`fedsparse.loop`). It holds no code for any
particular algorithm: it builds the one the config names through
`fedsparse.algorithms.registry`. Config keys and key streams: `fedsparse.experiment`.

Workdirs: one run at a time (`fedsparse.workdir.lock`); a workdir is resumed only with the
config that produced it (``num_rounds`` may grow; `fedsparse.workdir.OPERATIONAL_KEYS` may
change); checkpoints carry the cumulative bit counters, so totals stay true across resumes.
Config, data and workdir problems raise `UsageError` before anything is written.
"""

import contextlib
import os
import pathlib
from typing import Any

import ml_collections

from fedsparse import distributed
from fedsparse import experiment
from fedsparse import loop
from fedsparse import workdir as workdir_lib
# The names a script needs beside `run`, where it has always found them.
# pylint: disable=unused-import
from fedsparse.experiment import (TRACEABLE_KEYS, Experiment, algorithm_hparams,
                                  build_experiment, validate_config)
from fedsparse.workdir import (CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, MODEL_FILE,
                               UsageError)
# pylint: enable=unused-import

__all__ = ['CHECKPOINT_DIR', 'CONFIG_FILE', 'METRICS_FILE', 'MODEL_FILE', 'TRACEABLE_KEYS',
           'Experiment', 'UsageError', 'algorithm_hparams', 'build_experiment', 'run',
           'usage_errors', 'validate_config']


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *,
        overwrite: bool = False) -> dict[str, Any]:
  """Runs (or resumes) an experiment and returns its last metrics row.

  A workdir belongs to one config: re-running it resumes from its latest checkpoint (or
  starts over where it has none), provided the config differs at most in
  `fedsparse.workdir.OPERATIONAL_KEYS` and ``num_rounds`` has not dropped below the rounds
  already run. Anything else raises `UsageError` before the workdir changes. One run at a
  time holds a workdir (`fedsparse.workdir.lock`).

  Args:
    config: a flat experiment config (its keys: `fedsparse.experiment`).
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
  with usage_errors():
    validate_config(config)  # cheap checks first: nothing is created for a bad config
    # The processes of a multi-process job must run the same experiment into the same workdir
    # (the same flags everywhere): otherwise their collectives would not match.
    distributed.check_same([config.to_dict(), str(workdir.absolute()), overwrite],
                           'the config, --workdir or --overwrite')
  with contextlib.ExitStack() as held:
    # Only process 0 creates and locks the workdir; the others learn whether it could.
    created, had_lock_file = workdir_lib.on_primary(lambda: _open_workdir(workdir, held), (False, True))
    try:
      workdir_lib.check_shared(workdir)
      with usage_errors():
        exp = build_experiment(config)  # data, model, abstract init: may still reject input
      saved = experiment.saved_config(config, exp.hparams)
      if overwrite and primary:
        workdir_lib.clear(workdir)
      distributed.barrier('workdir cleared')  # before any process reads it
      start_round, history = workdir_lib.check_resumable(workdir, saved, config)
      with usage_errors():
        distributed.check_same([start_round, history], f'the state of {str(workdir)!r}')
    except UsageError:
      # Leave no trace of a run that never started (the lock is still held meanwhile).
      if primary and not had_lock_file:
        (workdir / workdir_lib.LOCK_FILE).unlink(missing_ok=True)
      if created:
        with contextlib.suppress(OSError):
          workdir.rmdir()
      raise
    loop.log_experiment(exp)
    member = loop.Member(config, workdir, saved, history, exp.algorithm)
    loop.run_members(loop.SingleProgram(exp), [member], start_round)
    if member.error is not None:
      raise member.error
    return member.last


def _open_workdir(workdir: pathlib.Path, held: contextlib.ExitStack) -> tuple[bool, bool]:
  """Creates ``workdir`` if needed and locks it until ``held`` closes.

  Returns:
    Whether it was created, and whether it had a lock file before.
  """
  created = workdir_lib.make_workdir(workdir)
  had_lock_file = (workdir / workdir_lib.LOCK_FILE).exists()
  held.enter_context(workdir_lib.lock(workdir))
  return created, had_lock_file


@contextlib.contextmanager
def usage_errors():
  """Re-raises config, data and file problems as `UsageError` (one line for the CLI)."""
  try:
    yield
  except UsageError:
    raise
  except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
          PermissionError) as e:
    raise UsageError(str(e)) from e
