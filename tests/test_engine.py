"""Tests of the round engine: client mapping, schedules, local training, aggregation, eval."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsparse import engine
from fedsparse.data import normalize
from tests.toy import STRATEGY_MAPPINGS, tiny_federated

# ---------------------------------------------------------------- client mapping


@pytest.mark.parametrize('mapping', STRATEGY_MAPPINGS, ids=lambda m: f'{m.strategy}-{m.inner}')
def test_map_clients_matches_python_loop(mapping):
  assert jax.device_count() == 8  # conftest: sharded runs on 8 host devices
  xs = jnp.arange(10 * 3, dtype=jnp.float32).reshape(10, 3)  # 10 clients: not a multiple of 8
  keys = jax.random.split(jax.random.key(0), 10)
  def fn(shared, x, key):
    return {'y': shared['a'] * x + jax.random.normal(key, ()), 's': jnp.sum(x)}
  shared = {'a': jnp.float32(2.0)}
  out = jax.jit(lambda s, x, k: engine.map_clients(fn, s, x, k, mapping=mapping))(
      shared, xs, keys)
  expected = [fn(shared, xs[i], keys[i]) for i in range(10)]
  np.testing.assert_allclose(out['y'], np.stack([e['y'] for e in expected]), rtol=1e-6)
  np.testing.assert_allclose(out['s'], np.stack([e['s'] for e in expected]), rtol=1e-6)


def test_client_mapping_rejects_unknown_names():
  with pytest.raises(ValueError, match='valid: auto, vmap, chunked, sequential, sharded'):
    engine.ClientMapping('pmap')
  with pytest.raises(ValueError, match='inner'):
    engine.ClientMapping('sharded', inner='sharded')
  with pytest.raises(ValueError, match='chunk_size'):
    engine.ClientMapping('chunked', chunk_size=0)


def test_auto_strategy_depends_on_backend():
  assert engine.default_strategy('cpu') == 'sequential'
  assert engine.default_strategy('gpu') == 'vmap'
  assert engine.default_strategy('tpu') == 'vmap'
  assert engine.ClientMapping('auto').resolved() == engine.default_strategy()
  assert engine.ClientMapping('vmap').batches_clients
  assert engine.ClientMapping('chunked').batches_clients
  assert not engine.ClientMapping('sequential').batches_clients
  assert engine.ClientMapping('sharded', inner='vmap').batches_clients
  assert not engine.ClientMapping('sharded', inner='sequential').batches_clients


# ---------------------------------------------------------------- minibatch orders


def _minibatches(size, nmax, **config):
  index = jnp.arange(100, 100 + nmax, dtype=jnp.int32)  # the client's rows are 100..100+nmax
  local = engine.LocalConfig(**config)
  orders = engine.example_orders(jax.random.key(3), index, jnp.int32(size), local)
  return orders, engine.host_minibatches(np.asarray(orders), size, local)


def test_epochs_visit_every_example_once_in_the_clients_own_steps():
  orders, batches = _minibatches(size=5, nmax=8, batch_size=2, local_epochs=3)
  assert orders.shape == (3, 8)  # one row per epoch, ceil(8/2)*2 wide
  # ceil(5/2) = 3 steps per epoch for this client (not the largest client's 4): 2, 2, 1.
  assert [len(b) for b in batches] == [2, 2, 1] * 3
  for e in range(3):
    seen = np.concatenate(batches[3 * e:3 * e + 3])
    assert sorted(seen.tolist()) == [100, 101, 102, 103, 104]
  assert len({tuple(np.concatenate(batches[3 * e:3 * e + 3])) for e in range(3)}) > 1


def test_fixed_steps_draw_distinct_examples():
  _, batches = _minibatches(size=5, nmax=8, batch_size=3, local_steps=7)
  assert len(batches) == 7
  for b in batches:
    assert len(set(b.tolist())) == 3 and set(b.tolist()) <= set(range(100, 105))


def test_fixed_steps_client_smaller_than_a_batch():
  _, batches = _minibatches(size=2, nmax=3, batch_size=4, local_steps=2)
  assert [sorted(b.tolist()) for b in batches] == [[100, 101]] * 2


def test_step_slice_and_client_steps_by_hand():
  local = engine.LocalConfig(batch_size=4, local_epochs=2)
  assert engine.client_steps(9, local) == (3, 6)
  s = engine.step_slice(5, 9, local)  # epoch 1, its third step: examples 8..8
  assert (s.epoch, s.step_in_epoch, s.row, s.offset, s.count) == (1, 2, 1, 8, 1)
  traced = jax.jit(lambda t, n: engine.step_slice(t, n, local))(jnp.int32(5), jnp.int32(9))
  assert tuple(int(x) for x in traced) == (1, 2, 1, 8, 1)
  assert engine.client_steps(0, engine.LocalConfig(local_steps=3)) == (0, 0)


# ---------------------------------------------------------------- local training


def _linear_apply(variables, x, train=False):
  del train
  return x.reshape(x.shape[0], -1) @ variables['params']['w']


def test_client_optimizer_matches_pytorch_sgd_order():
  # PyTorch SGD: clip, then g += wd·w, then buf = m·buf + g, w -= lr·buf.
  config = engine.LocalConfig(momentum=0.5, weight_decay=0.1, clip_norm=1.0)
  opt = engine.client_optimizer(config, jnp.float32(0.2))
  w = {'w': jnp.array([1.0, -2.0], jnp.float32)}
  g = {'w': jnp.array([3.0, 4.0], jnp.float32)}  # norm 5 -> clipped to [0.6, 0.8]
  state = opt.init(w)
  u1, state = opt.update(g, state, w)
  g1 = np.array([0.6, 0.8]) + 0.1 * np.array([1.0, -2.0])
  np.testing.assert_allclose(u1['w'], -0.2 * g1, rtol=1e-6)
  w2 = optax.apply_updates(w, u1)
  u2, _ = opt.update(g, state, w2)
  g2 = np.array([0.6, 0.8]) + 0.1 * np.asarray(w2['w'])
  np.testing.assert_allclose(u2['w'], -0.2 * (0.5 * g1 + g2), rtol=1e-6)


# ---------------------------------------------------------------- sampling, aggregation


def test_weighted_mean_reduces_the_client_axis_only():
  trees = {'a': jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], jnp.float32)}
  w = engine.aggregation_weights(jnp.array([1, 1, 2], jnp.int32), weighted=True)
  np.testing.assert_allclose(w, [0.25, 0.25, 0.5])
  out = engine.weighted_mean(trees, w)
  np.testing.assert_allclose(out['a'], [0.25 * 1 + 0.25 * 3 + 0.5 * 5, 0.25 * 2 + 0.25 * 4 + 3])
  u = engine.aggregation_weights(jnp.array([1, 1, 2], jnp.int32), weighted=False)
  np.testing.assert_allclose(u, [1 / 3] * 3, rtol=1e-6)


def test_sample_cohort_without_replacement_is_distinct_and_uniform():
  counts = np.zeros(20)
  for i in range(300):
    ids = np.asarray(engine.sample_cohort(jax.random.key(i), 20, 5, replace=False))
    assert len(set(ids.tolist())) == 5 and ids.min() >= 0 and ids.max() < 20
    counts[ids] += 1
  # Each client is picked with probability 1/4: 75 expected of 300, sd ≈ 7.5.
  assert np.all(np.abs(counts - 75) < 35)
  with_repl = engine.sample_cohort(jax.random.key(0), 3, 50, replace=True)
  assert len(set(np.asarray(with_repl).tolist())) <= 3


# ---------------------------------------------------------------- evaluation


def test_evaluator_pooled_and_client_accuracy_by_hand():
  fd = tiny_federated(num_clients=4, method='iid')
  # A linear model that reads pixel (c, 0) for class c: perfect on this toy data.
  w = np.zeros((16, 3), np.float32)
  for c in range(3):
    w[4 * c, c] = 10.0
  evaluate = engine.make_evaluator(_linear_apply, batch_size=7)  # 30 = 4·7 + 2: padded batch
  out = evaluate({'w': jnp.asarray(w)}, fd)
  assert float(out['test_accuracy']) == 1.0
  assert float(out['client_accuracy_mean']) == 1.0
  # All-zero logits: argmax picks class 0 everywhere and the loss is log 3.
  w0 = np.zeros((16, 3), np.float32)
  out = evaluate({'w': jnp.asarray(w0)}, fd)
  y_test = np.asarray(fd.y_test)
  np.testing.assert_allclose(out['test_accuracy'], np.mean(y_test == 0), rtol=1e-6)
  idx, size = np.asarray(fd.client_test_index), np.asarray(fd.client_test_size)
  per_client = [np.mean(y_test[idx[k, :size[k]]] == 0) for k in range(4)]
  np.testing.assert_allclose(out['client_accuracy_mean'], np.mean(per_client), rtol=1e-6)
  np.testing.assert_allclose(out['test_loss'], np.log(3.0), rtol=1e-5)  # all logits tie


@pytest.mark.parametrize('batch_size', [7, 30, 1, 8])
def test_evaluator_loss_and_accuracy_count_each_test_example_once(batch_size):
  """Untied logits whose loss differs per example: padded slots (30 = 4·7 + 2) must not count."""
  fd = tiny_federated(num_clients=4, method='iid')
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 3)).astype(np.float32)
  out = engine.make_evaluator(_linear_apply, batch_size=batch_size)({'w': jnp.asarray(w)}, fd)
  x = np.asarray(normalize(fd.x_test, fd.scale, fd.mean, fd.std)).reshape(len(fd.y_test), -1)
  logits = x.astype(np.float64) @ w
  y = np.asarray(fd.y_test)
  log_probs = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
  losses = -log_probs[np.arange(len(y)), y]
  assert np.std(losses) > 0.1 and losses[-1] != pytest.approx(np.mean(losses), rel=1e-2)
  np.testing.assert_allclose(out['test_loss'], np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(out['test_accuracy'], np.mean(np.argmax(logits, 1) == y),
                             rtol=1e-6)


def test_compiler_options_per_backend():
  assert engine.compiler_options('gpu') == {}
  assert engine.compiler_options('tpu') == {}
  # This jaxlib accepts the CPU option, so CPU runs compile with it.
  assert engine.compiler_options('cpu') == dict(engine.CPU_COMPILER_OPTIONS)


def test_jit_with_options_matches_plain_jit_on_a_conv_grad():
  from fedsparse import models  # pylint: disable=g-import-not-at-top
  model = models.get_model('conv4', 10, conv_impl='fwdconv')
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  params = model.init(jax.random.key(1), x)['params']
  grad = lambda p: jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2))(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               engine.jit(grad)(params), jax.jit(grad)(params))


def test_rejected_compiler_options_fall_back_to_defaults(monkeypatch):
  from fedsparse.engine import compilation  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(compilation, 'CPU_COMPILER_OPTIONS',
                      {'xla_cpu_experimental_ynn_fusion_type': 'NOT_A_FUSION_TYPE'})
  assert compilation.compiler_options('cpu') == {}
  assert float(compilation.jit(lambda x: x + 1)(jnp.float32(1))) == 2.0
  # Explicit options still reach jax.jit (and are validated by XLA as usual).
  with pytest.raises(Exception, match='not a valid enum value'):
    compilation.jit(lambda x: x + 1, compiler_options={
        'xla_cpu_experimental_ynn_fusion_type': 'NOT_A_FUSION_TYPE'})(jnp.float32(1))


@pytest.mark.parametrize('mapping', STRATEGY_MAPPINGS + [engine.ClientMapping('chunked', 4)],
                         ids=lambda m: f'{m.strategy}-{m.inner}-{m.chunk_size}')
def test_sum_clients_matches_python_sum(mapping):
  # 7 clients: not a multiple of the chunk size (3 or 4) nor of the 8 host devices, so padded
  # clients must be excluded from the sum.
  xs = jnp.arange(7.0) + 1.0
  ws = jnp.linspace(0.5, 2.0, 7)
  fn = lambda shared, x, w: {'a': w * shared * x, 'b': jnp.stack([x, x * x])}
  got = jax.jit(lambda xs, ws: engine.sum_clients(fn, 3.0, xs, ws, mapping=mapping))(xs, ws)
  np.testing.assert_allclose(got['a'], float(np.sum(3.0 * np.asarray(ws) * np.asarray(xs))),
                             rtol=1e-6)
  np.testing.assert_allclose(got['b'], [28.0, 140.0], rtol=1e-6)


def test_cosine_schedule_per_epoch_restarts_by_hand():
  # 3 steps per epoch, period 2 epochs, lr 0.1, floor 0.01: epochs 0,1,2,3 use
  # 0.1, 0.01 + 0.09 * (1 + cos(pi/2)) / 2 = 0.055, then 0.1 and 0.055 again (restart).
  config = engine.LocalConfig(lr_schedule='cosine', cosine_epochs=2, cosine_min_lr=0.01,
                              local_epochs=4)
  opt = engine.client_optimizer(config, jnp.float32(0.1), jnp.int32(3))
  w = {'w': jnp.zeros((), jnp.float32)}
  state = opt.init(w)
  steps = []
  for _ in range(12):
    u, state = opt.update({'w': jnp.ones((), jnp.float32)}, state, w)
    steps.append(-float(u['w']))
  np.testing.assert_allclose(steps, [0.1] * 3 + [0.055] * 3 + [0.1] * 3 + [0.055] * 3,
                             rtol=1e-6)


def test_local_config_rejects_unknown_schedule():
  with pytest.raises(ValueError, match='constant, cosine'):
    engine.LocalConfig(lr_schedule='step')


def test_vmapped_clients_compile_with_xla_defaults():
  assert engine.compiler_options('cpu', batched_clients=True) == {}
