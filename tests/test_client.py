"""The client-program loop: exact per-client steps, hooks, transforms, layouts, padding ratio."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsparse import engine
from fedsparse import masks
from tests.toy import STRATEGY_MAPPINGS, tiny_federated

ALL_MAPPINGS = STRATEGY_MAPPINGS + [engine.ClientMapping('vmap', size_groups=2)]


def linear_apply(variables, x, train=False):
  del train
  p = variables['params']
  return x.reshape(x.shape[0], -1) @ p['w'] + p['b'][None, :]


def init_params(seed=42):
  return {'w': 0.1 * jax.random.normal(jax.random.key(seed), (16, 3), jnp.float32),
          'b': jnp.zeros(3, jnp.float32)}


def uneven_data():
  fd = tiny_federated(num_clients=6, method='dirichlet', alpha=0.3)
  sizes = np.asarray(fd.client_size)
  assert len(set(sizes.tolist())) > 2 and sizes.min() < 4 < sizes.max()  # really uneven
  return fd


def reference_client(fd, key, client_id, local, params, lr, mask=None):
  """A Python loop over the client's own minibatches: the definition the engine must meet."""
  opt = engine.client_optimizer(local, jnp.float32(lr),
                                engine.steps_per_epoch(int(fd.client_size[client_id]),
                                                       local.batch_size))
  state = opt.init(params)
  p = params
  losses = []
  for idx in engine.client_minibatches(key, fd, client_id, local):
    batch = engine.gather_batch(fd, jnp.asarray(idx), jnp.ones(len(idx), bool))

    def loss(p):
      q = masks.apply(p, mask) if mask is not None else p
      logits = linear_apply({'params': q}, batch.x)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch.y))

    value, g = jax.value_and_grad(loss)(p)
    u, state = opt.update(g, state, p)
    p = optax.apply_updates(p, u)
    losses.append(value)
  return jax.tree.map(jnp.subtract, p, params), float(np.mean(losses))


@pytest.mark.parametrize('partial', engine.PARTIAL_BATCHES)
@pytest.mark.parametrize('mapping', ALL_MAPPINGS,
                         ids=lambda m: f'{m.strategy}-{m.inner}-{m.size_groups}')
def test_uneven_clients_match_a_loop_over_their_own_steps(mapping, partial):
  # Catches padded steps or padded examples leaking into an update, clients sharing keys, and
  # results coming back out of cohort order after a size-sorted layout.
  fd = uneven_data()
  local = engine.LocalConfig(batch_size=4, local_epochs=2, momentum=0.9, weight_decay=0.01,
                             partial_batches=partial)
  params = init_params()
  drawn = engine.draw_cohort(jax.random.key(5), fd.num_clients,
                             engine.CohortConfig(5, replace=True))
  clients = jnp.array([int(drawn.clients[0]), 0, 1, 2, 3], jnp.int32)  # a repeat and extremes
  shared = engine.Broadcast(params, jnp.float32(0.2))
  program = engine.sgd_client(linear_apply, local)
  result = jax.jit(lambda s: engine.run_clients(program, s, clients, drawn.keys, fd, local,
                                                mapping))(shared)
  for slot, c in enumerate(np.asarray(clients)):
    delta, loss = reference_client(fd, drawn.keys[slot], int(c), local, params, 0.2)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[slot], result.outputs), delta,
                                rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(result.loss[slot], loss, rtol=2e-5)
    assert int(result.num_steps[slot]) == 2 * -(-int(fd.client_size[c]) // 4)


def test_padding_ratio_by_hand():
  fd = uneven_data()
  sizes = np.asarray(fd.client_size)
  clients = jnp.arange(6, dtype=jnp.int32)
  keys = jax.random.split(jax.random.key(0), 6)
  shared = engine.Broadcast(init_params(), jnp.float32(0.1))
  real = 3 * sizes.sum()
  steps = 3 * -(-sizes // 4)

  def ratio(mapping, partial):
    local = engine.LocalConfig(batch_size=4, local_epochs=3, partial_batches=partial)
    program = engine.sgd_client(linear_apply, local)
    result = engine.run_clients(program, shared, clients, keys, fd, local, mapping)
    assert int(result.real_sample_steps) == real
    return float(result.padding_ratio)

  seq = engine.ClientMapping('sequential')
  assert ratio(seq, 'split') == 1.0  # no padded example is ever computed
  np.testing.assert_allclose(ratio(seq, 'pad'), 4 * steps.sum() / real, rtol=1e-6)
  # vmap: every lane runs as long as the largest client of its group.
  np.testing.assert_allclose(ratio(engine.ClientMapping('vmap'), 'split'),
                             4 * 6 * steps.max() / real, rtol=1e-6)
  order = np.sort(steps)
  grouped = 4 * 3 * (order[:3].max() + order[3:].max())
  np.testing.assert_allclose(ratio(engine.ClientMapping('vmap', size_groups=2), 'split'),
                             grouped / real, rtol=1e-6)
  # chunks of 4 over 6 clients: 2 padding lanes of size 0 sort into the first chunk.
  chunked = 4 * 4 * (order[:2].max() + order[2:].max())
  np.testing.assert_allclose(ratio(engine.ClientMapping('chunked', chunk_size=4), 'split'),
                             chunked / real, rtol=1e-6)


@pytest.mark.parametrize('mapping', ALL_MAPPINGS,
                         ids=lambda m: f'{m.strategy}-{m.inner}-{m.size_groups}')
def test_computed_iterations_matches_brute_force(mapping):
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 50, 11).astype(np.int32)
  steps = -(-sizes // 8)
  got = int(engine.computed_iterations(jnp.asarray(steps), jnp.asarray(sizes), mapping))
  strategy = mapping.resolved()
  if strategy == 'sharded':
    # Snake deal of the size-sorted cohort (padded to 8 devices) over the 8 host devices.
    d = jax.device_count()
    by_size = list(np.argsort(-sizes, kind='stable')) + [None] * (-len(sizes) % d)
    shares = [[] for _ in range(d)]
    for r, c in enumerate(by_size):
      lap, pos = divmod(r, d)
      shares[pos if lap % 2 == 0 else d - 1 - pos].append(0 if c is None else steps[c])
    if mapping.local_strategy == 'sequential':
      expected = steps.sum()
    else:
      expected = sum(len(s) * max(s) for s in shares)  # one lane group per device here
  elif strategy == 'sequential':
    expected = steps.sum()
  else:
    group = mapping.chunk_size if strategy == 'chunked' else -(-11 // mapping.size_groups)
    padded = [0] * (-11 % group) + sorted(steps.tolist())
    expected = sum(group * max(padded[i:i + group]) for i in range(0, len(padded), group))
  assert got == expected


def recording_program(local):
  """Counts steps per epoch and records what every hook saw."""
  num_epochs = local.num_epochs

  def init(ctx, key):
    del key
    return {'since_epoch': jnp.int32(0), 'per_epoch': jnp.zeros((num_epochs,), jnp.int32),
            'last_flags': jnp.int32(0), 'last_seen': jnp.int32(-1), 'steps': jnp.int32(0),
            'w': ctx.shared['w']}

  def update(carry, grads, ctx, info, key):
    del grads, ctx, key
    return {**carry, 'since_epoch': carry['since_epoch'] + 1, 'steps': carry['steps'] + 1,
            'last_flags': carry['last_flags'] + info.last_of_epoch.astype(jnp.int32),
            'last_seen': info.step}

  def epoch_end(carry, ctx, info, key):
    del ctx, key
    return {**carry, 'since_epoch': jnp.int32(0),
            'per_epoch': carry['per_epoch'].at[info.epoch].set(carry['since_epoch'])}

  def loss(params, batch, key):
    del key
    return jnp.sum(params['w']) * jnp.ones(batch.y.shape, jnp.float32)

  return engine.ClientProgram(
      init=init, trainable=lambda c: {'w': c['w']}, transform=engine.identity_transform,
      loss=loss, update=update, epoch_end=epoch_end,
      final=lambda c, ctx, key: {k: c[k] for k in ('per_epoch', 'last_flags', 'last_seen',
                                                    'steps')})


@pytest.mark.parametrize('mapping', ALL_MAPPINGS,
                         ids=lambda m: f'{m.strategy}-{m.inner}-{m.size_groups}')
def test_each_clients_epochs_end_at_its_own_steps(mapping):
  fd = uneven_data()
  local = engine.LocalConfig(batch_size=4, local_epochs=3)
  clients = jnp.arange(6, dtype=jnp.int32)
  out = engine.run_clients(recording_program(local), {'w': jnp.ones(2, jnp.float32)}, clients,
                           jax.random.split(jax.random.key(0), 6), fd, local, mapping).outputs
  for k, n in enumerate(np.asarray(fd.client_size)):
    spe = -(-int(n) // 4)
    np.testing.assert_array_equal(out['per_epoch'][k], [spe] * 3)
    assert int(out['last_flags'][k]) == 3 and int(out['steps'][k]) == 3 * spe
    assert int(out['last_seen'][k]) == 3 * spe - 1


def test_fixed_steps_mode_is_one_epoch_of_local_steps():
  fd = uneven_data()
  local = engine.LocalConfig(batch_size=4, local_steps=5)
  out = engine.run_clients(recording_program(local), {'w': jnp.ones(2, jnp.float32)},
                           jnp.arange(6, dtype=jnp.int32),
                           jax.random.split(jax.random.key(0), 6), fd, local).outputs
  np.testing.assert_array_equal(out['per_epoch'], [[5]] * 6)
  np.testing.assert_array_equal(out['steps'], [5] * 6)


def test_masked_transform_exposes_the_dense_gradient():
  # The loss sees w ⊙ m; `grads.params` is zero at pruned entries, `grads.effective` is not.
  fd = tiny_federated(num_clients=2, method='iid')
  local = engine.LocalConfig(batch_size=64, local_steps=1)
  params = init_params()
  mask = {'w': jnp.arange(48).reshape(16, 3) % 3 == 0, 'b': jnp.ones(3, bool)}

  def update(carry, grads, ctx, info, key):
    del ctx, info, key
    return {'params': carry['params'], 'g': grads.params, 'g_eff': grads.effective}

  program = engine.ClientProgram(
      init=lambda ctx, key: {'params': ctx.shared, 'g': ctx.shared, 'g_eff': ctx.shared},
      trainable=lambda c: c['params'],
      transform=engine.masked_transform(lambda carry, ctx: mask),
      loss=engine.supervised_loss(linear_apply), update=update,
      final=lambda c, ctx, key: (c['g'], c['g_eff']))
  keys = jax.random.split(jax.random.key(0), 1)
  (g, g_eff) = jax.tree.map(lambda x: x[0], engine.run_clients(
      program, params, jnp.array([0], jnp.int32), keys, fd, local).outputs)
  idx = engine.client_minibatches(keys[0], fd, 0, local)[0]
  batch = engine.gather_batch(fd, jnp.asarray(idx), jnp.ones(len(idx), bool))
  loss = lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      linear_apply({'params': q}, batch.x), batch.y))
  expected_eff = jax.grad(loss)(masks.apply(params, mask))
  chex.assert_trees_all_close(g_eff, expected_eff, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(g, masks.apply(expected_eff, mask), rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(g_eff['w'])[~np.asarray(mask['w'])] != 0)
  assert np.all(np.asarray(g['w'])[~np.asarray(mask['w'])] == 0)


def test_bernoulli_mask_gradient_reaches_the_scores():
  s = jnp.array([-1.0, 0.0, 2.0], jnp.float32)
  w = jnp.array([0.5, -1.0, 2.0], jnp.float32)
  key = jax.random.key(3)
  m = engine.bernoulli_mask(s, key)
  assert set(np.asarray(m).tolist()) <= {0.0, 1.0}
  # L = Σ c_i w_i m_i: ∂L/∂m = c ⊙ w, and ∂L/∂s = θ · (c ⊙ w) · θ (1 − θ).
  c = jnp.array([1.0, 2.0, 3.0], jnp.float32)
  g = jax.grad(lambda s: jnp.sum(c * w * engine.bernoulli_mask(s, key)))(s)
  theta = 1 / (1 + np.exp(-np.asarray(s)))
  np.testing.assert_allclose(g, theta * np.asarray(c * w) * theta * (1 - theta), rtol=1e-6)
  # The same key draws the same mask; the draw has mean sigmoid(s).
  np.testing.assert_array_equal(engine.bernoulli_mask(s, key), m)
  draws = jax.vmap(lambda k: engine.bernoulli_mask(s, k))(
      jax.random.split(jax.random.key(0), 4000))
  np.testing.assert_allclose(np.mean(np.asarray(draws), axis=0), theta, atol=0.03)


@jax.numpy_dtype_promotion('standard')  # optax's Adam mixes a float decay with an int count
def test_a_stochastic_transform_trains_scores_with_adam():
  # FedPM-shaped client: frozen weights W, trainable scores s, loss on W ⊙ Bernoulli(σ(s)),
  # Adam on the scores. The scores move and the frozen weights do not.
  fd = tiny_federated(num_clients=3, method='iid')
  local = engine.LocalConfig(batch_size=8, local_epochs=2)
  frozen = init_params()
  adam = optax.adam(0.1)

  def transform(scores, carry, ctx, key):
    keys = jax.random.split(key, 2)
    return {'w': ctx.shared['w'] * engine.bernoulli_mask(scores['w'], keys[0]),
            'b': ctx.shared['b'] * engine.bernoulli_mask(scores['b'], keys[1])}

  def update(carry, grads, ctx, info, key):
    del ctx, info, key
    u, opt_state = adam.update(grads.params, carry[1], carry[0])
    return optax.apply_updates(carry[0], u), opt_state

  scores0 = jax.tree.map(jnp.zeros_like, frozen)
  program = engine.ClientProgram(
      init=lambda ctx, key: (scores0, adam.init(scores0)), trainable=lambda c: c[0],
      transform=transform, loss=engine.supervised_loss(linear_apply), update=update,
      final=lambda c, ctx, key: c[0])
  out = engine.run_clients(program, frozen, jnp.arange(3, dtype=jnp.int32),
                           jax.random.split(jax.random.key(1), 3), fd, local).outputs
  assert np.all(np.abs(np.asarray(out['w'])) > 0)  # every score received a gradient


@jax.numpy_dtype_promotion('standard')  # optax's Adam mixes a float decay with an int count
def test_sgd_client_accepts_any_optax_optimizer():
  fd = tiny_federated(num_clients=2, method='iid')
  local = engine.LocalConfig(batch_size=8, local_epochs=1)
  params = init_params()
  program = engine.sgd_client(linear_apply, local, optimizer=lambda ctx: optax.adam(0.05))
  keys = jax.random.split(jax.random.key(0), 1)
  out = engine.run_clients(program, engine.Broadcast(params, jnp.float32(0.0)),
                           jnp.array([1], jnp.int32), keys, fd, local).outputs
  adam = optax.adam(0.05)
  p, s = params, adam.init(params)
  for idx in engine.client_minibatches(keys[0], fd, 1, local):
    batch = engine.gather_batch(fd, jnp.asarray(idx), jnp.ones(len(idx), bool))
    g = jax.grad(lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        linear_apply({'params': q}, batch.x), batch.y)))(p)
    u, s = adam.update(g, s, p)
    p = optax.apply_updates(p, u)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], out),
                              jax.tree.map(jnp.subtract, p, params), rtol=1e-5, atol=1e-6)


def test_masked_client_trains_masked_weights():
  # SSFL's clients must train w ⊙ m: with several steps, a client training dense would move its
  # kept weights differently (the pruned weights it grows feed back into the forward pass).
  fd = uneven_data()
  local = engine.LocalConfig(batch_size=4, local_epochs=2)
  params = init_params()
  mask = {'w': jnp.arange(48).reshape(16, 3) % 2 == 0, 'b': jnp.ones(3, bool)}
  params = masks.apply(params, mask)
  keys = jax.random.split(jax.random.key(2), 2)
  clients = jnp.array([4, 5], jnp.int32)
  for enforce in engine.ENFORCEMENTS:
    program = engine.sgd_client(linear_apply, local, enforce=enforce)
    out = engine.run_clients(program, engine.Broadcast(params, jnp.float32(0.3), mask),
                             clients, keys, fd, local).outputs
    for slot, c in enumerate(np.asarray(clients)):
      delta, _ = reference_client(fd, keys[slot], int(c), local, params, 0.3, mask=mask)
      got = jax.tree.map(lambda x: x[slot], out)
      chex.assert_trees_all_close(got, masks.apply(delta, mask), rtol=2e-5, atol=1e-6)
      assert np.all(np.asarray(got['w'])[~np.asarray(mask['w'])] == 0)


@pytest.mark.parametrize('mapping', ALL_MAPPINGS,
                         ids=lambda m: f'{m.strategy}-{m.inner}-{m.size_groups}')
def test_sized_map_clients_returns_cohort_order(mapping):
  sizes = jnp.array([5, 0, 9, 1, 9, 3, 7], jnp.int32)
  xs = jnp.arange(7, dtype=jnp.float32) * 10
  out = jax.jit(lambda s, x: engine.map_clients(
      lambda shared, size, x: (shared + x, size), 1.0, x, mapping=mapping, sizes=s))(sizes, xs)
  np.testing.assert_array_equal(out[0], np.arange(7) * 10 + 1)
  np.testing.assert_array_equal(out[1], sizes)


@pytest.mark.parametrize('steps', [0, 7])
def test_cosine_schedule_through_the_loop_by_hand(steps):
  # An epoch of the cosine schedule is ceil(n_k / B) steps, in fixed-steps mode too.
  fd = uneven_data()
  local = engine.LocalConfig(batch_size=4, local_epochs=3, local_steps=steps,
                             lr_schedule='cosine', cosine_epochs=2, cosine_min_lr=0.0)
  params = init_params()
  keys = jax.random.split(jax.random.key(4), 2)
  clients = jnp.array([4, 5], jnp.int32)
  program = engine.sgd_client(linear_apply, local)
  out = engine.run_clients(program, engine.Broadcast(params, jnp.float32(0.5)), clients, keys,
                           fd, local).outputs
  for slot, c in enumerate(np.asarray(clients)):
    delta, _ = reference_client(fd, keys[slot], int(c), local, params, 0.5)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[slot], out), delta, rtol=2e-5,
                                atol=1e-6)


def test_steps_and_hooks_draw_fresh_keys():
  # A transform key reused on every step (FedPM drawing one mask per round) must not pass.
  fd = uneven_data()
  local = engine.LocalConfig(batch_size=4, local_epochs=2)

  def transform(p, carry, ctx, key):
    del carry, ctx
    return {'w': p['w'] + jax.random.uniform(key, ())}

  def update(carry, grads, ctx, info, key):
    del grads, ctx
    draw = jax.random.uniform(key, ())
    return {**carry, 'draws': carry['draws'].at[info.step].set(draw)}

  def epoch_end(carry, ctx, info, key):
    del ctx
    return {**carry, 'epoch_draws': carry['epoch_draws'].at[info.epoch].set(
        jax.random.uniform(key, ()))}

  program = engine.ClientProgram(
      init=lambda ctx, key: {'w': jnp.zeros(()), 'draws': jnp.zeros(64),
                             'epoch_draws': jnp.zeros(2), 'init': jax.random.uniform(key, ())},
      trainable=lambda c: {'w': c['w']}, transform=transform,
      loss=lambda p, batch, key: p['w'] * jnp.ones(batch.y.shape),
      update=update, epoch_end=epoch_end,
      final=lambda c, ctx, key: {**c, 'final': jax.random.uniform(key, ())})
  out = engine.run_clients(program, None, jnp.array([5, 5], jnp.int32),
                           jax.random.split(jax.random.key(0), 2), fd, local).outputs
  n = int(out['draws'].shape[1])
  for slot in range(2):
    steps = 2 * -(-int(fd.client_size[5]) // 4)
    draws = np.asarray(out['draws'][slot, :steps]).tolist() + np.asarray(
        out['epoch_draws'][slot]).tolist() + [float(out['init'][slot]), float(out['final'][slot])]
    assert len(set(draws)) == len(draws) and steps <= n
  assert float(out['final'][0]) != float(out['final'][1])  # same client, two slots
