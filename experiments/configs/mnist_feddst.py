"""FedDST on MNIST: the paper's reference setting (sparsity 0.8, α = 0.05, ΔR = 10).

The setting of `mnist_feddst_fedavg` (MNISTNet, 400 Dirichlet(0.1) clients, 20 per round, 10
local epochs of batch 32, SGD lr 0.01, momentum 0.9, weight decay 1e-3, 100 rounds) with
FedDST at sparsity S = 0.8 (RigL's ERK allocation, magnitude-pruned initial mask), readjustment
ratio α = 0.05 annealed by a cosine, every ΔR = 10 rounds until R_end = 50 (0-based rounds 1,
11, 21, 31, 41), union of the client masks. The comparisons: `mnist_feddst_fedavg` (dense
FedAvg) and `mnist_feddst_fedavgm` (dense FedAvgM); the RandomMask baseline (a static random
mask of the same per-layer counts) is ``--config=experiments/configs/mnist_feddst_fedavg.py
--config.algorithm=random_mask`` (its defaults: S = 0.8, ERK).

Command (offline, with the MNIST file beside the checkout)::

  python -m experiments.run --config=experiments/configs/mnist_feddst.py \\
      --config.dataset=npz:../shared/data/mnist.npz --workdir=/tmp/mnist_feddst

Expected result: not yet measured.

Bits per client and round: ERK keeps 208, 396, 51,245 and 500 (dense) of the 250, 5,000,
256,000 and 500 kernel weights, so (52,349 kept weights + 90 biases) × 32 = 1,678,048 bits each
way; a mask message (the enumerative code of every layer's kept positions, vs 261,750 bits as a
bitmap) adds 187,047 bits up on readjustment rounds and down to every client whose mask is
stale. In ``:smoke`` mode the run readjusts once (round index 1), so the smoke test covers it.
"""

from experiments.configs import base
from experiments.configs import mnist_feddst_fedavg


def get_config(arg: str | None = None):
  c = mnist_feddst_fedavg.setting(base.base_config())
  base.set_algorithm(c, 'feddst', sparsity=0.8, alpha=0.05, readjust_every=10)
  if base.is_smoke(arg):
    c = base.smoke(c)
    c.feddst.readjust_end = 2  # two rounds: the second readjusts
  return c
