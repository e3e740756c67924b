"""FedPM on CIFAR-10, the official code's setting: Conv6, 50 clients, 5 per round.

Conv6 (64, 64, pool, 128, 128, pool, 256, 256, pool, then 256, 256, 10; 2,262,602 parameters,
every weight and bias frozen at ``±e·sqrt(1/fan_in)`` and scored) on CIFAR-10; 50 clients, IID
(``--config.partition=classes`` for the non-IID setting, 2 classes per client), 5 per round
without replacement; 3 local epochs of batch 128, Adam at lr 0.1 on the scores; 200 rounds.

Command (needs the TFDS CIFAR-10 data; a GPU)::

  python -m experiments.run --config=experiments/configs/cifar10_fedpm.py --workdir=/tmp/cifar10_fedpm

Not run here (no GPU and no CIFAR-10 offline); ``:smoke`` runs with the data prepared or with
``--config.dataset=digits``.
"""

from experiments.configs import mnist_fedpm


def get_config(arg: str | None = None):
  return mnist_fedpm.make(arg, dataset='cifar10', model='conv6', num_clients=50,
                         clients_per_round=5, local_epochs=3, num_rounds=200)
