"""SSFL density sweep on MNIST: density {0.05, 0.1, 0.2, 0.5} × 3 seeds (12 members).

Command (MNIST offline from an ``mnist.npz`` file, see the README)::

  python -m experiments.sweep --config=experiments/configs/mnist_ssfl.py \\
      --config.dataset=npz:mnist.npz \\
      --sweep=experiments/sweeps/ssfl_density.py --workdir=/tmp/ssfl_density

The density is traced: each member's exact keep count enters the round as an array, so all 12
members share one group and one compile (the log says ``1 group(s)`` and ``Round compiled ...
for 12 runs``). ``--sweep=...:2`` takes 2 seeds instead of 3.
"""

from fedsparse import sweep


def get_sweep(arg: str | None = None):
  seeds = int(arg) if arg else 3
  return sweep.product(sweep.sweep('ssfl.density', [0.05, 0.1, 0.2, 0.5]),
                       sweep.sweep('seed', range(seeds)))
