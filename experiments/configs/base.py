"""Defaults shared by every experiment config (each config file overrides what it needs).

Not an experiment itself: configs call :func:`base_config` and then set their own values.

Shared keys are flat (``--config.learning_rate=0.1``). An algorithm's own hyperparameters live
in a section named after it, built from its registered dataclass with the paper's defaults
(``--config.ssfl.density=0.05``; :func:`set_algorithm`). Only the section of the config's own
algorithm exists, so a key of another algorithm cannot be set and silently ignored.
"""

import dataclasses

import ml_collections

from fedsparse.algorithms import registry


def set_algorithm(c: ml_collections.ConfigDict, name: str, **hparams) -> ml_collections.ConfigDict:
  """Sets ``c.algorithm = name`` and gives ``c`` that algorithm's section (defaults + overrides).

  Sections of other algorithms are removed; an algorithm without own hyperparameters gets none.
  """
  spec = registry.get(name)
  for other in registry.names():
    if other in c:
      del c[other]
  c.algorithm = name
  values = dataclasses.asdict(spec.hparams(**hparams))  # validates the overrides
  if values:
    c[name] = ml_collections.ConfigDict(values)
  return c


def base_config() -> ml_collections.ConfigDict:
  """The flat run description with every key the run loop reads."""
  c = ml_collections.ConfigDict()
  c.algorithm = 'fedavg'           # fedavg | fedavgm | ssfl | feddst | random_mask | flash | fedpm
  c.dataset = 'digits'             # digits | mnist | fashion_mnist | emnist | cifar10 | cifar100 | npz:PATH
  c.data_dir = ''                  # TFDS data_dir ('' = TFDS default)
  c.model = 'mlp'
  c.conv_impl = 'auto'             # auto | xla | fwdconv | matmul (auto: fwdconv on CPU, xla elsewhere)
  c.partition = 'dirichlet_balanced'  # iid | dirichlet_balanced | dirichlet | classes | shards
  c.dirichlet_alpha = 0.3
  c.classes_per_client = 2
  c.shards_per_client = 2
  c.num_clients = 100
  c.clients_per_round = 10
  c.sample_with_replacement = False
  c.weighted_aggregation = True
  c.num_rounds = 100
  c.local_epochs = 1
  c.local_steps = 0                # > 0: fixed local steps instead of epochs
  c.batch_size = 32
  c.learning_rate = 0.05
  c.lr_decay = 1.0                 # client lr at round t: learning_rate * lr_decay**t
  c.momentum = 0.0
  c.weight_decay = 0.0
  c.clip_norm = 0.0                # 0 = no clipping
  c.lr_schedule = 'constant'       # constant | cosine (per local epoch, restarted every round)
  c.cosine_epochs = 0              # cosine period in local epochs (0 = local_epochs)
  c.cosine_min_lr = 1e-5
  c.server_optimizer = 'auto'      # auto (fedavgm: momentum, else sgd) | sgd | momentum
  c.server_learning_rate = 1.0
  c.server_momentum = 0.9          # used with the momentum server optimizer
  c.partial_batches = 'split'      # split (r < B examples computed in power-of-2 pieces) | pad
  c.strategy = 'auto'              # auto | vmap | chunked | sequential | sharded
  c.chunk_size = 8                 # clients per vmap group of `chunked`
  c.size_groups = 1                # `vmap`: size-sorted groups run one after another
  c.eval_every = 5
  c.eval_batch_size = 1000
  c.checkpoint_every = 0           # rounds between checkpoints (0 = none)
  c.tensorboard = True             # TensorBoard event files beside metrics.jsonl
  c.seed = 0
  return c


CONFIG_ARGS = ('smoke',)


def is_smoke(arg: str | None) -> bool:
  """Whether a config file's argument (``--config=FILE:ARG``) asks for the smoke version.

  Raises:
    ValueError: for an argument other than none or ``smoke`` (a misspelt ``:smok`` must not
      silently run the full experiment).
  """
  if arg in (None, ''):
    return False
  if arg not in CONFIG_ARGS:
    raise ValueError(f'Unknown config argument {arg!r} (after the ":" of --config); valid: '
                     f'{", ".join(CONFIG_ARGS)}, or none for the full experiment.')
  return True


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any experiment to seconds: few clients, rounds and steps; same code paths."""
  c.num_clients = min(c.num_clients, 8)
  c.clients_per_round = min(c.clients_per_round, 3)
  c.num_rounds = 2
  c.local_epochs = 1
  c.local_steps = 2
  c.batch_size = min(c.batch_size, 16)
  c.eval_every = 1
  c.eval_batch_size = 256
  return c
