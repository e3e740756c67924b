"""FedDST on CIFAR-100: the paper's setting at sparsity 0.5 (for a GPU).

`cifar10_feddst` on CIFAR-100 with the official code's CIFAR-100 model (CIFAR100Net: the conv
stack of CIFAR10Net, then fc 6400 → 120 → 100) at S = 0.5, α = 0.01, ΔR = 15, 400 rounds. The
dense baselines: `cifar100_feddst_fedavg` and `cifar100_feddst_fedavgm`.

Command (needs CIFAR-100 prepared for TFDS once, with network access)::

  python -m experiments.run --config=experiments/configs/cifar100_feddst.py \\
      --workdir=/tmp/c100_feddst

Expected result: not yet measured here (no CIFAR-100 offline).
"""

from experiments.configs import base
from experiments.configs import cifar100_feddst_fedavg


def get_config(arg: str | None = None):
  c = cifar100_feddst_fedavg.setting(base.base_config())
  base.set_algorithm(c, 'feddst', sparsity=0.5, alpha=0.01, readjust_every=15)
  if base.is_smoke(arg):
    c = base.smoke(c)
    c.feddst.readjust_end = 2  # two rounds: the second readjusts
  return c
