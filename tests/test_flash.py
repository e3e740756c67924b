"""FLASH: apportionment, stage-1 densities, NST and budget masks by hand, a round against a hand
loop for clients of different sizes, exact counts and bits every round, runs, bad input."""

import functools
import fractions
import importlib
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
from fedsparse import experiment
from fedsparse import masks
from fedsparse import train
from tests.test_ssfl import init_params, mlp_apply
from tests.test_train import load_config, read_rows, run_full_and_resumed
from tests.toy import STRATEGY_MAPPINGS, tiny_federated

# The module (the package re-exports the factory of the same name).
flash_lib = importlib.import_module('fedsparse.algorithms.flash')

SIZES = [128, 24]  # init_params' prunable kernels: hidden 16x8, out 8x3
DENSE = 11  # their biases


@functools.lru_cache(maxsize=None)  # one algorithm per setting: its jitted pieces compile once
def make_flash(mode='jmwst', clients_per_round=3, mapping=engine.ClientMapping('sequential'),
               local_epochs=2, momentum=0.0, weighted=False, **hparams):
  local = engine.LocalConfig(batch_size=4, local_epochs=local_epochs, momentum=momentum)
  hparams = {'density': 0.25, 'hunt_fraction': 0.5, 'hunt_epochs': 3, **hparams}
  return algorithms.flash(mlp_apply, cohort=engine.CohortConfig(clients_per_round,
                                                                weighted=weighted),
                          local=local, learning_rate=0.1, mapping=mapping, mode=mode, **hparams)


def layer_counts(mask):
  return [int(np.sum(mask[name]['kernel'])) for name in ('hidden', 'out')]


def stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


# --------------------------------------------------------------------------------------------------
# Apportionment and stage-1 densities.


@pytest.mark.parametrize('total, shares, caps, expected', [
    (10, [1, 1, 2], [100, 100, 100], [3, 2, 5]),  # quotas 2.5, 2.5, 5: the tie goes by index
    (10, [1, 1, 8], [100, 100, 4], [3, 3, 4]),  # the cap cuts 4, shared again 1:1
    (9, [1, 2, 3], [2, 100, 100], [2, 3, 4]),  # floors 1, 3, 4; remainders .5, 0, .5: index
    (7, [0, 0, 0], [1, 2, 3], [1, 2, 3]),  # no shares: by the caps
    (5, [float('nan'), -1, 1], [10, 10, 10], [0, 0, 5]),  # bad shares count as 0
    (50, [1, 1, 1], [3, 4, 5], [3, 4, 5]),  # more than the caps hold: clipped
    (0, [1, 2, 3], [9, 9, 9], [0, 0, 0]),
])
def test_apportion_by_hand(total, shares, caps, expected):
  got = jax.jit(masks.apportion)(jnp.int32(total), jnp.asarray(shares, jnp.float32),
                                 jnp.asarray(caps, jnp.int32))
  assert got.tolist() == expected


@pytest.mark.parametrize('seed', range(20))
def test_apportion_properties(seed):
  rng = np.random.default_rng(seed)
  num = int(rng.integers(1, 8))
  caps = rng.integers(0, 2000, num)
  shares = rng.exponential(1.0, num) * (rng.random(num) < 0.8)
  total = int(rng.integers(0, caps.sum() + 2))
  got = np.asarray(masks.apportion(total, jnp.asarray(shares, jnp.float32),
                                   jnp.asarray(caps, jnp.int32)))
  assert got.sum() == min(total, caps.sum())
  assert np.all(got >= 0) and np.all(got <= caps)
  if shares.sum() > 0 and np.all(total * shares / shares.sum() < caps):
    # No cap binds: every part within 1 of its quota.
    assert np.all(np.abs(got - total * shares / shares.sum()) < 1 + 1e-3)
  # Monotone in the shares: a part with a larger share never gets less, unless capped.
  for i in range(num):
    for j in range(num):
      if shares[i] > shares[j] and got[i] < caps[i] and shares.sum() > 0:
        assert got[i] >= got[j] - 1


def test_hunted_counts_rescale_with_the_cap_by_hand():
  # Mean counts 9, 12, 4 (sum 25) rescaled to K = 0.2 * 150 = 30: ratio 1.2 gives 10.8, 14.4,
  # 4.8; the first layer is capped at its 10 entries and the 20 left go 12 : 4 = 15 and 5.
  counts = jnp.array([[8, 10, 6], [10, 14, 2]])
  assert flash_lib.hunted_counts(counts, [10, 100, 40], 30).tolist() == [10, 15, 5]
  # Without a cap: 2 : 6 : 2 of K = 15 (densities 0.1 of 150).
  assert flash_lib.hunted_counts(jnp.array([[2, 6, 2]]), [10, 100, 40], 15).tolist() == [
      3, 9, 3]


# --------------------------------------------------------------------------------------------------
# NST and budget masks by hand.


def nst_tree():
  a = jnp.array([[0.5, -0.1, 0.0, 2.0], [-3.0, 0.2, 0.0, 0.4]])
  b = jnp.array([[1.0, 0.0], [-5.0, 3.0], [0.0, 0.0]])
  params = {'a': {'kernel': a, 'bias': jnp.ones(2)}, 'b': {'kernel': b, 'bias': jnp.ones(2)}}
  mask = {'a': {'kernel': a != 0, 'bias': jnp.ones(2, bool)},
          'b': {'kernel': b != 0, 'bias': jnp.ones(2, bool)}}
  return params, mask


def test_nst_prune_regrow_by_hand():
  params, mask = nst_tree()
  prunable = masks.prunable_leaves(params)
  # Layer a: 6 active, mean |w| = 6.2 / 6; drops ceil(0.25 * 6) = 2 (-0.1 and 0.2).
  # Layer b: 3 active, mean |w| = 3; drops ceil(0.25 * 3) = 1 (1.0).
  # 3 regrow in proportion 1.0333 : 3, capped at the inactive entries (a: 4, b: 4):
  # quotas 0.77, 2.23 -> floors 0, 2 and the larger remainder (a) gets the last: a 1, b 2.
  new_params, new_mask, grown = flash_lib.nst_prune_regrow(params, mask, 0.25, prunable,
                                                            jax.random.key(0))
  assert layer_counts_ab(new_mask) == (5, 4)
  assert layer_counts_ab(grown) == (1, 2)
  a_mask, b_mask = np.asarray(new_mask['a']['kernel']), np.asarray(new_mask['b']['kernel'])
  a_grown, b_grown = np.asarray(grown['a']['kernel']), np.asarray(grown['b']['kernel'])
  # The survivors keep their values; the dropped are gone unless regrown; regrown are 0.
  np.testing.assert_array_equal(a_mask & ~a_grown, [[1, 0, 0, 1], [1, 0, 0, 1]])
  np.testing.assert_array_equal(b_mask & ~b_grown, [[0, 0], [1, 1], [0, 0]])
  assert np.all(np.asarray(new_params['a']['kernel'])[a_grown] == 0)
  assert np.all(np.asarray(new_params['b']['kernel'])[b_grown] == 0)
  np.testing.assert_array_equal(np.asarray(new_params['a']['kernel'])[a_mask & ~a_grown],
                                np.float32([0.5, 2.0, -3.0, 0.4]))
  assert np.all(np.asarray(new_params['b']['kernel'])[~b_mask] == 0)
  # Regrown entries were inactive after the drop (the dropped ones are candidates too).
  assert not np.any(a_grown & np.asarray(mask['a']['kernel']) & (np.abs(
      np.asarray(params['a']['kernel'])) > 0.3))
  chex.assert_trees_all_equal(new_params['a']['bias'], params['a']['bias'])
  # Rate 0 changes nothing; the regrowth is random: another key, other positions.
  same = flash_lib.nst_prune_regrow(params, mask, 0.0, prunable, jax.random.key(0))
  chex.assert_trees_all_equal(same[1], mask)
  draws = {tuple(np.flatnonzero(flash_lib.nst_prune_regrow(
      params, mask, 0.25, prunable, jax.random.key(s))[2]['b']['kernel']))
      for s in range(8)}
  assert len(draws) > 1


@pytest.mark.parametrize('b, expected', [
    # b's mean |w| over its 2 active entries is 2 (a's 6.2 / 6): 1 : 2 of the 3 dropped. A sum
    # (6.2 : 4) or a mean over all entries (0.775 : 0.667) would give a 2 and b 1.
    ([3.0, 1.0, 0, 0, 0, 0], (1, 2)),
    # Measured before the drop (b: 4.55) it is 1 : 2; after it (b keeps 9) it would be 0 : 3.
    ([9.0, 0.1, 0, 0, 0, 0], (1, 2)),
])
def test_nst_regrowth_follows_the_mean_over_active_entries_before_the_drop(b, expected):
  params, mask = nst_tree()
  params['b']['kernel'] = jnp.asarray(b, jnp.float32).reshape(3, 2)
  mask['b']['kernel'] = params['b']['kernel'] != 0
  _, _, grown = flash_lib.nst_prune_regrow(params, mask, 0.25, masks.prunable_leaves(params),
                                           jax.random.key(0))
  assert layer_counts_ab(grown) == expected


def test_nst_regrowth_is_capped_and_a_regrown_dropped_weight_restarts_at_zero():
  # b is fully active: it drops its smallest (5.0) and, whatever its share, can regrow only
  # into that one entry, which must come back at 0; a takes the rest of the 3 dropped.
  params, mask = nst_tree()
  params['b']['kernel'] = jnp.array([[10.0, -20.0], [30.0, 5.0]])
  mask['b']['kernel'] = jnp.ones((2, 2), bool)
  new_params, new_mask, grown = flash_lib.nst_prune_regrow(
      params, mask, 0.25, masks.prunable_leaves(params), jax.random.key(0))
  assert layer_counts_ab(grown) == (2, 1)
  np.testing.assert_array_equal(new_mask['b']['kernel'], np.ones((2, 2), bool))
  np.testing.assert_array_equal(new_params['b']['kernel'], [[10.0, -20.0], [30.0, 0.0]])


def test_counted_mask_bits_by_hand():
  # Counts take ceil(log2(n + 1)) bits: 11 for n = 1024 (not 10), 5 for n = 16.
  assert comm.counted_mask_bits([1024], [0]) == 11
  assert comm.counted_mask_bits([1000, 16], [2, 16]) == 10 + 19 + 5 + 0
  assert comm.counted_mask_bits([100], [50]) == 7 + 97


def layer_counts_ab(mask):
  return int(np.sum(mask['a']['kernel'])), int(np.sum(mask['b']['kernel']))


def test_nst_prune_count_is_exact():
  # 0.225 * 400 = 90 exactly, but 0.225 is not a float32: the count must still be 90 (not 91),
  # whether the rate is a Python number or a traced fraction.
  w = jnp.arange(1.0, 801.0).reshape(20, 40)
  mask = w <= 400
  params, m = {'k': {'kernel': w}}, {'k': {'kernel': mask}}
  prunable = masks.prunable_leaves(params)
  nst = jax.jit(lambda p, m, r, k: flash_lib.nst_prune_regrow(p, m, r, prunable, k))
  _, _, grown = nst(params, m, (jnp.int32(9), jnp.int32(40)), jax.random.key(1))
  assert int(np.sum(grown['k']['kernel'])) == 90
  _, new_mask, grown = flash_lib.nst_prune_regrow(params, m, 0.225, prunable, jax.random.key(1))
  assert int(np.sum(grown['k']['kernel'])) == 90
  assert int(np.sum(new_mask['k']['kernel'] & ~mask)) <= 90  # regrowth is among the inactive
  assert flash_lib.rate_fraction(0.225) == fractions.Fraction(9, 40)
  assert flash_lib.rate_fraction(0.25 * (1 - 3 / 7)) == fractions.Fraction(1, 7)


def test_prune_counts_are_exact_where_float32_is_not():
  # 999/4000 of 402,999 is 100,649 + 1/4000: float32 (spacing 1/128 there) cannot see the
  # 1/4000 above an integer, so a float formula drops 100,649 (or misrounds exact cases).
  nnz = 402_999
  assert nnz * 999 % 4000 == 1
  assert int(flash_lib.prune_counts(jnp.int32(nnz), 999, 4000)) == nnz * 999 // 4000 + 1
  assert int(flash_lib.prune_counts(jnp.int32(nnz - 1), 999, 4000)) == -(-(nnz - 1) * 999 // 4000)
  rng = np.random.default_rng(0)
  nnz = np.concatenate([rng.integers(0, 1 << 24, 2000), rng.integers(0, 1000, 2000)])
  den = np.concatenate([rng.integers(1, 10**8, 2000), rng.integers(1, 50, 2000)])
  num = (rng.random(4000) * den).astype(np.int64)
  num[::7] = den[::7]  # rate 1
  num[::11] = 0
  got = np.asarray(jax.jit(flash_lib.prune_counts)(jnp.asarray(nnz, jnp.int32),
                                                    jnp.asarray(num, jnp.int32),
                                                    jnp.asarray(den, jnp.int32)))
  np.testing.assert_array_equal(got, -(-nnz * num // den))


def test_budget_masks_by_hand():
  params, mask = nst_tree()
  prunable = masks.prunable_leaves(params)
  stacked = flash_lib.budget_masks(params, mask, (0.5, 0.75, 1.0), prunable)
  a = np.asarray(stacked['a']['kernel'])
  b = np.asarray(stacked['b']['kernel'])
  assert a.shape == (3, 2, 4)
  # a has 6: 0.5 keeps 3 (|-3|, |2|, |0.5|), 0.75 keeps floor(4.5) = 4 (+ 0.4).
  np.testing.assert_array_equal(a[0], [[1, 0, 0, 1], [1, 0, 0, 0]])
  np.testing.assert_array_equal(a[1], [[1, 0, 0, 1], [1, 0, 0, 1]])
  np.testing.assert_array_equal(a[2], np.asarray(mask['a']['kernel']))
  # b has 3: 0.5 keeps 1 (-5), 0.75 keeps floor(2.25) = 2 (-5, 3).
  np.testing.assert_array_equal(b[0], [[0, 0], [1, 0], [0, 0]])
  np.testing.assert_array_equal(b[1], [[0, 0], [1, 1], [0, 0]])
  assert np.all(np.asarray(stacked['a']['bias']))


def test_slot_and_client_budgets():
  assert flash_lib.slot_budgets(10, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
  assert flash_lib.slot_budgets(3, 3).tolist() == [0, 1, 2]
  with pytest.raises(ValueError, match='at least one cohort slot per budget'):
    flash_lib.slot_budgets(2, 3)
  budgets = np.asarray(flash_lib._client_budgets(jax.random.key(0), 100, 3))
  assert np.bincount(budgets).tolist() == [34, 33, 33]
  other = np.asarray(flash_lib._client_budgets(jax.random.key(1), 100, 3))
  assert not np.array_equal(budgets, other)


# --------------------------------------------------------------------------------------------------
# Stage 1.


@pytest.mark.parametrize('mode', ['spdst', 'jmwst'])
def test_stage1_draws_a_random_mask_of_exactly_the_hunted_counts(mode):
  fd = tiny_federated(num_clients=6)
  alg = make_flash(mode)
  w0 = init_params()
  state = alg.init(jax.random.key(0), w0, fd)
  hunters = np.asarray(state.hunters)
  assert len(hunters) == 3 and len(set(hunters.tolist())) == 3  # floor(0.5 * 6), distinct
  counts = np.asarray(state.hunt_counts)
  assert counts.shape == (3, 2)
  # Every hunter started at the uniform 32 + 6 = 38 and NST kept its total exact, while the
  # layers' shares moved.
  np.testing.assert_array_equal(counts.sum(axis=1), [38, 38, 38])
  assert np.any(counts[:, 0] != 32)
  expected = flash_lib.hunted_counts(counts, SIZES, masks.keep_count(0.25, sum(SIZES))).tolist()
  assert sum(expected) == masks.keep_count(0.25, 152)
  assert layer_counts(state.mask) == expected
  # The model restarts from w0 under the new mask; every client must download that mask.
  chex.assert_trees_all_equal(state.params, masks.apply(w0, state.mask))
  assert np.all(np.asarray(state.client_mask_version) == -1)
  # Same key, same hunt; another key, other hunters or counts.
  again = alg.init(jax.random.key(0), w0, fd)
  chex.assert_trees_all_equal(again.mask, state.mask)
  other = alg.init(jax.random.key(5), w0, fd)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(other.mask),
                                                       jax.tree.leaves(state.mask)))


def test_stage1_hunters_run_nst_for_hunt_epochs_by_hand():
  # The hunters' uploaded counts, replayed with the hand loop: hunt_epochs local epochs (not the
  # rounds' one, whose single mid-run prune would give other counts), a prune after each but the
  # last, one key per hunter.
  fd = tiny_federated(num_clients=6)
  alg = make_flash('spdst', local_epochs=1, hunt_epochs=3)
  # A large output layer draws regrowth from the hidden one at every prune (mean |w| shares), so
  # the counts tell how many prunes ran: 2 here, 3 for a program that prunes mid-epoch.
  w0 = init_params()
  w0['out']['kernel'] = 10.0 * w0['out']['kernel']
  key = jax.random.key(0)
  state = alg.init(key, w0, fd)
  start_key, hunter_key, client_key, _, _ = jax.random.split(key, 5)
  prunable = masks.prunable_leaves(w0)
  start = masks.random_mask(start_key, w0, prunable, 0.25, 'layerwise', 'uniform')
  hunters = np.asarray(jax.random.permutation(hunter_key, 6)[:3])
  np.testing.assert_array_equal(state.hunters, hunters)
  keys = jax.random.split(client_key, 3)
  hunt_local = engine.LocalConfig(batch_size=4, local_epochs=3)
  for i, client in enumerate(hunters):
    _, mask, events = hand_client(w0, start, fd, hunt_local, keys[i], int(client), True)
    assert len(events) == 2
    assert layer_counts(mask) == np.asarray(state.hunt_counts[i]).tolist()
  # The drawn mask has the hunted counts at random positions: neither the start mask nor
  # w0's largest weights.
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.mask),
                                                       jax.tree.leaves(start)))
  top = masks.layerwise_topk_traced(jax.tree.map(jnp.abs, w0), prunable,
                                    masks.layer_count_tree(state.mask, prunable))
  assert not np.array_equal(top['hidden']['kernel'], state.mask['hidden']['kernel'])


def test_stage1_hunters_train_with_keys_of_their_own(monkeypatch):
  # Hunters' counts barely depend on their keys (the counts test above cannot see a shared key),
  # so watch the keys the hunt hands to the engine: one per hunter, all different.
  seen = []
  real = flash_lib.run_clients

  def spy(program, shared, clients, keys, *args):
    jax.debug.callback(lambda k: seen.append(np.asarray(k)), jax.random.key_data(keys))
    return real(program, shared, clients, keys, *args)

  monkeypatch.setattr(flash_lib, 'run_clients', spy)
  alg = make_flash.__wrapped__('spdst', hunt_fraction=0.5)  # built after the patch: not cached
  alg.init(jax.random.key(0), init_params(), tiny_federated(num_clients=6))
  assert len(seen) == 1 and seen[0].shape[0] == 3
  assert len({row.tobytes() for row in seen[0]}) == 3


def test_pdst_is_a_uniform_static_mask_from_the_seed():
  fd = tiny_federated(num_clients=6)
  alg = make_flash('pdst')
  state = alg.init(jax.random.key(0), init_params(), fd)
  assert layer_counts(state.mask) == [32, 6]
  assert state.hunters.tolist() == [-1]  # no hunters
  assert np.all(np.asarray(state.client_mask_version) == 0)  # nothing to download
  mask0 = state.mask
  for t in range(3):
    state, m = jax.jit(alg.round)(state, fd, jax.random.key(t))
    chex.assert_trees_all_equal(state.mask, mask0)
    bits = alg.host_bits(jax.device_get(m))
    assert not np.any(bits['bits_up']) and not np.any(bits['bits_down'])
    np.testing.assert_array_equal(m['bits_up'], [32 * (38 + DENSE)] * 3)
    np.testing.assert_array_equal(m['bits_down'], [32 * (38 + DENSE)] * 3)


# --------------------------------------------------------------------------------------------------
# A round against a hand-written loop, clients of different sizes in one cohort.


def hand_client(params, mask, fd, local, key, client, nst):
  """One FLASH client in plain Python: SGD re-masked every step, NST at its own epoch ends."""
  opt = engine.client_optimizer(local, jnp.float32(0.1), 1)
  p = masks.apply(params, mask)
  s = opt.init(p)
  prunable = masks.prunable_leaves(p)
  batches = engine.client_minibatches(key, fd, client, local)
  spe = -(-int(fd.client_size[client]) // local.batch_size)
  total = len(batches)
  assert total == spe * local.local_epochs
  streams = engine.client_streams(key)
  events = []

  @jax.jit
  def sgd_step(p, s, mask, idx):
    batch = engine.gather_batch(fd, idx, jnp.ones(idx.shape, bool))
    loss = lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        mlp_apply({'params': q}, batch.x), batch.y))
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return masks.apply(optax.apply_updates(p, u), mask), s

  for step, idx in enumerate(batches):
    p, s = sgd_step(p, s, mask, jnp.asarray(idx))
    epoch, within = divmod(step, spe)
    prune_key = None
    if local.local_epochs == 1 and within == spe // 2:
      prune_key = jax.random.split(jax.random.fold_in(streams[2], step), 3)[2]
    elif local.local_epochs > 1 and within == spe - 1 and epoch < local.local_epochs - 1:
      prune_key = jax.random.fold_in(streams[3], epoch)
    if nst and prune_key is not None:
      rate = 0.25 * (1 - (step + 1) / total)
      events.append(rate)
      p, mask, grown = flash_lib.nst_prune_regrow(p, mask, rate, prunable, prune_key)
      s = masks.reset_moments(opt, s, grown)
  return masks.apply(p, mask), mask, events


def top_k_by_hand(x, k):
  flat = np.abs(np.asarray(x)).reshape(-1)
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind='stable')[:k]] = True
  return keep.reshape(np.shape(x))


@pytest.mark.parametrize('local_epochs, aggregation, momentum', [
    (1, 'mean', 0.0), (3, 'masked_mean', 0.9)])
def test_jmwst_round_matches_a_hand_written_loop(local_epochs, aggregation, momentum):
  fd = tiny_federated(num_clients=6)
  sizes = np.asarray(fd.client_size)
  alg = make_flash('jmwst', local_epochs=local_epochs, aggregation=aggregation,
                   momentum=momentum, weighted=aggregation == 'masked_mean')
  local = engine.LocalConfig(batch_size=4, local_epochs=local_epochs, momentum=momentum)
  state = alg.init(jax.random.key(0), init_params(), fd)
  key = jax.random.key(3)
  new_state, metrics = jax.jit(alg.round)(state, fd, key)
  drawn = engine.draw_cohort(key, fd.num_clients, engine.CohortConfig(3))
  clients = np.asarray(drawn.clients)
  assert len(set(sizes[clients].tolist())) > 1  # clients of different sizes
  outs = [hand_client(state.params, state.mask, fd, local, drawn.keys[slot], int(c), True)
          for slot, c in enumerate(clients)]
  for (_, mask, events), c in zip(outs, clients):
    assert len(events) == (1 if local_epochs == 1 else local_epochs - 1)
    assert sum(layer_counts(mask)) == sum(layer_counts(state.mask))  # NST keeps the total
    if local_epochs == 1:  # the rate depends on the client's own step count
      spe = -(-int(sizes[c]) // 4)
      assert events == [pytest.approx(0.25 * (1 - (spe // 2 + 1) / spe))]
  client_counts = np.array([layer_counts(o[1]) for o in outs])
  np.testing.assert_array_equal(metrics['payload_up_counts'], client_counts)
  client_params = stack([o[0] for o in outs])
  if aggregation == 'mean':
    averaged = jax.tree.map(lambda x: jnp.mean(x, axis=0), client_params)
  else:
    w = sizes[clients].astype(np.float32)
    averaged = masks.masked_weighted_mean(client_params, stack([o[1] for o in outs]),
                                          jnp.asarray(w / w.sum()))
  counts = flash_lib.hunted_counts(client_counts, SIZES,
                                  masks.keep_count(0.25, sum(SIZES))).tolist()
  assert layer_counts(new_state.mask) == counts
  for name, k in zip(('hidden', 'out'), counts):
    np.testing.assert_array_equal(new_state.mask[name]['kernel'],
                                  top_k_by_hand(averaged[name]['kernel'], k))
    np.testing.assert_allclose(new_state.params[name]['kernel'],
                               np.where(new_state.mask[name]['kernel'],
                                        averaged[name]['kernel'], 0), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.params[name]['bias'], averaged[name]['bias'],
                               rtol=2e-5, atol=1e-6)


def test_spdst_round_is_static_mask_fedavg_of_the_weights():
  # No NST after stage 1: clients keep the mask, and the server's mean is of the weights.
  fd = tiny_federated(num_clients=6)
  alg = make_flash('spdst', local_epochs=2)
  local = engine.LocalConfig(batch_size=4, local_epochs=2)
  state = alg.init(jax.random.key(0), init_params(), fd)
  key = jax.random.key(4)
  new_state, _ = jax.jit(alg.round)(state, fd, key)
  drawn = engine.draw_cohort(key, fd.num_clients, engine.CohortConfig(3))
  outs = [hand_client(state.params, state.mask, fd, local, drawn.keys[slot], int(c), False)
          for slot, c in enumerate(np.asarray(drawn.clients))]
  for _, mask, events in outs:
    assert events == []
    chex.assert_trees_all_equal(mask, state.mask)
  expected = jax.tree.map(lambda *xs: sum(xs) / 3, *[o[0] for o in outs])
  chex.assert_trees_all_equal(new_state.mask, state.mask)
  chex.assert_trees_all_close(new_state.params, expected, rtol=2e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Invariants and bits over rounds.


@pytest.mark.parametrize('mode, hetero, assignment, interval', [
    ('spdst', False, 'slot', 1), ('jmwst', False, 'slot', 2), ('jmwst', True, 'slot', 1),
    ('spdst', True, 'client', 1)])
def test_every_round_exact_counts_zeros_and_bits(mode, hetero, assignment, interval):
  fd = tiny_federated(num_clients=6)
  alg = make_flash(mode, clients_per_round=3, local_epochs=1, hetero=hetero,
                   budget_assignment=assignment, mask_interval=interval)
  state = alg.init(jax.random.key(0), init_params(), fd)
  total = masks.keep_count(0.25, 152)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def round_fn(state, key):
    return alg.round(state, fd, key)

  held = np.full(6, -1)
  version, turnovers = 0, []
  hunt_bits = np.zeros(6, np.int64)
  for client, counts in zip(np.asarray(state.hunters), np.asarray(state.hunt_counts)):
    hunt_bits[client] = comm.counted_mask_bits(SIZES, counts)
  prunable = masks.prunable_leaves(state.params)
  fractions = (0.5, 0.75, 1.0) if hetero else (1.0,)
  for t in range(5):
    old = state
    state, m = round_fn(state, jax.random.key(t))
    m = jax.device_get(m)
    nst = mode == 'jmwst' and t % interval == 0
    if not hetero:
      budget = np.zeros(3, int)
    elif assignment == 'slot':
      budget = flash_lib.slot_budgets(3, 3)
    else:
      budget = np.asarray(state.client_budget)[np.asarray(m['clients'])]
    host = alg.host_bits(m)
    assert sum(layer_counts(state.mask)) == total
    assert [m['layer_density/hidden/kernel'], m['layer_density/out/kernel']] == pytest.approx(
        [layer_counts(state.mask)[0] / 128, layer_counts(state.mask)[1] / 24])
    for name in ('hidden', 'out'):
      w, mk = np.asarray(state.params[name]['kernel']), np.asarray(state.mask[name]['kernel'])
      assert np.all(w[~mk] == 0)
    if not nst:
      chex.assert_trees_all_equal(state.mask, old.mask)
    clients = np.asarray(m['clients'])
    # Down: the values of the slot's budget mask, and that mask when the client lacks it.
    stacked = flash_lib.budget_masks(old.params, old.mask, fractions, prunable)
    down_counts = [layer_counts(jax.tree.map(lambda x: x[b], stacked)) for b in budget]
    for b, counts in zip(budget, down_counts):
      assert counts == [math.floor(fractions[b] * k * (1 + 1e-6))
                        for k in layer_counts(old.mask)]
    sent = [(held[c] != version) if fractions[b] == 1 else True
            for c, b in zip(clients, budget)]
    np.testing.assert_array_equal(m['bits_down'], [32 * (sum(c) + DENSE) for c in down_counts])
    np.testing.assert_array_equal(
        host['bits_down'], [s * comm.counted_mask_bits(SIZES, c) for s, c in zip(sent, down_counts)])
    # Up: the values of the client's own mask, and in JMWST that mask (NST keeps its total).
    up_counts = np.asarray(m['payload_up_counts'])
    np.testing.assert_array_equal(up_counts.sum(axis=1), [sum(c) for c in down_counts])
    if not nst:  # no NST: every layer comes back with exactly the counts it went out with
      np.testing.assert_array_equal(up_counts, down_counts)
    np.testing.assert_array_equal(m['bits_up'], 32 * (up_counts.sum(axis=1) + DENSE))
    np.testing.assert_array_equal(
        host['bits_up'], [comm.counted_mask_bits(SIZES, c) * nst for c in up_counts])
    # Stage 1's mask uploads, once, from the hunters.
    np.testing.assert_array_equal(host['bits_up_all'], hunt_bits * (t == 0))
    for c, b in zip(clients, budget):
      if fractions[b] == 1:
        held[c] = version
    version += int(not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(old.mask), jax.tree.leaves(state.mask))))
    # Turnover: the share of the K mask entries that are new this round.
    gained = sum(int(np.sum(np.asarray(a) & ~np.asarray(b))) for a, b in zip(
        jax.tree.leaves(state.mask), jax.tree.leaves(old.mask)))
    assert m['mask_turnover'] == pytest.approx(gained / total, abs=1e-7)
    turnovers.append(gained)
    assert int(state.mask_version) == version
    np.testing.assert_array_equal(state.client_mask_version, held)
  assert (version > 0) == (mode == 'jmwst')
  assert (sum(turnovers) > 0) == (mode == 'jmwst')


def test_hetero_clients_train_under_their_budget_and_budgets_stay_with_clients():
  fd = tiny_federated(num_clients=6)
  alg = make_flash('spdst', clients_per_round=4, hetero=True)
  state = alg.init(jax.random.key(0), init_params(), fd)
  budgets = np.asarray(state.client_budget)
  assert np.bincount(budgets, minlength=3).tolist() == [2, 2, 2]
  for t in range(3):
    state, m = jax.jit(alg.round)(state, fd, jax.random.key(t))
    np.testing.assert_array_equal(state.client_budget, budgets)
    full = layer_counts(state.mask)
    for c, counts in zip(np.asarray(m['clients']), np.asarray(m['payload_up_counts'])):
      beta = (0.5, 0.75, 1.0)[budgets[c]]
      assert counts.tolist() == [math.floor(beta * k * (1 + 1e-6)) for k in full]
  variants = alg.eval_variants(state, jax.random.key(0))
  assert sorted(variants) == ['budget_0.5', 'budget_0.75']
  assert layer_counts(masks_of(variants['budget_0.5'])) == [
      math.floor(0.5 * k) for k in layer_counts(state.mask)]
  assert make_flash('spdst').eval_variants(state, jax.random.key(0)) == {}


def masks_of(params):
  return jax.tree.map(lambda w: w != 0, params)


@pytest.mark.parametrize('mapping', [m for m in STRATEGY_MAPPINGS if m.batches_clients])
def test_strategies_agree(mapping):
  # The reference runs clients one after another; the batched strategies must agree with it.
  fd = tiny_federated(num_clients=6)
  # One local epoch: the prune in the middle of each client's own run.
  ref = make_flash('jmwst', local_epochs=1)
  alg = make_flash('jmwst', mapping=mapping, local_epochs=1)
  state = ref.init(jax.random.key(0), init_params(), fd)
  other = alg.init(jax.random.key(0), init_params(), fd)
  chex.assert_trees_all_equal(other.mask, state.mask)
  for t in range(2):
    expected, m_ref = jax.jit(ref.round)(state, fd, jax.random.key(t))
    got, m = jax.jit(alg.round)(state, fd, jax.random.key(t))
    chex.assert_trees_all_equal(got.mask, expected.mask)
    chex.assert_trees_all_close(got.params, expected.params, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(m['payload_up_counts'], m_ref['payload_up_counts'])
    state = expected


def test_exclude_layers_stay_dense():
  fd = tiny_federated(num_clients=6)
  alg = make_flash('jmwst', exclude_layers='^out/')
  state = alg.init(jax.random.key(0), init_params(), fd)
  assert layer_counts(state.mask) == [32, 24]  # out: dense; hidden: 0.25 of 128
  state, m = jax.jit(alg.round)(state, fd, jax.random.key(0))
  assert layer_counts(state.mask)[1] == 24 and layer_counts(state.mask)[0] == 32
  np.testing.assert_array_equal(m['bits_up'], [32 * (32 + 24 + DENSE)] * 3)


# --------------------------------------------------------------------------------------------------
# Runs.


@pytest.mark.slow
def test_run_bits_budgets_and_resume(tmp_path):
  config = load_config('mnist_flash')
  config.dataset, config.model = 'digits', 'mlp'
  config.flash.exclude_layers = ''
  config.flash.mode, config.flash.hetero = 'jmwst', True
  config.flash.hunt_epochs = 2
  config.num_rounds, config.checkpoint_every, config.eval_every = 4, 1, 2
  full = run_full_and_resumed(config, tmp_path)
  exp = train.build_experiment(config)
  state = exp.algorithm.init(experiment.algorithm_key(config.seed), exp.params, exp.data)
  prunable = masks.prunable_leaves(exp.params)
  sizes = [w.size for w, f in zip(jax.tree.leaves(exp.params), jax.tree.leaves(prunable)) if f]
  hunt = sum(comm.counted_mask_bits(sizes, c) for c in np.asarray(state.hunt_counts))
  assert hunt > 0
  # Replayed round by round from the run's keys: the run's totals are exactly the formulas.
  dense = sum(w.size for w, f in zip(jax.tree.leaves(exp.params), jax.tree.leaves(prunable))
              if not f)
  k_total = masks.keep_count(config.flash.density, sum(sizes))
  round_fn = jax.jit(exp.algorithm.round)
  held, version = {}, 0
  budgets = np.asarray(state.client_budget)
  for t, row in enumerate(full):
    old = state
    state, m = round_fn(state, exp.data, experiment.round_key(config.seed, t))
    assert row['train_loss'] == pytest.approx(float(m['train_loss']), rel=1e-6)  # the same run
    clients = np.asarray(m['clients']).tolist()
    up, down = np.asarray(m['payload_up_counts']), np.asarray(m['payload_down_counts'])
    # JMWST, mask_interval 1: every client uploads its values and its NST mask every round.
    assert row['bits_up'] == sum(32 * (int(c.sum()) + dense) + comm.counted_mask_bits(sizes, c)
                                 for c in up) + hunt * (t == 0)
    # Down: the values under the client's budget mask, plus that mask unless it is the full one
    # and the client already holds the current version.
    sent = [budgets[c] < 2 or held.get(c) != version for c in clients]
    assert row['bits_down'] == sum(32 * (int(c.sum()) + dense) + s * comm.counted_mask_bits(
        sizes, c) for c, s in zip(down, sent))
    assert sum(sent) > 0 and row['bits_down'] > 0
    for c in clients:
      if budgets[c] == 2:
        held[c] = version
    version += int(any(np.any(a != b) for a, b in zip(jax.tree.leaves(old.mask),
                                                       jax.tree.leaves(state.mask))))
    assert abs(row['density'] - k_total / sum(sizes)) < 1e-6
  assert version > 0
  for row in full[1::2]:
    for name in ('budget_0.5', 'budget_0.75'):
      assert 0 <= row[f'{name}/test_accuracy'] <= 1


@pytest.mark.parametrize('mode', ['pdst', 'spdst'])
def test_run_bits_are_exact(tmp_path, mode):
  # Replayed from the run's own cohorts: values both ways, the hunters' masks at round 1, the
  # SPDST mask at each client's first participation; PDST's mask is free (the shared seed).
  config = load_config('mnist_flash')
  config.dataset, config.model = 'digits', 'mlp'
  config.flash.exclude_layers, config.flash.mode = '^Dense_1/', mode
  config.flash.hunt_epochs = 2
  config.num_rounds, config.checkpoint_every = 3, 1
  train.run(config, tmp_path / 'run')
  exp = train.build_experiment(config)
  state = exp.algorithm.init(experiment.algorithm_key(config.seed), exp.params, exp.data)
  prunable = masks.prunable_leaves(exp.params, lambda path, leaf: masks.default_prunable(
      path, leaf) and path[0] != 'Dense_1')
  leaves, flags = jax.tree.leaves(exp.params), jax.tree.leaves(prunable)
  sizes = [w.size for w, f in zip(leaves, flags) if f]
  dense = sum(w.size for w, f in zip(leaves, flags) if not f)
  counts = [int(np.sum(m)) for m, f in zip(jax.tree.leaves(state.mask), flags) if f]
  if mode == 'pdst':
    assert counts == [masks.keep_count(config.flash.density, n) for n in sizes]
  values = 32 * (sum(counts) + dense)
  hunt = sum(comm.counted_mask_bits(sizes, c) for c in np.asarray(state.hunt_counts)
             if mode == 'spdst')
  seen = set()
  cohort = engine.CohortConfig(config.clients_per_round, config.sample_with_replacement)
  for t, row in enumerate(read_rows(tmp_path / 'run')):
    clients = np.asarray(engine.draw_cohort(experiment.round_key(config.seed, t),
                                            exp.data.num_clients, cohort).clients).tolist()
    new = len(set(clients) - seen) if mode == 'spdst' else 0
    seen |= set(clients)
    assert row['bits_up'] == values * len(clients) + hunt * (t == 0)
    assert row['bits_down'] == values * len(clients) + new * comm.counted_mask_bits(sizes, counts)
  assert (tmp_path / 'run' / train.CHECKPOINT_DIR).is_dir()


# --------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('kwargs, message', [
    ({'mode': 'nst'}, "Unknown mode 'nst'; valid: spdst, jmwst, pdst"),
    ({'density': 0.0}, r'density must be in \(0, 1\]'),
    ({'hunt_fraction': 1.5}, r'hunt_fraction must be in \(0, 1\]'),
    ({'prune_rate': 1.0}, r'prune_rate must be in \[0, 1\)'),
    ({'hunt_epochs': 0}, 'hunt_epochs must be an integer >= 1'),
    ({'mask_interval': 0}, 'mask_interval must be an integer >= 1'),
    ({'aggregation': 'sum'}, 'valid: mean, masked_mean'),
    ({'budget_assignment': 'device'}, 'valid: client, slot'),
    ({'hetero': 'yes'}, 'hetero must be a bool'),
    ({'hetero': True, 'budgets': 'half,1'}, 'budgets must be comma-separated numbers'),
    ({'hetero': True, 'budgets': '0.5,0.75'}, 'increasing fractions of the density ending at 1'),
    ({'hetero': True, 'budgets': '1,0.5'}, 'increasing fractions'),
    ({'hetero': True, 'budgets': '0,1'}, r'every budget must be in \(0, 1\]'),
    ({'exclude_layers': 'out/('}, 'is not a regular expression'),
    ({'mask_enforcement': 'both'}, 'valid: forward, step'),
])
def test_bad_hyperparameters_fail_fast(kwargs, message):
  with pytest.raises(ValueError, match=message):
    algorithms.FLASHHparams(**kwargs)


def test_bad_setups_fail_fast(tmp_path):
  fd = tiny_federated(num_clients=6)
  with pytest.raises(ValueError, match='has no server optimizer'):
    algorithms.flash(mlp_apply, cohort=engine.CohortConfig(3), local=engine.LocalConfig(),
                     learning_rate=0.1, server_optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError, match='at least one cohort slot per budget'):
    make_flash(clients_per_round=2, hetero=True, budget_assignment='slot')
  with pytest.raises(ValueError, match='excludes every prunable leaf .hidden/kernel, out/kernel'):
    make_flash(exclude_layers='kernel').init(jax.random.key(0), init_params(), fd)
  # 152 prunable weights: the hint is the smallest density that keeps one, and it does.
  with pytest.raises(ValueError, match='keeps no weight of the 152 prunable ones; use at least '
                                       '0.0066'):
    make_flash(density=0.001).init(jax.random.key(0), init_params(), fd)
  make_flash(density=0.0066).init(jax.random.key(0), init_params(), fd)
  # PDST's per-layer floor: 0.01 keeps 1 of the 128 hidden weights but none of the 24 out ones.
  with pytest.raises(ValueError, match="keeps no weight of out/kernel under PDST"):
    make_flash('pdst', density=0.01).init(jax.random.key(0), init_params(), fd)
  with pytest.raises(ValueError, match='needs the federated data'):
    make_flash().init(jax.random.key(0), init_params(), None)
  config = load_config('mnist_flash')
  config.dataset, config.model = 'digits', 'mlp'
  config.server_optimizer = 'momentum'
  with pytest.raises(train.UsageError, match='has no server optimizer'):
    train.run(config, tmp_path / 'x')
  assert not (tmp_path / 'x' / 'metrics.jsonl').exists()
