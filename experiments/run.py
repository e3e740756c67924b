"""Runs one federated experiment from an ml_collections config file.

Usage::

  python -m experiments.run --config=experiments/configs/digits_fedavg.py --workdir=/tmp/run
  python -m experiments.run --config=experiments/configs/mnist_fedavg.py:smoke --workdir=/tmp/s
  python -m experiments.run --config=experiments/configs/mnist_fedavg.py \\
      --config.dataset=npz:../shared/data/mnist.npz --config.num_rounds=50 --workdir=/tmp/mnist

``:smoke`` makes any experiment tiny; ``--config.KEY=VALUE`` overrides any key.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedsparse import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for config.json, metrics.jsonl and '
                               'checkpoints (resumes from the latest checkpoint there).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  last = train.run(_CONFIG.value, _WORKDIR.value)
  print(f'Final (round {last["round"]}): pooled test accuracy {last["test_accuracy"]:.4f}, '
        f'mean client accuracy {last["client_accuracy_mean"]:.4f}; communicated '
        f'{last["cum_bits_up"]:,} bits up ({last["cum_bits_up"] / 8e6:.2f} MB), '
        f'{last["cum_bits_down"]:,} bits down ({last["cum_bits_down"] / 8e6:.2f} MB). '
        f'Metrics: {_WORKDIR.value}/metrics.jsonl')


if __name__ == '__main__':
  app.run(main)
