"""SSFL on MNIST with MNISTNet: 100 clients, balanced Dirichlet α = 0.3, 10 per round, d = 0.05.

The setting of `mnist_fedavg` (same partition, seed, local training and rounds) with a static
global mask chosen from the saliency of all 100 clients before the first round.

Command (offline, with the MNIST file beside the checkout)::

  python -m experiments.run --config=experiments/configs/mnist_ssfl.py \\
      --config.dataset=npz:../shared/data/mnist.npz --workdir=/tmp/mnist_ssfl

Other densities and the random-mask baselines: ``--config.density=0.1``,
``--config.mask=random_global`` (or ``random_layerwise``).

Expected result: see the README's SSFL table (measured with this command, seed 0).
"""

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.base_config()
  c.algorithm = 'ssfl'
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
  c.density = 0.05
  c.mask = 'saliency'
  c.eval_every = 5
  if arg == 'smoke':
    c = base.smoke(c)
  return c
