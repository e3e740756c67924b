"""FedDST: schedules, client readjustment and server merge by hand, a round against a hand loop,
exact counts and bits every round, strategies agreeing, RandomMask, bad input."""

import importlib
import json
import math

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
from tests.test_ssfl import init_params, mlp_apply
from tests.test_train import load_config, read_rows, run_full_and_resumed
from tests.toy import STRATEGY_MAPPINGS, tiny_federated

# The module (the package re-exports the factory of the same name).
feddst_lib = importlib.import_module('fedsparse.algorithms.feddst')


def make_feddst(clients_per_round=3, mapping=engine.ClientMapping('sequential'), local_epochs=1,
                num_rounds=20, replace=False, **hparams):
  local = engine.LocalConfig(batch_size=4, local_epochs=local_epochs, momentum=0.9,
                             weight_decay=1e-3)
  hparams = {'sparsity': 0.5, 'allocation': 'uniform', 'alpha': 0.3, 'readjust_every': 1,
             **hparams}
  return algorithms.feddst(mlp_apply, cohort=engine.CohortConfig(clients_per_round, replace),
                           local=local, learning_rate=0.1, mapping=mapping,
                           num_rounds=num_rounds, **hparams)


def layer_counts(mask):
  return {name: int(np.sum(mask[name]['kernel'])) for name in ('hidden', 'out')}


# --------------------------------------------------------------------------------------------------
# Schedules.


def test_readjustment_schedule_by_hand():
  # The official code: 0-based rounds with (t - 1) % ΔR == 0, while t < R_end.
  assert feddst_lib.readjust_rounds(100, 10, 50) == [1, 11, 21, 31, 41]
  assert feddst_lib.readjust_rounds(100, 15, 200) == [1, 16, 31, 46, 61, 76, 91]
  assert feddst_lib.readjust_rounds(100, 0, 50) == []
  assert feddst_lib.readjust_rounds(4, 1, 50) == [1, 2, 3]
  assert feddst_lib.alpha_schedule(0, 0.05, 50) == pytest.approx(0.05)
  assert feddst_lib.alpha_schedule(25, 0.05, 50) == pytest.approx(0.025)
  assert feddst_lib.alpha_schedule(1, 0.05, 50) == pytest.approx(
      0.025 * (1 + math.cos(math.pi / 50)))
  assert feddst_lib.alpha_schedule(50, 0.05, 50) == 0.0
  assert feddst_lib.alpha_schedule(49, 0.05, 50, constant=True) == 0.05
  # keep floor((1 - α) k): 0.7 * 100 = 70 (not 69 by round-off), floor(0.7 * 7) = 4.
  assert feddst_lib.prune_counts([100, 7, 0], 0.3) == [30, 3, 0]
  assert feddst_lib.prune_counts([51200], 0.05) == [2560]
  assert feddst_lib.prune_counts([10], 0.0) == [0]


def test_proportional_allocation_by_hand():
  params = init_params()
  prunable = masks.prunable_leaves(params)
  d = masks.allocate_densities(params, prunable, 0.5, 'proportional')
  # ERK scores r = (16 + 8) / 128 and (8 + 3) / 24; sparsity s_l = c (1 - r_l) with
  # c = 0.5 * 152 / (128 (1 - r_1) + 24 (1 - r_2)) = 76 / 117.
  c = 76 / 117
  assert d['hidden']['kernel'] == pytest.approx(1 - c * (1 - 24 / 128))
  assert d['out']['kernel'] == pytest.approx(1 - c * (1 - 11 / 24))
  assert d['hidden']['bias'] == 1.0
  assert 128 * d['hidden']['kernel'] + 24 * d['out']['kernel'] == pytest.approx(76)


def test_mask_message_bits_by_hand():
  bits = comm.mask_encoding_bits([128, 24, 5, 1], [64, 12, 5, 0])
  assert bits['bitmap'] == 128 + 24 + 5 + 1
  assert bits['index_list'] == 64 * 7 + 12 * 5 + 5 * 3 + 0
  # C(24, 12) = 2,704,156 -> 22 bits; C(128, 64) ~ 2^124.2 -> 125; full and empty layers: 0.
  assert math.comb(24, 12) == 2704156
  assert bits['enumerative'] == math.ceil(math.log2(math.comb(128, 64))) + 22
  assert comm.mask_message_bits([128, 24, 5, 1], [64, 12, 5, 0]) == (
      bits['enumerative'], 'enumerative')
  assert comm.mask_message_bits([8], [8]) == (0, 'enumerative')  # bitmap 8, indices 24
  assert comm.mask_message_bits([1], [1]) == (0, 'index_list')  # 0 bits, tied: the first wins
  with pytest.raises(ValueError, match='cannot keep'):
    comm.mask_encoding_bits([4], [5])
  # The float estimate agrees with exact integers, powers of two included (C(8, 1) = 2^3).
  for n, k in ((8, 1), (16, 8), (1000, 3), (5000, 396), (4096, 1), (64, 32)):
    assert comm.enumerative_bits(n, k) == (math.comb(n, k) - 1).bit_length()


@pytest.mark.parametrize('seed', range(4))
def test_enumerative_code_round_trips_within_its_counted_length(seed):
  rng = np.random.default_rng(seed)
  for _ in range(25):
    n = int(rng.integers(1, 60))
    k = int(rng.integers(0, n + 1))
    mask = np.zeros(n, bool)
    mask[rng.choice(n, k, replace=False)] = True
    rank = comm.enumerative_encode(mask)
    assert rank.bit_length() <= comm.enumerative_bits(n, k)  # fits the counted bits
    np.testing.assert_array_equal(comm.enumerative_decode(rank, n, k), mask)
  with pytest.raises(ValueError, match='not in'):
    comm.enumerative_decode(math.comb(10, 3), 10, 3)


# --------------------------------------------------------------------------------------------------
# The client's readjustment and the server's merge, on tiny trees.


def test_client_readjust_by_hand():
  params = {'a': {'kernel': jnp.array([0.5, -0.1, 0.0, 0.3, 0.0, -0.2])},
            'a_bias': {'bias': jnp.array([1.0, 2.0])},
            'c': {'kernel': jnp.array([0.7, 0.2, 0.0])}}
  mask = {'a': {'kernel': jnp.array([1, 1, 0, 1, 0, 1], bool)},
          'a_bias': {'bias': jnp.ones(2, bool)},
          'c': {'kernel': jnp.array([1, 1, 0], bool)}}
  grad = {'a': {'kernel': jnp.array([9.0, 1.0, 5.0, -7.0, -6.0, 0.5])},
          'a_bias': {'bias': jnp.array([100.0, 100.0])},
          'c': {'kernel': jnp.array([0.0, 3.0, 1.0])}}
  prunable = {'a': {'kernel': True}, 'a_bias': {'bias': False}, 'c': {'kernel': True}}
  n = {'a': {'kernel': jnp.int32(2)}, 'a_bias': {'bias': jnp.int32(0)},
       'c': {'kernel': jnp.int32(1)}}
  new_params, new_mask, grown = jax.jit(
      lambda p, m, g, n: feddst_lib.client_readjust(p, m, g, n, prunable))(params, mask, grad, n)
  # Drop the 2 smallest active |w| (0.1 at 1, 0.2 at 5); regrow the 2 largest |grad| among the
  # inactive 1, 2, 4, 5 (|g| = 1, 5, 6, 0.5): entries 4 and 2, at weight 0.
  np.testing.assert_array_equal(new_mask['a']['kernel'], [1, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(grown['a']['kernel'], [0, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(new_params['a']['kernel'],
                                np.float32([0.5, 0, 0, 0.3, 0, 0]))
  np.testing.assert_array_equal(new_params['a_bias']['bias'], [1.0, 2.0])
  assert not np.any(grown['a_bias']['bias'])
  # In 'c' the entry just dropped (0.2 at 1) has the largest gradient: it regrows, at 0.
  np.testing.assert_array_equal(new_mask['c']['kernel'], [1, 1, 0])
  np.testing.assert_array_equal(grown['c']['kernel'], [0, 1, 0])
  np.testing.assert_array_equal(new_params['c']['kernel'], np.float32([0.7, 0, 0]))


def test_server_merge_by_hand():
  prunable = {'k': True, 'b': False}
  w = {'k': jnp.array([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0],
                       [3.0, -2.0, 0.0, 4.0, 0.0, 0.0],
                       [2.0, 0.0, 0.0, 0.0, 0.5, 0.0]]),
       'b': jnp.array([[1.0], [2.0], [4.0]])}
  m = {'k': jnp.array([[1, 1, 1, 0, 0, 0],
                       [1, 1, 0, 1, 0, 0],
                       [1, 0, 1, 0, 1, 0]], bool),  # client 2 regrew entry 2: it holds a 0
       'b': jnp.ones((3, 1), bool)}
  a = jnp.array([1.0, 2.0, 1.0])
  targets = {'k': 3, 'b': 1}
  merge = lambda w, m, a, targets, prunable, threshold: jax.jit(
      lambda w, m, a: feddst_lib.server_merge(w, m, a, targets, prunable, threshold))(w, m, a)
  # w̄ over holders: 9/4, (2 - 4)/3, 3/2, 8/2, 0.5/1, 0 (nobody); votes 1, 3/4, 1/2, 1/2, 1/4, 0.
  params, mask = merge(w, m, a, targets, prunable, 0.0)
  # Union: entries 0-4, pruned to 3 by |w̄|: entries 4 (0.5) and 1 (2/3) go.
  np.testing.assert_array_equal(mask['k'], [1, 0, 1, 1, 0, 0])
  np.testing.assert_allclose(params['k'], [2.25, 0, 1.5, 4, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(params['b'], [(1 + 4 + 4) / 4], rtol=1e-6)  # a plain mean
  assert bool(np.all(mask['b']))
  # Majority (votes > 1/2): entries 0 and 1 only; topped up by the largest |w̄| (entry 3).
  params, mask = merge(w, m, a, targets, prunable, 0.5)
  np.testing.assert_array_equal(mask['k'], [1, 1, 0, 1, 0, 0])
  np.testing.assert_allclose(params['k'], [2.25, -2 / 3, 0, 4, 0, 0], rtol=1e-6)


def test_server_merge_breaks_ties_between_regrown_zeros_by_votes():
  prunable = {'k': True}
  w = {'k': jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])}
  m = {'k': jnp.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0]], bool)}  # regrown: 1 once, 2 twice
  _, mask = feddst_lib.server_merge(w, m, jnp.ones(3), {'k': 2}, prunable)
  np.testing.assert_array_equal(mask['k'], [1, 0, 1, 0])  # by index it would keep entry 1


# --------------------------------------------------------------------------------------------------
# A round against a hand-written loop.


def hand_client(state, fd, local, key, client, counts, readjust_epoch, enforce):
  """One FedDST client in plain Python: SGD under the mask, readjust after one epoch."""
  opt = engine.client_optimizer(local, jnp.float32(0.1), 1)
  p, s, mask = state.params, opt.init(state.params), state.mask
  prunable = masks.prunable_leaves(p)
  batches = engine.client_minibatches(key, fd, client, local)
  spe = -(-int(fd.client_size[client]) // local.batch_size)
  grad = None
  for step, idx in enumerate(batches):
    batch = engine.gather_batch(fd, jnp.asarray(idx), jnp.ones(len(idx), bool))
    loss = lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        mlp_apply({'params': q}, batch.x), batch.y))
    effective = masks.apply(p, mask) if enforce == 'forward' else p
    grad = jax.grad(loss)(effective)  # dense: also at pruned entries
    g = masks.apply(grad, mask) if enforce == 'forward' else grad
    u, s = opt.update(g, s, p)
    p = optax.apply_updates(p, u)
    if enforce == 'step':
      p = masks.apply(p, mask)
    if (step + 1) % spe == 0 and step // spe == readjust_epoch and counts is not None:
      kept = masks.prune_smallest(p, mask, counts, prunable)
      mask, grown = masks.regrow(kept, counts, prunable, scores=jax.tree.map(jnp.abs, grad))
      p = masks.apply(jax.tree.map(lambda w, gr: jnp.where(gr, 0.0, w), p, grown), mask)
      s = masks.reset_moments(opt, s, grown)
  return masks.apply(p, mask), mask


@pytest.mark.parametrize('enforce, readjust_epoch, options', [
    ('step', -1, {}), ('step', 0, {}), ('forward', 0, {}),
    ('step', -1, {'constant_alpha': True, 'vote_threshold': 0.5})])
def test_round_matches_a_hand_written_loop(enforce, readjust_epoch, options):
  # Readjusting after the first of two epochs makes the regrown weights train, so a missing
  # moment reset, a wrong gradient or a missing re-mask shows in the numbers.
  fd = tiny_federated(num_clients=6)
  alg = make_feddst(local_epochs=2, mask_enforcement=enforce, readjust_epoch=readjust_epoch,
                    **options)
  local = engine.LocalConfig(batch_size=4, local_epochs=2, momentum=0.9, weight_decay=1e-3)
  round_fn = jax.jit(alg.round)
  state, metrics = round_fn(alg.init(jax.random.key(0), init_params(), fd), fd,
                            jax.random.key(7))
  assert float(metrics['readjusted']) == 0.0  # round 0 never readjusts
  key = jax.random.key(8)
  new_state, metrics = round_fn(state, fd, key)
  assert float(metrics['readjusted']) == 1.0
  alpha_1 = feddst_lib.alpha_schedule(1, 0.3, 10, options.get('constant_alpha', False))
  assert float(metrics['alpha']) == pytest.approx(alpha_1)
  ks = {'hidden': 64, 'out': 12}
  n = {name: feddst_lib.prune_counts([k], alpha_1)[0] for name, k in ks.items()}
  assert n == {'hidden': 64 - math.floor((1 - alpha_1) * 64), 'out': 12 - math.floor(
      (1 - alpha_1) * 12)}
  counts = {name: {'kernel': jnp.int32(n[name]), 'bias': jnp.int32(0)} for name in ks}
  drawn = engine.draw_cohort(key, fd.num_clients, engine.CohortConfig(3))
  outs = [hand_client(state, fd, local, drawn.keys[slot], int(c), counts,
                      1 if readjust_epoch < 0 else readjust_epoch, enforce)
          for slot, c in enumerate(np.asarray(drawn.clients))]
  for _, mask in outs:
    assert layer_counts(mask) == ks
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  sizes = jnp.asarray(fd.client_size)[drawn.clients].astype(jnp.float32)
  targets = {name: {'kernel': k, 'bias': 0} for name, k in ks.items()}
  params, mask = feddst_lib.server_merge(
      stack([o[0] for o in outs]), stack([o[1] for o in outs]), sizes / jnp.sum(sizes),
      targets, masks.prunable_leaves(state.params), options.get('vote_threshold', 0.0))
  chex.assert_trees_all_equal(new_state.mask, mask)
  chex.assert_trees_all_close(new_state.params, params, rtol=2e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Invariants and bits over a run.


@pytest.mark.parametrize('clients_per_round, replace', [(3, False), (5, True)])
def test_every_round_exact_counts_zeros_and_bits(clients_per_round, replace):
  # With replacement a client drawn twice is two participants: each slot pays its traffic.
  fd = tiny_federated(num_clients=6)
  alg = make_feddst(clients_per_round, readjust_every=2, readjust_end=5, num_rounds=8,
                    replace=replace)
  state = alg.init(jax.random.key(0), init_params(), fd)
  ks = {'hidden': 64, 'out': 12}
  mask_bits, encoding = comm.mask_message_bits([128, 24], [64, 12])
  values = 32 * (64 + 12 + 11)  # kept kernels + the 11 dense biases
  chex.clear_trace_counter()  # the other parametrization traced a function of the same code

  @jax.jit
  @chex.assert_max_traces(n=1)
  def round_fn(state, key):
    return alg.round(state, fd, key)

  held = np.zeros(6, int)  # the mask version each client holds, replayed by hand
  version, duplicates = 0, 0
  for t in range(8):
    old_mask = state.mask
    state, m = round_fn(state, jax.random.key(t))
    readjust = t in (1, 3)
    assert bool(m['readjusted']) == readjust
    assert float(m['alpha']) == pytest.approx(feddst_lib.alpha_schedule(t, 0.3, 5) * readjust)
    assert layer_counts(state.mask) == ks
    for name in ks:
      w, mk = np.asarray(state.params[name]['kernel']), np.asarray(state.mask[name]['kernel'])
      assert np.all(w[~mk] == 0)
    clients = np.asarray(m['clients'])
    duplicates += clients_per_round - len(set(clients.tolist()))
    np.testing.assert_array_equal(m['bits_up'],
                                  [values + readjust * mask_bits] * clients_per_round)
    np.testing.assert_array_equal(m['bits_down'], values + mask_bits * (held[clients] != version))
    assert int(m['mask_bits']) == mask_bits
    assert comm.MASK_ENCODINGS[int(m['mask_encoding'])] == encoding
    changed = not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old_mask),
                                                             jax.tree.leaves(state.mask)))
    assert changed == (float(m['mask_turnover']) > 0)
    assert not changed or readjust  # the mask moves on readjustment rounds only
    held[clients] = version
    version += changed
    assert int(state.mask_version) == version
    np.testing.assert_array_equal(state.client_mask_version, held)
  assert version > 0
  assert (duplicates > 0) == replace


@pytest.mark.parametrize('mapping', STRATEGY_MAPPINGS + [
    engine.ClientMapping('vmap', size_groups=2)])
def test_strategies_agree(mapping):
  fd = tiny_federated(num_clients=6)
  ref = make_feddst(local_epochs=2)
  alg = make_feddst(local_epochs=2, mapping=mapping)
  state = ref.init(jax.random.key(0), init_params(), fd)
  for t in range(3):
    expected, m_ref = jax.jit(ref.round)(state, fd, jax.random.key(t))
    got, m = jax.jit(alg.round)(state, fd, jax.random.key(t))
    chex.assert_trees_all_equal(got.mask, expected.mask)
    chex.assert_trees_all_close(got.params, expected.params, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(m['bits_up'], m_ref['bits_up'])
    state = expected


def test_dense_layers_do_not_readjust():
  # At sparsity 0.3, ERK makes the small 'out' kernel dense: it has nothing to regrow into, and
  # readjusting it would drop weights only to regrow the same entries at 0.
  fd = tiny_federated(num_clients=6)
  alg = make_feddst(sparsity=0.3, allocation='erk')
  state = alg.init(jax.random.key(0), init_params(), fd)
  assert bool(np.all(state.mask['out']['kernel']))
  round_fn = jax.jit(alg.round)
  for t in range(3):
    state, m = round_fn(state, fd, jax.random.key(t))
  assert float(m['readjusted']) == 1.0
  assert bool(np.all(state.mask['out']['kernel']))
  assert np.all(np.asarray(state.params['out']['kernel']) != 0)


def test_random_mask_baseline_is_static_and_exact():
  fd = tiny_federated(num_clients=6)
  spec = algorithms.registry.get('random_mask')
  common = algorithms.registry.Common(
      apply_fn=mlp_apply, cohort=engine.CohortConfig(3),
      local=engine.LocalConfig(batch_size=4), learning_rate=0.1, num_rounds=6)
  alg = spec.build(spec.hparams(sparsity=0.5, allocation='uniform'), common)
  state = alg.init(jax.random.key(0), init_params(), fd)
  magnitude = make_feddst().init(jax.random.key(0), init_params(), fd)
  assert not np.array_equal(state.mask['hidden']['kernel'], magnitude.mask['hidden']['kernel'])
  first = state.mask
  for t in range(4):
    state, m = jax.jit(alg.round)(state, fd, jax.random.key(t))
    chex.assert_trees_all_equal(state.mask, first)
    assert float(m['readjusted']) == 0 and int(state.mask_version) == 0
    np.testing.assert_array_equal(m['bits_up'], [32 * (64 + 12 + 11)] * 3)


def test_run_bits_and_resume(tmp_path):
  config = load_config('mnist_feddst')
  config.dataset, config.model = 'digits', 'mlp'
  config.num_rounds, config.checkpoint_every = 4, 1
  config.feddst.readjust_every, config.feddst.alpha = 1, 0.2
  config.feddst.readjust_end = 2  # explicit: the cut first invocation runs the same schedule
  full = run_full_and_resumed(config, tmp_path)
  exp = train.build_experiment(config)
  prunable = masks.prunable_leaves(exp.params)
  densities = masks.allocate_densities(exp.params, prunable, 0.2, 'erk')
  targets = masks.layer_counts(exp.params, prunable, densities)
  flags = jax.tree.leaves(prunable)
  ks = [k for k, f in zip(jax.tree.leaves(targets), flags) if f]
  sizes = [w.size for w, f in zip(jax.tree.leaves(exp.params), flags) if f]
  dense = sum(w.size for w, f in zip(jax.tree.leaves(exp.params), flags) if not f)
  values = 32 * (sum(ks) + dense) * config.clients_per_round
  mask_bits = comm.mask_message_bits(sizes, ks)[0]
  # R_end = 4 // 2: only round 1 readjusts.
  readjusted = [int(t in feddst_lib.readjust_rounds(4, 1, 2)) for t in range(4)]
  assert readjusted == [0, 1, 0, 0]
  for row, r in zip(full, readjusted):
    assert row['bits_up'] == values + r * mask_bits * config.clients_per_round
    extra = row['bits_down'] - values
    assert extra % mask_bits == 0 and 0 <= extra <= mask_bits * config.clients_per_round
    assert abs(row['density'] - sum(ks) / sum(sizes)) < 1e-6
  assert full[0]['bits_down'] == values  # everyone starts with the initial mask
  assert full[2]['bits_down'] > values  # after the readjustment, the new mask goes down


# --------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('kwargs, message', [
    ({'sparsity': 1.0}, 'sparsity must be in'),
    ({'sparsity': -0.1}, 'sparsity must be in'),
    ({'alpha': 1.5}, 'alpha must be in'),
    ({'vote_threshold': 1.0}, 'vote_threshold must be in'),
    ({'allocation': 'er'}, "Unknown allocation 'er'; valid: uniform, erk, proportional"),
    ({'initial_mask': 'grasp'}, 'valid: magnitude, random'),
    ({'mask_enforcement': 'both'}, 'valid: forward, step'),
    ({'readjust_every': -1}, 'readjust_every must be an integer >= 0'),
    ({'readjust_epoch': -2}, 'readjust_epoch must be an integer >= -1'),
    ({'readjust_epoch': 1}, 'below the 1 local epoch'),
    ({'constant_alpha': 'yes'}, 'constant_alpha must be a bool'),
])
def test_bad_hyperparameters_fail_fast(kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_feddst(**kwargs)


def test_bad_setups_fail_fast(tmp_path):
  with pytest.raises(ValueError, match='no server optimizer'):
    make_feddst(server_optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError, match='pass num_rounds'):
    make_feddst(num_rounds=None)
  with pytest.raises(ValueError, match='needs the federated data'):
    make_feddst().init(jax.random.key(0), init_params())
  config = load_config('mnist_feddst')
  config.dataset, config.model = 'digits', 'mlp'
  config.server_optimizer = 'momentum'
  with pytest.raises(train.UsageError, match='no server optimizer'):
    train.run(config, tmp_path / 'momentum')
  assert not (tmp_path / 'momentum').exists()
  config = load_config('mnist_feddst')
  config.dataset, config.model = 'digits', 'mlp'
  config.feddst.readjust_epoch = 1  # smoke: 1 local epoch
  with pytest.raises(train.UsageError, match='readjust_epoch'):
    train.run(config, tmp_path / 'epoch')


def test_default_readjust_end_is_recorded_and_a_resume_cannot_move_it(tmp_path):
  config = load_config('mnist_feddst')
  config.dataset, config.model = 'digits', 'mlp'
  config.num_rounds, config.checkpoint_every = 2, 1
  config.feddst.readjust_end = 0  # the default (the smoke config sets 2)
  train.run(config, tmp_path / 'run')
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['feddst']['readjust_end'] == 1  # num_rounds // 2
  config.num_rounds = 4  # would move R_end to 2
  with pytest.raises(train.UsageError, match='pass its recorded values: '
                     '--config.feddst.readjust_end=1'):
    train.run(config, tmp_path / 'run')
  config.feddst.readjust_end = 1  # as the message says: the run continues
  train.run(config, tmp_path / 'run')
  assert len(read_rows(tmp_path / 'run')) == 4
  # A one-round run records R_end = 1 (not 0, which would be "half the run" again).
  config.num_rounds, config.feddst.readjust_end = 1, 0
  train.run(config, tmp_path / 'one')
  saved = json.loads((tmp_path / 'one' / 'config.json').read_text())
  assert saved['feddst']['readjust_end'] == 1
