"""FedDST on CIFAR-10: the paper's reference setting (sparsity 0.8, α = 0.01, ΔR = 15).

The setting of `cifar10_feddst_fedavg` (CIFAR10Net, 400 Dirichlet(0.1) clients, 20 per round,
10 local epochs of batch 32, SGD lr 0.01, momentum 0.9, weight decay 1e-3, 400 rounds) with
FedDST at S = 0.8 (RigL's ERK allocation), α = 0.01 annealed by a cosine, readjusting every
ΔR = 15 rounds until R_end = 200.

Command (needs CIFAR-10 prepared for TFDS once, with network access, in ``--config.data_dir``)::

  python -m experiments.run --config=experiments/configs/cifar10_feddst.py \\
      --workdir=/tmp/c10_feddst

Expected result: not yet measured here (no CIFAR-10 offline). The paper: about 10 points of
mean client accuracy ahead of FedAvgM (`cifar10_feddst_fedavgm`) at any fixed upload budget.
"""

from experiments.configs import base
from experiments.configs import cifar10_feddst_fedavg


def get_config(arg: str | None = None):
  c = cifar10_feddst_fedavg.setting(base.base_config())
  base.set_algorithm(c, 'feddst', sparsity=0.8, alpha=0.01, readjust_every=15)
  if base.is_smoke(arg):
    c = base.smoke(c)
    c.feddst.readjust_end = 2  # two rounds: the second readjusts
  return c
