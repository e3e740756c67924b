"""FLASH on CIFAR-10 with ResNet-18: the paper's setting (for a GPU with the data).

FLASH's CIFAR-10 experiment (Babakniya et al., TMLR 2023; `fedsparse.algorithms.flash`): 100
clients, balanced Dirichlet labels (α = 1 here; the paper also runs α = 1000 and 0.1), 10 clients
per round without replacement, unweighted averaging, 600 rounds of 1 local epoch of batch 32, plain
SGD (no momentum, no weight decay) at lr 0.1 · 0.01^(t/1000), SPDST at density d = 0.05 of every
conv kernel (first conv and shortcut convs included); the classifier (``Dense_0``) stays dense.
Stage 1: 10 % of the clients hunt densities for 10 local epochs.

Deviations from the official code, each of which moves the numbers:

* fedsparse's ResNet-18 normalises with GroupNorm (32 groups), where the paper uses BatchNorm
  with running statistics averaged by the server. The engine's clients carry parameters and
  optimizer state but no model state (``batch_stats``), and GroupNorm needs none; a ``bn``
  option waits for model state in the engine.
* No data augmentation: the official code trains on random 32×32 crops (padding 4) and
  horizontal flips; fedsparse's data pipeline has none, so expect lower accuracy than the paper.
* Initialisation: flax's lecun-normal kernels, where the official ResNet uses
  ``xavier_uniform(gain=0.5)`` for convs and N(0, 0.01) for the classifier. NST shares its
  regrowth by each layer's mean |w|, so the hunted densities depend on the layers' initial
  scales (the stem's is relatively larger here).

Commands (need CIFAR-10 prepared for TFDS once, with network access, in ``--config.data_dir``)::

  python -m experiments.run --config=experiments/configs/cifar10_flash.py --workdir=/tmp/c10_spdst
  ... --config.flash.mode=jmwst --workdir=/tmp/c10_jmwst
  ... --config.flash.mode=pdst --workdir=/tmp/c10_pdst
  ... --config.flash.hetero=True --workdir=/tmp/c10_hetero
  ... --config.dirichlet_alpha=1000 (or 0.1)            # the paper's other splits
  ... --config.flash.density=0.1 (or 0.2)               # the paper's other densities

Expected result: not yet measured here (no GPU and no CIFAR-10 offline in the sessions so far).
"""

from experiments.configs import base
from experiments.configs import mnist_flash


def setting(c):
  """FLASH's CIFAR-10 setting on any config (data, model, cohort, local training, rounds)."""
  c = mnist_flash.setting(c)  # the paper's cohort, local training and learning-rate schedule
  c.dataset = 'cifar10'
  c.model = 'resnet18'
  c.num_rounds = 600
  c.eval_every = 10
  c.checkpoint_every = 50
  return c


def get_config(arg: str | None = None):
  c = setting(base.base_config())
  base.set_algorithm(c, 'flash', mode='spdst', density=0.05, exclude_layers='^Dense_0/')
  if base.is_smoke(arg):
    c = base.smoke(c)
    c.local_steps = 4  # as mnist_flash's smoke: the mid-run prune prunes
    c.flash.hunt_epochs = 1
  return c
