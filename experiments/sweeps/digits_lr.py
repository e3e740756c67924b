"""Client learning rate × seeds on digits: lr {0.01, 0.02, 0.05, 0.1} × 3 seeds (12 members).

Command::

  python -m experiments.sweep --config=experiments/configs/digits_fedavg.py \\
      --sweep=experiments/sweeps/digits_lr.py --workdir=/tmp/digits_lr

The learning rate is traced, so all 12 members form one group: one compile.
``--sweep=...:2`` takes 2 seeds instead of 3.
"""

from fedsparse import sweep


def get_sweep(arg: str | None = None):
  seeds = int(arg) if arg else 3
  return sweep.product(sweep.sweep('learning_rate', [0.01, 0.02, 0.05, 0.1]),
                       sweep.sweep('seed', range(seeds)))
