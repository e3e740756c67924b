"""Dense FedAvgM in FedDST's MNIST setting: FedDST's main baseline, beside `mnist_feddst`.

The setting of `mnist_feddst_fedavg`, with server SGD with momentum β = 0.9 on −Δ̄ at server
learning rate 0.1, i.e. an effective step η / (1 − β) = 1 (Hsu et al., 2019, find the best
runs near an effective learning rate of 1; plain FedAvg is η = 1, β = 0).

Command::

  python -m experiments.run --config=experiments/configs/mnist_feddst_fedavgm.py \\
      --config.dataset=npz:mnist.npz --workdir=/tmp/mnist_feddst_fedavgm

Expected result: see `mnist_feddst` (measured side by side).
"""

from experiments.configs import base
from experiments.configs import mnist_feddst_fedavg


def get_config(arg: str | None = None):
  c = mnist_feddst_fedavg.setting(base.base_config())
  base.set_algorithm(c, 'fedavgm')
  c.server_learning_rate = 0.1
  c.server_momentum = 0.9
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
