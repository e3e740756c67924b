"""FLASH on MNIST: SPDST at density d = 0.05 (JMWST, PDST and hetero-FLASH by flags).

MNISTNet on MNIST; 100 clients, balanced Dirichlet(α = 1) labels; 10 clients per round (no
replacement), unweighted averaging; 1 local epoch of batch 32, plain SGD at
lr 0.1 · 0.01^(t/1000); 100 rounds (the paper runs 600 on CIFAR-10; MNIST converges within
100 here). Masks on ``conv2`` and ``fc1`` (``Conv_1``, ``Dense_0``)
only, as the official code's MNIST mask: the first conv and the classifier stay dense. Stage 1:
10 % of the clients hunt densities for 10 local epochs.

Commands (offline, with the MNIST file beside the checkout; one per row of the README table)::

  python -m experiments.run --config=experiments/configs/mnist_flash.py \\
      --config.dataset=npz:../shared/data/mnist.npz --workdir=/tmp/mnist_spdst
  ... --config.flash.mode=jmwst --workdir=/tmp/mnist_jmwst
  ... --config.flash.mode=pdst --workdir=/tmp/mnist_pdst
  ... --config.flash.hetero=True --workdir=/tmp/mnist_hetero_spdst

Expected results (seed 0, measured with these commands on the 2-core CPU): pooled test
accuracy at round 100 of PDST 98.11 %, SPDST 98.46 %, JMWST 98.50 %, hetero-SPDST 98.43 % (its
0.75d and 0.5d models 98.42 % and 98.53 %), after 55.6, 55.6, 62.1 and 41.9 MB of upload;
at round 10: 93.75, 95.38, 95.36 and 95.44 %. Stage 1 moves ``conv2`` from 5 % to 93 %
density and ``fc1`` to 3.3 %. Curves and the upload budgets: the README's "FLASH on MNIST".
"""

from experiments.configs import base


def setting(c):
  """FLASH's MNIST setting on any config (data, model, cohort, local training, rounds)."""
  c.dataset = 'mnist'
  c.model = 'mnistnet'
  c.partition = 'dirichlet_balanced'
  c.dirichlet_alpha = 1.0
  c.num_clients = 100
  c.clients_per_round = 10
  c.sample_with_replacement = False
  c.weighted_aggregation = False
  c.num_rounds = 100
  c.local_epochs = 1
  c.batch_size = 32
  c.learning_rate = 0.1
  c.lr_decay = 0.01 ** (1 / 1000)
  c.momentum = 0.0
  c.weight_decay = 0.0
  c.eval_every = 5
  return c


def get_config(arg: str | None = None):
  c = setting(base.base_config())
  base.set_algorithm(c, 'flash', mode='spdst', density=0.05,
                     exclude_layers='^Conv_0/,^Dense_1/')
  if base.is_smoke(arg):
    c = base.smoke(c)
    c.local_steps = 4  # the mid-run prune after step 2 of 4 prunes (after 1 of 2, r = 0)
    c.flash.hunt_epochs = 1  # stage 1 trains on whole epochs: one, with its mid-run prune
  return c
