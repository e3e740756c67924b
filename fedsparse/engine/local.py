"""Local training of one client: its minibatch schedule and a ``lax.scan`` over SGD steps.

Every client runs the same, static number of steps so that clients can be mapped over a batch
axis. A client with fewer examples than the largest has its surplus steps *frozen*: the step is
computed and discarded with ``jnp.where(active, new, old)``. Examples past the end of a client's
data inside its last minibatch are masked out of the loss.

Two schedules:

* epochs (``local_steps=0``): ``local_epochs`` passes over the client's data, reshuffled each
  epoch, ``ceil(n_k / batch_size)`` steps per epoch, the last minibatch partial (like PyTorch's
  ``DataLoader`` with ``drop_last=False``).
* fixed steps (``local_steps=S > 0``): S steps, each on a fresh minibatch of
  ``min(batch_size, n_k)`` distinct examples of the client.

The client's data never leaves device memory: a schedule is an array of indices into the
federated training set, and images are gathered and normalised inside the jitted step.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsparse import masks as masks_lib
from fedsparse.data import FederatedData, normalize

__all__ = [
    'ENFORCEMENTS',
    'LR_SCHEDULES',
    'Batch',
    'LocalConfig',
    'Schedule',
    'client_optimizer',
    'cross_entropy',
    'make_schedule',
    'gather_batch',
    'run_local',
    'sgd_step',
    'steps_per_epoch',
]


class Batch(NamedTuple):
  """A minibatch: inputs, integer labels and a validity mask over examples."""
  x: jax.Array  # [B, H, W, C] float32, normalised
  y: jax.Array  # [B] int32
  mask: jax.Array  # [B] bool: False for padding past the end of the client's data


class Schedule(NamedTuple):
  """The minibatches of one client for one round (indices only)."""
  index: jax.Array  # [S, B] int32 indices into the federated training set
  example_mask: jax.Array  # [S, B] bool
  active: jax.Array  # [S] bool: False for frozen (padding) steps
  epoch: jax.Array  # [S] int32 local epoch of each step (0 in fixed-steps mode)


# Client learning-rate schedules within a round (see `LocalConfig`).
LR_SCHEDULES = ('constant', 'cosine')


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  """Static settings of local training.

  Attributes:
    batch_size: examples per minibatch.
    local_epochs: passes over the client's data (used when ``local_steps == 0``).
    local_steps: if positive, a fixed number of steps per round instead of epochs.
    momentum: client SGD momentum (PyTorch convention: ``buf = m·buf + g``).
    weight_decay: L2 weight decay added to the gradient (PyTorch ``SGD(weight_decay=...)``).
    clip_norm: if positive, clip the gradient to this global norm before weight decay.
    lr_schedule: one of `LR_SCHEDULES`. ``'cosine'`` anneals the round's learning rate per
      local epoch, ``min + (lr - min)(1 + cos(π (e mod P) / P)) / 2`` for epoch e, restarting
      every round (PyTorch's ``CosineAnnealingWarmRestarts(T_0=P)`` stepped per epoch and
      rebuilt each round, as in the SSFL code's CIFAR-100 setting).
    cosine_epochs: the period P in local epochs (0: ``local_epochs``). An epoch is
      ``ceil(n_k / batch_size)`` steps of client k, also in fixed-steps mode.
    cosine_min_lr: the floor of the cosine.
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

  def __post_init__(self):
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

  def num_steps(self, max_client_size: int) -> int:
    """The static number of scan steps every client runs."""
    if self.local_steps > 0:
      return self.local_steps
    return self.local_epochs * steps_per_epoch(max_client_size, self.batch_size)


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

  parts = []
  if config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  if config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(optax.inject_hyperparams(optax.sgd)(
      learning_rate=lr, momentum=config.momentum or None))
  return optax.chain(*parts)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the valid examples (0 when there are none)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  maskf = mask.astype(losses.dtype)
  return jnp.sum(losses * maskf) / jnp.maximum(jnp.sum(maskf), 1.0)


def _masked_permutation(key: jax.Array, size: jax.Array, length: int) -> jax.Array:
  """A uniform permutation of ``[0, size)`` in the first ``size`` slots of a length-``length`` row."""
  u = jax.random.uniform(key, (length,))
  u = jnp.where(jnp.arange(length) < size, u, 2.0)  # padding sorts last
  return jnp.argsort(u).astype(jnp.int32)


def make_schedule(key: jax.Array, client_index: jax.Array, client_size: jax.Array,
                  config: LocalConfig) -> Schedule:
  """Draws one client's minibatch schedule for a round.

  Args:
    key: the client's PRNG key for this round.
    client_index: [Nmax] int32 training-set indices of the client (padded).
    client_size: int32 scalar, the client's number of examples n_k.
    config: local training settings.

  Returns:
    A :class:`Schedule` with ``config.num_steps(Nmax)`` steps.
  """
  nmax = client_index.shape[0]
  b = config.batch_size
  if config.local_steps > 0:
    keys = jax.random.split(key, config.local_steps)
    perms = jax.vmap(lambda k: _masked_permutation(k, client_size, nmax))(keys)
    if nmax < b:  # every minibatch is the whole client, padded
      perms = jnp.pad(perms, ((0, 0), (0, b - nmax)))
    pos = perms[:, :b]
    example_mask = jnp.broadcast_to(jnp.arange(b) < client_size, pos.shape)
    active = jnp.full((config.local_steps,), client_size > 0)
    epoch = jnp.zeros((config.local_steps,), jnp.int32)
  else:
    spe = steps_per_epoch(nmax, b)
    keys = jax.random.split(key, config.local_epochs)
    perms = jax.vmap(lambda k: _masked_permutation(k, client_size, nmax))(keys)
    perms = jnp.pad(perms, ((0, 0), (0, spe * b - nmax)))  # [E, spe*B]
    slot = jnp.arange(spe * b)
    example_mask = jnp.broadcast_to(slot < client_size, perms.shape)
    pos = perms.reshape(-1, b)
    example_mask = example_mask.reshape(-1, b)
    step_in_epoch = jnp.tile(jnp.arange(spe), config.local_epochs)
    active = step_in_epoch < steps_per_epoch(client_size, b)
    epoch = jnp.repeat(jnp.arange(config.local_epochs, dtype=jnp.int32), spe)
  index = jnp.take(client_index, pos, axis=0)
  return Schedule(index=index, example_mask=example_mask & active[:, None],
                  active=active, epoch=epoch)


def gather_batch(data: FederatedData, index: jax.Array, mask: jax.Array) -> Batch:
  """Gathers and normalises a minibatch of the training set on device."""
  x = normalize(jnp.take(data.x_train, index, axis=0), data.scale, data.mean, data.std)
  return Batch(x=x, y=jnp.take(data.y_train, index, axis=0), mask=mask)


StepFn = Callable[[Any, Any, Batch, jax.Array], tuple[Any, Any, jax.Array]]


def run_local(step_fn: StepFn, params: Any, opt_state: Any, schedule: Schedule,
              data: FederatedData, key: jax.Array) -> tuple[Any, Any, jax.Array]:
  """Runs a client's schedule with ``lax.scan``, freezing inactive steps.

  Args:
    step_fn: ``(params, opt_state, batch, key) -> (params, opt_state, loss)``, one SGD step.
    params: the client's starting parameters.
    opt_state: the client optimizer's starting state.
    schedule: the client's :class:`Schedule`.
    data: the federated data (for gathering minibatches).
    key: PRNG key for stochastic steps (one key per step is split from it).

  Returns:
    ``(params, opt_state, mean_loss)`` -- the loss averaged over the active steps.
  """
  num_steps = schedule.active.shape[0]
  keys = jax.random.split(key, num_steps)

  def body(carry, xs):
    params, opt_state, loss_sum = carry
    index, example_mask, active, step_key = xs
    batch = gather_batch(data, index, example_mask)
    new_params, new_opt_state, loss = step_fn(params, opt_state, batch, step_key)
    # Padding steps are computed (shapes are static) but leave no trace.
    params, opt_state = jax.tree.map(lambda n, o: jnp.where(active, n, o),
                                     (new_params, new_opt_state), (params, opt_state))
    loss_sum = loss_sum + jnp.where(active, loss, 0.0)
    return (params, opt_state, loss_sum), None

  init = (params, opt_state, jnp.zeros((), jnp.float32))
  xs = (schedule.index, schedule.example_mask, schedule.active, keys)
  (params, opt_state, loss_sum), _ = jax.lax.scan(body, init, xs)
  num_active = jnp.maximum(jnp.sum(schedule.active, dtype=jnp.int32), 1)
  return params, opt_state, loss_sum / num_active.astype(jnp.float32)


# How a weight mask is enforced during local training (see `sgd_step`).
ENFORCEMENTS = ('forward', 'step')


def sgd_step(apply_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation, *,
             mask: Any = None, enforce: str = 'forward') -> StepFn:
  """A supervised SGD step on the masked cross-entropy, optionally under a weight mask.

  Args:
    apply_fn: the flax ``Module.apply``.
    optimizer: the client optimizer.
    mask: optional boolean pytree like the params (True = kept).
    enforce: one of `ENFORCEMENTS`. ``'forward'``: the model runs on ``w ⊙ m``, so pruned
      weights get a zero gradient and -- starting at zero -- stay zero under weight decay and
      momentum too. ``'step'``: the model runs on ``w`` and every update is re-masked after the
      step (the dense gradient, e.g. for clipping, includes pruned positions).

  Returns:
    ``step(params, opt_state, batch, key) -> (params, opt_state, loss)``.
  """
  if enforce not in ENFORCEMENTS:
    raise ValueError(f'Unknown mask enforcement {enforce!r}; valid: {", ".join(ENFORCEMENTS)}.')
  forward_mask = mask if enforce == 'forward' else None
  step_mask = mask if enforce == 'step' else None

  def loss_fn(params, batch):
    if forward_mask is not None:
      params = masks_lib.apply(params, forward_mask)
    logits = apply_fn({'params': params}, batch.x, train=True)
    return cross_entropy(logits, batch.y, batch.mask)

  def step(params, opt_state, batch, key):
    del key  # deterministic model
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if step_mask is not None:
      params = masks_lib.apply(params, step_mask)
    return params, opt_state, loss

  return step
