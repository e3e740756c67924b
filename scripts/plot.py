"""Plots test accuracy against round and against cumulative upload for one or more runs.

Usage::

  python scripts/plot.py /tmp/run_a /tmp/run_b --out=/tmp/curves.png
  python scripts/plot.py /tmp/feddst /tmp/fedavg --labels=FedDST,FedAvg --budgets_mb=100,400

Each argument is a workdir holding ``metrics.jsonl``; the legend uses the directory names, or
``--labels``. Writes one PNG with two panels: accuracy vs round, accuracy vs cumulative upload
(MB = 10^6 bytes, all clients). With ``--budgets_mb`` it also prints, for every run, the best
accuracy evaluated within each upload budget: runs compared at equal upload.
"""

import json
import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')  # files only; no display on servers
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string('out', 'curves.png', 'Output PNG path.')
_METRIC = flags.DEFINE_string('metric', 'test_accuracy',
                              'Accuracy column: test_accuracy or client_accuracy_mean.')
_LABELS = flags.DEFINE_list('labels', [], 'Legend names, one per run (default: directory names).')
_BUDGETS = flags.DEFINE_list('budgets_mb', [], 'Upload budgets (MB) to compare the runs at.')
_TITLE = flags.DEFINE_string('title', '', 'Figure title.')


def load_curve(workdir: pathlib.Path, metric: str) -> tuple[list[int], list[float], list[float]]:
  """Rounds, cumulative upload in MB and accuracy for the evaluated rounds of one run."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist; pass run directories made by '
                            'experiments.run.')
  rounds, upload_mb, accuracy = [], [], []
  for line in path.read_text().splitlines():
    row = json.loads(line)
    if metric in row:
      rounds.append(row['round'])
      upload_mb.append(row['cum_bits_up'] / 8e6)
      accuracy.append(row[metric])
  return rounds, upload_mb, accuracy


def accuracy_within(upload_mb: Sequence[float], accuracy: Sequence[float],
                    budget_mb: float) -> float | None:
  """The best accuracy a run evaluated before its cumulative upload passed ``budget_mb``."""
  within = [a for u, a in zip(upload_mb, accuracy) if u <= budget_mb]
  return max(within) if within else None


def budget_table(workdirs: Sequence[pathlib.Path], labels: Sequence[str], metric: str,
                 budgets_mb: Sequence[float]) -> str:
  """A markdown table: per run, the best accuracy within each upload budget (– if none)."""
  lines = ['| run | ' + ' | '.join(f'≤ {b:g} MB' for b in budgets_mb) + ' |',
           '|---|' + '---|' * len(budgets_mb)]
  for workdir, label in zip(workdirs, labels):
    _, upload_mb, accuracy = load_curve(workdir, metric)
    cells = [accuracy_within(upload_mb, accuracy, b) for b in budgets_mb]
    lines.append(f'| {label} | ' + ' | '.join('–' if c is None else f'{100 * c:.2f} %'
                                              for c in cells) + ' |')
  return '\n'.join(lines)


def plot(workdirs: Sequence[pathlib.Path], out: pathlib.Path, metric: str,
         labels: Sequence[str] | None = None, title: str = '') -> None:
  """Draws both panels for every run and saves them to ``out``."""
  labels = labels or [w.name for w in workdirs]
  fig, (ax_round, ax_bits) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
  if title:
    fig.suptitle(title)
  for workdir, label in zip(workdirs, labels):
    rounds, upload_mb, accuracy = load_curve(workdir, metric)
    ax_round.plot(rounds, accuracy, marker='.', label=label)
    ax_bits.plot(upload_mb, accuracy, marker='.', label=label)
  ax_round.set(xlabel='round', ylabel=metric.replace('_', ' '), title='accuracy vs round')
  ax_bits.set(xlabel='cumulative upload, all clients (MB)', ylabel=metric.replace('_', ' '),
              title='accuracy vs upload')
  for ax in (ax_round, ax_bits):
    ax.grid(alpha=0.3)
    ax.legend()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def check_inputs(workdirs: Sequence[pathlib.Path], labels: Sequence[str], metric: str,
                 budgets: Sequence[str]) -> list[float]:
  """Validates the command line before anything is drawn; returns the budgets as numbers.

  Raises:
    ValueError: naming what is wrong (a missing run, a metric no run logged, ...).
  """
  if not workdirs:
    raise ValueError('Pass at least one run directory (a workdir of experiments.run).')
  if len(labels) != len(workdirs):
    raise ValueError(f'--labels has {len(labels)} names for {len(workdirs)} runs.')
  try:
    values = [float(b) for b in budgets]
  except ValueError:
    raise ValueError(f'--budgets_mb must be numbers, got {",".join(budgets)}.') from None
  if any(not v > 0 for v in values):
    raise ValueError(f'--budgets_mb must be positive, got {",".join(budgets)}.')
  for workdir in workdirs:
    path = workdir / 'metrics.jsonl'
    if not path.exists():
      raise ValueError(f'{path} does not exist; pass run directories made by experiments.run.')
    keys = set()
    for line in path.read_text().splitlines():
      keys.update(json.loads(line))
    if metric not in keys:
      found = sorted(k for k in keys if 'accuracy' in k) or sorted(keys)
      raise ValueError(f'{path} has no {metric!r}; it has {", ".join(found) or "no rows"}.')
  return values


def main(argv: Sequence[str]) -> None:
  workdirs = [pathlib.Path(a) for a in argv[1:]]
  labels = _LABELS.value or [w.name for w in workdirs]
  try:
    budgets = check_inputs(workdirs, labels, _METRIC.value, _BUDGETS.value)
  except ValueError as e:
    print(f'FATAL: {e}', file=sys.stderr)
    sys.exit(2)
  plot(workdirs, pathlib.Path(_OUT.value), _METRIC.value, labels, _TITLE.value)
  print(f'Wrote {_OUT.value}')
  if budgets:
    print(budget_table(workdirs, labels, _METRIC.value, budgets))


if __name__ == '__main__':
  app.run(main)
