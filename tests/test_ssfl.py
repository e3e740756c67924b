"""SSFL / SalientGrads: saliency by hand, static masks, exact zeros and counts, bit formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsparse import algorithms
from fedsparse import comm
from fedsparse import engine
from fedsparse import masks
from fedsparse import train
from fedsparse.data import normalize
from tests.test_train import load_config, read_rows
from tests.toy import STRATEGY_MAPPINGS, tiny_federated


def mlp_apply(variables, x, train=False):
  del train
  p = variables['params']
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ p['hidden']['kernel'] + p['hidden']['bias'][None, :])
  return h @ p['out']['kernel'] + p['out']['bias'][None, :]


def init_params(seed=42):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {'hidden': {'kernel': 0.3 * jax.random.normal(k1, (16, 8), jnp.float32),
                     'bias': 0.1 * jax.random.normal(k3, (8,), jnp.float32)},
          'out': {'kernel': 0.3 * jax.random.normal(k2, (8, 3), jnp.float32),
                  'bias': jnp.zeros(3, jnp.float32)}}


def make_ssfl(density=0.25, clients_per_round=3, mapping=engine.ClientMapping('vmap'),
              **kwargs):
  local = engine.LocalConfig(batch_size=kwargs.pop('batch_size', 4),
                             local_epochs=kwargs.pop('local_epochs', 1),
                             momentum=kwargs.pop('momentum', 0.0),
                             weight_decay=kwargs.pop('weight_decay', 0.0))
  return algorithms.ssfl(mlp_apply, density=density,
                         cohort=engine.CohortConfig(clients_per_round), local=local,
                         learning_rate=0.1, mapping=mapping, **kwargs)


def hand_saliency(fd, params, weighting, score='ssfl'):
  """|grad ⊙ w| per client on its whole data (batch = client size), averaged in NumPy."""
  sizes = np.asarray(fd.client_size)
  per_client = []
  for k in range(fd.num_clients):
    idx = np.asarray(fd.client_index[k, :sizes[k]])
    x = normalize(fd.x_train[idx], fd.scale, fd.mean, fd.std)
    y = fd.y_train[idx]
    def loss(p):
      logits = mlp_apply({'params': p}, x)
      if score == 'ssfl':
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
      return -jnp.mean(logits[jnp.arange(len(y)), y])
    g = jax.grad(loss)(params)
    per_client.append({name: np.abs(np.asarray(g[name]['kernel']) * np.asarray(
        params[name]['kernel'])) for name in ('hidden', 'out')})
  a = (np.full(len(sizes), 1 / len(sizes)) if weighting == 'uniform' else sizes / sizes.sum())
  return {name: sum(w * s[name] for w, s in zip(a, per_client)) for name in ('hidden', 'out')}


@pytest.mark.parametrize('weighting', ['uniform', 'weighted'])
@pytest.mark.parametrize('score', ['ssfl', 'salientgrads'])
def test_population_saliency_matches_hand_computation(weighting, score):
  fd = tiny_federated(num_clients=5, method='dirichlet')
  params = init_params()
  prunable = masks.prunable_leaves(params)
  nmax = int(fd.client_index.shape[1])
  # One minibatch as large as the largest client: every client scores on all its data.
  got = jax.jit(lambda p: algorithms.population_saliency(
      mlp_apply, p, fd, jax.random.key(0), prunable=prunable, batch_size=nmax, score=score,
      weighting=weighting, mapping=engine.ClientMapping('sequential')))(params)
  expected = hand_saliency(fd, params, weighting, score)
  for name in ('hidden', 'out'):
    np.testing.assert_allclose(got[name]['kernel'], expected[name], rtol=2e-5, atol=1e-7)
    np.testing.assert_array_equal(got[name]['bias'], 0.0)  # biases are not scored


@pytest.mark.parametrize('mapping', STRATEGY_MAPPINGS, ids=lambda m: f'{m.strategy}-{m.inner}')
def test_saliency_agrees_across_strategies(mapping):
  fd = tiny_federated(num_clients=7)
  params = init_params()
  prunable = masks.prunable_leaves(params)
  run = lambda m: jax.jit(lambda p: algorithms.population_saliency(
      mlp_apply, p, fd, jax.random.key(3), prunable=prunable, batch_size=4, num_batches=2,
      mapping=m))(params)
  ref = run(engine.ClientMapping('sequential'))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               run(mapping), ref)


def test_saliency_mask_is_the_global_top_k_of_the_scores():
  fd = tiny_federated(num_clients=6)
  params = init_params()
  alg = make_ssfl(density=0.2)
  state = alg.init(jax.random.key(0), params)
  key = jax.random.key(11)
  new_state, _ = jax.jit(alg.round)(state, fd, key)
  prunable = masks.prunable_leaves(params)
  scores = algorithms.population_saliency(
      mlp_apply, params, fd, engine.server_key(key), prunable=prunable, batch_size=4)
  flat = np.concatenate([np.ravel(scores['hidden']['kernel']), np.ravel(scores['out']['kernel'])])
  kept = np.concatenate([np.ravel(new_state.mask['hidden']['kernel']),
                         np.ravel(new_state.mask['out']['kernel'])])
  k = int(np.floor(0.2 * flat.size))  # 0.2 * 152 = 30.4 -> 30
  assert k == 30 and kept.sum() == k
  # Every kept score is at least every dropped one.
  assert flat[kept].min() >= flat[~kept].max()
  assert bool(new_state.mask['hidden']['bias'].all()) and bool(new_state.mask['out']['bias'].all())


@pytest.mark.parametrize('mask', algorithms.SSFL_MASKS)
@pytest.mark.parametrize('enforce', engine.ENFORCEMENTS)
def test_mask_static_and_pruned_weights_exactly_zero(mask, enforce):
  fd = tiny_federated(num_clients=6)
  params = init_params()
  # Momentum, weight decay and a FedAvgM server: everything that could revive a pruned weight.
  alg = make_ssfl(density=0.3, mask=mask, mask_enforcement=enforce, momentum=0.9, weight_decay=1e-2,
                  server_optimizer=optax.sgd(1.0, momentum=0.9), local_epochs=2)
  state = alg.init(jax.random.key(0), params)
  round_fn = jax.jit(alg.round)
  prunable = masks.prunable_leaves(params)
  expected_count = masks.keep_count(0.3, masks.num_prunable(params, prunable))
  first_mask = None
  for t in range(4):
    state, metrics = round_fn(state, fd, jax.random.fold_in(jax.random.key(5), t))
    if first_mask is None:
      first_mask = state.mask
    chex.assert_trees_all_equal(state.mask, first_mask)  # never changes after scoring
    for w, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.mask)):
      assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
    if mask == 'random_layerwise':
      counts = masks.layer_counts(params, prunable, 0.3)
      assert int(state.mask['hidden']['kernel'].sum()) == counts['hidden']['kernel']
      assert int(state.mask['out']['kernel'].sum()) == counts['out']['kernel']
    else:
      assert int(masks.count(state.mask, prunable)) == expected_count
    np.testing.assert_allclose(metrics['density'], expected_count / 152 if mask != (
        'random_layerwise') else (int(0.3 * 128) + int(0.3 * 24)) / 152, rtol=1e-6)
  assert np.isfinite(float(metrics['train_loss']))


def test_keep_ties_rule_keeps_every_tie():
  # Constant saliency everywhere (zero weights in `out`: all its scores are exactly 0, tied).
  params = init_params()
  params['out']['kernel'] = jnp.zeros_like(params['out']['kernel'])
  fd = tiny_federated(num_clients=4)
  # d = 0.9 of 152 keeps 136 > 128 hidden weights: the threshold falls inside the zero ties.
  for ties, expected in (('index', 136), ('keep', 152)):
    alg = make_ssfl(density=0.9, ties=ties)
    state, _ = jax.jit(alg.round)(alg.init(jax.random.key(0), params), fd, jax.random.key(1))
    assert int(masks.count(state.mask, masks.prunable_leaves(params))) == expected


def test_round_traces_once_and_scores_only_once():
  fd = tiny_federated(num_clients=6)
  alg = make_ssfl()
  state = alg.init(jax.random.key(0), init_params())

  @jax.jit
  @chex.assert_max_traces(n=1)
  def round_fn(state, key):
    return alg.round(state, fd, key)

  ups = []
  for t in range(4):
    state, metrics = round_fn(state, jax.random.key(t))
    ups.append(int(np.sum(metrics['bits_up_all'])))
  assert ups[0] > 0 and ups[1:] == [0, 0, 0]


def test_bits_per_client_by_hand():
  fd = tiny_federated(num_clients=6)
  params = init_params()
  alg = make_ssfl(density=0.25)
  state = alg.init(jax.random.key(0), params)
  round_fn = jax.jit(alg.round)
  # 152 prunable kernel entries, 11 dense bias entries; keep floor(0.25 * 152) = 38.
  per_client = 32 * (38 + 11)
  for t in range(2):
    state, m = round_fn(state, fd, jax.random.key(t))
    np.testing.assert_array_equal(m['bits_up'], [per_client] * 3)
    np.testing.assert_array_equal(m['bits_down'], [per_client] * 3)
    once = t == 0
    np.testing.assert_array_equal(m['bits_up_all'], [32 * 152 * once] * 6)  # saliency upload
    np.testing.assert_array_equal(m['bits_down_all'], [152 * once] * 6)  # 1 bit per mask entry


def test_warmup_rounds_are_dense_and_scoring_downloads_the_weights():
  fd = tiny_federated(num_clients=6)
  params = init_params()
  alg = make_ssfl(density=0.25, warmup_rounds=2)
  state = alg.init(jax.random.key(0), params)
  round_fn = jax.jit(alg.round)
  dense = comm.dense_bits(params)  # 32 * 163
  for t in range(3):
    before = state.params
    state, m = round_fn(state, fd, jax.random.key(t))
    if t < 2:
      assert bool(jax.tree.reduce(lambda a, b: a & b, jax.tree.map(jnp.all, state.mask)))
      np.testing.assert_array_equal(m['bits_up'], [dense] * 3)
      np.testing.assert_array_equal(m['bits_up_all'], [0] * 6)
    else:
      # Scored at the warm-up weights: the mask is the top-k of their saliency, not of w0's.
      prunable = masks.prunable_leaves(params)
      scores = algorithms.population_saliency(
          mlp_apply, before, fd, engine.server_key(jax.random.key(t)), prunable=prunable,
          batch_size=4)
      chex.assert_trees_all_equal(state.mask, masks.global_topk(scores, prunable, 0.25))
      np.testing.assert_array_equal(m['bits_up'], [32 * (38 + 11)] * 3)
      np.testing.assert_array_equal(m['bits_up_all'], [32 * 152] * 6)
      np.testing.assert_array_equal(m['bits_down_all'], [152 + dense] * 6)


@pytest.mark.parametrize('mapping', STRATEGY_MAPPINGS, ids=lambda m: f'{m.strategy}-{m.inner}')
def test_ssfl_rounds_agree_across_strategies(mapping):
  fd = tiny_federated(num_clients=6)
  params = init_params()
  def run(m):
    alg = make_ssfl(mapping=m)
    state = alg.init(jax.random.key(0), params)
    for t in range(2):
      state, _ = jax.jit(alg.round)(state, fd, jax.random.key(t))
    return state
  ref, got = run(engine.ClientMapping('vmap')), run(mapping)
  chex.assert_trees_all_equal(got.mask, ref.mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got.params, ref.params)


def test_bad_hyperparameters_fail_fast():
  for kwargs, message in (({'density': 0.0}, 'density'), ({'density': 1.5}, 'density'),
                          ({'mask': 'magnitude'}, 'random_global'),
                          ({'ties': 'first'}, 'index'), ({'saliency_score': 'snip'}, 'salientgrads'),
                          ({'mask_enforcement': 'never'}, 'forward'), ({'warmup_rounds': -1}, 'warmup'),
                          ({'saliency_weighting': 'n'}, 'weighted')):
    with pytest.raises(ValueError, match=message):
      make_ssfl(**kwargs)


def test_run_bits_match_the_formula_exactly(tmp_path):
  config = load_config('mnist_ssfl')
  config.dataset = 'digits'  # 8x8 inputs: MNISTNet does not fit, use the MLP
  config.model = 'mlp'
  config.num_rounds = 3
  config.ssfl.density = 0.1
  workdir = tmp_path / 'run'
  train.run(config, workdir)
  exp = train.build_experiment(config)
  prunable = masks.prunable_leaves(exp.params)
  p_prunable = masks.num_prunable(exp.params, prunable)
  dense_rest = comm.num_elements(exp.params) - p_prunable
  per_round = config.clients_per_round * 32 * (masks.keep_count(0.1, p_prunable) + dense_rest)
  n = exp.data.num_clients
  rows = read_rows(workdir)
  for t, row in enumerate(rows, start=1):
    assert row['cum_bits_up'] == n * 32 * p_prunable + t * per_round
    assert row['cum_bits_down'] == n * p_prunable + t * per_round
    assert abs(row['density'] - masks.keep_count(0.1, p_prunable) / p_prunable) < 1e-6


def test_random_global_ignores_the_layerwise_allocation():
  fd = tiny_federated(num_clients=6)
  params = init_params()
  states = []
  for allocation in ('uniform', 'erk'):
    alg = make_ssfl(density=0.3, mask='random_global', layerwise_allocation=allocation)
    state, _ = jax.jit(alg.round)(alg.init(jax.random.key(0), params), fd, jax.random.key(1))
    states.append(state)
  chex.assert_trees_all_equal(states[0].mask, states[1].mask)


def test_density_keeping_no_weight_fails_at_init():
  alg = make_ssfl(density=1e-4)  # floor(1e-4 * 152) = 0
  with pytest.raises(ValueError, match='keeps no weight'):
    alg.init(jax.random.key(0), init_params())


@pytest.mark.parametrize('mapping, expected', [
    (engine.ClientMapping('vmap', chunk_size=5), engine.ClientMapping('chunked', chunk_size=5)),
    (engine.ClientMapping('sharded', inner='vmap', chunk_size=5),
     engine.ClientMapping('sharded', inner='chunked', chunk_size=5)),
    (engine.ClientMapping('sequential'), engine.ClientMapping('sequential')),
    (engine.ClientMapping('sharded', inner='sequential'),
     engine.ClientMapping('sharded', inner='sequential')),
])
def test_scoring_never_vmaps_the_whole_population(mapping, expected):
  from fedsparse.algorithms import ssfl as ssfl_module  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  module = sys.modules[ssfl_module.__module__]
  assert module._scoring_mapping(mapping) == expected  # pylint: disable=protected-access


@pytest.mark.parametrize('enforce', engine.ENFORCEMENTS)
def test_training_round_clients_train_the_masked_model(enforce):
  # After scoring, each client must train w ⊙ m. A client training the dense model would grow
  # its pruned weights and, over several steps, move its kept weights differently; the server's
  # re-mask hides the pruned entries but not that.
  fd = tiny_federated(num_clients=6)
  alg = make_ssfl(density=0.3, mask='random_global', mask_enforcement=enforce, local_epochs=2)
  state = alg.init(jax.random.key(0), init_params())
  round_fn = jax.jit(alg.round)
  state, _ = round_fn(state, fd, jax.random.key(0))  # scoring round
  key = jax.random.key(1)
  new_state, metrics = round_fn(state, fd, key)
  drawn = engine.draw_cohort(key, fd.num_clients, engine.CohortConfig(3))
  local = engine.LocalConfig(batch_size=4, local_epochs=1 * 2)
  sizes = np.asarray(fd.client_size)[np.asarray(drawn.clients)].astype(np.float64)
  expected = state.params
  for slot, c in enumerate(np.asarray(drawn.clients)):
    opt = engine.client_optimizer(local, jnp.float32(0.1), 1)
    p, s = state.params, opt.init(state.params)
    for idx in engine.client_minibatches(drawn.keys[slot], fd, int(c), local):
      batch = engine.gather_batch(fd, jnp.asarray(idx), jnp.ones(len(idx), bool))
      g = jax.grad(lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          mlp_apply({'params': masks.apply(q, state.mask)}, batch.x), batch.y)))(p)
      u, s = opt.update(g, s, p)
      p = optax.apply_updates(p, u)
    w = sizes[slot] / sizes.sum()
    expected = jax.tree.map(lambda e, a, b, w=w: e + w * (a - b), expected, p, state.params)
  np.testing.assert_array_equal(metrics['clients'], drawn.clients)
  chex.assert_trees_all_close(new_state.params, masks.apply(expected, state.mask), rtol=2e-5,
                              atol=1e-6)
