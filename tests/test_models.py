"""Tests for fedsparse.models: registry, parameter counts, and agreement of conv/pool impls."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsparse import models
from fedsparse.models import layers

CONCRETE_IMPLS = ('xla', 'matmul', 'fwdconv')

# (model, input HWC, classes, exact parameter count). Counts pinned from the papers' models:
# MNISTNet/CIFAR10Net/CIFAR100Net from FedDST, Conv4/6/10 from FedPM's official code (convs with bias),
# ResNet-18 with GroupNorm has as many parameters as with BatchNorm (scale + bias per channel).
PARAM_COUNTS = (
    ('mlp', (28, 28, 1), 10, 199_210),
    ('mnistnet', (28, 28, 1), 10, 261_840),
    ('cifar10net', (32, 32, 3), 10, 782_006),
    ('cifar100net', (32, 32, 3), 100, 783_092),
    ('conv4', (28, 28, 1), 10, 1_933_258),
    ('conv6', (32, 32, 3), 10, 2_262_602),
    ('conv10', (32, 32, 3), 100, 19_197_092),
    ('resnet18', (32, 32, 3), 10, 11_173_962),
    ('resnet18', (32, 32, 3), 100, 11_220_132),
)


def _abstract_params(model, shape):
  # eval_shape: the 19M-parameter Conv10 and ResNet-18 are never materialised.
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + shape))
  return variables


def _num_params(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _leaf_names(tree):
  return {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


class TestRegistry:

  def test_models_tuple(self):
    assert models.MODELS == ('mlp', 'mnistnet', 'cifar10net', 'cifar100net', 'conv4', 'conv6',
                             'conv10', 'resnet18')

  def test_unknown_model_lists_choices(self):
    with pytest.raises(ValueError, match='mnistnet.*resnet18'):
      models.get_model('lenet', 10)

  def test_unknown_impl(self):
    with pytest.raises(ValueError, match='conv_impl'):
      models.get_model('conv4', 10, conv_impl='cudnn')

  def test_bad_keyword(self):
    with pytest.raises(ValueError, match='mlp'):
      models.get_model('mlp', 10, widths=(3,))

  def test_kwargs_reach_the_model(self):
    model = models.get_model('mlp', 7, hidden_sizes=(16,))
    params = _abstract_params(model, (4, 4, 1))['params']
    assert params['Dense_0']['kernel'].shape == (16, 16)
    assert params['Dense_1']['kernel'].shape == (16, 7)

  def test_resolve_impl(self):
    assert layers.resolve_impl('xla') == 'xla'
    on_cpu = jax.default_backend() == 'cpu'
    assert layers.resolve_impl('auto') == ('fwdconv' if on_cpu else 'xla')
    assert layers.resolve_impl('auto', batched_clients=True) == ('matmul' if on_cpu else 'xla')
    assert layers.resolve_impl('matmul', batched_clients=False) == 'matmul'
    with pytest.raises(ValueError, match='impl'):
      layers.resolve_impl('fast')


@pytest.mark.parametrize('name, shape, classes, count', PARAM_COUNTS)
def test_param_count_and_names(name, shape, classes, count):
  model = models.get_model(name, classes)
  variables = _abstract_params(model, shape)
  # Only parameters: no batch statistics, nothing for dropout.
  assert set(variables) == {'params'}
  params = variables['params']
  assert _num_params(params) == count
  assert _leaf_names(params) <= {'kernel', 'bias', 'scale'}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if path[-1].key == 'kernel':
      assert leaf.ndim in (2, 4), path  # dense [in, out] or conv [kh, kw, cin, cout]
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, jnp.zeros((3,) + shape))
  assert out.shape == (3, classes) and out.dtype == jnp.float32


@pytest.mark.parametrize('name, shape', [('mnistnet', (28, 28, 1)), ('conv6', (32, 32, 3)),
                                         ('resnet18', (32, 32, 3))])
def test_same_param_tree_for_every_impl(name, shape):
  trees = [_abstract_params(models.get_model(name, 10, conv_impl=impl), shape)
           for impl in CONCRETE_IMPLS]
  for tree in trees[1:]:
    assert jax.tree.structure(tree) == jax.tree.structure(trees[0])
    assert jax.tree.map(lambda a: a.shape, tree) == jax.tree.map(lambda a: a.shape, trees[0])


def test_conv_kernel_shapes():
  params = _abstract_params(models.get_model('mnistnet', 10), (28, 28, 1))['params']
  assert params['Conv_0']['kernel'].shape == (5, 5, 1, 10)
  assert params['Conv_1']['kernel'].shape == (5, 5, 10, 20)
  assert params['Dense_0']['kernel'].shape == (5120, 50)


# --------------------------------------------------------------------------------------------
# Layers: every impl computes the same function and the same gradients.

CONV_CASES = (
    # input NHWC, kernel HWIO, strides, padding
    ((2, 7, 9, 3), (3, 3, 3, 4), 1, 'SAME'),
    ((2, 7, 9, 3), (3, 2, 3, 4), 2, 'SAME'),
    ((1, 8, 8, 3), (3, 3, 3, 5), 2, 1),
    ((2, 8, 8, 3), (1, 1, 3, 5), 2, 0),
    ((2, 9, 7, 1), (5, 5, 1, 3), 1, 'VALID'),
    ((3, 10, 9, 2), (4, 3, 2, 3), (3, 2), 'VALID'),
    ((2, 10, 9, 2), (4, 3, 2, 3), (2, 3), ((1, 2), (0, 3))),
    # Stride 1 takes fwdconv's folded input gradient when every pad is at most k - 1:
    # an even kernel (SAME pads 1 low, 2 high), uneven explicit pads, and (last) a pad beyond
    # k - 1, which falls back to the full correlation.
    ((2, 8, 7, 3), (4, 3, 3, 5), 1, 'SAME'),
    ((2, 8, 7, 3), (3, 4, 3, 2), 1, ((2, 0), (1, 3))),
    ((2, 6, 7, 2), (2, 3, 2, 3), 1, ((0, 3), (2, 1))),
)


@pytest.mark.parametrize('x_shape, k_shape, strides, padding', CONV_CASES)
def test_conv2d_impls_agree(x_shape, k_shape, strides, padding):
  x = jax.random.normal(jax.random.key(0), x_shape)
  kernel = jax.random.normal(jax.random.key(1), k_shape)

  # All impls in one jit: compiling is most of this test's time, and one program compiles
  # faster than three.
  @jax.jit
  def run(x, kernel):
    out = {}
    for impl in CONCRETE_IMPLS:
      def loss(x, k, impl=impl):
        y = layers.conv2d(x, k, strides, padding, impl)
        probe = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(probe * y), y
      (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, kernel)
      out[impl] = (y, grads)
    return out
  out = run(x, kernel)
  for impl in ('matmul', 'fwdconv'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 out[impl], out['xla'])


@pytest.mark.parametrize('impl', CONCRETE_IMPLS)
def test_conv_module_matches_flax_conv(impl):
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3))
  ours = layers.Conv(4, (3, 2), strides=2, padding='SAME', impl=impl)
  theirs = nn.Conv(4, (3, 2), strides=2, padding='SAME')
  p_ours = ours.init(jax.random.key(1), x)
  p_theirs = theirs.init(jax.random.key(1), x)
  # Same names, shapes and initial values from the same key: checkpoints are interchangeable.
  jax.tree.map(np.testing.assert_array_equal, p_ours, p_theirs)
  np.testing.assert_allclose(ours.apply(p_ours, x), theirs.apply(p_theirs, x),
                             rtol=1e-5, atol=1e-5)


def test_conv_rejects_bad_input():
  with pytest.raises(ValueError, match='channels'):
    layers.conv2d(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 3, 4)))
  with pytest.raises(ValueError, match='padding'):
    layers.conv2d(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), padding='FULL')


POOL_CASES = (
    # input, window, strides, padding
    ((2, 7, 9, 3), 3, 1, 'VALID'),
    ((2, 6, 5, 1), 3, 1, 'VALID'),  # one channel: column and row offsets coincide
    ((2, 7, 9, 3), (2, 3), 1, 'SAME'),
    ((2, 7, 9, 3), (1, 3), 1, 'SAME'),  # one pass is the identity (no padding, one candidate)
    ((2, 7, 9, 3), (3, 1), 1, 'VALID'),
    ((2, 8, 7, 2), (3, 2), 1, 'VALID'),  # kh > kw
    ((2, 7, 9, 3), 2, 2, 'VALID'),  # odd size: floor mode crops
    ((2, 8, 8, 5), 2, 2, 'SAME'),
    ((2, 9, 9, 3), 3, 2, 'SAME'),  # overlapping and strided: reduce_window for every impl
)


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('x_shape, window, strides, padding', POOL_CASES)
def test_max_pool_impls_agree(x_shape, window, strides, padding, ties):
  x = jax.random.normal(jax.random.key(0), x_shape)
  if ties:
    x = jnp.round(x)  # many exact ties: the gradient must still go to the same element

  @jax.jit
  def run(x):
    out = {}
    # 'matmul' and 'fwdconv' share the pooling code; one of them is enough.
    for impl in ('xla', 'matmul'):
      def loss(x, impl=impl):
        y = layers.max_pool(x, window, strides, padding, impl)
        probe = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(probe * y), y
      (_, y), g = jax.value_and_grad(loss, has_aux=True)(x)
      out[impl] = (y, g)
    return out
  out = run(x)
  np.testing.assert_array_equal(out['matmul'][0], out['xla'][0])
  np.testing.assert_allclose(out['matmul'][1], out['xla'][1], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Whole models: same logits and gradients for every impl.

# Full-size models except ResNet-18, which runs narrow and one block per stage here (same code
# path: GroupNorm with fewer groups than 32, identity and 1x1-conv shortcuts, strided 3x3
# convs) to keep the suite fast; its full size is checked by the parameter count above.
MODEL_CASES = (
    ('mlp', (28, 28, 1), 10, {}),
    ('mnistnet', (28, 28, 1), 10, {}),
    ('cifar10net', (32, 32, 3), 10, {}),
    ('conv4', (28, 28, 1), 10, {}),
    ('conv6', (32, 32, 3), 10, {}),
    ('conv10', (32, 32, 3), 100, {}),
    ('resnet18', (32, 32, 3), 10,
     {'stage_sizes': (1, 1, 1, 1), 'widths': (8, 16, 32, 64), 'num_groups': 32}),
)


@pytest.mark.parametrize('name, shape, classes, kwargs', MODEL_CASES)
def test_model_impls_agree(name, shape, classes, kwargs):
  x = jax.random.normal(jax.random.key(0), (2,) + shape)
  y = jnp.arange(2) % classes
  params = jax.jit(models.get_model(name, classes, **kwargs).init)(jax.random.key(1), x)

  @jax.jit
  def run(params):
    out = {}
    for impl in CONCRETE_IMPLS:
      model = models.get_model(name, classes, conv_impl=impl, **kwargs)

      def loss(p, model=model):
        logits = model.apply(p, x, train=True)
        nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
        return nll, logits
      (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
      out[impl] = (logits, grads)
    return out
  out = run(params)
  ref_logits, ref_grads = out['xla']
  assert ref_logits.shape == (2, classes) and ref_logits.dtype == jnp.float32
  for impl in CONCRETE_IMPLS[1:]:
    logits, grads = out[impl]
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                 grads, ref_grads)


def test_train_flag_changes_nothing():
  model = models.get_model('resnet18', 10, stage_sizes=(1, 1), widths=(8, 16))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  apply = jax.jit(model.apply, static_argnames='train')
  np.testing.assert_array_equal(apply(variables, x, train=True), apply(variables, x, train=False))


def test_group_norm_groups():
  assert layers.group_norm_groups(64) == 32
  assert layers.group_norm_groups(16) == 16
  assert layers.group_norm_groups(24) == 8


@pytest.mark.parametrize('impl', ('matmul', 'fwdconv'))
def test_per_client_gradients_under_vmap_and_scan(impl):
  """Clients mapped by vmap/lax.map with local steps in scan: same as one client at a time."""
  model = models.get_model('mnistnet', 10, conv_impl=impl)
  xs = jax.random.normal(jax.random.key(0), (2, 2, 3, 28, 28, 1))  # [client, step, batch, ...]
  ys = jnp.zeros((2, 2, 3), jnp.int32)
  params = model.init(jax.random.key(1), xs[0, 0])['params']

  def client(p, x, y):
    def step(p, batch):
      def loss(p):
        logits = model.apply({'params': p}, batch[0])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], 1))
      return jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p)), None
    return jax.lax.scan(step, p, (x, y))[0]

  @jax.jit
  def run(params):
    per_client = [client(params, xs[c], ys[c]) for c in range(2)]
    expected = jax.tree.map(lambda *a: jnp.stack(a), *per_client)
    vmapped = jax.vmap(client, in_axes=(None, 0, 0))(params, xs, ys)
    mapped = jax.lax.map(lambda b: client(params, *b), (xs, ys))
    return expected, vmapped, mapped
  expected, vmapped, mapped = run(params)
  for got in (vmapped, mapped):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 got, expected)
