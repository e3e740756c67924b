"""Masks: prunable leaves, keep counts, ERK allocation, exact top-k selections, random masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
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
  with pytest.raises(ValueError, match="'uniform', 'erk'"):
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
  with pytest.raises(ValueError, match="'index', 'keep'"):
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
  with pytest.raises(ValueError, match="'global', 'layerwise'"):
    masks.random_mask(key, params, prunable, 0.5, scope='per-leaf')
  with pytest.raises(ValueError, match="'uniform', 'erk'"):
    masks.random_mask(key, params, prunable, 0.5, scope='layerwise', allocation='er')
  with pytest.raises(ValueError, match=r'\(0, 1\]'):
    masks.random_mask(key, params, prunable, 1.2)
