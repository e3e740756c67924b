"""Dense FedAvg in FedDST's MNIST setting: the baseline of `mnist_feddst`.

FedDST's reference setting (Bibikar et al., AAAI 2022; `fedsparse.algorithms.feddst`): MNISTNet,
MNIST split over 400 clients by a Dirichlet(0.1) over clients per class (very uneven: 1 to 1,138
examples; the 2 clients left empty are dropped), 20 clients per round sampled without replacement,
aggregation weighted by n_k, 10 local epochs of batch 32, client SGD lr 0.01, momentum 0.9, weight
decay 1e-3 (optimizer state restarted every round), 100 rounds.

Command (offline, with the MNIST file beside the checkout)::

  python -m experiments.run --config=experiments/configs/mnist_feddst_fedavg.py \\
      --config.dataset=npz:mnist.npz --workdir=/tmp/mnist_feddst_fedavg

Expected result: see `mnist_feddst` (measured side by side).
"""

from experiments.configs import base


def setting(c):
  """FedDST's MNIST setting on any config (data, model, cohort, local training, rounds)."""
  c.dataset = 'mnist'
  c.model = 'mnistnet'
  c.partition = 'dirichlet'
  c.dirichlet_alpha = 0.1
  c.num_clients = 400
  c.clients_per_round = 20
  c.sample_with_replacement = False
  c.weighted_aggregation = True
  c.num_rounds = 100
  c.local_epochs = 10
  c.batch_size = 32
  c.learning_rate = 0.01
  c.momentum = 0.9
  c.weight_decay = 1e-3
  c.eval_every = 5
  return c


def get_config(arg: str | None = None):
  c = setting(base.base_config())
  base.set_algorithm(c, 'fedavg')
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
