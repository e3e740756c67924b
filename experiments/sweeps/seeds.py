"""Seeds only: ``--sweep=experiments/sweeps/seeds.py:N`` runs seeds 0..N-1 (default 8).

Command (the README's sweep benchmark runs this for 8 seeds)::

  python -m experiments.sweep --config=experiments/configs/digits_fedavg.py \\
      --sweep=experiments/sweeps/seeds.py:8 --workdir=/tmp/digits_seeds

All members share one compile (the seed changes no shape).
"""

from fedsparse import sweep


def get_sweep(arg: str | None = None):
  return sweep.sweep('seed', range(int(arg) if arg else 8))
