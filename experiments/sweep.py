"""Runs a sweep: many members of one experiment config, each into its own workdir.

Usage::

  python -m experiments.sweep --config=experiments/configs/digits_fedavg.py \\
      --sweep=experiments/sweeps/digits_lr.py --workdir=/tmp/digits_lr
  python -m experiments.sweep --config=experiments/configs/mnist_ssfl.py \\
      --config.dataset=npz:mnist.npz \\
      --sweep=experiments/sweeps/ssfl_density.py --workdir=/tmp/ssfl_density

A sweep file defines ``get_sweep(arg=None)`` returning the members' overrides, written with
`fedsparse.sweep` (``sweep``, ``product``, ``zipit``, ``chain``, ``random_search``);
``--sweep=FILE:ARG`` passes ``ARG``. ``--config`` and its ``--config.KEY=VALUE`` overrides
make the base every member starts from. Member ``m`` runs in ``WORKDIR/<m>/`` (config.json,
metrics.jsonl, TensorBoard events, checkpoints, status.json); ``WORKDIR/summary.csv`` and
``WORKDIR/summary.png`` (final accuracy against each swept value) cover them all, and the
summary is printed. Members that share shapes share one compile (`fedsparse.sweep`).

Re-running the same command resumes: finished and failed members are kept, the rest continue
from their checkpoints; ``--retry_failed`` reruns the failed. Exit code: 0 when every member
finished, 1 when some failed (the summary says which and why), 2 for a usage error (flags,
config, sweep file, workdir), before anything runs.

Multi-process (multi-host) sweeps start the same command in every process, adding
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or
``--coordinator_address=auto``), as ``experiments.run`` does. Each group's members are
sharded over the devices of all processes (``--member_mapping`` then maps each device's
share); process 0 writes the files and prints the summary; every process exits with the same
code. See the README's "Sweeps" and "Multi-host" sections.
"""

import importlib.util
import os
import sys
import traceback
from typing import Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import run as run_lib
from fedsparse import distributed
from fedsparse import engine
from fedsparse import sweep as sweep_lib
from fedsparse import train


def _define_flags(fv: flags.FlagValues, argv: Sequence[str]):
  config = config_flags.DEFINE_config_file('config', None, 'Base experiment config file.',
                                           lock_config=True, flag_values=fv,
                                           sys_argv=list(argv))
  values = {
      'sweep': flags.DEFINE_string(
          'sweep', None, 'Sweep file FILE[:ARG] defining get_sweep(arg) -> list of overrides.',
          flag_values=fv),
      'workdir': flags.DEFINE_string(
          'workdir', None, 'Directory of the sweep: one subdirectory per member, summary.csv '
          'and summary.png (re-running resumes).', flag_values=fv),
      'member_mapping': flags.DEFINE_enum(
          'member_mapping', 'auto', engine.STRATEGIES, 'How a group maps its members '
          '(auto: sequential on CPU, vmap on GPU/TPU; in a multi-process job the members are '
          'sharded over every device and this maps each device\'s share).', flag_values=fv),
      'retry_failed': flags.DEFINE_bool(
          'retry_failed', False, 'Rerun members recorded as failed.', flag_values=fv),
      'traceback': flags.DEFINE_bool(
          'traceback', False, 'On an error, print the full traceback instead of one line.',
          flag_values=fv),
  }
  run_lib.define_process_flags(fv)
  return config, values


def load_sweep(spec: str) -> list[dict]:
  """The members of sweep file ``FILE[:ARG]``.

  Raises:
    train.UsageError: a missing file, one without ``get_sweep``, or one that fails or returns
      something other than a non-empty list of dicts.
  """
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise train.UsageError(f'Sweep file {path!r} not found (--sweep=FILE[:ARG], e.g. '
                           '--sweep=experiments/sweeps/digits_lr.py).')
  try:
    module_spec = importlib.util.spec_from_file_location('fedsparse_sweep_file', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_sweep = getattr(module, 'get_sweep', None)
    if get_sweep is None:
      raise ValueError('it defines no get_sweep(arg=None)')
    members = get_sweep(arg) if arg else get_sweep()
  except Exception as e:  # pylint: disable=broad-except -- any error of the user's file
    raise train.UsageError(f'Cannot load sweep file {spec!r}: {type(e).__name__}: {e}') from e
  if (not isinstance(members, (list, tuple)) or not members
      or not all(isinstance(m, dict) for m in members)):
    raise train.UsageError(f'Sweep file {spec!r}: get_sweep must return a non-empty list of '
                           f'dicts of overrides, got {type(members).__name__} {members!r:.80}.')
  return list(members)


def cli(argv: Sequence[str]) -> int:
  """Parses ``argv`` (program name first), runs the sweep and returns the exit code."""
  run_lib.quiet_logs()
  fv = flags.FlagValues()
  config, values = _define_flags(fv, argv)
  if (code := run_lib.parse_flags(fv, argv, config, __doc__)) is not None:
    return code
  for name in ('config', 'sweep', 'workdir'):
    if fv[name].value is None:
      return run_lib.fail(
          f'--{name} is required, e.g. --config=experiments/configs/digits_fedavg.py '
          '--sweep=experiments/sweeps/digits_lr.py --workdir=/tmp/digits_lr',
          run_lib.USAGE_ERROR)
  try:
    run_lib.start_processes(fv)  # before anything uses a device
    members = error = None
    try:
      members = load_sweep(values['sweep'].value)
    except train.UsageError as e:
      error = e
    # A sweep file that one process cannot load stops every process (none waits for it).
    error = distributed.agree_on_error(error)
    if error is not None:
      raise error if isinstance(error, train.UsageError) else train.UsageError(str(error))
    rows = sweep_lib.run_sweep(config.value, members, values['workdir'].value,
                               strategy=values['member_mapping'].value,
                               retry_failed=values['retry_failed'].value)
  except train.UsageError as e:
    if values['traceback'].value:
      traceback.print_exc()
    return run_lib.fail(str(e), run_lib.USAGE_ERROR)
  workdir = values['workdir'].value
  failed = [r for r in rows if r['status'] != 'done']  # the same in every process
  if not distributed.is_primary():  # process 0 plots and prints what all computed
    return run_lib.RUN_ERROR if failed else 0
  plotted = sweep_lib.plot_summary(rows, os.path.join(workdir, sweep_lib.PLOT_FILE))
  print(sweep_lib.format_summary(rows))
  print(f'{len(rows) - len(failed)} of {len(rows)} members finished'
        f'{f", {len(failed)} failed" if failed else ""}. Summary: '
        f'{os.path.join(workdir, sweep_lib.SUMMARY_FILE)}'
        + (f'; plot: {os.path.join(workdir, sweep_lib.PLOT_FILE)}' if plotted else ''))
  return run_lib.RUN_ERROR if failed else 0


if __name__ == '__main__':
  flags.FLAGS.mark_as_parsed()  # flags are parsed by cli(); silences absl's pre-parse warning
  logging.use_absl_handler()
  sys.exit(cli(sys.argv))
