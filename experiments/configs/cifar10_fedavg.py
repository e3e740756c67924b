"""FedAvg on CIFAR-10 with ResNet-18-GN in the SSFL reference setting (for a GPU with the data).

100 clients, 10 per round, balanced Dirichlet α = 0.3 (500 examples each), 5 local epochs,
batch 16, client SGD lr 0.1 · 0.998^t, no momentum, weight decay 5e-4, gradient-norm clip 10,
1000 rounds (SalientGrads / SSFL, `fedsparse.algorithms.ssfl`; the dense baseline of that paper).

Command (needs CIFAR-10 prepared for TFDS once, with network access, in ``--config.data_dir``)::

  python -m experiments.run --config=experiments/configs/cifar10_fedavg.py --workdir=/tmp/c10

Expected result: not yet measured here (no GPU and no CIFAR-10 offline); the SSFL paper's dense
baseline at this setting is in the high 80s % pooled test accuracy.
"""

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.base_config()
  base.set_algorithm(c, 'fedavg')
  c.dataset = 'cifar10'
  c.model = 'resnet18'
  c.partition = 'dirichlet_balanced'
  c.dirichlet_alpha = 0.3
  c.num_clients = 100
  c.clients_per_round = 10
  c.num_rounds = 1000
  c.local_epochs = 5
  c.batch_size = 16
  c.learning_rate = 0.1
  c.lr_decay = 0.998
  c.momentum = 0.0
  c.weight_decay = 5e-4
  c.clip_norm = 10.0
  c.eval_every = 10
  c.checkpoint_every = 50
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
