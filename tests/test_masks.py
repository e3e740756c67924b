"""Masks: prunable leaves, keep counts, ERK allocation, exact top-k, random masks, DST steps."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsparse import masks


def small_cnn():
  """A tiny conv + dense + GroupNorm tree (shapes only matter; values are distinct)."""
  shapes = {'Conv_0': {'kernel': (3, 3, 1, 4), 'bias': (4,)},
            'Dense_0': {'kernel': (8, 2), 'bias': (2,)},
            'GroupNorm_0': {'scale': (4,), 'bias': (4,)}}
  return jax.tree.map(lambda s: jnp.arange(math.prod(s), dtype=jnp.float32).reshape(s) + 1.0,
                      shapes, is_leaf=lambda x: isinstance(x, tuple))


def two_kernels():
  """Two prunable kernels, 1x3 and 2x2 (7 entries), and a bias that stays dense."""
  params = {'a': {'kernel': jnp.array([[0.5, 2.0, 1.0]], jnp.float32)},
            'b': {'kernel': jnp.array([[3.0, 0.1], [1.5, 0.2]], jnp.float32),
                  'bias': jnp.array([-9.0, 9.0], jnp.float32)}}
  return params, masks.prunable_leaves(params)


# ------------------------------------------------------------------------------------------------
# Structure and bookkeeping.


def test_prunable_leaves_picks_kernels_only():
  prunable = masks.prunable_leaves(small_cnn())
  assert prunable == {'Conv_0': {'kernel': True, 'bias': False},
                      'Dense_0': {'kernel': True, 'bias': False},
                      'GroupNorm_0': {'scale': False, 'bias': False}}
  assert all(type(f) is bool for f in jax.tree.leaves(prunable))


def test_prunable_leaves_ignores_1d_kernels_and_nests_under_params():
  params = {'params': {'Dense_0': {'kernel': jnp.zeros((3, 2))}, 'Odd': {'kernel': jnp.zeros(5)}}}
  assert masks.prunable_leaves(params) == {
      'params': {'Dense_0': {'kernel': True}, 'Odd': {'kernel': False}}}


def test_prunable_leaves_predicate_override_sees_string_paths():
  seen = []

  def predicate(path, leaf):
    seen.append(path)
    return path[0] == 'GroupNorm_0' and leaf.ndim == 1

  prunable = masks.prunable_leaves(small_cnn(), predicate)
  assert prunable['GroupNorm_0'] == {'scale': True, 'bias': True}
  assert not prunable['Conv_0']['kernel'] and not prunable['Dense_0']['kernel']
  assert ('Conv_0', 'kernel') in seen and ('GroupNorm_0', 'scale') in seen


def test_prunable_leaves_raises_when_none():
  with pytest.raises(ValueError, match='No prunable'):
    masks.prunable_leaves({'b': jnp.zeros(3)})
  with pytest.raises(ValueError, match='No prunable'):
    masks.prunable_leaves(small_cnn(), lambda path, leaf: False)


def test_ones_like_apply_count_density():
  params, prunable = two_kernels()
  mask = masks.ones_like(params)
  assert all(m.dtype == jnp.bool_ and m.all() for m in jax.tree.leaves(mask))
  mask['a']['kernel'] = jnp.array([[False, True, False]])
  mask['b']['kernel'] = jnp.array([[True, False], [False, False]])
  pruned = masks.apply(params, mask)
  np.testing.assert_array_equal(pruned['a']['kernel'], [[0.0, 2.0, 0.0]])
  np.testing.assert_array_equal(pruned['b']['kernel'], [[3.0, 0.0], [0.0, 0.0]])
  np.testing.assert_array_equal(pruned['b']['bias'], [-9.0, 9.0])
  assert pruned['a']['kernel'].dtype == jnp.float32
  half = masks.apply({'w': jnp.array([1.5, -2.0], jnp.bfloat16)}, {'w': jnp.array([True, False])})
  assert half['w'].dtype == jnp.bfloat16 and float(half['w'][1]) == 0.0

  assert masks.num_prunable(params, prunable) == 7
  c = masks.count(mask, prunable)
  assert c.dtype == jnp.int32 and int(c) == 2
  assert int(masks.count(mask)) == 4  # + the two bias entries.
  d = masks.density(mask, prunable)
  assert d.dtype == jnp.float32 and float(d) == pytest.approx(2 / 7)
  assert float(jax.jit(lambda m: masks.density(m, prunable))(mask)) == pytest.approx(2 / 7)


def test_structure_mismatch_raises():
  params, _ = two_kernels()
  with pytest.raises(ValueError, match='structure'):
    masks.num_prunable(params, {'a': {'kernel': True}})


# ------------------------------------------------------------------------------------------------
# Keep counts and allocation.


def test_keep_count():
  assert masks.keep_count(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in floats.
  assert masks.keep_count(0.05, 261840) == 13092
  assert masks.keep_count(1.0, 37) == 37
  assert masks.keep_count(0.5, 7) == 3  # floor.
  assert masks.keep_count(0.01, 50) == 0
  assert masks.keep_count(0.5, 0) == 0
  for bad in (0.0, -0.1, 1.5, float('nan'), True):
    with pytest.raises(ValueError, match=r'\(0, 1\]'):
      masks.keep_count(bad, 10)


def test_layer_counts():
  params = small_cnn()
  prunable = masks.prunable_leaves(params)
  counts = masks.layer_counts(params, prunable, 0.5)
  assert counts == {'Conv_0': {'kernel': 18, 'bias': 4}, 'Dense_0': {'kernel': 8, 'bias': 2},
                    'GroupNorm_0': {'scale': 4, 'bias': 4}}
  densities = masks.allocate_densities(params, prunable, 0.5)
  densities['Dense_0']['kernel'] = 0.25
  assert masks.layer_counts(params, prunable, densities)['Dense_0']['kernel'] == 4


def test_allocate_uniform():
  params = small_cnn()
  prunable = masks.prunable_leaves(params)
  d = masks.allocate_densities(params, prunable, 0.3)
  assert d == {'Conv_0': {'kernel': 0.3, 'bias': 1.0}, 'Dense_0': {'kernel': 0.3, 'bias': 1.0},
               'GroupNorm_0': {'scale': 1.0, 'bias': 1.0}}


def test_allocate_erk_hand_computed():
  # A: (10, 10), n = 100, raw = 20 / 100 = 0.2.  B: (2, 50), n = 100, raw = 52 / 100 = 0.52.
  # Budget 0.3 * 200 = 60 = eps * (0.2 * 100 + 0.52 * 100) = 72 eps  =>  eps = 60 / 72 = 5 / 6.
  # d_A = 0.2 * 5/6 = 1/6, d_B = 0.52 * 5/6 = 13/30; both below 1, so no layer turns dense.
  params = {'A': {'kernel': jnp.zeros((10, 10))}, 'B': {'kernel': jnp.zeros((2, 50))},
            'B_bias': {'bias': jnp.zeros(50)}}
  prunable = masks.prunable_leaves(params)
  d = masks.allocate_densities(params, prunable, 0.3, method='erk')
  assert d['A']['kernel'] == pytest.approx(1 / 6)
  assert d['B']['kernel'] == pytest.approx(13 / 30)
  assert d['B_bias']['bias'] == 1.0
  assert 100 * d['A']['kernel'] + 100 * d['B']['kernel'] == pytest.approx(60)

  # erk_power_scale = 0 makes every raw score 1: the uniform allocation.
  d0 = masks.allocate_densities(params, prunable, 0.3, method='erk', erk_power_scale=0.0)
  assert d0['A']['kernel'] == pytest.approx(0.3) and d0['B']['kernel'] == pytest.approx(0.3)


def test_allocate_erk_makes_tiny_layer_dense():
  # C: (2, 2), n = 4, raw = 4 / 4 = 1.  D: (20, 20), n = 400, raw = 40 / 400 = 0.1.
  # Budget 0.5 * 404 = 202. First pass: eps = 202 / (4 + 40) = 4.59, so d_C = 4.59 > 1: C dense.
  # Second pass: eps = (202 - 4) / 40 = 4.95, d_D = 0.495; kept 4 + 0.495 * 400 = 202.
  params = {'C': {'kernel': jnp.zeros((2, 2))}, 'D': {'kernel': jnp.zeros((20, 20))}}
  prunable = masks.prunable_leaves(params)
  d = masks.allocate_densities(params, prunable, 0.5, method='erk')
  assert d['C']['kernel'] == 1.0
  assert d['D']['kernel'] == pytest.approx(0.495)


def test_allocate_erk_budget_on_conv_net():
  params = {'Conv_0': {'kernel': jnp.zeros((3, 3, 1, 8))},
            'Conv_1': {'kernel': jnp.zeros((3, 3, 8, 16))},
            'Dense_0': {'kernel': jnp.zeros((64, 10))}, 'Dense_0_b': {'bias': jnp.zeros(10)}}
  prunable = masks.prunable_leaves(params)
  for density in (0.05, 0.2, 0.5, 0.9, 1.0):
    d = masks.allocate_densities(params, prunable, density, method='erk')
    kept = sum(dl * w.size for dl, w, f in zip(jax.tree.leaves(d), jax.tree.leaves(params),
                                               jax.tree.leaves(prunable)) if f)
    assert kept == pytest.approx(density * (72 + 1152 + 640), rel=1e-9)
    assert all(0.0 < dl <= 1.0 for dl in jax.tree.leaves(d))
  # The first conv (raw (3+3+1+8)/72) is the densest, the big conv the sparsest.
  d = masks.allocate_densities(params, prunable, 0.2, method='erk')
  assert d['Conv_0']['kernel'] > d['Dense_0']['kernel'] > d['Conv_1']['kernel']


def test_allocate_rejects_bad_inputs():
  params, prunable = two_kernels()
  with pytest.raises(ValueError, match='valid: uniform, erk, proportional'):
    masks.allocate_densities(params, prunable, 0.5, method='snip')
  with pytest.raises(ValueError, match=r'\(0, 1\]'):
    masks.allocate_densities(params, prunable, 0.0)


# ------------------------------------------------------------------------------------------------
# Selections.


def test_topk_mask_ties():
  s = jnp.array([3.0, 1.0, 3.0, 2.0, 3.0], jnp.float32)
  np.testing.assert_array_equal(masks.topk_mask(s, 2), [True, False, True, False, False])
  np.testing.assert_array_equal(masks.topk_mask(s, 2, ties='keep'),
                                [True, False, True, False, True])
  np.testing.assert_array_equal(masks.topk_mask(s, 4), [True, False, True, True, True])
  np.testing.assert_array_equal(masks.topk_mask(s, 0), [False] * 5)
  np.testing.assert_array_equal(masks.topk_mask(s, 0, ties='keep'), [False] * 5)
  np.testing.assert_array_equal(masks.topk_mask(s, 5), [True] * 5)
  np.testing.assert_array_equal(masks.topk_mask(s, 9), [True] * 5)
  # Negative scores, integer dtypes (including the most negative int) and 2-D shapes.
  np.testing.assert_array_equal(masks.topk_mask(-s, 1), [False, True, False, False, False])
  ints = jnp.array([[np.iinfo(np.int32).min, 5], [5, -1]], jnp.int32)
  np.testing.assert_array_equal(masks.topk_mask(ints, 3), [[False, True], [True, True]])
  np.testing.assert_array_equal(masks.topk_mask(ints, 1), [[False, True], [False, False]])
  np.testing.assert_array_equal(masks.topk_mask(jnp.array([1, 7, 7], jnp.uint8), 1),
                                [False, True, False])


def test_topk_mask_exact_count_with_many_ties():
  scores = jax.random.randint(jax.random.key(0), (6, 7), 0, 4).astype(jnp.float32)
  for k in (1, 5, 13, 20, 41):
    m = jax.jit(lambda s, k=k: masks.topk_mask(s, k))(scores)
    assert m.shape == scores.shape and int(m.sum()) == k
    # Every kept score beats or ties every dropped one.
    assert float(scores[m].min()) >= float(scores[~m].max())
    kept_keep = masks.topk_mask(scores, k, ties='keep')
    assert int(kept_keep.sum()) >= k and bool(jnp.all(kept_keep | ~m))


def test_topk_mask_rejects_bad_inputs():
  with pytest.raises(ValueError, match='valid: index, keep'):
    masks.topk_mask(jnp.ones(3), 1, ties='random')
  with pytest.raises(ValueError, match='non-negative'):
    masks.topk_mask(jnp.ones(3), -1)


def test_global_topk_exact_positions():
  params, prunable = two_kernels()
  # Prunable entries in leaf order: a = [0.5, 2.0, 1.0], b = [3.0, 0.1, 1.5, 0.2]. 7 entries at
  # density 0.5 keep 3: 3.0, 2.0, 1.5. The bias scores (+-9) would win if they were not ignored.
  m = masks.global_topk(params, prunable, 0.5)
  np.testing.assert_array_equal(m['a']['kernel'], [[False, True, False]])
  np.testing.assert_array_equal(m['b']['kernel'], [[True, False], [True, False]])
  np.testing.assert_array_equal(m['b']['bias'], [True, True])
  assert int(masks.count(m, prunable)) == masks.keep_count(0.5, 7)
  # Ties across leaves: the earlier leaf in jax.tree.leaves order wins.
  ties = {'a': {'kernel': jnp.array([[1.0, 0.0, 0.0]])},
          'b': {'kernel': jnp.array([[1.0, 0.0], [0.0, 1.0]]), 'bias': jnp.zeros(2)}}
  m = jax.jit(lambda s: masks.global_topk(s, prunable, 2 / 7))(ties)
  np.testing.assert_array_equal(m['a']['kernel'], [[True, False, False]])
  np.testing.assert_array_equal(m['b']['kernel'], [[True, False], [False, False]])
  m = masks.global_topk(ties, prunable, 2 / 7, ties='keep')
  np.testing.assert_array_equal(m['b']['kernel'], [[True, False], [False, True]])


@pytest.mark.parametrize('ties', masks.TIES)
def test_global_topk_traced_one_compile_for_every_count(ties):
  """A traced k: one compilation, exactly the static selection at every k (ties included)."""
  _, prunable = two_kernels()
  rng = np.random.default_rng(0)
  # Scores drawn from {0, 1, 2}: many ties, across and within leaves.
  scores = {'a': {'kernel': jnp.asarray(rng.integers(0, 3, (1, 3)), jnp.float32)},
            'b': {'kernel': jnp.asarray(rng.integers(0, 3, (2, 2)), jnp.float32),
                  'bias': jnp.array([9.0, -9.0])}}
  traces = []

  @jax.jit
  def select(s, k):
    traces.append(k)
    return masks.global_topk_traced(s, prunable, k, ties)
  for k in range(8):
    got = select(scores, jnp.int32(k))
    flat = jnp.concatenate([scores['a']['kernel'].ravel(), scores['b']['kernel'].ravel()])
    want = masks.topk_mask(flat, k, ties)
    np.testing.assert_array_equal(
        jnp.concatenate([got['a']['kernel'].ravel(), got['b']['kernel'].ravel()]), want, str(k))
    np.testing.assert_array_equal(got['b']['bias'], [True, True])
    if ties == 'index':
      assert int(masks.count(got, prunable)) == k
  assert len(traces) == 1
  # k = 0 keeps nothing and k >= P everything, under either rule.
  assert int(masks.count(select(scores, jnp.int32(0)), prunable)) == 0
  assert int(masks.count(select(scores, jnp.int32(99)), prunable)) == 7


def test_random_scores_draw_random_masks_of_any_count():
  params = small_cnn()
  prunable = masks.prunable_leaves(params)
  key = jax.random.key(3)
  scores = masks.random_scores(key, params, prunable)
  # The same key gives random_mask's mask, whether its counts are static or traced.
  counts = masks.layer_counts(params, prunable, 0.3)
  np.testing.assert_equal(
      jax.tree.map(np.asarray, masks.layerwise_topk_traced(scores, prunable, counts)),
      jax.tree.map(np.asarray, masks.random_mask(key, params, prunable, 0.3, 'layerwise')))
  k = masks.keep_count(0.3, masks.num_prunable(params, prunable))
  np.testing.assert_equal(
      jax.tree.map(np.asarray, masks.global_topk_traced(scores, prunable, jnp.int32(k))),
      jax.tree.map(np.asarray, masks.random_mask(key, params, prunable, 0.3, 'global')))
  assert all(float(jnp.max(s)) == 0.0 for s, f in zip(jax.tree.leaves(scores),
                                                        jax.tree.leaves(prunable)) if not f)


def test_global_topk_mixed_dtypes():
  params, prunable = two_kernels()
  params['a']['kernel'] = params['a']['kernel'].astype(jnp.bfloat16)
  m = masks.global_topk(params, prunable, 0.5)
  np.testing.assert_array_equal(m['a']['kernel'], [[False, True, False]])


def test_layerwise_topk_counts():
  params = small_cnn()
  prunable = masks.prunable_leaves(params)
  scores = jax.tree.map(lambda w: -w, params)  # Smallest index = largest score.
  m = masks.layerwise_topk(scores, prunable, 0.25)
  assert int(m['Conv_0']['kernel'].sum()) == 9  # floor(0.25 * 36)
  np.testing.assert_array_equal(m['Dense_0']['kernel'].reshape(-1), [True] * 4 + [False] * 12)
  assert bool(m['GroupNorm_0']['scale'].all()) and bool(m['Dense_0']['bias'].all())
  densities = masks.allocate_densities(params, prunable, 0.3, method='erk')
  m = jax.jit(lambda s: masks.layerwise_topk(s, prunable, densities))(scores)
  counts = masks.layer_counts(params, prunable, densities)
  assert jax.tree.map(lambda x: int(x.sum()), m) == counts


# ------------------------------------------------------------------------------------------------
# Random masks.


def test_random_mask_exact_counts_and_determinism():
  params = small_cnn()
  prunable = masks.prunable_leaves(params)
  sample = jax.jit(lambda k: masks.random_mask(k, params, prunable, 0.3))
  m1, m2, m3 = sample(jax.random.key(1)), sample(jax.random.key(1)), sample(jax.random.key(2))
  assert int(masks.count(m1, prunable)) == masks.keep_count(0.3, 52)
  assert bool(m1['Conv_0']['bias'].all()) and bool(m1['GroupNorm_0']['scale'].all())
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), m1, m2))
  assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), m1, m3))

  for allocation in masks.ALLOCATIONS:
    m = masks.random_mask(jax.random.key(3), params, prunable, 0.3, scope='layerwise',
                          allocation=allocation)
    counts = masks.layer_counts(params, prunable, masks.allocate_densities(
        params, prunable, 0.3, method=allocation))
    assert jax.tree.map(lambda x: int(x.sum()), m) == counts


def test_random_mask_inclusion_is_uniform():
  params = {'x': {'kernel': jnp.zeros((2, 3))},
            'y': {'kernel': jnp.zeros((3, 2)), 'bias': jnp.zeros(2)}}
  prunable = masks.prunable_leaves(params)
  keys = jax.random.split(jax.random.key(0), 2000)
  x_counts = {}
  for scope, p in (('global', 4 / 12), ('layerwise', 2 / 6)):
    ms = jax.jit(jax.vmap(lambda k, scope=scope: masks.random_mask(k, params, prunable, 0.34,
                                                                   scope=scope)))(keys)
    for name in ('x', 'y'):
      freq = np.asarray(ms[name]['kernel'], np.float32).mean(axis=0)
      # Std of a frequency over 2000 draws is sqrt(p (1 - p) / 2000) ~ 0.011: 0.06 is > 5 sigma.
      np.testing.assert_allclose(freq, p, atol=0.06)
    assert bool(ms['y']['bias'].all())
    counts = np.asarray(ms['x']['kernel'].sum(axis=(1, 2)) + ms['y']['kernel'].sum(axis=(1, 2)))
    assert (counts == 4).all()
    x_counts[scope] = set(np.asarray(ms['x']['kernel'].sum(axis=(1, 2))).tolist())
  # Globally the split of the 4 kept entries between the two leaves varies; layerwise it is 2 + 2.
  assert x_counts['global'] == {0, 1, 2, 3, 4}
  assert x_counts['layerwise'] == {2}


def test_random_mask_rejects_bad_inputs():
  params, prunable = two_kernels()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='valid: global, layerwise'):
    masks.random_mask(key, params, prunable, 0.5, scope='per-leaf')
  with pytest.raises(ValueError, match='valid: uniform, erk, proportional'):
    masks.random_mask(key, params, prunable, 0.5, scope='layerwise', allocation='er')
  with pytest.raises(ValueError, match=r'\(0, 1\]'):
    masks.random_mask(key, params, prunable, 1.2)


# ------------------------------------------------------------------------------------------------
# Dynamic sparse training: traced counts.


def test_topk_traced_hand_computed():
  # Descending ranks, ties by index: idx 0 (3.0) -> 0, idx 2 -> 1, idx 4 -> 2, idx 3 (2.0) -> 3,
  # idx 1 (1.0) -> 4.
  s = jnp.array([3.0, 1.0, 3.0, 2.0, 3.0], jnp.float32)
  topk = jax.jit(masks.topk_traced)
  expected = {-2: [False] * 5, 0: [False] * 5, 1: [True, False, False, False, False],
              2: [True, False, True, False, False], 3: [True, False, True, False, True],
              4: [True, False, True, True, True], 5: [True] * 5, 9: [True] * 5}
  for k, want in expected.items():
    np.testing.assert_array_equal(topk(s, jnp.int32(k)), want, err_msg=f'k={k}')
  # A Python int works too, and agrees with the static selection.
  np.testing.assert_array_equal(masks.topk_traced(s, 2), masks.topk_mask(s, 2))
  # NaN ranks below -inf; 2-D shapes and the most negative int32.
  nan = jnp.array([jnp.nan, 1.0, -jnp.inf], jnp.float32)
  np.testing.assert_array_equal(topk(nan, jnp.int32(2)), [False, True, True])
  ints = jnp.array([[np.iinfo(np.int32).min, 5], [5, -1]], jnp.int32)
  np.testing.assert_array_equal(topk(ints, jnp.int32(3)), [[False, True], [True, True]])
  np.testing.assert_array_equal(topk(ints, jnp.int32(1)), [[False, True], [False, False]])


def test_topk_traced_vmap_and_agrees_with_topk_mask():
  batch = jnp.array([[3.0, 1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 5.0, 0.0, 0.0]], jnp.float32)
  got = jax.jit(jax.vmap(masks.topk_traced))(batch, jnp.array([2, 3], jnp.int32))
  np.testing.assert_array_equal(got, [[True, False, True, False, False],
                                      [True, True, True, False, False]])
  # Many ties, every k at once, against NumPy's stable argsort (ties by index too).
  scores = jax.random.randint(jax.random.key(0), (6, 7), 0, 4).astype(jnp.float32)
  ks = np.arange(-1, 44)
  every_k = jax.jit(jax.vmap(masks.topk_traced, in_axes=(None, 0)))
  got = every_k(scores, jnp.asarray(ks, jnp.int32))
  rank = np.empty(42, np.int64)
  rank[np.argsort(-np.asarray(scores).reshape(-1), kind='stable')] = np.arange(42)
  np.testing.assert_array_equal(np.asarray(got).reshape(len(ks), 42), rank[None, :] < ks[:, None])
  np.testing.assert_array_equal(got[ks == 13][0], masks.topk_mask(scores, 13))


def test_topk_traced_rejects_bad_counts():
  for bad in (1.5, True, jnp.array([1, 2], jnp.int32), jnp.float32(2.0)):
    with pytest.raises(ValueError, match='integer scalar'):
      masks.topk_traced(jnp.ones(3), bad)


def test_layerwise_topk_traced_and_layer_count_tree():
  params, prunable = two_kernels()
  # a = [0.5, 2.0, 1.0] keeps 2: 2.0, 1.0. b = [3.0, 0.1, 1.5, 0.2] keeps 1: 3.0. The bias count
  # is never read (0 would otherwise prune it).
  counts = {'a': {'kernel': jnp.int32(2)}, 'b': {'kernel': jnp.int32(1), 'bias': jnp.int32(0)}}
  m = jax.jit(lambda s, c: masks.layerwise_topk_traced(s, prunable, c))(params, counts)
  np.testing.assert_array_equal(m['a']['kernel'], [[False, True, True]])
  np.testing.assert_array_equal(m['b']['kernel'], [[True, False], [False, False]])
  np.testing.assert_array_equal(m['b']['bias'], [True, True])
  c = masks.layer_count_tree(m, prunable)
  assert jax.tree.map(int, c) == {'a': {'kernel': 2}, 'b': {'kernel': 1, 'bias': 0}}
  assert all(x.dtype == jnp.int32 for x in jax.tree.leaves(c))
  # One integer for every leaf; static counts from layer_counts match layerwise_topk.
  m = masks.layerwise_topk_traced(params, prunable, 2)
  np.testing.assert_array_equal(m['b']['kernel'], [[True, False], [True, False]])
  static = masks.layer_counts(params, prunable, 0.5)
  chex.assert_trees_all_equal(masks.layerwise_topk_traced(params, prunable, static),
                              masks.layerwise_topk(params, prunable, 0.5))
  with pytest.raises(ValueError, match='structure'):
    masks.layerwise_topk_traced(params, prunable, {'a': 1})


def prune_case():
  """One 2x4 kernel with two inactive entries (one of them the largest |w|) and a dense bias."""
  params = {'k': {'kernel': jnp.array([[-1.0, 5.0, 4.0, 0.0], [1.0, 0.5, -3.0, 2.0]], jnp.float32),
                  'bias': jnp.array([0.0, 7.0], jnp.float32)}}
  mask = {'k': {'kernel': jnp.array([[True, False, True, False], [True, True, True, True]]),
                'bias': jnp.array([True, True])}}
  return params, mask, masks.prunable_leaves(params)


def test_prune_smallest_hand_computed():
  params, mask, prunable = prune_case()
  # Active |w| by flat index: 0: 1, 2: 4, 4: 1, 5: 0.5, 6: 3, 7: 2 (1 and 3 are inactive). Drop
  # order: 5 (0.5), then the tie |1| at 4 before 0 (the lower index survives), then 7 (2).
  prune = jax.jit(lambda n: masks.prune_smallest(params, mask, {'k': {'kernel': n, 'bias': n}},
                                                 prunable))
  expected = {
      1: [[True, False, True, False], [True, False, True, True]],
      2: [[True, False, True, False], [False, False, True, True]],
      3: [[False, False, True, False], [False, False, True, True]],
      4: [[False, False, True, False], [False, False, True, False]],
      6: [[False] * 4, [False] * 4],
      10: [[False] * 4, [False] * 4],  # Clipped to the 6 active entries.
      0: mask['k']['kernel'].tolist(),
      -1: mask['k']['kernel'].tolist(),  # Clipped to 0: nothing inactive comes back.
  }
  for n, want in expected.items():
    new = prune(jnp.int32(n))
    np.testing.assert_array_equal(new['k']['kernel'], want, err_msg=f'n={n}')
    np.testing.assert_array_equal(new['k']['bias'], [True, True])  # Not prunable: untouched.
    assert int(masks.count(new, prunable)) == 6 - min(max(n, 0), 6)
  # NaN magnitudes go first.
  w = {'k': {'kernel': jnp.array([[jnp.nan, 1.0, 2.0]], jnp.float32)}}
  new = masks.prune_smallest(w, masks.ones_like(w), 1, masks.prunable_leaves(w))
  np.testing.assert_array_equal(new['k']['kernel'], [[False, True, True]])


def regrow_case():
  """A 2x3 kernel with active entries 0 and 4 (the highest scores) and a dense bias."""
  mask = {'k': {'kernel': jnp.array([[True, False, False], [False, True, False]]),
                'bias': jnp.array([True, True])}}
  scores = {'k': {'kernel': jnp.array([[9.0, 1.0, 5.0], [5.0, 9.0, -1.0]], jnp.float32),
                  'bias': jnp.array([9.0, 9.0], jnp.float32)}}
  return mask, scores, {'k': {'kernel': True, 'bias': False}}


def test_regrow_by_scores_hand_computed():
  mask, scores, prunable = regrow_case()

  @jax.jit
  def grow(n, exclude):
    return masks.regrow(mask, {'k': {'kernel': n, 'bias': n}}, prunable, scores=scores,
                        exclude=exclude)

  none = jax.tree.map(jnp.zeros_like, mask)
  # Candidates by score: 2 (5.0) and 3 (5.0, loses the tie), 1 (1.0), 5 (-1.0).
  expected = {0: [[False] * 3, [False] * 3],
              1: [[False, False, True], [False, False, False]],
              2: [[False, False, True], [True, False, False]],
              3: [[False, True, True], [True, False, False]],
              4: [[False, True, True], [True, False, True]],
              10: [[False, True, True], [True, False, True]]}  # Clipped to the 4 candidates.
  for n, want in expected.items():
    new, grown = grow(jnp.int32(n), none)
    np.testing.assert_array_equal(grown['k']['kernel'], want, err_msg=f'n={n}')
    np.testing.assert_array_equal(new['k']['kernel'], mask['k']['kernel'] | jnp.array(want))
    assert int(masks.count(grown)) == min(n, 4) and int(masks.count(new)) == 4 + min(n, 4)
    np.testing.assert_array_equal(grown['k']['bias'], [False, False])
    np.testing.assert_array_equal(new['k']['bias'], [True, True])
  # Excluding entry 2 (say, just pruned) leaves 3, 1, 5.
  exclude = {'k': {'kernel': jnp.array([[False, False, True], [False, False, False]]),
                   'bias': jnp.array([False, False])}}
  _, grown = grow(jnp.int32(1), exclude)
  np.testing.assert_array_equal(grown['k']['kernel'], [[False, False, False], [True, False, False]])
  _, grown = grow(jnp.int32(9), exclude)
  np.testing.assert_array_equal(grown['k']['kernel'], [[False, True, False], [True, False, True]])


def test_regrow_random_is_uniform_over_candidates():
  mask = {'k': {'kernel': jnp.array([[True, False, False, False], [False, True, False, False]])}}
  exclude = {'k': {'kernel': jnp.array([[False, False, False, True], [False] * 4])}}
  prunable = {'k': {'kernel': True}}
  candidates = [1, 2, 4, 6, 7]  # Flat indices: not active (0, 5), not excluded (3).
  n_draws = 2000
  keys = jax.random.split(jax.random.key(0), n_draws)
  grow = jax.jit(jax.vmap(lambda key: masks.regrow(mask, jnp.int32(2), prunable, key=key,
                                                   exclude=exclude)))
  new, grown = grow(keys)
  g = np.asarray(grown['k']['kernel']).reshape(n_draws, 8)
  assert (g.sum(axis=1) == 2).all()
  assert not g[:, [0, 3, 5]].any()  # Never an active or excluded entry.
  np.testing.assert_array_equal(np.asarray(new['k']['kernel']).reshape(n_draws, 8),
                                g | np.asarray(mask['k']['kernel']).reshape(1, 8))
  # Each candidate is drawn with probability 2/5: expected 800 times. Chi-square with 4 degrees
  # of freedom is below 18.5 with probability 0.999.
  freq = g[:, candidates].sum(axis=0)
  assert ((freq - 800.0) ** 2 / 800.0).sum() < 18.5, freq
  # All 10 pairs equally likely (200 each; 9 degrees of freedom, 0.999 quantile 27.9).
  pairs = {p: 0 for p in itertools.combinations(candidates, 2)}
  for row in g:
    pairs[tuple(np.flatnonzero(row).tolist())] += 1
  assert sum((c - 200.0) ** 2 / 200.0 for c in pairs.values()) < 27.9, pairs
  # Same key, same draw; the key matters.
  one = lambda k: masks.regrow(mask, 2, prunable, key=k)[1]['k']['kernel']
  np.testing.assert_array_equal(one(jax.random.key(3)), one(jax.random.key(3)))
  assert len({one(jax.random.key(i)).tobytes() for i in range(10)}) > 1


def test_regrow_needs_exactly_one_of_scores_and_key():
  mask, scores, prunable = regrow_case()
  with pytest.raises(ValueError, match='exactly one'):
    masks.regrow(mask, 1, prunable)
  with pytest.raises(ValueError, match='exactly one'):
    masks.regrow(mask, 1, prunable, scores=scores, key=jax.random.key(0))


def test_zero_regrown():
  params = {'w': jnp.array([1.5, -2.0, 3.0], jnp.bfloat16), 'b': jnp.array([4.0], jnp.float32)}
  grown = {'w': jnp.array([False, True, True]), 'b': jnp.array([False])}
  out = masks.zero_regrown(params, grown)
  np.testing.assert_array_equal(out['w'].astype(jnp.float32), [1.5, 0.0, 0.0])
  np.testing.assert_array_equal(out['b'], [4.0])
  assert out['w'].dtype == jnp.bfloat16


def moment_case():
  params = {'d': {'kernel': jnp.array([[1.0, 2.0], [3.0, 4.0]], jnp.float32),
                  'bias': jnp.array([1.0, -1.0], jnp.float32)}}
  grads = {'d': {'kernel': jnp.array([[0.5, -1.0], [2.0, 0.25]], jnp.float32),
                 'bias': jnp.array([1.0, 3.0], jnp.float32)}}
  grown = {'d': {'kernel': jnp.array([[False, True], [True, False]]),
                 'bias': jnp.array([False, False])}}
  return params, grads, grown


def two_updates(opt, params, grads):
  # The params stay fixed, so every step sees the same gradient: the moments are hand-computable.
  state = opt.init(params)
  # Optax's Adam bias correction raises a Python float to an int32 count, which strict promotion
  # rejects; only reset_moments is under test here.
  with jax.numpy_dtype_promotion('standard'):
    for _ in range(2):
      _, state = opt.update(grads, state, params)
  return state


def test_reset_moments_sgd_momentum_in_chain():
  params, grads, grown = moment_case()
  opt = optax.chain(optax.add_decayed_weights(1e-3),
                    optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9))
  state = two_updates(opt, params, grads)
  # trace = g' + 0.9 g' = 1.9 g' with g' = g + 1e-3 w.
  expected = jax.tree.map(lambda g, w: 1.9 * (g + 1e-3 * w), grads, params)
  np.testing.assert_allclose(state[1].inner_state[0].trace['d']['kernel'],
                             expected['d']['kernel'], rtol=1e-6)
  out = jax.jit(lambda s, g: masks.reset_moments(opt, s, g))(state, grown)
  inner = out[1]
  np.testing.assert_allclose(inner.inner_state[0].trace['d']['kernel'],
                             [[1.9 * (0.5 + 1e-3), 0.0], [0.0, 1.9 * (0.25 + 4e-3)]], rtol=1e-6)
  np.testing.assert_array_equal(inner.inner_state[0].trace['d']['bias'],
                                state[1].inner_state[0].trace['d']['bias'])
  assert int(inner.count) == 2
  assert float(inner.hyperparams['learning_rate']) == pytest.approx(0.1)
  assert float(inner.hyperparams['momentum']) == pytest.approx(0.9)
  chex.assert_trees_all_equal_structs(out, state)


def test_reset_moments_adam():
  params, grads, grown = moment_case()
  opt = optax.adam(0.1)
  state = two_updates(opt, params, grads)
  # After two equal gradients: mu = (1 - 0.9^2) g = 0.19 g, nu = (1 - 0.999^2) g^2 = 0.001999 g^2.
  np.testing.assert_allclose(state[0].mu['d']['kernel'], 0.19 * grads['d']['kernel'], rtol=1e-5)
  out = masks.reset_moments(opt, state, grown)
  np.testing.assert_allclose(out[0].mu['d']['kernel'], [[0.19 * 0.5, 0.0], [0.0, 0.19 * 0.25]],
                             rtol=1e-5)
  np.testing.assert_allclose(out[0].nu['d']['kernel'],
                             [[0.001999 * 0.25, 0.0], [0.0, 0.001999 * 0.0625]], rtol=1e-4)
  np.testing.assert_array_equal(out[0].mu['d']['bias'], state[0].mu['d']['bias'])
  np.testing.assert_array_equal(out[0].nu['d']['bias'], state[0].nu['d']['bias'])
  assert int(out[0].count) == 2


def test_masked_weighted_mean_hand_computed():
  weights = jnp.array([1.0, 2.0, 3.0], jnp.float32)
  x = jnp.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [100.0, 200.0, 300.0, 400.0]],
                jnp.float32)
  m = jnp.array([[True, True, False, False], [True, False, True, False],
                 [True, False, False, False]])
  # Entry 0: (1 * 1 + 2 * 10 + 3 * 100) / 6 = 53.5; entry 1: client 0 only; entry 2: client 1
  # only; entry 3: nobody, so 0.
  want = [53.5, 2.0, 30.0, 0.0]
  # A second leaf with extra axes: client k holds only its own row.
  y = jnp.arange(3 * 2 * 2, dtype=jnp.float32).reshape(3, 2, 2)
  my = jnp.zeros((3, 2, 2), jnp.bool_).at[0, 0].set(True).at[1, 1].set(True).at[2, 1, 0].set(True)
  # [1, 0]: (2 * 6 + 3 * 10) / 5 = 8.4; [1, 1]: client 1 only = 7.
  want_y = [[0.0, 1.0], [8.4, 7.0]]
  mean = jax.jit(masks.masked_weighted_mean)
  out = mean({'x': x, 'y': y}, {'x': m, 'y': my}, weights)
  np.testing.assert_allclose(out['x'], want, rtol=1e-6)
  np.testing.assert_allclose(out['y'], want_y, rtol=1e-6)
  assert out['x'].dtype == jnp.float32 and out['x'].shape == (4,)

  # Masked-out values never leak, however large (3 * 3e38 would overflow, 0 * inf is NaN).
  dirty = x.at[0, 2].set(3e38).at[1, 3].set(jnp.inf).at[2, 1].set(jnp.nan)
  np.testing.assert_allclose(mean({'x': dirty}, {'x': m}, weights)['x'], want, rtol=1e-6)
  # A zero-weight client holds nothing: entry 0 averages clients 0 and 1, (1 + 20) / 3 = 7.
  zero_w = jnp.array([1.0, 2.0, 0.0], jnp.float32)
  out = mean({'x': dirty.at[2, 0].set(jnp.inf)}, {'x': m}, zero_w)['x']
  np.testing.assert_allclose(out, [7.0, 2.0, 30.0, 0.0], rtol=1e-6)
  # bfloat16 leaves keep their dtype.
  half = mean({'x': x.astype(jnp.bfloat16)}, {'x': m}, weights)['x']
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32), want, rtol=1e-2)


def test_masked_weighted_mean_rejects_bad_shapes():
  x = jnp.ones((3, 2), jnp.float32)
  with pytest.raises(ValueError, match='1-D'):
    masks.masked_weighted_mean({'x': x}, {'x': x > 0}, jnp.ones((3, 1), jnp.float32))
  with pytest.raises(ValueError, match='client axis'):
    masks.masked_weighted_mean({'x': x}, {'x': x > 0}, jnp.ones(2, jnp.float32))


def test_dst_step_compiles_once_for_any_counts():
  params = small_cnn()
  prunable = masks.prunable_leaves(params)
  mask = masks.random_mask(jax.random.key(0), params, prunable, 0.5, scope='layerwise')
  grads = jax.tree.map(lambda w: jnp.cos(w), params)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(key, params, mask, n):
    pruned = masks.prune_smallest(params, mask, n, prunable)
    dropped = jax.tree.map(lambda a, b: a & ~b, mask, pruned)
    by_score, grown = masks.regrow(pruned, n, prunable, scores=jax.tree.map(jnp.abs, grads),
                                   exclude=dropped)
    at_random, _ = masks.regrow(pruned, n, prunable, key=key)
    top = masks.layerwise_topk_traced(grads, prunable, n)
    return pruned, by_score, masks.zero_regrown(params, grown), at_random, top

  before = masks.layer_count_tree(mask, prunable)  # Conv 18 of 36, Dense 8 of 16.
  for conv, dense in ((3, 1), (5, 8)):
    n = {'Conv_0': {'kernel': jnp.int32(conv), 'bias': jnp.int32(0)},
         'Dense_0': {'kernel': jnp.int32(dense), 'bias': jnp.int32(0)},
         'GroupNorm_0': {'scale': jnp.int32(0), 'bias': jnp.int32(0)}}
    pruned, by_score, _, at_random, top = step(jax.random.key(1), params, mask, n)
    want = jax.tree.map(lambda c, k: int(c) - int(k), before, n)
    assert jax.tree.map(int, masks.layer_count_tree(pruned, prunable)) == want
    for grown_mask in (by_score, at_random):
      assert jax.tree.map(int, masks.layer_count_tree(grown_mask, prunable)) == jax.tree.map(
          int, before)
    assert jax.tree.map(int, masks.layer_count_tree(top, prunable)) == jax.tree.map(
        lambda k, f: int(k) if f else 0, n, prunable)


def test_prune_smallest_breaks_magnitude_ties_by_the_tiebreak_then_index():
  w = {'k': jnp.array([0.0, 0.0, 0.0, 0.5, 0.0])}
  m = {'k': jnp.array([True, True, True, True, False])}
  prunable = {'k': True}
  # Drop 2 of the 3 active zeros: without a tiebreak the higher indices go first.
  np.testing.assert_array_equal(masks.prune_smallest(w, m, 2, prunable)['k'],
                                [True, False, False, True, False])
  tb = {'k': jnp.array([0.1, 0.9, 0.5, 0.0, 1.0])}  # entry 1 has the largest tiebreak
  np.testing.assert_array_equal(masks.prune_smallest(w, m, 2, prunable, tiebreak=tb)['k'],
                                [False, True, False, True, False])
  # The magnitude still comes first: the tiebreak never saves a smaller weight.
  np.testing.assert_array_equal(masks.prune_smallest(w, m, 3, prunable, tiebreak=tb)['k'],
                                [False, False, False, True, False])
