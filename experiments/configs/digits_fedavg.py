"""FedAvg on scikit-learn's digits (offline, 8×8): the README's default experiment.

Command::

  python -m experiments.run --config=experiments/configs/digits_fedavg.py --workdir=/tmp/digits

Expected result (seed 0; about a minute on the 2-core CPU): pooled test accuracy 88.3 % at
round 10, 95.6 % at 30, 97.5-97.8 % from round 50 on (final 97.5 %; mean client accuracy
98.1 %);
1376 MB uploaded in total (5 clients × 458,698 float32 Conv4 params per round).
Conv4 on 8×8 inputs: two 2×2 pools leave 2×2×128 features before the dense layers.
"""

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.base_config()
  base.set_algorithm(c, 'fedavg')
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
  if base.is_smoke(arg):
    c = base.smoke(c)
  return c
