"""Plots test accuracy against round and against cumulative upload for one or more runs.

Usage::

  python scripts/plot.py /tmp/run_a /tmp/run_b --out=/tmp/curves.png

Each argument is a workdir holding ``metrics.jsonl``; the legend uses the directory names.
Writes one PNG with two panels: accuracy vs round, accuracy vs cumulative upload (MB).
"""

import json
import pathlib
from typing import Sequence

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')  # files only; no display on servers
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string('out', 'curves.png', 'Output PNG path.')
_METRIC = flags.DEFINE_string('metric', 'test_accuracy',
                              'Accuracy column: test_accuracy or client_accuracy_mean.')


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


def plot(workdirs: Sequence[pathlib.Path], out: pathlib.Path, metric: str) -> None:
  """Draws both panels for every run and saves them to ``out``."""
  fig, (ax_round, ax_bits) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
  for workdir in workdirs:
    rounds, upload_mb, accuracy = load_curve(workdir, metric)
    ax_round.plot(rounds, accuracy, marker='.', label=workdir.name)
    ax_bits.plot(upload_mb, accuracy, marker='.', label=workdir.name)
  ax_round.set(xlabel='round', ylabel=metric.replace('_', ' '), title='accuracy vs round')
  ax_bits.set(xlabel='cumulative upload, all clients (MB)', ylabel=metric.replace('_', ' '),
              title='accuracy vs upload')
  for ax in (ax_round, ax_bits):
    ax.grid(alpha=0.3)
    ax.legend()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError('Pass at least one run directory.')
  plot([pathlib.Path(a) for a in argv[1:]], pathlib.Path(_OUT.value), _METRIC.value)
  print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
