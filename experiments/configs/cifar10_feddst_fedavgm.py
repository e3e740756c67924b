"""Dense FedAvgM in FedDST's CIFAR-10 setting: the paper's main baseline (for a GPU).

The setting of `cifar10_feddst_fedavg` with server momentum β = 0.9 at server learning rate 0.1
(effective step 1, as `mnist_feddst_fedavgm`).

Command::

  python -m experiments.run --config=experiments/configs/cifar10_feddst_fedavgm.py \\
      --workdir=/tmp/c10_feddst_fedavgm

Expected result: not yet measured here (no CIFAR-10 offline). FedDST's headline: at any fixed
upload budget FedDST is about 10 points ahead of FedAvgM.
"""

from experiments.configs import base
from experiments.configs import cifar10_feddst_fedavg


def get_config(arg: str | None = None):
  c = cifar10_feddst_fedavg.setting(base.base_config())
  base.set_algorithm(c, 'fedavgm')
  c.server_learning_rate = 0.1
  c.server_momentum = 0.9
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
