"""SSFL density sweep on MNIST: density {0.05, 0.1, 0.2, 0.5} × 3 seeds (12 members).

Command (MNIST offline from ``../shared/data/mnist.npz``)::

  python -m experiments.sweep --config=experiments/configs/mnist_ssfl.py \\
      --config.dataset=npz:../shared/data/mnist.npz \\
      --sweep=experiments/sweeps/ssfl_density.py --workdir=/tmp/ssfl_density

Densities set static keep counts (top-k sizes), so each density is its own group and compile;
its three seeds share that compile. ``--sweep=...:2`` takes 2 seeds instead of 3.
"""

from fedsparse import sweep


def get_sweep(arg: str | None = None):
  seeds = int(arg) if arg else 3
  return sweep.product(sweep.sweep('ssfl.density', [0.05, 0.1, 0.2, 0.5]),
                       sweep.sweep('seed', range(seeds)))
