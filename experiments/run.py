"""Runs one federated experiment from an ml_collections config file.

Usage::

  python -m experiments.run --config=experiments/configs/digits_fedavg.py --workdir=/tmp/run
  python -m experiments.run --config=experiments/configs/mnist_fedavg.py:smoke --workdir=/tmp/s
  python -m experiments.run --config=experiments/configs/mnist_ssfl.py \\
      --config.dataset=npz:../shared/data/mnist.npz --config.ssfl.density=0.1 --workdir=/tmp/m

``:smoke`` makes any experiment tiny; ``--config.KEY=VALUE`` overrides a shared key and
``--config.ALGORITHM.KEY=VALUE`` one of the algorithm's own (e.g. ``--config.ssfl.density``).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedsparse import train
from fedsparse.algorithms import registry

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for config.json, metrics.jsonl and '
                               'checkpoints (resumes from the latest checkpoint there).')
flags.mark_flags_as_required(['config', 'workdir'])


def _unknown_override(argv: list[str]) -> str | None:
  """A one-line message for the first ``--config.a.b=v`` whose key the config lacks, if any."""
  config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if config_arg is None:
    return None
  path, _, arg = config_arg.partition(':')
  try:
    module = config_flags.config_flags._LoadConfigModule('config', path)  # pylint: disable=protected-access
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except -- absl reports a broken config file itself
    return None
  for a in argv:
    if not a.startswith('--config.'):
      continue
    keys = a[len('--config.'):].split('=', 1)[0].split('.')
    node, where = config, 'the config'
    for i, key in enumerate(keys):
      if not hasattr(node, 'keys') or key not in node:
        valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else 'none'
        hint = ''
        if i == 0 and key in registry.names():
          hint = (f' The config is for algorithm {config.algorithm!r}, so it has no section '
                  f'{key!r}: use a config file written for {key!r}.')
        return (f'Unknown config key {".".join(keys[:i + 1])!r} in {where}; valid keys there: '
                f'{valid}.{hint}')
      node, where = node[key], f'section {".".join(keys[:i + 1])!r}'
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    message = _unknown_override(argv)
    if message is None:
      raise
    del e
    print(f'FATAL: {message}', file=sys.stderr)
    sys.exit(2)


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
  app.run(main, flags_parser=_parse_flags)
