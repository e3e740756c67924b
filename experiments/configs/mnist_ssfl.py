"""SSFL on MNIST with MNISTNet: 100 clients, balanced Dirichlet α = 0.3, 10 per round, d = 0.05.

The setting of `mnist_fedavg` (same partition, seed, local training and rounds) with a static
global mask chosen from the saliency of all 100 clients before the first round.

Command (offline, with the MNIST file beside the checkout)::

  python -m experiments.run --config=experiments/configs/mnist_ssfl.py \\
      --config.dataset=npz:mnist.npz --workdir=/tmp/mnist_ssfl

Other densities and the random-mask baselines: ``--config.ssfl.density=0.1``,
``--config.ssfl.mask=random_global`` (or ``random_layerwise``).

Expected result (seed 0, measured with the command above on the 2-core CPU, ~4 s per round;
the first round also scores all 100 clients): 97.3 % pooled test accuracy at round 50, 0.7
points below dense FedAvg (`mnist_fedavg`: 98.1 %) and 17 above a random global mask of the
same density (80.5 %). Other densities in the README's SSFL table.

  round                       5      10     15     20     25     30     35     40     45     50
  pooled test accuracy      88.49  93.20  94.32  95.23  96.52  96.49  96.70  97.36  97.21  97.33
  mean client accuracy      88.36  93.24  94.23  95.24  96.63  96.36  96.78  97.39  97.40  97.46
  cumulative upload (MB)    107.3  110.0  112.6  115.2  117.9  120.5  123.1  125.8  128.4  131.1

Upload: once, 100 clients × 261,750 prunable weights × 32 bits of saliency = 104.7 MB; then
each round 10 clients × (13,087 kept weights + 90 dense biases) × 32 bits = 0.53 MB (the same
down; the mask download is 100 × 261,750 bits = 3.3 MB once).
"""

from experiments.configs import base
from experiments.configs import mnist_fedavg


def get_config(arg: str | None = None):
  c = mnist_fedavg.get_config()  # the same data, partition, model and local training
  base.set_algorithm(c, 'ssfl', density=0.05, mask='saliency')
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
