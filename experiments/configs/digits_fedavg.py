"""FedAvg on scikit-learn's digits (offline, 8×8): the README's default experiment.

Command::

  python -m experiments.run --config=experiments/configs/digits_fedavg.py --workdir=/tmp/digits

Expected result: see the README (filled in from a measured run).
"""

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.base_config()
  c.algorithm = 'fedavg'
  c.dataset = 'digits'
  c.model = 'conv4'
  c.partition = 'dirichlet_balanced'
  c.dirichlet_alpha = 0.3
  c.num_clients = 20
  c.clients_per_round = 5
  c.num_rounds = 150
  c.local_epochs = 2
  c.batch_size = 16
  c.learning_rate = 0.05
  c.eval_every = 10
  if arg == 'smoke':
    c = base.smoke(c)
  return c
