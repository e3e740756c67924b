"""SSFL on CIFAR-10 with ResNet-18-GN: the paper's reference setting (for a GPU with the data).

100 clients, 10 per round, balanced Dirichlet α = 0.3 (500 examples each), 5 local epochs,
batch 16, client SGD lr 0.1 · 0.998^t, no momentum, weight decay 5e-4, gradient-norm clip 10,
1000 rounds, density d = 0.5 of the conv and dense kernels (first conv, shortcut convs and
classifier included), mask from the uniform mean of all 100 clients' saliency on one minibatch
(SalientGrads / SSFL, `fedsparse.algorithms.ssfl`). The dense baseline is `cifar10_fedavg`.

Command (needs CIFAR-10 prepared for TFDS once, with network access, in ``--config.data_dir``)::

  python -m experiments.run --config=experiments/configs/cifar10_ssfl.py --workdir=/tmp/c10_ssfl

Other densities studied in the paper: ``--config.ssfl.density=0.3`` (0.2, 0.1, 0.05).

Expected result: the SSFL paper reports 88.29 % pooled test accuracy at d = 0.5 (5-run mean).
Not yet measured here: no GPU and no CIFAR-10 offline in the sessions so far.
"""

from experiments.configs import base
from experiments.configs import cifar10_fedavg


def get_config(arg: str | None = None):
  c = cifar10_fedavg.get_config()  # the reference setting of the dense baseline
  base.set_algorithm(c, 'ssfl', density=0.5, mask='saliency', saliency_score='ssfl')
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
