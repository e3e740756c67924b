"""Dense FedAvg in FedDST's CIFAR-10 setting: the baseline of `cifar10_feddst` (for a GPU).

FedDST's CIFAR-10 setting (Bibikar et al., AAAI 2022; `fedsparse.algorithms.feddst`): CIFAR10Net,
CIFAR-10 split over 400 clients by a Dirichlet(0.1) over clients per class, 20 clients per round
without replacement, aggregation weighted by n_k, 10 local epochs of batch 32, client SGD lr 0.01,
momentum 0.9, weight decay 1e-3, 400 rounds. The paper reports the mean of the clients' local-test
accuracy (``client_accuracy_mean`` in metrics.jsonl; the pooled ``test_accuracy`` is logged too).

Command (needs CIFAR-10 prepared for TFDS once, with network access, in ``--config.data_dir``)::

  python -m experiments.run --config=experiments/configs/cifar10_feddst_fedavg.py \\
      --workdir=/tmp/c10_feddst_fedavg

Expected result: not yet measured here (no CIFAR-10 offline).
"""

from experiments.configs import base
from experiments.configs import mnist_feddst_fedavg


def setting(c):
  """FedDST's CIFAR-10 setting on any config."""
  c = mnist_feddst_fedavg.setting(c)
  c.dataset = 'cifar10'
  c.model = 'cifar10net'
  c.num_rounds = 400
  c.eval_every = 10
  c.checkpoint_every = 50
  return c


def get_config(arg: str | None = None):
  c = setting(base.base_config())
  base.set_algorithm(c, 'fedavg')
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
