"""FedPM on EMNIST, the official code's EMNIST setting: Conv4, 10 clients, all in every round.

Conv4 (64, 64, pool, 128, 128, pool, then 256, 256, classes; every weight and bias frozen at
``±e·sqrt(1/fan_in)`` and scored) on EMNIST (``emnist`` = TFDS ``emnist/balanced``, 47
classes; ``--config.dataset=emnist/digits`` for the 10 digit classes); 10 clients, IID
(``--config.partition=classes`` for the non-IID setting, 2 classes per client), all 10 per
round; 3 local epochs of batch 128, Adam at lr 0.1 on the scores; 200 rounds. The official
code hard-codes a 10-class head for EMNIST; here the head has as many outputs as the data has
classes.

Command (needs the TFDS EMNIST data; ≈ 80 TFLOP per round, so a GPU)::

  python -m experiments.run --config=experiments/configs/emnist_fedpm.py --workdir=/tmp/emnist_fedpm

Not run here (no GPU and no EMNIST offline); ``:smoke`` runs with the data prepared or with
``--config.dataset=digits``.
"""

from experiments.configs import mnist_fedpm


def get_config(arg: str | None = None):
  return mnist_fedpm.make(arg, dataset='emnist', model='conv4', local_epochs=3, num_rounds=200)
