"""Local training data of one client: its minibatch order, step counts and the client optimizer.

A client's round is a number of steps that depends on its own data: ``local_epochs`` passes over
its ``n_k`` examples of ``ceil(n_k / batch_size)`` steps each (the last minibatch of an epoch
partial, like PyTorch's ``DataLoader`` with ``drop_last=False``), or a fixed ``local_steps``
steps, each on a fresh minibatch of ``min(batch_size, n_k)`` distinct examples. The client loop
(`fedsparse.engine.client`) runs exactly these steps and no padding step.

A client's minibatches are rows of an *order*: one uniformly random permutation of its examples
per epoch (per step in fixed-steps mode), as indices into the federated training set. Step ``t``
reads ``count`` consecutive entries of one row from an offset (:func:`step_slice`); images are
gathered and normalised inside the jitted step, so the client's data never leaves the device.
"""

import dataclasses
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsparse.data import FederatedData, normalize

__all__ = [
    'LR_SCHEDULES',
    'PARTIAL_BATCHES',
    'Batch',
    'LocalConfig',
    'StepSlice',
    'client_optimizer',
    'client_steps',
    'example_orders',
    'gather_batch',
    'host_minibatches',
    'step_slice',
    'steps_per_epoch',
]


class Batch(NamedTuple):
  """A minibatch: inputs, integer labels and a validity mask over examples."""
  x: jax.Array  # [B, H, W, C] float32, normalised
  y: jax.Array  # [B] int32
  mask: jax.Array  # [B] bool: False for padding past the end of the client's data


# Client learning-rate schedules within a round (see `LocalConfig`).
LR_SCHEDULES = ('constant', 'cosine')
# How a minibatch smaller than `batch_size` (an epoch's last, or a client smaller than a batch) is
# computed; see `LocalConfig.partial_batches`.
PARTIAL_BATCHES = ('split', 'pad')


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  """Static settings of local training.

  Attributes:
    batch_size: examples per minibatch.
    local_epochs: passes over the client's data (used when ``local_steps == 0``).
    local_steps: if positive, a fixed number of steps per round instead of epochs.
    momentum: client SGD momentum (PyTorch convention: ``buf = m·buf + g``); a float32 array
      when a sweep traces it (`fedsparse.sweep`), which keeps the momentum buffer even at 0.
    weight_decay: L2 weight decay added to the gradient (PyTorch ``SGD(weight_decay=...)``);
      an array when swept, like ``momentum``.
    clip_norm: if positive, clip the gradient to this global norm before weight decay.
    lr_schedule: one of `LR_SCHEDULES`. ``'cosine'`` anneals the round's learning rate per
      local epoch, ``min + (lr - min)(1 + cos(π (e mod P) / P)) / 2`` for epoch e, restarting
      every round (PyTorch's ``CosineAnnealingWarmRestarts(T_0=P)`` stepped per epoch and
      rebuilt each round, as in the SSFL code's CIFAR-100 setting).
    cosine_epochs: the period P in local epochs (0: ``local_epochs``). An epoch is
      ``ceil(n_k / batch_size)`` steps of client k, also in fixed-steps mode.
    cosine_min_lr: the floor of the cosine.
    partial_batches: one of `PARTIAL_BATCHES`: how a minibatch of ``r < batch_size`` examples is
      computed when clients run one after another. ``'split'`` computes its gradient in pieces
      of the powers of two that sum to ``r`` (21 = 16 + 4 + 1), so no padded example is ever
      computed; this is exact for losses that are sums over examples (every model here: no
      batch normalisation). ``'pad'`` computes a full ``batch_size`` minibatch with the surplus
      examples masked out of the loss. Clients mapped under ``vmap`` always pad (a data-
      dependent branch under ``vmap`` would compute every piece).
  """
  batch_size: int = 32
  local_epochs: int = 1
  local_steps: int = 0
  momentum: float = 0.0
  weight_decay: float = 0.0
  clip_norm: float = 0.0
  lr_schedule: str = 'constant'
  cosine_epochs: int = 0
  cosine_min_lr: float = 1e-5
  partial_batches: str = 'split'

  def __post_init__(self):
    for name in ('batch_size', 'local_epochs'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}.')
    if isinstance(self.local_steps, bool) or not isinstance(self.local_steps, numbers.Integral) or (
        self.local_steps < 0):
      raise ValueError(f'local_steps must be an integer >= 0, got {self.local_steps!r}.')
    if self.partial_batches not in PARTIAL_BATCHES:
      raise ValueError(f'Unknown partial_batches {self.partial_batches!r}; valid: '
                       f'{", ".join(PARTIAL_BATCHES)}.')
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f'Unknown lr_schedule {self.lr_schedule!r}; valid: '
                       f'{", ".join(LR_SCHEDULES)}.')
    if self.cosine_epochs < 0:
      raise ValueError(f'cosine_epochs must be >= 0, got {self.cosine_epochs}.')
    if self.cosine_min_lr < 0:
      raise ValueError(f'cosine_min_lr must be >= 0, got {self.cosine_min_lr}.')
    if self.lr_schedule == 'cosine' and self.local_steps > 0 and self.cosine_epochs == 0:
      # The default period, local_epochs, means nothing in fixed-steps mode.
      raise ValueError('lr_schedule=cosine with local_steps > 0 needs cosine_epochs > 0 (the '
                       'period in epochs of ceil(n_k / batch_size) steps).')

  @property
  def num_epochs(self) -> int:
    """Epochs of the client loop: ``local_epochs``, or one epoch of ``local_steps`` steps."""
    return 1 if self.local_steps > 0 else self.local_epochs


def steps_per_epoch(n, batch_size):
  """``ceil(n / batch_size)`` for Python ints or int arrays."""
  return (n + batch_size - 1) // batch_size


def client_optimizer(config: LocalConfig, learning_rate: jax.Array,
                     client_steps_per_epoch: jax.Array | int = 1
                     ) -> optax.GradientTransformation:
  """Client SGD: clip → weight decay → momentum SGD, in PyTorch's order.

  The learning rate is injected as a hyperparameter so that a per-round decayed value (a traced
  scalar) needs no re-compilation; with ``lr_schedule='cosine'`` it is a schedule of the
  optimizer's step count (frozen padding steps do not advance it).

  Args:
    config: local training settings.
    learning_rate: the round's (peak) client learning rate.
    client_steps_per_epoch: ``ceil(n_k / batch_size)`` of this client, for the cosine schedule.
  """
  lr = learning_rate
  if config.lr_schedule == 'cosine':
    period = config.cosine_epochs or config.local_epochs
    floor = jnp.float32(config.cosine_min_lr)
    spe = jnp.maximum(jnp.asarray(client_steps_per_epoch, jnp.int32), 1)

    def lr(count):
      epoch = (count.astype(jnp.int32) // spe) % period
      phase = jnp.pi * epoch.astype(jnp.float32) / period
      return floor + (learning_rate - floor) * 0.5 * (1.0 + jnp.cos(phase))

  # A swept momentum or weight decay is an array (traced per sweep member): its transform is
  # always built, since at 0 it is exact (g + 0·buf = g, g + 0·w = g) and every member of a
  # compiled sweep needs the same optimizer state.
  swept_wd = isinstance(config.weight_decay, jax.Array)
  swept_momentum = isinstance(config.momentum, jax.Array)
  parts = []
  if config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  if swept_wd or config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(optax.inject_hyperparams(optax.sgd)(
      learning_rate=lr, momentum=config.momentum if swept_momentum else config.momentum or None))
  return optax.chain(*parts)


def _masked_permutation(key: jax.Array, size: jax.Array, length: int) -> jax.Array:
  """A uniform permutation of ``[0, size)`` in the first ``size`` slots of a length-``length`` row."""
  u = jax.random.uniform(key, (length,))
  u = jnp.where(jnp.arange(length) < size, u, 2.0)  # padding sorts last
  return jnp.argsort(u).astype(jnp.int32)


def order_width(max_client_size: int, config: LocalConfig) -> int:
  """Static width of an order row: every step's slice ``[offset, offset + batch_size)`` fits."""
  if config.local_steps > 0:
    return max(max_client_size, config.batch_size)
  return steps_per_epoch(max_client_size, config.batch_size) * config.batch_size


def example_orders(key: jax.Array, client_index: jax.Array, client_size: jax.Array,
                   config: LocalConfig) -> jax.Array:
  """Draws one client's example orders for a round.

  Args:
    key: the client's PRNG key for its data order this round.
    client_index: ``[Nmax]`` int32 training-set indices of the client (padded).
    client_size: int32 scalar, the client's number of examples ``n_k``.
    config: local training settings.

  Returns:
    ``[R, W]`` int32 training-set indices: row ``e`` is a uniform permutation of the client's
    examples in its first ``n_k`` entries (``R = local_epochs`` rows, one per epoch, or
    ``local_steps`` rows, one per step), padded up to the static width `order_width`.
  """
  nmax = client_index.shape[0]
  rows = config.local_steps if config.local_steps > 0 else config.local_epochs
  keys = jax.random.split(key, rows)
  perms = jax.vmap(lambda k: _masked_permutation(k, client_size, nmax))(keys)
  perms = jnp.pad(perms, ((0, 0), (0, order_width(nmax, config) - nmax)))
  return jnp.take(client_index, perms, axis=0)


def client_steps(client_size, config: LocalConfig):
  """``(steps per epoch, steps in the round)`` of a client of ``client_size`` examples.

  Works on Python ints, NumPy and JAX int arrays alike. An empty client runs no step.
  """
  if config.local_steps > 0:
    if isinstance(client_size, jax.Array):
      steps = jnp.where(client_size > 0, config.local_steps, 0).astype(jnp.int32)
    else:
      steps = np.where(np.asarray(client_size) > 0, config.local_steps, 0)
      steps = int(steps) if np.ndim(steps) == 0 else steps
    return steps, steps
  spe = steps_per_epoch(client_size, config.batch_size)
  return spe, config.local_epochs * spe


class StepSlice(NamedTuple):
  """Where step ``t`` of a client reads its minibatch in the client's orders."""
  epoch: jax.Array  # int32: the local epoch (0 in fixed-steps mode)
  step_in_epoch: jax.Array  # int32
  row: jax.Array  # int32 row of the orders
  offset: jax.Array  # int32 first entry of the row
  count: jax.Array  # int32 examples in the minibatch, 1..batch_size


def step_slice(t, client_size, config: LocalConfig) -> StepSlice:
  """The minibatch of step ``t`` (``0 <= t < client_steps(...)[1]``) of a client.

  Works on Python ints and (traced) int32 arrays alike.
  """
  b = config.batch_size
  if config.local_steps > 0:
    zero = t * 0
    count = jnp.minimum(client_size, b) if isinstance(t, jax.Array) else min(client_size, b)
    return StepSlice(epoch=zero, step_in_epoch=t, row=t, offset=zero, count=count)
  spe = steps_per_epoch(client_size, b)
  epoch, step_in_epoch = t // spe, t % spe
  offset = step_in_epoch * b
  rest = client_size - offset
  count = jnp.minimum(rest, b) if isinstance(rest, jax.Array) else min(rest, b)
  return StepSlice(epoch=epoch, step_in_epoch=step_in_epoch, row=epoch, offset=offset,
                   count=count)


def gather_batch(data: FederatedData, index: jax.Array, mask: jax.Array) -> Batch:
  """Gathers and normalises a minibatch of the training set on device."""
  x = normalize(jnp.take(data.x_train, index, axis=0), data.scale, data.mean, data.std)
  return Batch(x=x, y=jnp.take(data.y_train, index, axis=0), mask=mask)


def host_minibatches(orders: np.ndarray, client_size: int, config: LocalConfig
                     ) -> list[np.ndarray]:
  """The training-set indices of every step of one client, as NumPy arrays (for references).

  ``orders`` is the client's `example_orders`; step ``t`` uses ``result[t]``. This is what the
  jitted client loop trains on, for Python-loop baselines and hand-computed tests.
  """
  orders = np.asarray(orders)
  _, steps = client_steps(int(client_size), config)
  out = []
  for t in range(steps):
    s = step_slice(t, int(client_size), config)
    out.append(orders[s.row, s.offset:s.offset + s.count])
  return out
