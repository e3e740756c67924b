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
from experiments.configs import mnist_fedavg


def get_config(arg: str | None = None):
  c = mnist_fedavg.get_config()  # the same data, partition, model and local training
  c.algorithm = 'ssfl'
  c.density = 0.05
  c.mask = 'saliency'
  if arg == 'smoke':
    c = base.smoke(c)
  return c
