"""FedPM on CIFAR-10, the official code's setting: Conv6, 50 clients, 5 per round.

Conv6 (64, 64, pool, 128, 128, pool, 256, 256, pool, then 256, 256, 10; 2,262,602 parameters,
every weight and bias frozen at ``±e·sqrt(1/fan_in)`` and scored) on CIFAR-10; 50 clients, IID
(``--config.partition=classes`` for the non-IID setting, 2 classes per client), 5 per round
without replacement; 3 local epochs of batch 128, Adam at lr 0.1 on the scores; 200 rounds.

Command (needs the TFDS CIFAR-10 data; a GPU)::

  python -m experiments.run --config=experiments/configs/cifar10_fedpm.py --workdir=/tmp/cifar10_fedpm

Not run here (no GPU and no CIFAR-10 offline); ``:smoke`` runs everywhere.
"""

from experiments.configs import base


def setting(c):
  """The official CIFAR-10 setting on any config."""
  c.dataset = 'cifar10'
  c.model = 'conv6'
  c.partition = 'iid'
  c.classes_per_client = 2
  c.num_clients = 50
  c.clients_per_round = 5
  c.sample_with_replacement = False
  c.weighted_aggregation = False
  c.num_rounds = 200
  c.local_epochs = 3
  c.batch_size = 128
  c.learning_rate = 0.1
  c.eval_every = 5
  return c


def get_config(arg: str | None = None):
  c = setting(base.base_config())
  base.set_algorithm(c, 'fedpm')
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
