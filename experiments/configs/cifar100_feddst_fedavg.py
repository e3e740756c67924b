"""Dense FedAvg in FedDST's CIFAR-100 setting: the baseline of `cifar100_feddst` (for a GPU).

The setting of `cifar10_feddst_fedavg` on CIFAR-100 with CIFAR100Net (400 Dirichlet(0.1)
clients, 20 per round, 10 local epochs of batch 32, SGD lr 0.01, momentum 0.9, weight decay
1e-3, 400 rounds).

Command (needs CIFAR-100 prepared for TFDS once, with network access)::

  python -m experiments.run --config=experiments/configs/cifar100_feddst_fedavg.py \\
      --workdir=/tmp/c100_feddst_fedavg

Expected result: not yet measured here (no CIFAR-100 offline).
"""

from experiments.configs import base
from experiments.configs import cifar10_feddst_fedavg


def setting(c):
  """FedDST's CIFAR-100 setting on any config."""
  c = cifar10_feddst_fedavg.setting(c)
  c.dataset = 'cifar100'
  c.model = 'cifar100net'
  return c


def get_config(arg: str | None = None):
  c = setting(base.base_config())
  base.set_algorithm(c, 'fedavg')
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
