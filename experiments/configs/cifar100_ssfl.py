"""SSFL on CIFAR-100 with ResNet-18-GN: the paper's reference setting (for a GPU with the data).

As `cifar10_ssfl` (100 clients, 10 per round, balanced Dirichlet α = 0.3, weight decay 5e-4,
clip 10, d = 0.5, 1000 rounds) but 10 local epochs of batch 128, client momentum 0.9, and a
cosine learning-rate schedule stepped per local epoch with a 10-epoch period and a 1e-5 floor
(epoch e uses 1e-5 + (0.1 - 1e-5)(1 + cos(π e / 10)) / 2: 0.1 down to 0.0025 in the last
epoch), restarted every round (the SSFL code's ``cosine_annealing`` scheduler, rebuilt each
round; see `fedsparse.algorithms.ssfl`).

Command (needs CIFAR-100 prepared for TFDS once, with network access, in ``--config.data_dir``)::

  python -m experiments.run --config=experiments/configs/cifar100_ssfl.py --workdir=/tmp/c100

Expected result: the SSFL paper reports 61.37 % pooled test accuracy at d = 0.5 (5-run mean).
Not yet measured here: no GPU and no CIFAR-100 offline in the sessions so far.
"""

from experiments.configs import base
from experiments.configs import cifar10_ssfl


def get_config(arg: str | None = None):
  c = cifar10_ssfl.get_config()
  c.dataset = 'cifar100'
  c.local_epochs = 10
  c.batch_size = 128
  c.lr_decay = 1.0
  c.lr_schedule = 'cosine'
  c.cosine_epochs = 10
  c.cosine_min_lr = 1e-5
  c.momentum = 0.9
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
