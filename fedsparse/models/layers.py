"""Convolution and max-pooling layers that stay fast inside loops on XLA:CPU.

The federated round runs the local SGD steps of every client in `lax.scan`, with clients mapped
by `vmap` or `lax.map`. On XLA:CPU a convolution *gradient* inside such a loop, or under `vmap`
(where per-client kernels turn into a grouped convolution), leaves the fast convolution path and
becomes about ten times slower; matrix multiplications do not suffer from this (see "Measured
facts" in DESIGN.md). This module therefore offers two implementations of the same layers:

* ``'xla'``: `lax.conv_general_dilated` and `lax.reduce_window` (what `flax.linen.Conv` and
  `flax.linen.max_pool` use). Best on GPU/TPU, and for a single jitted step on CPU.
* ``'matmul'``: the convolution as im2col -- the ``kh * kw`` shifted (strided) slices of the
  padded input concatenated along the channel axis -- followed by one matrix multiplication with
  the reshaped kernel; max-pooling as an elementwise maximum over shifted slices (or a
  reshape-and-max for non-overlapping windows). Forward and backward are then slices, pads,
  elementwise ops and dots only, all of which XLA:CPU compiles well inside loops and under
  `vmap` (a per-client kernel becomes a batched matmul).

``'auto'`` picks ``'matmul'`` on the CPU backend and ``'xla'`` elsewhere. Both implementations
share parameters (names, shapes, initialisers) with `flax.linen.Conv`, so a checkpoint or a mask
made with one runs with the other; `scripts/bench_conv.py` holds the measurements behind the
choice.
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

__all__ = [
    'IMPLS',
    'Conv',
    'conv2d',
    'group_norm_groups',
    'max_pool',
    'resolve_impl',
]

# Public names of the implementations; 'auto' resolves to one of the other two.
IMPLS = ('auto', 'xla', 'matmul')

PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]


def resolve_impl(impl: str) -> str:
  """Returns the concrete implementation (``'xla'`` or ``'matmul'``) for ``impl``.

  Args:
    impl: one of `IMPLS`. ``'auto'`` means ``'matmul'`` when JAX's default backend is the CPU
      and ``'xla'`` otherwise: the im2col formulation only pays off where convolution gradients
      inside loops are slow, and GPU/TPU convolution kernels are faster than im2col.

  Raises:
    ValueError: if ``impl`` is not one of `IMPLS`.
  """
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv/pool impl {impl!r}; expected one of {IMPLS}.')
  if impl == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) for v in value):
    raise ValueError(f'{what} must be an int or a pair of ints, got {value!r}.')
  return value  # pytype: disable=bad-return-type


def _explicit_padding(
    padding: PaddingLike,
    in_size: tuple[int, int],
    window: tuple[int, int],
    strides: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
  """Turns SAME/VALID/int/pairs into explicit (low, high) pads for the two spatial axes.

  ``'SAME'`` follows `lax.padtype_to_pads` (output size ``ceil(n / stride)``, the extra pad
  element on the high side), so both implementations agree with `flax.linen.Conv` exactly.
  """
  if isinstance(padding, str):
    pad = padding.upper()
    if pad == 'VALID':
      return ((0, 0), (0, 0))
    if pad == 'SAME':
      pads = []
      for n, k, s in zip(in_size, window, strides):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
      return tuple(pads)  # pytype: disable=bad-return-type
    raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}.")
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  padding = tuple(padding)
  if len(padding) == 2 and all(isinstance(p, int) for p in padding):
    return ((padding[0], padding[0]), (padding[1], padding[1]))
  if len(padding) == 2 and all(len(p) == 2 for p in padding):
    return tuple((int(lo), int(hi)) for lo, hi in padding)  # pytype: disable=bad-return-type
  raise ValueError(f'Cannot interpret padding {padding!r} for a 2-D window.')


def _shifted_slices(
    x: jax.Array,
    window: tuple[int, int],
    strides: tuple[int, int],
) -> tuple[list[jax.Array], tuple[int, int]]:
  """All ``kh * kw`` window offsets of an (already padded) NHWC input, in row-major order.

  Slice ``(i, j)`` holds ``x[:, i + s_h * p, j + s_w * q, :]`` for every output position
  ``(p, q)``. Its transpose (for the backward pass) is a pad, so gradients stay elementwise.
  """
  (kh, kw), (sh, sw) = window, strides
  b, h, w, c = x.shape
  oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
  if oh <= 0 or ow <= 0:
    raise ValueError(f'Window {window} does not fit the (padded) input of spatial size {(h, w)}.')
  slices = [
      lax.slice(x, (0, i, j, 0), (b, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)
  ]
  return slices, (oh, ow)


def _pad_spatial(x: jax.Array, pads, value: float = 0.0) -> jax.Array:
  if all(p == (0, 0) for p in pads):
    return x
  return jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=value)


def _conv_im2col(x, kernel, strides, pads):
  """Convolution as one matmul of the im2col patches with the ``[kh*kw*cin, cout]`` kernel."""
  kh, kw, cin, cout = kernel.shape
  slices, _ = _shifted_slices(_pad_spatial(x, pads), (kh, kw), strides)
  # Concatenating along channels gives patch features in (i, j, c) order, which is exactly the
  # row-major order of kernel.reshape(kh * kw * cin, cout): no transpose of the kernel needed.
  patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
  return lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))


def _conv_xla(x, kernel, strides, pads):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=pads,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: int | Sequence[int] = 1,
    padding: PaddingLike = 'SAME',
    impl: str = 'auto',
) -> jax.Array:
  """2-D cross-correlation of an NHWC input with an HWIO kernel (as `flax.linen.Conv`).

  Args:
    x: input ``[batch, height, width, cin]``.
    kernel: ``[kh, kw, cin, cout]``.
    strides: an int or a pair.
    padding: ``'SAME'``, ``'VALID'``, an int, a pair of ints (per spatial axis) or a pair of
      ``(low, high)`` pairs.
    impl: one of `IMPLS`.

  Returns:
    ``[batch, out_height, out_width, cout]``.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f'conv2d expects NHWC input and HWIO kernel, got {x.shape}, {kernel.shape}.')
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f'Input has {x.shape[-1]} channels but the kernel expects {kernel.shape[2]}.')
  strides = _pair(strides, 'strides')
  pads = _explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
  if resolve_impl(impl) == 'xla':
    return _conv_xla(x, kernel, strides, pads)
  return _conv_im2col(x, kernel, strides, pads)


def max_pool(
    x: jax.Array,
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = 'VALID',
    impl: str = 'auto',
) -> jax.Array:
  """Max-pooling over the two spatial axes of an NHWC input (as `flax.linen.max_pool`).

  ``impl='xla'`` uses `lax.reduce_window`, whose gradient is a select-and-scatter.
  ``impl='matmul'`` (the loop-friendly formulation that goes with the matmul convolution) uses a
  reshape-and-max for non-overlapping windows (``window == strides``, e.g. 2x2 stride 2) and an
  elementwise maximum over the shifted slices otherwise (e.g. 3x3 stride 1).

  The two differ only in how a gradient is shared among *tied* maxima: select-and-scatter gives
  it all to one element, `jnp.maximum`/`jnp.max` split it evenly. Both are valid subgradients
  and give the same total; in these models ties come from identical receptive fields (e.g. blank
  image background), whose parameter gradients are identical, so parameter gradients agree.

  Args:
    x: input ``[batch, height, width, channels]``.
    window: an int or a pair.
    strides: an int or a pair; defaults to ``window``.
    padding: as in `conv2d`; padded positions hold ``-inf`` and never win.
    impl: one of `IMPLS`.

  Returns:
    The pooled ``[batch, out_height, out_width, channels]``.
  """
  if x.ndim != 4:
    raise ValueError(f'max_pool expects an NHWC input, got shape {x.shape}.')
  window = _pair(window, 'window')
  strides = window if strides is None else _pair(strides, 'strides')
  pads = _explicit_padding(padding, x.shape[1:3], window, strides)
  if resolve_impl(impl) == 'xla':
    return nn.max_pool(x, window, strides, padding=pads)
  x = _pad_spatial(x, pads, value=-jnp.inf)
  if window == strides:
    # Non-overlapping windows: crop to whole windows (floor mode, as VALID pooling does), split
    # each spatial axis into (blocks, window) and reduce. One fused reduction, no slices.
    (kh, kw), (b, h, w, c) = window, x.shape
    oh, ow = h // kh, w // kw
    x = x[:, :oh * kh, :ow * kw, :].reshape(b, oh, kh, ow, kw, c)
    return jnp.max(x, axis=(2, 4))
  slices, _ = _shifted_slices(x, window, strides)
  out = slices[0]
  for s in slices[1:]:
    out = jnp.maximum(out, s)
  return out


class Conv(nn.Module):
  """A 2-D convolution with `flax.linen.Conv`'s parameters and a selectable implementation.

  Parameters are ``kernel`` ``[kh, kw, cin, cout]`` (LeCun normal) and ``bias`` ``[cout]``
  (zeros), exactly as `flax.linen.Conv` creates them from the same RNG, so the two are
  interchangeable. Only the computation differs; see the module docstring.

  Attributes:
    features: number of output channels.
    kernel_size: an int or a pair.
    strides: an int or a pair.
    padding: ``'SAME'``, ``'VALID'``, an int, or explicit pairs (see `conv2d`).
    use_bias: whether to add a bias.
    impl: one of `IMPLS`; resolved when the module is called.
    kernel_init: initialiser of the kernel.
    bias_init: initialiser of the bias.

  Example:
    >>> conv = Conv(8, (3, 3), impl='matmul')
    >>> params = conv.init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))['params']
    >>> params['kernel'].shape
    (3, 3, 2, 8)
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: PaddingLike = 'SAME'
  use_bias: bool = True
  impl: str = 'auto'
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = _pair(self.kernel_size, 'kernel_size')
    kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        jnp.float32)
    y = conv2d(x, kernel, self.strides, self.padding, self.impl)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      # Explicit reshape: the test suite raises on implicit rank promotion.
      y = y + bias.reshape((1, 1, 1, self.features))
    return y


def group_norm_groups(channels: int, num_groups: int = 32) -> int:
  """Number of GroupNorm groups for ``channels``: ``num_groups``, fewer when it does not divide.

  ``gcd`` keeps the count a divisor of ``channels`` (``min(num_groups, channels)`` for the
  power-of-two widths of ResNet), so GroupNorm never rejects a width.
  """
  return math.gcd(channels, num_groups)
