"""Tests of FedPM: frozen signed constants, the stochastic client, the posterior, coded uplinks."""

import importlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsparse import comm
from fedsparse import engine
from fedsparse import train
from fedsparse import workdir
from tests.test_ssfl import init_params, mlp_apply
from tests.test_train import load_config, run_full_and_resumed
from tests.toy import tiny_federated

fedpm_lib = importlib.import_module('fedsparse.algorithms.fedpm')

P = 16 * 8 + 8 + 8 * 3 + 3  # the toy MLP's parameters: every one is scored


def make_fedpm(clients_per_round=3, local_epochs=1, **hparams):
  return fedpm_lib.fedpm(mlp_apply, cohort=engine.CohortConfig(clients_per_round, weighted=False),
                         local=engine.LocalConfig(batch_size=8, local_epochs=local_epochs),
                         learning_rate=0.1, **hparams)


# --------------------------------------------------------------------------------------------------
# Pieces.


def test_signed_constants_by_hand():
  params = {'Conv_0': {'kernel': jnp.zeros((3, 3, 2, 4)), 'bias': jnp.zeros(4)},
            'Dense_0': {'kernel': jnp.zeros((50, 7)), 'bias': jnp.zeros(7)},
            'GroupNorm_0': {'scale': jnp.full(4, 1.5), 'bias': jnp.full(4, 0.25)}}
  w = fedpm_lib.signed_constants(jax.random.key(0), params)
  for name, fan_in in (('Conv_0', 18), ('Dense_0', 50)):
    c = math.e * math.sqrt(1 / fan_in)
    for leaf in ('kernel', 'bias'):
      np.testing.assert_allclose(np.abs(w[name][leaf]), c, rtol=1e-6)
  # Normalisation leaves (no kernel beside them) keep their values.
  chex.assert_trees_all_equal(w['GroupNorm_0'], params['GroupNorm_0'])
  # Random signs: both present, about half each, other seeds other signs.
  signs = np.sign(np.asarray(w['Dense_0']['kernel']))
  assert 0.4 < np.mean(signs > 0) < 0.6
  other = fedpm_lib.signed_constants(jax.random.key(1), params)
  assert np.any(np.asarray(other['Dense_0']['kernel']) != np.asarray(w['Dense_0']['kernel']))
  # Kernel and bias of one layer draw independent signs.
  k0 = np.sign(np.asarray(w['Conv_0']['kernel'])).reshape(-1)[:4]
  assert not np.array_equal(k0, np.sign(np.asarray(w['Conv_0']['bias']))) or np.any(
      np.sign(np.asarray(w['Dense_0']['bias'])) != np.sign(np.asarray(w['Dense_0']['kernel'][0])))


def test_masked_forward_gradient_is_the_theta_scaled_straight_through_estimate():
  # L = Σ_i x_i (W ⊙ m)_i with m ~ Bernoulli(θ): ∂L/∂s = θ · (x ⊙ W) · θ (1 − θ).
  w = {'a': jnp.array([0.5, -1.0, 2.0]), 'b': jnp.array([3.0])}
  s = {'a': jnp.array([-1.0, 0.0, 2.0]), 'b': jnp.array([0.5])}
  x = {'a': jnp.array([1.0, 2.0, 3.0]), 'b': jnp.array([-2.0])}
  loss = lambda s: sum(jnp.sum(xi * ei) for xi, ei in zip(  # pylint: disable=g-long-lambda
      jax.tree.leaves(x), jax.tree.leaves(fedpm_lib._masked(w, s, jax.random.key(0)))))
  g = jax.grad(loss)(s)
  for name in ('a', 'b'):
    theta = 1 / (1 + np.exp(-np.asarray(s[name])))
    np.testing.assert_allclose(g[name], theta * np.asarray(x[name] * w[name]) * theta * (1 - theta),
                               rtol=1e-6)
  # A loss whose ∂L/∂m depends on m: L = ½ Σ (x ⊙ W ⊙ m)², ∂L/∂m = (x W)² m with the forward's
  # own sample m, so ∂L/∂s = θ · (x W)² m · θ (1 − θ).
  eff = fedpm_lib._masked(w, s, jax.random.key(0))
  def square(s):
    masked = fedpm_lib._masked(w, s, jax.random.key(0))
    return sum(0.5 * jnp.sum((xi * ei) ** 2)
               for xi, ei in zip(jax.tree.leaves(x), jax.tree.leaves(masked)))
  g = jax.grad(square)(s)
  for name in ('a', 'b'):
    theta = 1 / (1 + np.exp(-np.asarray(s[name])))
    m = np.asarray(eff[name]) / np.asarray(w[name])
    np.testing.assert_allclose(
        g[name], theta * np.asarray(x[name] * w[name]) ** 2 * m * theta * (1 - theta), rtol=1e-6)
  # The forward is W ⊙ m with a 0/1 mask; each leaf draws its own.
  for name in ('a', 'b'):
    ratio = np.asarray(eff[name]) / np.asarray(w[name])
    assert set(ratio.tolist()) <= {0.0, 1.0}
  big = {'a': jnp.zeros(4000), 'b': jnp.zeros(4000)}
  draws = fedpm_lib._masked({'a': jnp.ones(4000), 'b': jnp.ones(4000)}, big, jax.random.key(1))
  assert not np.array_equal(draws['a'], draws['b'])
  assert abs(float(np.mean(draws['a'])) - 0.5) < 0.03


def test_beta_posterior_by_hand():
  # Three clients; ε = 0.1, λ0 = 1. Entry 0: samples 1,1,0 -> α = 1 + 0.9 + 0.9 + 0.1 = 2.9,
  # β = 1 + 0.1 + 0.1 + 0.9 = 2.1, mode (α − 1)/(α + β − 2) = 1.9 / 3 (the smoothed mean).
  samples = {'w': jnp.array([[1, 0, 1], [1, 0, 1], [0, 0, 1]], bool)}
  ones = {'w': jnp.ones(3)}
  theta, alpha, beta = fedpm_lib.beta_posterior(samples, ones, ones, 0.1)
  np.testing.assert_allclose(alpha['w'], [2.9, 1.3, 3.7], rtol=1e-6)
  np.testing.assert_allclose(beta['w'], [2.1, 3.7, 1.3], rtol=1e-6)
  np.testing.assert_allclose(theta['w'], [1.9 / 3, 0.1, 0.9], rtol=1e-6)
  # Accumulated (no reset): α and β keep growing, the mode follows every sample seen.
  theta2, alpha2, beta2 = fedpm_lib.beta_posterior(samples, alpha, beta, 0.1)
  np.testing.assert_allclose(alpha2['w'], [4.8, 1.6, 6.4], rtol=1e-6)
  np.testing.assert_allclose(theta2['w'], [3.8 / 6, 0.6 / 6, 5.4 / 6], rtol=1e-6)


def test_prior_resets():
  periodic = [bool(fedpm_lib.prior_is_reset(jnp.int32(t), 'periodic')) for t in range(26)]
  assert periodic == [True] * 15 + [True, False, False, False, False, True, False, False, False,
                                    False, True]
  assert all(bool(fedpm_lib.prior_is_reset(jnp.int32(t), 'every_round')) for t in range(20))


@pytest.mark.parametrize('n, p', [(0, 0.5), (1, 1.0), (7, 0.0), (1000, 0.03), (50_000, 0.5),
                                  (50_000, 0.999)])
def test_bernoulli_codes_decode_exactly_and_cost_about_the_entropy(n, p):
  rng = np.random.default_rng(n)
  bits = rng.random(n) < p
  code = comm.bernoulli_encode(bits)
  np.testing.assert_array_equal(comm.bernoulli_decode(code, n), bits)
  assert code.ones == int(bits.sum())
  assert code.bits == 32 * code.words.size + math.ceil(math.log2(n + 1))
  if n >= 1000:
    assert abs(code.bits - comm.bernoulli_entropy_bits(n, code.ones)) < 0.01 * code.bits + 64
  # Per-bit probabilities both sides hold: confident and right is cheap, nothing else travels.
  theta = np.where(bits, 0.99, 0.01)
  coded = comm.bernoulli_encode(bits, theta)
  assert coded.ones is None
  np.testing.assert_array_equal(comm.bernoulli_decode(coded, n, theta), bits)
  assert coded.bits <= 32 * math.ceil((n * -math.log2(0.99) + 64) / 32) + 32


def test_bernoulli_entropy_bits_by_hand():
  assert comm.bernoulli_entropy_bits(8, 4) == pytest.approx(8 + 3)
  assert comm.bernoulli_entropy_bits(1024, 0) == pytest.approx(10)
  with pytest.raises(ValueError, match='0 <= ones <= n'):
    comm.bernoulli_entropy_bits(4, 5)
  with pytest.raises(ValueError, match='0 or 1'):
    comm.bernoulli_encode(np.array([0, 2, 1]))


# --------------------------------------------------------------------------------------------------
# Rounds.


def test_round_matches_a_hand_written_client_and_server():
  fd = tiny_federated(num_clients=4)
  alg = make_fedpm(clients_per_round=2, local_epochs=2)
  state = alg.init(jax.random.key(0), init_params(), fd)
  key = jax.random.key(5)
  new, m = jax.jit(alg.round)(state, fd, key)
  drawn = engine.draw_cohort(key, fd.num_clients, engine.CohortConfig(2, weighted=False))
  local = engine.LocalConfig(batch_size=8, local_epochs=2)
  adam = optax.adam(0.1)
  samples = []
  for slot, client in enumerate(np.asarray(drawn.clients)):
    streams = engine.client_streams(drawn.keys[slot])
    s, opt = state.scores, adam.init(state.scores)
    for t, idx in enumerate(engine.client_minibatches(drawn.keys[slot], fd, int(client), local)):
      transform_key = jax.random.split(jax.random.fold_in(streams[2], t), 3)[0]
      batch = engine.gather_batch(fd, jnp.asarray(idx), jnp.ones(len(idx), bool))

      def loss(s, batch=batch, transform_key=transform_key):
        eff = fedpm_lib._masked(state.weights, s, transform_key)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            mlp_apply({'params': eff}, batch.x), batch.y))
      with jax.numpy_dtype_promotion('standard'):
        u, opt = adam.update(jax.grad(loss)(s), opt, s)
      s = optax.apply_updates(s, u)
    sample = fedpm_lib._sample(s, streams[4])
    samples.append(sample)
  flat = np.stack([np.asarray(fedpm_lib.flatten_mask(jax.tree.map(lambda x: x[None], smp)))[0]
                   for smp in samples])
  np.testing.assert_array_equal(m['payload_masks'], flat)
  # The server: θ_g = mean of the smoothed samples (prior reset), s_g = logit(θ_g).
  theta = np.mean(np.where(flat, 0.99, 0.01), axis=0)
  got = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(new.scores)])
  np.testing.assert_allclose(got, np.log(theta / (1 - theta)), rtol=1e-5, atol=1e-5)
  # The frozen weights never change and the downlink is 32 bits per score.
  chex.assert_trees_all_equal(new.weights, state.weights)
  np.testing.assert_array_equal(m['bits_down'], [32 * P] * 2)


@pytest.mark.parametrize('prior', [1.0, 3.0])
@pytest.mark.parametrize('prior_reset, round_, accumulates', [
    ('every_round', 3, False), ('periodic', 14, False), ('periodic', 16, True),
    ('periodic', 20, False)])
def test_the_round_resets_the_prior_or_accumulates(prior_reset, round_, accumulates, prior):
  fd = tiny_federated(num_clients=4)
  alg = make_fedpm(clients_per_round=2, prior_reset=prior_reset, smoothing=0.1, prior=prior)
  state = alg.init(jax.random.key(0), init_params(), fd)
  # A posterior that has already seen samples: α = 3.5, β = 1.5 everywhere.
  state = state._replace(alpha=jax.tree.map(lambda a: a + 2.5, state.alpha),
                         beta=jax.tree.map(lambda b: b + 0.5, state.beta),
                         round=jnp.int32(round_))
  new, m = jax.jit(alg.round)(state, fd, jax.random.key(1))
  ones = np.sum(np.where(np.asarray(m['payload_masks']), 0.9, 0.1), axis=0)
  # A reset starts from the configured prior λ0 (α = β = λ0), whatever the state held.
  a, b = (prior + 2.5, prior + 0.5) if accumulates else (prior, prior)
  theta = (a + ones - 1) / (a + b + 2 - 2)  # K = 2 clients
  got = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(new.scores)])
  np.testing.assert_allclose(got, np.log(theta / (1 - theta)), rtol=1e-5, atol=1e-5)
  got_alpha = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(new.alpha)])
  np.testing.assert_allclose(got_alpha, a + ones, rtol=1e-6)


def test_host_bits_are_real_streams_that_decode_to_the_uploaded_masks():
  fd = tiny_federated(num_clients=4)
  state = make_fedpm().init(jax.random.key(0), init_params(), fd)
  for coder in fedpm_lib.UPLINK_CODERS:
    alg = make_fedpm(uplink_coder=coder)
    _, m = jax.jit(alg.round)(state, fd, jax.random.key(1))
    m = jax.device_get(m)
    host = alg.host_bits(m)
    theta = np.asarray(m['payload_theta'], np.float64)
    np.testing.assert_allclose(theta, 1 / (1 + np.exp(-np.concatenate(
        [np.asarray(x).reshape(-1) for x in jax.tree.leaves(state.scores)]))), rtol=1e-6)
    lengths = {'empirical': [], 'global': []}
    for mask in np.asarray(m['payload_masks']):
      code = comm.bernoulli_encode(mask)
      np.testing.assert_array_equal(comm.bernoulli_decode(code, P), mask)
      lengths['empirical'].append(code.bits)
      code = comm.bernoulli_encode(mask, theta)
      np.testing.assert_array_equal(comm.bernoulli_decode(code, P, theta), mask)
      lengths['global'].append(code.bits)
    np.testing.assert_array_equal(host['bits_up'], lengths[coder])
    assert host['uplink_bits_empirical'] == sum(lengths['empirical'])
    assert host['uplink_bits_global'] == sum(lengths['global'])
    assert host['uplink_bits_per_param'] == pytest.approx(sum(lengths[coder]) / (3 * P))
    assert host['uplink_entropy_bits'] == pytest.approx(sum(
        comm.bernoulli_entropy_bits(P, int(x.sum())) for x in np.asarray(m['payload_masks'])))
    np.testing.assert_array_equal(m['bits_up'], [0, 0, 0])  # all of it is on the host


def test_counts_downlink_is_the_coded_counts_that_rebuild_the_scores():
  fd = tiny_federated(num_clients=4)
  alg = make_fedpm(clients_per_round=3, downlink='counts')
  state = alg.init(jax.random.key(0), init_params(), fd)
  round_fn = jax.jit(alg.round)
  state1, m = round_fn(state, fd, jax.random.key(1))
  m = jax.device_get(m)
  np.testing.assert_array_equal(m['bits_down'], [0, 0, 0])
  np.testing.assert_array_equal(alg.host_bits(m)['bits_down'], [0, 0, 0])  # w0: the seed
  counts = np.asarray(m['payload_masks']).sum(axis=0)
  np.testing.assert_array_equal(state1.counts, counts)
  _, m2 = round_fn(state1, fd, jax.random.key(2))
  m2 = jax.device_get(m2)
  code = comm.categorical_encode(counts, 4)
  np.testing.assert_array_equal(alg.host_bits(m2)['bits_down'], [code.bits] * 3)
  assert code.bits < 2 * P + 4 * 8 + 32  # at most log2(K + 1) = 2 bits per parameter here
  # The decoded counts give the clients exactly the server's scores.
  decoded = comm.categorical_decode(code)
  theta = (0.99 * decoded + 0.01 * (3 - decoded)) / 3
  got = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(state1.scores)])
  np.testing.assert_allclose(got, np.log(theta / (1 - theta)), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="prior_reset='every_round'"):
    fedpm_lib.FedPMHparams(downlink='counts', prior_reset='periodic')


def test_no_retrace_and_same_key_same_numbers_and_client_keys_differ():
  fd = tiny_federated(num_clients=6)
  alg = make_fedpm(clients_per_round=3)
  state = alg.init(jax.random.key(0), init_params(), fd)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def round_fn(state, key):
    return alg.round(state, fd, key)

  a, ma = round_fn(state, jax.random.key(1))
  b, mb = round_fn(state, jax.random.key(1))
  chex.assert_trees_all_equal(a.scores, b.scores)
  np.testing.assert_array_equal(ma['payload_masks'], mb['payload_masks'])
  for t in range(2, 4):
    a, _ = round_fn(a, jax.random.key(t))
  # Three clients never upload the same sample (each has its own keys).
  masks_ = np.asarray(ma['payload_masks'])
  assert len({row.tobytes() for row in masks_}) == 3


def test_adam_state_kept_per_client_only_when_asked():
  fd = tiny_federated(num_clients=4)
  reset, kept = make_fedpm(clients_per_round=2), make_fedpm(clients_per_round=2,
                                                            adam_state='client')
  s_reset = reset.init(jax.random.key(0), init_params(), fd)
  s_kept = kept.init(jax.random.key(0), init_params(), fd)
  assert s_reset.client_opt is None
  chex.assert_trees_all_equal(s_kept.scores, s_reset.scores)
  key = jax.random.key(3)
  r1, m1 = jax.jit(reset.round)(s_reset, fd, key)
  k1, m2 = jax.jit(kept.round)(s_kept, fd, key)
  # First round: the same fresh moments, so the same samples.
  np.testing.assert_array_equal(m1['payload_masks'], m2['payload_masks'])
  clients = np.asarray(m2['clients'])
  counts = np.asarray(jax.tree.leaves(k1.client_opt)[0])  # Adam's step count per client
  steps = np.asarray(engine.client_steps(fd.client_size[jnp.asarray(clients)],
                                         engine.LocalConfig(batch_size=8, local_epochs=1))[1])
  np.testing.assert_array_equal(counts[clients], steps)
  assert np.all(np.delete(counts, clients) == 0)
  # Second round with the same cohort: the kept moments change what is trained.
  _, m1 = jax.jit(reset.round)(r1, fd, key)
  _, m2 = jax.jit(kept.round)(k1._replace(scores=r1.scores), fd, key)
  assert np.any(np.asarray(m1['payload_masks']) != np.asarray(m2['payload_masks']))


def test_kept_adam_states_go_to_their_clients_and_a_repeated_client_keeps_its_first_slot():
  stacked = {'mu': jnp.zeros((5, 2))}
  new = {'mu': jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])}
  out = fedpm_lib._keep_client_states(stacked, new, jnp.array([1, 3, 1, 0]))
  np.testing.assert_array_equal(out['mu'], [[4, 4], [1, 1], [0, 0], [2, 2], [0, 0]])
  out = jax.jit(fedpm_lib._keep_client_states)(stacked, new, jnp.array([2, 2, 2, 4]))
  np.testing.assert_array_equal(out['mu'], [[0, 0], [0, 0], [1, 1], [0, 0], [4, 4]])


def test_kept_adam_states_accumulate_per_client_over_rounds_with_other_cohorts():
  fd = tiny_federated(num_clients=5)
  alg = make_fedpm(clients_per_round=2, adam_state='client')
  state = alg.init(jax.random.key(0), init_params(), fd)
  local = engine.LocalConfig(batch_size=8, local_epochs=1)
  steps = np.asarray(engine.client_steps(fd.client_size, local)[1])
  assert len(set(steps.tolist())) > 1  # uneven clients: a state given to another client shows
  expected = np.zeros(5, np.int64)
  round_fn = jax.jit(alg.round)
  cohorts = set()
  for t in range(4):
    state, metrics = round_fn(state, fd, jax.random.key(10 + t))
    clients = np.asarray(metrics['clients'])
    cohorts.add(tuple(sorted(clients.tolist())))
    expected[clients] += steps[clients]
    counts = np.asarray(jax.tree.leaves(state.client_opt)[0])  # Adam's step count per client
    np.testing.assert_array_equal(counts, expected)
  assert len(cohorts) > 1


def test_eval_sampled_and_deterministic_models():
  fd = tiny_federated(num_clients=4)
  alg = make_fedpm()
  state = alg.init(jax.random.key(0), init_params(), fd)
  a = alg.eval_params(state, jax.random.key(1))
  chex.assert_trees_all_equal(a, alg.eval_params(state, jax.random.key(1)))
  b = alg.eval_params(state, jax.random.key(2))
  assert any(np.any(x != y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  det = alg.eval_variants(state, jax.random.key(1))['deterministic']
  for w, s, d in zip(jax.tree.leaves(state.weights), jax.tree.leaves(state.scores),
                     jax.tree.leaves(det)):
    np.testing.assert_array_equal(d, np.where(np.asarray(s) > 0, w, 0))


# --------------------------------------------------------------------------------------------------
# Runs and bad input.


def test_run_logs_coded_uplink_beside_its_estimate_and_resumes(tmp_path):
  config = load_config('mnist_fedpm')
  config.dataset, config.model, config.num_rounds = 'digits', 'mlp', 3
  config.checkpoint_every, config.local_epochs = 1, 1
  full = run_full_and_resumed(config, tmp_path)
  for row in full:
    assert row['bits_up'] == row['uplink_bits_empirical']
    assert abs(row['bits_up'] - row['uplink_entropy_bits']) < 0.01 * row['bits_up'] + 64 * 10
    assert 'deterministic/test_accuracy' in row or 'test_accuracy' not in row
  # The export: seed + one coded mask, which rebuilds the last evaluated network exactly.
  exp = train.build_experiment(config)
  for run in ('full', 'resumed'):
    loaded = fedpm_lib.load_model(tmp_path / run / train.MODEL_FILE, exp.params)
    ev = jax.device_get(exp.evaluate(loaded, exp.data))
    assert float(ev['test_accuracy']) == full[-1]['test_accuracy']
  with np.load(tmp_path / 'full' / train.MODEL_FILE) as f:
    exported = {k: f[k] for k in f.files}
  p = sum(np.size(w) for w in jax.tree.leaves(exp.params))
  assert fedpm_lib.exported_bits(exported) < 1.01 * p + 64 + 64
  assert fedpm_lib.exported_bits(exported) < p * 32 / 30
  small = {'Dense_0': {'kernel': jnp.zeros((64, 3)), 'bias': jnp.zeros(3)}}
  with pytest.raises(ValueError, match='another network'):
    fedpm_lib.load_model(exported, small)
  with pytest.raises(ValueError, match='Not a FedPM export'):
    fedpm_lib.load_model(dict(exported, format=np.array('x')), exp.params)
  # A file that is not this state's (a run cut before its export, an earlier run's) is rewritten
  # when the finished workdir is run again, and --overwrite deletes it with the rest.
  (tmp_path / 'resumed' / train.MODEL_FILE).write_bytes(b'stale')
  train.run(config, tmp_path / 'resumed')
  loaded = fedpm_lib.load_model(tmp_path / 'resumed' / train.MODEL_FILE, exp.params)
  assert float(jax.device_get(exp.evaluate(loaded, exp.data))['test_accuracy']) == (
      full[-1]['test_accuracy'])
  workdir.clear(tmp_path / 'resumed')
  assert not (tmp_path / 'resumed' / train.MODEL_FILE).exists()


@pytest.mark.slow
def test_kept_adam_states_and_accumulated_posteriors_resume_exactly(tmp_path):
  config = load_config('mnist_fedpm')
  config.dataset, config.model, config.batch_size, config.local_epochs = 'digits', 'mlp', 64, 1
  config.num_clients, config.clients_per_round, config.sample_with_replacement = 6, 4, True
  config.fedpm.adam_state, config.fedpm.prior_reset = 'client', 'periodic'
  # Cut at round 17: inside a period of the accumulating posterior (resets at 0-based 15, 20).
  config.num_rounds, config.checkpoint_every, config.eval_every = 19, 17, 17
  run_full_and_resumed(config, tmp_path, cut=17)


@pytest.mark.parametrize('kwargs, message', [
    ({'smoothing': 0.5}, r'smoothing must be in \(0, 0.5\)'),
    ({'prior': 0.5}, 'prior must be finite and >= 1'),
    ({'prior': float('inf')}, 'prior must be finite and >= 1'),
    ({'adam_eps': float('inf')}, 'adam_eps must be positive and finite'),
    ({'adam_eps': 0.0}, 'adam_eps must be positive and finite'),
    ({'prior_reset': 'never'}, 'valid: every_round, periodic'),
    ({'uplink_coder': 'huffman'}, 'valid: empirical, global'),
    ({'adam_state': 'server'}, 'valid: reset, client'),
    ({'downlink': 'sparse'}, 'valid: dense, counts'),
    ({'adam_b2': 1.0}, r'adam_b2 must be in \[0, 1\)'),
])
def test_bad_hyperparameters_fail_fast(kwargs, message):
  with pytest.raises(ValueError, match=message):
    fedpm_lib.FedPMHparams(**kwargs)


@pytest.mark.parametrize('key, value, message', [
    ('momentum', 0.9, 'momentum is a setting of the SGD clients'),
    ('weighted_aggregation', True, 'set weighted_aggregation=False'),
    ('server_optimizer', 'momentum', 'Beta posterior.*no server optimizer'),
    ('server_learning_rate', 0.5, 'Beta posterior.*no server optimizer'),
])
def test_settings_fedpm_does_not_use_are_refused(key, value, message, tmp_path):
  config = load_config('mnist_fedpm')
  config.dataset, config.model = 'digits', 'mlp'
  config[key] = value
  with pytest.raises(ValueError, match=message):
    train.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()
