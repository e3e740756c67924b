"""Dense FedAvgM in FedDST's CIFAR-100 setting, beside `cifar100_feddst` (for a GPU).

The setting of `cifar100_feddst_fedavg` with server momentum β = 0.9 at server learning rate
0.1 (effective step 1, as `mnist_feddst_fedavgm`).

Command::

  python -m experiments.run --config=experiments/configs/cifar100_feddst_fedavgm.py \\
      --workdir=/tmp/c100_feddst_fedavgm

Expected result: not yet measured here (no CIFAR-100 offline).
"""

from experiments.configs import base
from experiments.configs import cifar100_feddst_fedavg


def get_config(arg: str | None = None):
  c = cifar100_feddst_fedavg.setting(base.base_config())
  base.set_algorithm(c, 'fedavgm')
  c.server_learning_rate = 0.1
  c.server_momentum = 0.9
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
