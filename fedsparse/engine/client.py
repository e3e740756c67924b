"""Client programs: the one local-training loop every algorithm shares.

Every algorithm's client is the same loop with different pieces, in the manner of fedjax's
client init / step / final and jaxpruner's updater hooks. An algorithm writes a
:class:`ClientProgram`; the engine owns the loop, the minibatches, the step counts and the mapping
over clients (:func:`run_clients`), so no algorithm calls ``vmap``, ``lax.map`` or sharding.

The loop of one client::

  carry = init(ctx, key)
  for epoch in range(num_epochs):            # local_epochs, or 1 epoch of local_steps steps
    for step in this client's steps of the epoch:  # ceil(n_k / B): its own count, no padding
      effective = transform(trainable(carry), carry, ctx, key)     # w, w ⊙ m, W ⊙ Bernoulli(θ)
      loss, g_eff = value_and_grad(mean of loss(effective, batch, key))(effective)
      g = the vjp of transform applied to g_eff                    # ∂L/∂trainable
      carry = update(carry, Gradients(g, g_eff, loss), ctx, step_info, key)
    carry = epoch_end(carry, ctx, epoch_info, key)                 # optional
  output = final(carry, ctx, key)                                    # e.g. sample what to send

* The carry is any pytree: params, optimizer state, a mask, running statistics, the gradient
  of the last minibatch (what a step wants to keep for later, it stores in the carry: the loop
  has a data-dependent trip count, so per-step outputs are not stacked).
* ``g_eff`` is the gradient with respect to the *effective*, dense weights: under ``w ⊙ m`` it is
  non-zero at pruned positions too, which is what FedDST regrows by.
* Steps run in a ``lax.while_loop`` whose trip count is the client's own: run one after another,
  a client of 1 example costs one step per epoch, not the largest client's. A minibatch of
  ``r < B`` examples (an epoch's last) is computed in power-of-two pieces when clients run one
  after another (``LocalConfig.partial_batches='split'``), so no padded example is computed
  either; under ``vmap`` it is padded and masked.
* Each client's epochs end at its own steps, so ``epoch_end`` hooks (FLASH's prune and regrow,
  FedDST's readjustment) see each client's own epochs.
* Randomness: a client gets one key per round (one per cohort slot, never shared), split into
  five streams -- data order, ``init``, steps, epoch ends, ``final``; step ``t`` and epoch ``e``
  fold their index into their stream, and a step splits its key once more for the transform,
  the loss and the update. Within a partial minibatch computed in pieces, each piece folds its
  size into the loss key, so no two examples share random bits.

Example: plain local SGD on a linear model, two clients of digits::

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from fedsparse import data as data_lib, engine
  >>> ds = data_lib.load_dataset('digits')
  >>> fd, _ = data_lib.make_federated_data(ds, 4, 'iid', seed=0)
  >>> apply = lambda v, x, train=False: x.reshape(x.shape[0], -1) @ v['params']['w']
  >>> local = engine.LocalConfig(batch_size=32, local_epochs=2)
  >>> program = engine.sgd_client(apply, local)
  >>> shared = engine.Broadcast(params={'w': jnp.zeros((64, 10))},
  ...                           learning_rate=jnp.float32(0.1))
  >>> result = engine.run_clients(program, shared, jnp.array([0, 3]),
  ...                             jax.random.split(jax.random.key(0), 2), fd, local)
  >>> fd.client_size.tolist()
  [360, 359, 359, 359]
  >>> result.outputs['w'].shape, result.num_steps.tolist()  # 2 epochs of ceil(n_k / 32) steps
  ((2, 64, 10), [24, 24])
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsparse import masks as masks_lib
from fedsparse.data import FederatedData
from fedsparse.engine.local import (Batch, LocalConfig, client_optimizer, client_steps,
                                    example_orders, gather_batch, host_minibatches, step_slice,
                                    steps_per_epoch)
from fedsparse.engine.mapping import ClientMapping, computed_iterations, map_clients

__all__ = [
    'ENFORCEMENTS',
    'Broadcast',
    'ClientInfo',
    'ClientProgram',
    'CohortResult',
    'Context',
    'EpochInfo',
    'Gradients',
    'MaskedState',
    'SGDState',
    'StepInfo',
    'bernoulli_mask',
    'client_minibatches',
    'client_streams',
    'cohort_metrics',
    'enforcement_transform',
    'identity_transform',
    'local_sgd',
    'masked_client',
    'masked_transform',
    'run_clients',
    'sgd_client',
    'supervised_loss',
]

# How a weight mask is enforced during local training (see `sgd_client`).
ENFORCEMENTS = ('forward', 'step')


class ClientInfo(NamedTuple):
  """Who the client is this round (loop-invariant, traced)."""
  id: jax.Array  # int32 id in the population
  slot: jax.Array  # int32 position in the cohort
  size: jax.Array  # int32 n_k
  steps_per_epoch: jax.Array  # int32 ceil(n_k / B) (local_steps in fixed-steps mode)
  num_steps: jax.Array  # int32 steps this round


class Context(NamedTuple):
  """What every hook of a client program sees besides its carry."""
  shared: Any  # what the server broadcast, the same for every client
  client: ClientInfo


class StepInfo(NamedTuple):
  """Where a step stands in the client's round."""
  step: jax.Array  # int32, 0-based within the round
  epoch: jax.Array  # int32 local epoch (0 in fixed-steps mode)
  step_in_epoch: jax.Array  # int32
  last_of_epoch: jax.Array  # bool
  num_examples: jax.Array  # int32 examples in this minibatch


class EpochInfo(NamedTuple):
  """Which epoch just ended."""
  epoch: jax.Array  # int32
  last: jax.Array  # bool: the client's last local epoch of the round
  num_epochs: int  # static


class Gradients(NamedTuple):
  """What a step's ``update`` receives."""
  params: Any  # ∂L/∂trainable (through the transform)
  effective: Any  # ∂L/∂(transformed weights): dense, also at masked-out positions
  loss: jax.Array  # float32 mean loss over the minibatch's examples


class ClientProgram(NamedTuple):
  """The pieces of one client's round (see the module docstring for the loop).

  Attributes:
    init: ``init(ctx, key) -> carry``.
    trainable: ``trainable(carry) -> pytree`` the loss is differentiated with respect to.
    transform: ``transform(trainable, carry, ctx, key) -> effective weights`` the loss is
      computed on: `identity_transform`, `masked_transform`, or a stochastic one.
    loss: ``loss(effective, batch, key) -> [B]`` per-example losses (the engine masks padding
      and takes the mean over the minibatch's real examples). ``batch`` is a
      `fedsparse.engine.Batch`: ``x`` (normalised inputs), ``y`` (int32 labels), ``mask``
      (bool, False for padding examples).
    update: ``update(carry, grads, ctx, step_info, key) -> carry``, e.g. an optax step.
    final: ``final(carry, ctx, key) -> output``, what the client uploads (before encoding);
      the key serves e.g. FedPM's sampled mask.
    epoch_end: optional ``epoch_end(carry, ctx, epoch_info, key) -> carry``.
  """
  init: Callable[[Context, jax.Array], Any]
  trainable: Callable[[Any], Any]
  transform: Callable[[Any, Any, Context, jax.Array], Any]
  loss: Callable[[Any, Batch, jax.Array], jax.Array]
  update: Callable[[Any, Gradients, Context, StepInfo, jax.Array], Any]
  final: Callable[[Any, Context, jax.Array], Any]
  epoch_end: Callable[[Any, Context, EpochInfo, jax.Array], Any] | None = None


class CohortResult(NamedTuple):
  """What :func:`run_clients` returns, every per-client array in cohort order."""
  outputs: Any  # ``final``'s outputs with a leading [K] axis
  loss: jax.Array  # [K] float32 mean over the client's steps of the minibatch loss
  num_steps: jax.Array  # [K] int32 steps each client ran
  real_sample_steps: jax.Array  # int32: Σ_k examples processed (E·n_k, or S·min(B, n_k))
  computed_sample_steps: jax.Array  # int32: example slots computed, padding included

  @property
  def padding_ratio(self) -> jax.Array:
    """Computed / real sample-steps of the round (1.0: no padding computed)."""
    return (self.computed_sample_steps.astype(jnp.float32)
            / jnp.maximum(self.real_sample_steps, 1).astype(jnp.float32))


def cohort_metrics(result: CohortResult, clients: jax.Array, weights: jax.Array | None, *,
                   bits_up: Any = None, bits_down: Any = None) -> dict[str, jax.Array]:
  """The metrics every round reports about its cohort (`fedsparse.engine.Algorithm.round`).

  Args:
    result: the cohort's `run_clients` result.
    clients: ``[K]`` int32 client ids.
    weights: ``[K]`` aggregation weights summing to 1 (``train_loss`` is their mean of the
      client losses), or None for the plain mean.
    bits_up: the per-client upload in bits: ``[K]`` or one count for every client (int32);
      None leaves it to the caller.
    bits_down: the download, likewise.

  Returns:
    ``train_loss``, ``client_loss``, ``clients``, ``padding_ratio`` and the bits given, as
    ``[K]`` int32 vectors.
  """
  k = clients.shape[0]
  loss = jnp.mean(result.loss) if weights is None else jnp.sum(weights * result.loss)
  metrics = {'train_loss': loss, 'client_loss': result.loss, 'clients': clients,
             'padding_ratio': result.padding_ratio}
  for name, bits in (('bits_up', bits_up), ('bits_down', bits_down)):
    if bits is not None:
      metrics[name] = jnp.broadcast_to(jnp.asarray(bits, jnp.int32), (k,))
  return metrics


# --------------------------------------------------------------------------------------------------
# Transforms: what the loss sees of the trainable state.


def identity_transform(trainable: Any, carry: Any, ctx: Context, key: jax.Array) -> Any:
  """Dense training: the loss sees the trainable weights as they are."""
  del carry, ctx, key
  return trainable


def masked_transform(mask_of: Callable[[Any, Context], Any]
                     ) -> Callable[[Any, Any, Context, jax.Array], Any]:
  """Static-mask training: the loss sees ``w ⊙ m`` with ``m = mask_of(carry, ctx)``.

  The gradient reaching ``w`` is ``m ⊙ ∂L/∂(w ⊙ m)``: pruned weights get none.
  """
  def transform(trainable, carry, ctx, key):
    del key
    return masks_lib.apply(trainable, mask_of(carry, ctx))
  return transform


def enforcement_transform(enforce: str | None, mask_of: Callable[[Any, Context], Any]
                          ) -> Callable[[Any, Any, Context, jax.Array], Any]:
  """The transform of a mask enforcement (`ENFORCEMENTS`): ``w ⊙ m`` for ``'forward'``.

  ``'step'`` (re-mask after every update, which the program's ``update`` does) and ``None``
  (dense) compute the loss on the weights as they are.
  """
  return masked_transform(mask_of) if enforce == 'forward' else identity_transform


@jax.custom_vjp
def _bernoulli_sample(theta: jax.Array, u: jax.Array) -> jax.Array:
  return (u < theta).astype(theta.dtype)


def _bernoulli_fwd(theta, u):
  return _bernoulli_sample(theta, u), theta


def _bernoulli_bwd(theta, g):
  # The θ-scaled straight-through estimator: ∂L/∂θ = θ · ∂L/∂m. No gradient to the noise.
  return theta * g, None


_bernoulli_sample.defvjp(_bernoulli_fwd, _bernoulli_bwd)


def bernoulli_mask(scores: jax.Array, key: jax.Array) -> jax.Array:
  """A mask ``m ~ Bernoulli(sigmoid(s))`` (float 0/1) that gradients flow through.

  The backward pass is the θ-scaled straight-through estimator of FedPM (Isik et al., ICLR 2023):
  ``∂L/∂θ = θ · ∂L/∂m`` with ``θ = sigmoid(s)``, then through the sigmoid, so
  ``∂L/∂s = θ² (1 − θ) ∂L/∂m``.

  Args:
    scores: real scores ``s``.
    key: PRNG key of this draw (a fresh mask at every forward pass needs a fresh key).

  Returns:
    A float array of 0s and 1s shaped like ``scores``.
  """
  theta = jax.nn.sigmoid(scores)
  return _bernoulli_sample(theta, jax.random.uniform(key, scores.shape, theta.dtype))


# --------------------------------------------------------------------------------------------------
# The loop.


def _minibatch_grad(loss_fn: Callable[..., jax.Array], params: Any, data: FederatedData,
                    row: jax.Array, offset: jax.Array, count: jax.Array, key: jax.Array,
                    batch_size: int, split: bool) -> tuple[jax.Array, Any]:
  """Mean loss and its gradient over the ``count`` examples ``row[offset:offset + count]``."""
  def summed(p, index, valid, loss_key=key):
    losses = loss_fn(p, gather_batch(data, index, valid), loss_key)
    return jnp.sum(jnp.where(valid, losses, 0.0))

  value_and_grad = jax.value_and_grad(summed)

  def slice_of(start, size):
    return jax.lax.dynamic_slice(row, (start,), (size,))

  def full():
    return value_and_grad(params, slice_of(offset, batch_size), jnp.ones((batch_size,), bool))

  if not split:
    # Padded: one batch_size minibatch, the surplus slots masked out of the loss.
    total, grads = value_and_grad(params, slice_of(offset, batch_size),
                                  jnp.arange(batch_size) < count)
  else:
    def partial():
      # count = Σ 2^bit over its set bits; the piece of 2^bit starts after the larger pieces.
      acc = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      for bit in reversed(range((batch_size - 1).bit_length())):
        size = 1 << bit
        start = offset + ((count >> (bit + 1)) << (bit + 1))

        def piece(acc, size=size, start=start):
          # Its own loss key: draws of different shapes from one key share their leading rows.
          value, grads = value_and_grad(params, slice_of(start, size), jnp.ones((size,), bool),
                                        jax.random.fold_in(key, size))
          return acc[0] + value, jax.tree.map(jnp.add, acc[1], grads)

        acc = jax.lax.cond((count >> bit) & 1 == 1, piece, lambda acc: acc, acc)
      return acc

    total, grads = jax.lax.cond(count == batch_size, full, partial)
  scale = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
  return total * scale, jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)


def client_streams(key: jax.Array) -> jax.Array:
  """A client's round key split into its data-order, init, step, epoch-end and final streams.

  For hand-written references of the loop: step ``t``'s transform, loss and update keys are
  ``jax.random.split(jax.random.fold_in(streams[2], t), 3)``, epoch ``e``'s end key is
  ``jax.random.fold_in(streams[3], e)``.
  """
  return jax.random.split(key, 5)


def client_minibatches(key: jax.Array, data: FederatedData, client_id: int,
                       local: LocalConfig) -> list[np.ndarray]:
  """The training-set indices of every step the client loop runs, on the host.

  For Python-loop baselines and hand-computed references: with the key `run_clients` gives the
  client (its cohort slot's key, e.g. ``draw_cohort(...).keys[slot]``), this lists exactly the
  minibatches the jitted loop trains on, step by step.
  """
  order_key = client_streams(key)[0]
  size = int(data.client_size[client_id])
  orders = example_orders(order_key, data.client_index[client_id], jnp.int32(size), local)
  return host_minibatches(np.asarray(orders), size, local)


def _run_one_client(program: ClientProgram, local: LocalConfig, data: FederatedData,
                    split: bool, shared: Any, size: jax.Array, client_id: jax.Array,
                    slot: jax.Array, key: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
  """One client's round: ``(output, mean loss, steps run)``."""
  spe, num_steps = client_steps(size, local)
  client = ClientInfo(id=client_id, slot=slot, size=size, steps_per_epoch=spe,
                      num_steps=num_steps)
  ctx = Context(shared=shared, client=client)
  order_key, init_key, step_keys, epoch_keys, final_key = client_streams(key)
  orders = example_orders(order_key, data.client_index[client_id], size, local)
  carry = program.init(ctx, init_key)
  num_epochs = local.num_epochs

  def step_body(state):
    t_in_epoch, epoch, carry, loss_sum = state
    t = epoch * spe + t_in_epoch
    where = step_slice(t, size, local)
    transform_key, loss_key, update_key = jax.random.split(jax.random.fold_in(step_keys, t), 3)
    effective, vjp = jax.vjp(
        lambda p: program.transform(p, carry, ctx, transform_key), program.trainable(carry))
    loss, g_eff = _minibatch_grad(program.loss, effective, data, orders[where.row],
                                  where.offset, where.count, loss_key, local.batch_size, split)
    (g,) = vjp(g_eff)
    info = StepInfo(step=t, epoch=epoch, step_in_epoch=t_in_epoch,
                    last_of_epoch=t_in_epoch == spe - 1, num_examples=where.count)
    carry = program.update(carry, Gradients(g, g_eff, loss), ctx, info, update_key)
    return t_in_epoch + 1, epoch, carry, loss_sum + loss

  def epoch_body(epoch, state):
    carry, loss_sum = state
    zero = jnp.zeros((), jnp.int32)
    _, _, carry, loss_sum = jax.lax.while_loop(
        lambda s: s[0] < spe, step_body, (zero, epoch, carry, loss_sum))
    if program.epoch_end is not None:
      info = EpochInfo(epoch=epoch, last=epoch == num_epochs - 1, num_epochs=num_epochs)
      carry = program.epoch_end(carry, ctx, info, jax.random.fold_in(epoch_keys, epoch))
    return carry, loss_sum

  carry, loss_sum = jax.lax.fori_loop(0, num_epochs, epoch_body,
                                      (carry, jnp.zeros((), jnp.float32)))
  mean_loss = loss_sum / jnp.maximum(num_steps, 1).astype(jnp.float32)
  return program.final(carry, ctx, final_key), mean_loss, num_steps


def run_clients(program: ClientProgram, shared: Any, clients: jax.Array, keys: jax.Array,
                data: FederatedData, local: LocalConfig,
                mapping: ClientMapping = ClientMapping()) -> CohortResult:
  """Runs ``program`` for every client of a cohort.

  Args:
    program: the client program.
    shared: what the server broadcasts (a pytree, the same for every client).
    clients: ``[K]`` int32 client ids (repeats allowed: sampling with replacement).
    keys: ``[K]`` PRNG keys, one per cohort slot (never shared between slots).
    data: the federated data.
    local: local training settings.
    mapping: how clients are mapped; the cohort is laid out by size (`map_clients`).

  Returns:
    A :class:`CohortResult` in cohort order.
  """
  sizes = data.client_size[clients]
  slots = jnp.arange(clients.shape[0], dtype=jnp.int32)
  split = local.partial_batches == 'split' and not mapping.batches_clients

  def one(shared_, size, client_id, slot, key):
    return _run_one_client(program, local, data, split, shared_, size, client_id, slot, key)

  outputs, loss, num_steps = map_clients(one, shared, clients, slots, keys, mapping=mapping,
                                         sizes=sizes)
  b = local.batch_size
  if local.local_steps > 0:
    real = jnp.sum(local.local_steps * jnp.minimum(sizes, b))
  else:
    real = jnp.sum(local.local_epochs * sizes)
  if split:
    computed = real  # every piece holds real examples only
  else:
    computed = b * computed_iterations(client_steps(sizes, local)[1], sizes, mapping)
  return CohortResult(outputs=outputs, loss=loss, num_steps=num_steps,
                      real_sample_steps=real.astype(jnp.int32),
                      computed_sample_steps=computed.astype(jnp.int32))


# --------------------------------------------------------------------------------------------------
# The standard supervised SGD client (FedAvg, SSFL) and its building blocks.


def supervised_loss(apply_fn: Callable[..., jax.Array]
                    ) -> Callable[[Any, Batch, jax.Array], jax.Array]:
  """Per-example softmax cross-entropy of a flax model (``apply_fn({'params': p}, x)``)."""
  def loss(params, batch, key):
    del key  # deterministic models
    logits = apply_fn({'params': params}, batch.x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
  return loss


class Broadcast(NamedTuple):
  """What the server sends the clients of FedAvg-style rounds."""
  params: Any  # the global params
  learning_rate: jax.Array  # float32: this round's client learning rate
  mask: Any = None  # optional boolean pytree like params (True = kept)


class SGDState(NamedTuple):
  """The carry of `sgd_client`."""
  params: Any
  opt_state: optax.OptState


def sgd_client(apply_fn: Callable[..., jax.Array], local: LocalConfig, *,
               enforce: str | None = None,
               optimizer: Callable[[Context], optax.GradientTransformation] | None = None,
               loss: Callable[[Any, Batch, jax.Array], jax.Array] | None = None
               ) -> ClientProgram:
  """Local training from the broadcast params, optionally under the broadcast mask.

  The client starts from ``Broadcast.params``, runs its steps and uploads its delta
  ``w_k − w``.

  Args:
    apply_fn: the flax ``Module.apply``.
    local: local training settings (the default optimizer is `client_optimizer` of it).
    enforce: ``None`` for dense training, or one of `ENFORCEMENTS` to train under
      ``Broadcast.mask``: ``'forward'`` computes the loss on ``w ⊙ m`` (pruned weights get no
      gradient and, starting at 0, stay 0 under weight decay and momentum too); ``'step'``
      computes it on ``w`` and re-masks after every step (clipping sees the dense gradient).
    optimizer: ``optimizer(ctx) -> optax.GradientTransformation``; defaults to the client SGD
      of ``local`` at the broadcast learning rate. Any optax optimizer works.
    loss: per-example loss; defaults to `supervised_loss` of ``apply_fn``.

  Returns:
    A :class:`ClientProgram` whose output is the delta pytree.
  """
  if enforce is not None and enforce not in ENFORCEMENTS:
    raise ValueError(f'Unknown mask enforcement {enforce!r}; valid: {", ".join(ENFORCEMENTS)}.')

  def make_optimizer(ctx):
    return optimizer(ctx) if optimizer is not None else local_sgd(local, ctx)

  def init(ctx, key):
    del key
    params = ctx.shared.params
    return SGDState(params, make_optimizer(ctx).init(params))

  def update(carry, grads, ctx, info, key):
    del info, key
    updates, opt_state = make_optimizer(ctx).update(grads.params, carry.opt_state, carry.params)
    params = optax.apply_updates(carry.params, updates)
    if enforce == 'step':
      params = masks_lib.apply(params, ctx.shared.mask)
    return SGDState(params, opt_state)

  def final(carry, ctx, key):
    del key
    return jax.tree.map(jnp.subtract, carry.params, ctx.shared.params)

  transform = enforcement_transform(enforce, lambda carry, ctx: ctx.shared.mask)
  return ClientProgram(init=init, trainable=lambda carry: carry.params, transform=transform,
                       loss=loss or supervised_loss(apply_fn), update=update, final=final)


# --------------------------------------------------------------------------------------------------
# Sparse training: a client that owns its mask and may rewire it (FedDST, FLASH).


class MaskedState(NamedTuple):
  """The carry of `masked_client`."""
  params: Any  # the client's weights, 0 outside ``mask`` at every step boundary
  opt_state: optax.OptState
  mask: Any  # the client's bool mask, which rewiring may change
  grad: Any  # ∂L/∂w of the last minibatch, dense (``keep_grad``), else None


def local_sgd(local: LocalConfig, ctx: Context) -> optax.GradientTransformation:
  """The client optimizer of ``local`` at the broadcast's ``learning_rate``.

  The cosine schedule's epoch is ``ceil(n_k / B)`` steps, in fixed-steps mode too (where the
  loop's own "epoch" is all ``local_steps`` steps).
  """
  return client_optimizer(local, ctx.shared.learning_rate,
                          steps_per_epoch(ctx.client.size, local.batch_size))


def masked_client(apply_fn: Callable[..., jax.Array], local: LocalConfig, *, enforce: str,
                  start: Callable[[Context], tuple[Any, Any]],
                  rewire: Callable[[MaskedState, Context, jax.Array, jax.Array],
                                   tuple[Any, Any, Any]] | None = None,
                  rewire_at_epoch_end: Callable[[Context, EpochInfo], jax.Array] | None = None,
                  rewire_after_step: Callable[[Context, StepInfo], jax.Array] | None = None,
                  keep_grad: bool = False) -> ClientProgram:
  """Local SGD of a sparse model whose mask the client holds and may change (rewire).

  The dynamic-sparse-training client of FedDST and FLASH: it starts from ``start(ctx)``'s
  weights and mask, trains under the mask (``enforce``), and at the points its hooks choose
  replaces the mask by ``rewire``'s -- magnitude pruning and regrowth -- resetting the optimizer
  moments of the regrown weights (RigL's and jaxpruner's convention). It uploads its masked
  weights and its mask.

  Args:
    apply_fn: the flax ``Module.apply``.
    local: local training settings (the optimizer is `local_sgd`).
    enforce: one of `ENFORCEMENTS`: ``'forward'`` trains ``w ⊙ m``; ``'step'`` trains ``w`` and
      re-masks after every step.
    start: ``start(ctx) -> (params, mask)``, the client's weights and mask at the round's start
      (the weights 0 outside the mask).
    rewire: ``rewire(state, ctx, steps_done, key) -> (params, mask, grown)``: the new weights
      (0 outside the new mask), mask, and a bool tree of the entries grown (their moments are
      reset). ``steps_done`` counts the client's steps so far this round.
    rewire_at_epoch_end: ``(ctx, epoch_info) -> bool`` scalar: rewire after that epoch.
    rewire_after_step: ``(ctx, step_info) -> bool`` scalar: rewire after that step.
    keep_grad: keep the dense gradient of the last minibatch in ``MaskedState.grad`` (what
      gradient-based regrowth ranks).

  Returns:
    A :class:`ClientProgram` whose output is ``(params ⊙ mask, mask)``.
  """
  if enforce not in ENFORCEMENTS:
    raise ValueError(f'Unknown mask enforcement {enforce!r}; valid: {", ".join(ENFORCEMENTS)}.')
  if rewire is None and (rewire_at_epoch_end or rewire_after_step):
    raise ValueError('rewire_at_epoch_end and rewire_after_step need a rewire function.')

  def rewired(state, ctx, steps_done, key):
    params, mask, grown = rewire(state, ctx, steps_done, key)
    opt_state = masks_lib.reset_moments(local_sgd(local, ctx), state.opt_state, grown)
    return MaskedState(params, opt_state, mask, state.grad)

  def maybe_rewire(state, ctx, when, steps_done, key):
    # A cond, not a select: rewiring ranks every layer, which the skipped points need not pay.
    return jax.lax.cond(when, lambda s: rewired(s, ctx, steps_done, key), lambda s: s, state)

  def init(ctx, key):
    del key
    params, mask = start(ctx)
    grad = jax.tree.map(jnp.zeros_like, params) if keep_grad else None
    return MaskedState(params, local_sgd(local, ctx).init(params), mask, grad)

  def update(state, grads, ctx, info, key):
    updates, opt_state = local_sgd(local, ctx).update(grads.params, state.opt_state,
                                                      state.params)
    params = optax.apply_updates(state.params, updates)
    if enforce == 'step':
      params = masks_lib.apply(params, state.mask)
    # The dense gradient (also at masked-out entries, which regrowth ranks): only the last
    # minibatch's survives to the rewiring.
    state = MaskedState(params, opt_state, state.mask, grads.effective if keep_grad else None)
    if rewire_after_step is not None:
      state = maybe_rewire(state, ctx, rewire_after_step(ctx, info), info.step + 1, key)
    return state

  def epoch_end(state, ctx, info, key):
    steps_done = (info.epoch + 1) * ctx.client.steps_per_epoch
    return maybe_rewire(state, ctx, rewire_at_epoch_end(ctx, info), steps_done, key)

  def final(state, ctx, key):
    del ctx, key
    return masks_lib.apply(state.params, state.mask), state.mask

  transform = enforcement_transform(enforce, lambda state, ctx: state.mask)
  return ClientProgram(init=init, trainable=lambda state: state.params, transform=transform,
                       loss=supervised_loss(apply_fn), update=update, final=final,
                       epoch_end=None if rewire_at_epoch_end is None else epoch_end)
