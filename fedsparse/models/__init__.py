"""Model zoo: flax.linen classifiers used by the sparse-FL algorithms.

Every model maps a normalised float32 NHWC batch to float32 logits (no softmax):
``model.apply({'params': params}, x, train=False)``. Models have only a ``params`` collection
(no batch statistics, no dropout RNG), so a client's state is its parameters. Kernels are named
``kernel`` (convolutions ``[kh, kw, cin, cout]``, dense ``[in, out]``) and biases ``bias``;
pruning selects leaves by the name ``kernel``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = get_model('mnistnet', num_classes=10)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  >>> model.apply({'params': params}, jnp.zeros((2, 28, 28, 1))).shape
  (2, 10)
"""

import flax.linen as nn

from fedsparse.models import layers
from fedsparse.models.cnn import CIFAR10Net
from fedsparse.models.cnn import CIFAR100Net
from fedsparse.models.cnn import FedDSTNet
from fedsparse.models.cnn import Conv10
from fedsparse.models.cnn import Conv4
from fedsparse.models.cnn import Conv6
from fedsparse.models.cnn import ConvStack
from fedsparse.models.cnn import MNISTNet
from fedsparse.models.layers import Conv
from fedsparse.models.layers import IMPLS
from fedsparse.models.layers import conv2d
from fedsparse.models.layers import max_pool
from fedsparse.models.layers import resolve_impl
from fedsparse.models.mlp import MLP
from fedsparse.models.resnet import ResNet
from fedsparse.models.resnet import ResNet18

__all__ = [
    'CIFAR10Net',
    'CIFAR100Net',
    'FedDSTNet',
    'Conv',
    'Conv10',
    'Conv4',
    'Conv6',
    'ConvStack',
    'IMPLS',
    'MLP',
    'MNISTNet',
    'MODELS',
    'ResNet',
    'ResNet18',
    'conv2d',
    'get_model',
    'layers',
    'max_pool',
    'resolve_impl',
]

MODELS = ('mlp', 'mnistnet', 'cifar10net', 'cifar100net', 'conv4', 'conv6', 'conv10', 'resnet18')

_REGISTRY = {
    'mnistnet': MNISTNet,
    'cifar10net': CIFAR10Net,
    'cifar100net': CIFAR100Net,
    'conv4': Conv4,
    'conv6': Conv6,
    'conv10': Conv10,
    'resnet18': ResNet18,
}


def get_model(name: str, num_classes: int, *, conv_impl: str = 'auto', **kwargs) -> nn.Module:
  """Builds the model registered under ``name``.

  Args:
    name: one of `MODELS` (case-insensitive).
    num_classes: number of output logits.
    conv_impl: convolution/pooling implementation, one of `IMPLS` (see
      `fedsparse.models.layers`); it changes speed, never parameters or results beyond float32
      rounding. ``'xla'``: `lax.conv_general_dilated` with autodiff gradients (GPU/TPU).
      ``'fwdconv'``: gradients rewritten as canonical forward convolutions and pooling
      gradients without select-and-scatter -- fast on CPU in a Python loop of steps and with
      clients under `lax.map`. ``'matmul'``: im2col + one matmul -- the CPU choice when clients
      are under `vmap`. ``'auto'``: ``'fwdconv'`` on CPU, ``'xla'`` elsewhere. Ignored by
      ``'mlp'``, which has no convolutions.
    **kwargs: further fields of the model class, e.g. ``hidden_sizes=(100,)`` for ``'mlp'``,
      ``num_groups=16`` for ``'resnet18'``, ``dense_sizes`` for the ``conv*`` models.

  Returns:
    An unbound `flax.linen.Module`.

  Raises:
    ValueError: for an unknown ``name`` or ``conv_impl``, or a keyword the model does not have.
  """
  key = name.lower() if isinstance(name, str) else name
  if key not in MODELS:
    raise ValueError(f'Unknown model {name!r}; expected one of {MODELS}.')
  if conv_impl not in IMPLS:
    raise ValueError(f'Unknown conv_impl {conv_impl!r}; expected one of {IMPLS}.')
  if key == 'mlp':
    cls, fields = MLP, dict(num_classes=num_classes, **kwargs)
  else:
    cls, fields = _REGISTRY[key], dict(num_classes=num_classes, conv_impl=conv_impl, **kwargs)
  try:
    return cls(**fields)
  except TypeError as e:
    raise ValueError(f'Bad keyword for model {name!r}: {e}') from e
