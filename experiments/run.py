"""Runs one federated experiment from an ml_collections config file.

Usage::

  python -m experiments.run --config=experiments/configs/digits_fedavg.py --workdir=/tmp/run
  python -m experiments.run --config=experiments/configs/mnist_fedavg.py:smoke --workdir=/tmp/s
  python -m experiments.run --config=experiments/configs/mnist_ssfl.py \\
      --config.dataset=npz:mnist.npz --config.ssfl.density=0.1 --workdir=/tmp/m

``:smoke`` makes any experiment tiny; ``--config.KEY=VALUE`` overrides a shared key and
``--config.ALGORITHM.KEY=VALUE`` one of the algorithm's own (e.g. ``--config.ssfl.density``).
Re-running a workdir resumes it if the config matches (``num_rounds`` may grow; evaluation and
checkpoint cadence may change); ``--overwrite`` starts over. Errors in flags, config, data or
workdir print one line (``--traceback`` for more) and exit with code 2, before anything is
written.

Multi-process (multi-host) runs start the same command in every process, adding
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or
``--coordinator_address=auto`` where JAX detects them: Cloud TPU pod slices, SLURM, Open MPI);
see the README's "Multi-host" section. Process 0 writes the files; its log shows the progress.
"""

import importlib.util
import logging as std_logging
import os
import sys
import traceback
from typing import Any, Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from fedsparse import distributed
from fedsparse import train
from fedsparse.algorithms import registry

USAGE_ERROR = 2  # bad flags, config, data or workdir: nothing was run or written
RUN_ERROR = 1    # the run itself failed (e.g. the loss became NaN)


def _define_flags(fv: flags.FlagValues, argv: Sequence[str]):
  # config_flags finds the --config.KEY overrides in the argv it is given at definition time.
  config = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                           lock_config=True, flag_values=fv,
                                           sys_argv=list(argv))
  workdir = flags.DEFINE_string(
      'workdir', None, 'Directory for config.json, metrics.jsonl and checkpoints (resumes '
      'from the latest checkpoint there when the config matches).', flag_values=fv)
  overwrite = flags.DEFINE_bool(
      'overwrite', False, 'Delete the workdir\'s metrics, checkpoints and config.json and start '
      'over (instead of resuming; needed when the config changed).', flag_values=fv)
  show_traceback = flags.DEFINE_bool(
      'traceback', False, 'On an error, print the full traceback instead of one line.',
      flag_values=fv)
  define_process_flags(fv)
  return config, workdir, overwrite, show_traceback


_PROCESS_FLAGS = ('coordinator_address', 'num_processes', 'process_id')


def define_process_flags(fv: flags.FlagValues) -> None:
  """Defines the flags `start_processes` reads (also used by ``experiments.sweep``)."""
  flags.DEFINE_string(
      'coordinator_address', None, 'Multi-process runs: HOST:PORT of process 0 (the same in '
      'every process), or "auto" to let JAX detect the job (Cloud TPU pod slice, SLURM, Open '
      'MPI). Omitted: a single-process run.', flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'Multi-process runs: the number of processes.',
                       flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process\'s index, 0 to '
                       'num_processes - 1 (process 0 writes the files).', flag_values=fv)


def start_processes(fv: flags.FlagValues) -> None:
  """Joins the `jax.distributed` job that the flags describe (none given: one process).

  Must run before anything uses a JAX device.

  Raises:
    train.UsageError: for an incomplete or invalid set of flags, naming the valid values.
  """
  values = {name: fv[name].value for name in _PROCESS_FLAGS}
  if all(v is None for v in values.values()):
    return
  if values['coordinator_address'] == 'auto':
    others = [f'--{k}' for k in ('num_processes', 'process_id') if values[k] is not None]
    if others:
      raise train.UsageError(f'--coordinator_address=auto detects the process count and id; '
                             f'omit {" and ".join(others)}.')
    values = {}  # jax.distributed.initialize() reads them from the cluster
  else:
    missing = [f'--{k}' for k, v in values.items() if v is None]
    if missing:
      raise train.UsageError(
          f'A multi-process run needs --coordinator_address=HOST:PORT (of process 0), '
          f'--num_processes and --process_id in every process (or --coordinator_address=auto '
          f'on a Cloud TPU pod slice, SLURM or Open MPI); missing: {", ".join(missing)}.')
  try:
    distributed.initialize(**values)
  except ValueError as e:
    message = str(e)
    for name in _PROCESS_FLAGS:
      message = message.replace(f'{name} ', f'--{name} ')
    raise train.UsageError(message) from e
  if not distributed.is_primary():
    logging.set_verbosity(logging.WARNING)  # progress once (process 0's), warnings from all


def _config_arg(argv: Sequence[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_module(path: str) -> Any:
  """Imports the config file at ``path`` as a module of its own (as config_flags does)."""
  spec = importlib.util.spec_from_file_location('fedsparse_config', os.path.expanduser(path))
  if spec is None or spec.loader is None:
    raise FileNotFoundError(path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _unknown_override(argv: Sequence[str]) -> str | None:
  """A one-line message for the first ``--config.a.b=v`` whose key the config lacks, if any."""
  config_arg = _config_arg(argv)
  if config_arg is None:
    return None
  path, _, arg = config_arg.partition(':')
  try:
    module = _load_module(path)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except -- reported by flag_error
    return None
  for a in argv:
    if not a.startswith('--config.'):
      continue
    keys = a[len('--config.'):].split('=', 1)[0].split('.')
    node, where = config, 'the config'
    for i, key in enumerate(keys):
      if not hasattr(node, 'keys') or key not in node:
        valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else 'none'
        hint = ''
        if i == 0 and key in registry.names():
          hint = (f' The config is for algorithm {config.algorithm!r}, so it has no section '
                  f'{key!r}: use a config file written for {key!r}.')
        return (f'Unknown config key {".".join(keys[:i + 1])!r} in {where}; valid keys there: '
                f'{valid}.{hint}')
      node, where = node[key], f'section {".".join(keys[:i + 1])!r}'
  return None


def flag_error(argv: Sequence[str], error: Exception) -> str:
  """One line for a flag-parsing failure: the bad key, file or value and what is valid."""
  unknown = _unknown_override(argv)
  if unknown is not None:
    return unknown
  config_arg = _config_arg(argv)
  if config_arg is not None:
    path = config_arg.partition(':')[0]
    if not os.path.isfile(path):
      what = 'is a directory' if os.path.isdir(path) else 'not found'
      return (f'Config file {path!r} {what} (--config=FILE[:ARG], e.g. '
              '--config=experiments/configs/digits_fedavg.py).')
  # absl wraps the cause ("flag --config.x=v: could not convert...", or the config file's
  # own exception); its last line says what was wrong.
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  text = str(error).strip().splitlines()
  detail = str(cause).strip().splitlines()
  line = text[-1] if text else type(error).__name__
  if cause is not error and detail and detail[-1] not in line:
    line = f'{line} ({detail[-1]})'
  if 'config_config' in line or 'get_config' in line:  # a config file that fails to load
    line = f'Cannot load config file {config_arg!r}: {detail[-1] if detail else line}'
  for prefix in ('ValueError: ', 'KeyError: ', 'TypeError: '):
    line = line.replace(prefix, '')
  if 'Non-boolean argument to boolean flag' in line:
    line = line.split(':')[0] + ': expected true or false.'
  return line


def quiet_logs() -> None:
  """Progress lines at INFO; orbax's per-save INFO lines and JAX's backend probing hidden."""
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)

  class _NoOrbaxInfo(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
      return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname

  handler = logging.get_absl_handler()
  if not any(isinstance(f, _NoOrbaxInfo) for f in handler.filters):
    handler.addFilter(_NoOrbaxInfo())


def parse_flags(fv: flags.FlagValues, argv: Sequence[str], config: Any,
                usage: str) -> int | None:
  """Parses ``argv`` into ``fv`` and loads the ``--config`` file (``usage``: for ``--help``).

  Returns:
    None to go on; 0 after printing the usage and flags for ``--help``; or `USAGE_ERROR`
    after printing one ``FATAL:`` line (the traceback with ``--traceback``) for a bad flag,
    config file or override.
  """
  if any(a in ('-h', '--help', '--helpshort', '--helpfull') for a in argv[1:]):
    print(usage.strip() + '\n\nFlags:\n' + fv.get_help(include_special_flags=False))
    return 0
  try:
    fv(list(argv))
    if fv['config'].present:
      config.value.get('algorithm')  # ml_collections reports a load failure on first access
  except Exception as e:  # pylint: disable=broad-except -- reported as one line
    if any(a in ('--traceback', '--traceback=true', '--traceback=True') for a in argv):
      traceback.print_exc()
    return fail(flag_error(argv, e), USAGE_ERROR)
  return None


def fail(message: str, code: int) -> int:
  print(f'FATAL: {message}', file=sys.stderr)
  return code


def cli(argv: Sequence[str]) -> int:
  """Parses ``argv`` (program name first), runs the experiment and returns the exit code.

  Usage errors (flags, config, data, workdir) print one line and return 2 before anything is
  written; a failed run (a non-finite loss) prints one line and returns 1. ``--traceback``
  prints the full traceback instead.
  """
  quiet_logs()
  fv = flags.FlagValues()
  config, workdir, overwrite, show_traceback = _define_flags(fv, argv)
  if (code := parse_flags(fv, argv, config, __doc__)) is not None:
    return code
  for name in ('config', 'workdir'):
    if fv[name].value is None:
      return fail(f'--{name} is required, e.g. --config=experiments/configs/digits_fedavg.py '
                   '--workdir=/tmp/digits', USAGE_ERROR)
  try:
    start_processes(fv)
    last = train.run(config.value, workdir.value, overwrite=overwrite.value)
  except train.UsageError as e:
    if show_traceback.value:
      traceback.print_exc()
    return fail(str(e), USAGE_ERROR)
  except FloatingPointError as e:
    if show_traceback.value:
      traceback.print_exc()
    return fail(f'{e} Metrics so far: {workdir.value}/metrics.jsonl', RUN_ERROR)
  if distributed.is_primary():  # the other processes of a multi-process run hold the same
    print(f'Final (round {last["round"]}): pooled test accuracy {last["test_accuracy"]:.4f}, '
          f'mean client accuracy {last["client_accuracy_mean"]:.4f}; communicated '
          f'{last["cum_bits_up"]:,} bits up ({last["cum_bits_up"] / 8e6:.2f} MB), '
          f'{last["cum_bits_down"]:,} bits down ({last["cum_bits_down"] / 8e6:.2f} MB). '
          f'Metrics: {workdir.value}/metrics.jsonl')
  return 0


if __name__ == '__main__':
  flags.FLAGS.mark_as_parsed()  # flags are parsed by cli(); silences absl's pre-parse warning
  logging.use_absl_handler()
  sys.exit(cli(sys.argv))
