"""FedAvg / FedAvgM: hand-computed rounds, no retrace, strategy agreement, determinism."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsparse import algorithms
from fedsparse import comm
from fedsparse import data as data_lib
from fedsparse import engine
from fedsparse import models
from fedsparse.data import normalize
from tests.toy import STRATEGY_MAPPINGS, tiny_federated


def linear_apply(variables, x, train=False):
  del train
  p = variables['params']
  return x.reshape(x.shape[0], -1) @ p['w'] + p['b'][None, :]


def init_params():
  k1, _ = jax.random.split(jax.random.key(42))
  return {'w': 0.1 * jax.random.normal(k1, (16, 3), jnp.float32), 'b': jnp.zeros(3, jnp.float32)}


def make_alg(num_clients_per_round=3, mapping=engine.ClientMapping('vmap'), **local):
  local = {'batch_size': 4, 'local_epochs': 1, **local}
  return algorithms.fedavg(linear_apply, cohort=engine.CohortConfig(num_clients_per_round),
                           local=engine.LocalConfig(**local), learning_rate=0.1,
                           mapping=mapping)


def test_one_step_round_matches_hand_computation():
  fd = tiny_federated(num_clients=4, method='iid')
  nmax = fd.client_index.shape[1]
  # One local step on a minibatch holding the whole client: the full-batch gradient, whatever the
  # shuffle; the whole population takes part, so the average is over every client.
  alg = algorithms.fedavg(linear_apply, cohort=engine.CohortConfig(4),
                          local=engine.LocalConfig(batch_size=nmax, local_steps=1),
                          learning_rate=0.5)
  params = init_params()
  state = alg.init(jax.random.key(0), params)
  new_state, metrics = jax.jit(alg.round)(state, fd, jax.random.key(7))

  def client_grad(k):
    idx = np.asarray(fd.client_index[k, :int(fd.client_size[k])])
    x = normalize(fd.x_train[idx], fd.scale, fd.mean, fd.std)
    y = fd.y_train[idx]
    def loss(p):
      logits = linear_apply({'params': p}, x)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return jax.grad(loss)(params), loss(params)

  sizes = np.asarray(fd.client_size, np.float64)
  weights = sizes / sizes.sum()
  grads, losses = zip(*[client_grad(k) for k in range(4)])
  for name in ('w', 'b'):
    expected = params[name] - 0.5 * sum(w * g[name] for w, g in zip(weights, grads))
    np.testing.assert_allclose(new_state.params[name], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['train_loss'], np.dot(weights, losses), rtol=1e-5)
  assert sorted(np.asarray(metrics['clients']).tolist()) == [0, 1, 2, 3]
  assert int(new_state.round) == 1
  chex.assert_trees_all_equal_shapes(new_state.params, params)


@pytest.mark.parametrize('weighted', [True, False])
def test_uneven_partial_cohort_round_by_hand(weighted):
  # Uneven n_k, 3 of 6 clients: catches aggregation that ignores n_k (or ignores `weighted`).
  fd = tiny_federated(num_clients=6, method='dirichlet', alpha=0.3)
  sizes = np.asarray(fd.client_size)
  nmax = int(sizes.max())
  cohort = engine.CohortConfig(3, weighted=weighted)
  alg = algorithms.fedavg(linear_apply, cohort=cohort,
                          local=engine.LocalConfig(batch_size=nmax, local_steps=1),
                          learning_rate=0.5)
  params = init_params()
  key = jax.random.key(7)
  new_state, metrics = jax.jit(alg.round)(alg.init(jax.random.key(0), params), fd, key)
  clients = np.asarray(engine.draw_cohort(key, 6, cohort).clients)
  np.testing.assert_array_equal(metrics['clients'], clients)
  assert len(set(sizes[clients].tolist())) > 1  # the drawn clients really differ in size
  # One step on a minibatch holding the whole client: its full-batch gradient.
  grads = []
  for k in clients:
    idx = np.asarray(fd.client_index[k, :sizes[k]])
    x = normalize(fd.x_train[idx], fd.scale, fd.mean, fd.std)
    loss = lambda p, x=x, y=fd.y_train[idx]: jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(linear_apply({'params': p}, x), y))
    grads.append(jax.grad(loss)(params))
  a = sizes[clients] / sizes[clients].sum() if weighted else np.full(3, 1 / 3)
  for name in ('w', 'b'):
    expected = params[name] - 0.5 * sum(w * g[name] for w, g in zip(a, grads))
    np.testing.assert_allclose(new_state.params[name], expected, rtol=1e-5, atol=1e-6)


def test_client_lr_decays_every_round_by_hand():
  # Round t uses lr · decay^t: with one full-batch step per round, round 2's move is 0.25 lr g.
  fd = tiny_federated(num_clients=2, method='iid')
  nmax = int(np.asarray(fd.client_size).max())
  alg = algorithms.fedavg(linear_apply, cohort=engine.CohortConfig(2),
                          local=engine.LocalConfig(batch_size=nmax, local_steps=1),
                          learning_rate=0.4, lr_decay=0.5)
  state = alg.init(jax.random.key(0), init_params())
  round_fn = jax.jit(alg.round)
  for t in range(3):
    before = state.params
    state, _ = round_fn(state, fd, jax.random.key(t))
    sizes = np.asarray(fd.client_size, np.float64)
    grad = jax.tree.map(jnp.zeros_like, before)
    for k in range(2):
      idx = np.asarray(fd.client_index[k, :int(sizes[k])])
      x = normalize(fd.x_train[idx], fd.scale, fd.mean, fd.std)
      g = jax.grad(lambda p, x=x, y=fd.y_train[idx]: jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(linear_apply({'params': p}, x), y)))(
              before)
      grad = jax.tree.map(lambda a, b, w=sizes[k] / sizes.sum(): a + w * b, grad, g)
    expected = jax.tree.map(lambda p, g, lr=0.4 * 0.5 ** t: p - lr * g, before, grad)
    chex.assert_trees_all_close(state.params, expected, rtol=1e-5, atol=1e-6)


def test_every_algorithm_trains_the_same_cohorts():
  # Paired comparisons: the cohort of round t depends on (seed, t, population) only.
  fd = tiny_federated(num_clients=8)
  local = engine.LocalConfig(batch_size=4, local_steps=2)
  common = dict(cohort=engine.CohortConfig(3), local=local, learning_rate=0.1)
  runs = [algorithms.fedavg(linear_apply, **common),
          algorithms.fedavg(linear_apply, server_optimizer=optax.sgd(1.0, momentum=0.9),
                            **common),
          algorithms.ssfl(linear_apply, density=0.5,
                          is_prunable=lambda path, leaf: path[-1] == 'w', **common)]
  cohorts = []
  for alg in runs:
    state = alg.init(jax.random.key(0), init_params(), fd)
    seen = []
    for t in range(3):
      state, metrics = jax.jit(alg.round)(state, fd, jax.random.fold_in(jax.random.key(9), t))
      seen.append(np.asarray(metrics['clients']).tolist())
    cohorts.append(seen)
  assert cohorts[0] == cohorts[1] == cohorts[2]
  assert len({tuple(c) for c in cohorts[0]}) > 1  # and they change from round to round


def test_round_traces_once_across_rounds():
  fd = tiny_federated()
  alg = make_alg()
  state = alg.init(jax.random.key(0), init_params())

  @jax.jit
  @chex.assert_max_traces(n=1)
  def round_fn(state, data, key):
    return alg.round(state, data, key)

  for t in range(4):
    state, metrics = round_fn(state, fd, jax.random.fold_in(jax.random.key(1), t))
  chex.assert_trees_all_equal_shapes_and_dtypes(state.params, init_params())
  assert int(state.round) == 4
  assert metrics['bits_up'].dtype == jnp.int32


def test_clients_get_distinct_keys():
  # Two clients holding exactly the same data still draw different minibatches (a shared key
  # would give them identical losses).
  fd = tiny_federated(num_clients=4, method='iid')
  fd = fd.replace(client_index=fd.client_index.at[1].set(fd.client_index[0]),
                  client_size=fd.client_size.at[1].set(fd.client_size[0]))
  alg = make_alg(num_clients_per_round=4, local_steps=3, batch_size=2)
  state = alg.init(jax.random.key(0), init_params())
  _, metrics = jax.jit(alg.round)(state, fd, jax.random.key(3))
  clients = np.asarray(metrics['clients']).tolist()
  losses = np.asarray(metrics['client_loss'])
  assert losses[clients.index(0)] != losses[clients.index(1)]


@pytest.mark.parametrize('mapping', STRATEGY_MAPPINGS[1:], ids=lambda m: f'{m.strategy}-{m.inner}')
def test_strategies_agree(mapping):
  fd = tiny_federated(num_clients=8)
  def two_rounds(mapping):
    alg = make_alg(num_clients_per_round=5, mapping=mapping, momentum=0.9)
    state = alg.init(jax.random.key(0), init_params())
    round_fn = jax.jit(alg.round)
    for t in range(2):
      state, metrics = round_fn(state, fd, jax.random.key(t))
    return state, metrics
  ref_state, ref_metrics = two_rounds(STRATEGY_MAPPINGS[0])
  state, metrics = two_rounds(mapping)
  chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['train_loss'], ref_metrics['train_loss'], rtol=1e-5)
  np.testing.assert_array_equal(metrics['clients'], ref_metrics['clients'])


def test_same_seed_same_numbers():
  fd = tiny_federated()
  def run():
    alg = make_alg()
    state = alg.init(jax.random.key(0), init_params())
    state, _ = jax.jit(alg.round)(state, fd, jax.random.key(5))
    return state.params
  chex.assert_trees_all_equal(run(), run())


def test_dense_bits_per_client():
  fd = tiny_federated()
  alg = make_alg(num_clients_per_round=3)
  state = alg.init(jax.random.key(0), init_params())
  _, metrics = jax.jit(alg.round)(state, fd, jax.random.key(0))
  expected = 32 * (16 * 3 + 3)
  np.testing.assert_array_equal(metrics['bits_up'], [expected] * 3)
  np.testing.assert_array_equal(metrics['bits_down'], [expected] * 3)
  assert comm.dense_bits(init_params()) == expected


def test_fedavgm_applies_server_momentum():
  fd = tiny_federated()
  kwargs = dict(cohort=engine.CohortConfig(3), local=engine.LocalConfig(batch_size=4),
                learning_rate=0.1, mapping=engine.ClientMapping('vmap'))
  plain = algorithms.fedavg(linear_apply, **kwargs)
  momentum = algorithms.fedavg(linear_apply, server_optimizer=optax.sgd(1.0, momentum=0.5),
                               **kwargs)
  p0 = init_params()
  s_plain = plain.init(jax.random.key(0), p0)
  s_mom = momentum.init(jax.random.key(0), p0)
  keys = [jax.random.key(10), jax.random.key(11)]
  # Round 1: momentum buffer is empty, so both agree.
  s_plain, _ = jax.jit(plain.round)(s_plain, fd, keys[0])
  s_mom, _ = jax.jit(momentum.round)(s_mom, fd, keys[0])
  chex.assert_trees_all_close(s_mom.params, s_plain.params, rtol=1e-6)
  delta1 = jax.tree.map(jnp.subtract, s_plain.params, p0)
  # Round 2: FedAvgM moves by Δ̄2 + 0.5·Δ̄1, FedAvg by Δ̄2 (same clients, same start point).
  before = s_plain.params
  s_plain, _ = jax.jit(plain.round)(s_plain, fd, keys[1])
  s_mom, _ = jax.jit(momentum.round)(s_mom, fd, keys[1])
  delta2 = jax.tree.map(jnp.subtract, s_plain.params, before)
  expected = jax.tree.map(lambda b, d2, d1: b + d2 + 0.5 * d1, before, delta2, delta1)
  chex.assert_trees_all_close(s_mom.params, expected, rtol=1e-5, atol=1e-6)


def test_bad_hyperparameters_fail_fast():
  kwargs = dict(cohort=engine.CohortConfig(3), local=engine.LocalConfig())
  with pytest.raises(ValueError, match='learning_rate'):
    algorithms.fedavg(linear_apply, learning_rate=0.0, **kwargs)
  with pytest.raises(ValueError, match='clients_per_round'):
    engine.CohortConfig(0)


def test_strategies_agree_on_a_conv_net():
  # On CPU `auto` picks a different conv formulation per strategy (fwdconv for sequential
  # clients, im2col under vmap): the rounds must still agree to float32 rounding.
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (80, 16, 16, 1), dtype=np.uint8)
  y = rng.integers(0, 3, 80).astype(np.int32)
  ds = data_lib.Dataset('toy16', x[:60], y[:60], x[60:], y[60:], 3, 255.0, (0.5,), (0.3,))
  fd, _ = data_lib.make_federated_data(ds, 6, 'iid', seed=0)
  results = []
  for mapping in STRATEGY_MAPPINGS:
    impl = models.resolve_impl('auto', batched_clients=mapping.batches_clients)
    model = models.FedDSTNet(num_classes=3, conv_features=(2, 3), dense_features=(8,),
                             conv_impl=impl)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1), jnp.float32))['params']
    alg = algorithms.fedavg(model.apply, cohort=engine.CohortConfig(4),
                            local=engine.LocalConfig(batch_size=4, local_steps=3),
                            learning_rate=0.1, mapping=mapping)
    state, _ = jax.jit(alg.round)(alg.init(jax.random.key(0), params), fd, jax.random.key(1))
    results.append(state.params)
  for params in results[1:]:
    chex.assert_trees_all_close(params, results[0], rtol=1e-4, atol=1e-5)
