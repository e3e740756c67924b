"""Convolution and max-pooling layers that stay fast inside loops on XLA:CPU.

The federated round runs the local SGD steps of every client in `lax.scan`, with clients mapped
by `vmap` or `lax.map`. On XLA:CPU a convolution *gradient* inside such a loop leaves the fast
convolution path: autodiff of `lax.conv_general_dilated` emits convolutions with permuted
dimension numbers, which XLA:CPU runs fast at the top level of a program but 5-150x slower
inside a loop body; under `vmap`, per-client kernels also turn into grouped convolutions.
Max-pooling's gradient (select-and-scatter) is slow on XLA:CPU everywhere. This module offers
three implementations of the same layers (same parameters, same results up to float32
rounding; pooling gradients of `fwdconv` go to the same elements as `xla`'s):

* ``'xla'``: `lax.conv_general_dilated` and `lax.reduce_window` with autodiff gradients (what
  `flax.linen.Conv` and `flax.linen.max_pool` do). Best on GPU/TPU.
* ``'fwdconv'``: the forward pass as ``'xla'``, and a custom VJP that writes both convolution
  gradients as *forward* convolutions in canonical NHWC/HWIO form (explicit transposes, a
  flipped kernel), which XLA:CPU keeps on its fast path inside `lax.scan`/`lax.map`; pooling
  gradients by selects and pads instead of select-and-scatter. Fastest on CPU for a Python loop
  of jitted steps and for clients under `lax.map` (but not under `vmap`: grouped convolutions).
* ``'matmul'``: the convolution as im2col -- the ``kh * kw`` shifted (strided) slices of the
  padded input concatenated along channels -- and one matrix multiplication with the reshaped
  kernel; pooling as for ``'fwdconv'``. Only slices, pads, elementwise ops and dots: per-client
  kernels under `vmap` become batched matmuls, the fastest choice when clients are vmapped on
  CPU, but slower than ``'fwdconv'`` otherwise (the im2col buffer is kh*kw times the input).

``'auto'`` picks ``'fwdconv'`` on the CPU backend and ``'xla'`` elsewhere.
`scripts/bench_conv.py` holds the measurements behind these choices.
"""

from collections.abc import Sequence
import functools
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

# Public names of the implementations; 'auto' resolves to 'fwdconv' (CPU) or 'xla' (GPU/TPU).
IMPLS = ('auto', 'xla', 'matmul', 'fwdconv')

PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]


def resolve_impl(impl: str, *, batched_clients: bool = False) -> str:
  """Returns the concrete implementation (``'xla'``, ``'matmul'`` or ``'fwdconv'``) for ``impl``.

  Args:
    impl: one of `IMPLS`. On GPU/TPU ``'auto'`` means ``'xla'``: plain autodiff of
      `lax.conv_general_dilated` is what the vendor libraries are tuned for. On the CPU it means
      ``'fwdconv'`` when clients run one after another (its gradients stay on XLA:CPU's fast
      convolution path inside loops), and ``'matmul'`` when clients are vmapped (per-client
      kernels become batched matmuls rather than slow grouped convolutions).
    batched_clients: whether the model will run under a ``vmap`` over clients (the engine's
      ``ClientMapping.batches_clients``).

  Raises:
    ValueError: if ``impl`` is not one of `IMPLS`.
  """
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv_impl {impl!r}; valid: {", ".join(IMPLS)}.')
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'xla'
    return 'matmul' if batched_clients else 'fwdconv'
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


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv_xla(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_fwdconv(x, kernel, strides, pads):
  return _conv_xla(x, kernel, strides, pads)


def _conv_fwdconv_fwd(x, kernel, strides, pads):
  return _conv_xla(x, kernel, strides, pads), (x, kernel)


def _conv_fwdconv_bwd(strides, pads, residuals, g):
  """Both gradients as *forward* convolutions in canonical NHWC/HWIO form.

  Autodiff of `lax.conv_general_dilated` emits convolutions with permuted dimension numbers
  (batch and feature swapped for the kernel gradient). XLA:CPU runs those on its fast path only
  outside loops: inside `lax.scan` the kernel gradient of MNISTNet's second conv is ~20x slower
  and Conv4's ~150x (scripts/bench_conv.py --layers). The same maths with explicit transposes
  and a flipped kernel is a plain NHWC/HWIO convolution, which stays fast inside loops.
  """
  x, kernel = residuals
  (kh, kw, _, _), (sh, sw) = kernel.shape, strides
  (_, h, w, _), (_, oh, ow, _) = x.shape, g.shape
  (lo_h, hi_h), (lo_w, hi_w) = pads
  hp, wp = h + lo_h + hi_h, w + lo_w + hi_w  # padded input size

  # dW[i, j, c, o] = sum_{b, p, q} xpad[b, s*p + i, s*q + j, c] * g[b, p, q, o]: a convolution
  # whose batch is c, whose input features are b and whose (dilated) kernel is g.
  dw = lax.conv_general_dilated(
      x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), pads, rhs_dilation=strides,
      dimension_numbers=_NHWC)
  # With strides, trailing rows/columns the forward never reached make the result too long.
  dw = dw[:, :kh, :kw, :].transpose(1, 2, 0, 3)

  if strides == (1, 1) and all(0 <= p <= k - 1 for (lo, hi), k in ((pads[0], kh), (pads[1], kw))
                                for p in (lo, hi)):
    return _conv_input_grad_folded(g, kernel, pads), dw

  # dx = correlation of the (stride-dilated) g, zero-padded by k - 1, with the spatially flipped
  # kernel whose in/out features are swapped; computed over the padded input, then cropped.
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  extra_h = hp - sh * (oh - 1) - 1  # >= kh - 1: rows of xpad after the last window start
  extra_w = wp - sw * (ow - 1) - 1
  dxp = lax.conv_general_dilated(
      g, flipped, (1, 1), ((kh - 1, extra_h), (kw - 1, extra_w)), lhs_dilation=strides,
      dimension_numbers=_NHWC)
  dx = dxp[:, lo_h:lo_h + h, lo_w:lo_w + w, :]
  return dx, dw


def _conv_input_grad_folded(g, kernel, pads):
  """Input gradient of a stride-1 convolution, its kernel columns folded into output features.

  ``dx[b, y, x, c] = sum_{i, j, o} g[b, y + lo_h - i, x + lo_w - j, o] * kernel[i, j, c, o]``
  (g is zero outside its range). The plain formulation -- a full correlation of g, zero-padded
  by k - 1 on every side, with the flipped kernel -- has only ``cin`` output features (10 for
  MNISTNet's second conv), which XLA:CPU's convolution vectorises poorly, and it multiplies the
  zero padding of both axes. Here one convolution with a ``kh x 1`` kernel, padded along H
  only, produces ``t[b, y, q, (j, c)]`` for every kernel column j at once (``kw * cin`` output
  features), and ``dx`` is the sum of the kw column-shifted slices ``t[:, :, x + j, j, :]``
  (t zero-padded along W). Same products, another summation order: agrees with autodiff to
  float32 rounding. Measured inside a `fori_loop` of batch-32 steps on the 2-core CPU: 2.1x
  faster for MNISTNet's second conv (3.8 -> 1.8 ms), 1.06-1.27x for Conv4's 3x3 layers.
  """
  (kh, kw, cin, cout), (lo_h, hi_h), (lo_w, hi_w) = kernel.shape, *pads
  # folded[i, 0, o, (j, c)] = kernel[kh - 1 - i, kw - 1 - j, c, o]: flipped, in/out swapped.
  folded = jnp.flip(kernel, (0, 1)).transpose(0, 3, 1, 2).reshape(kh, 1, cout, kw * cin)
  t = lax.conv_general_dilated(g, folded, (1, 1), ((kh - 1 - lo_h, kh - 1 - hi_h), (0, 0)),
                               dimension_numbers=_NHWC)
  b, h, ow, _ = t.shape
  t = jnp.pad(t.reshape(b, h, ow, kw, cin),
              ((0, 0), (0, 0), (kw - 1 - lo_w, kw - 1 - hi_w), (0, 0), (0, 0)))
  w = t.shape[2] - kw + 1
  dx = t[:, :, 0:w, 0, :]
  for j in range(1, kw):
    dx = dx + t[:, :, j:j + w, j, :]
  return dx


_conv_fwdconv.defvjp(_conv_fwdconv_fwd, _conv_fwdconv_bwd)


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
    impl: one of `IMPLS`; changes speed only (results agree to float32 rounding).

  Returns:
    ``[batch, out_height, out_width, cout]``.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f'conv2d expects NHWC input and HWIO kernel, got {x.shape}, {kernel.shape}.')
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f'Input has {x.shape[-1]} channels but the kernel expects {kernel.shape[2]}.')
  strides = _pair(strides, 'strides')
  pads = _explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
  impl = resolve_impl(impl)
  if impl == 'xla':
    return _conv_xla(x, kernel, strides, pads)
  if impl == 'fwdconv':
    return _conv_fwdconv(x, kernel, strides, pads)
  return _conv_im2col(x, kernel, strides, pads)


def _first_equal(candidates: list[jax.Array], target: jax.Array) -> jax.Array:
  """Index of the first candidate equal to ``target`` (one of them is, by construction)."""
  idx = jnp.full(target.shape, len(candidates) - 1, jnp.int8)
  for n in range(len(candidates) - 2, -1, -1):
    idx = jnp.where(candidates[n] == target, jnp.int8(n), idx)
  return idx


def _reduce_window_max(x, window, strides):
  # The forward value comes from reduce_window: fast, and -- unlike an elementwise formulation
  # -- never fused into its consumer. That matters: the next layer's im2col reads every pooled
  # element kh*kw times, and XLA would recompute a fused elementwise pool once per read.
  return lax.reduce_window(x, -jnp.inf, lax.max, (1,) + window + (1,), (1,) + strides + (1,),
                           'VALID')


def _scatter_back(g: jax.Array, idx: jax.Array, k: int, axis: int, step: int) -> jax.Array:
  """Transpose of "candidate n = slice at offset n * step along ``axis``": masked shifted sums.

  ``out[r] = sum_n where(idx[r - n * step] == n, g[r - n * step], 0)`` along ``axis``, terms
  outside ``g`` being 0. ``g`` (with zeros) and ``idx`` are padded once by ``(k - 1) * step`` on
  both sides and every term is a plain slice of the padded arrays, rather than one pad per term
  (the transpose of each slice taken alone), which XLA:CPU fused as k bounds-checked pads: up
  to 1.2x faster for MNISTNet's pools (batch 32, inside a loop).

  Args:
    g: gradient of the pass output, ``[b, rows, cols]``.
    idx: which candidate won, same shape as ``g``.
    k: number of candidates.
    axis: the sliced axis, 1 (rows) or 2 (flattened columns-and-channels).
    step: offset between candidates along ``axis`` (1 for rows, c for flat columns).

  Returns:
    The gradient of the pass input, ``(k - 1) * step`` longer than ``g`` along ``axis``.
  """
  width = (k - 1) * step
  pads = [(0, 0)] * 3
  pads[axis] = (width, width)
  g, idx = jnp.pad(g, pads), jnp.pad(idx, pads, constant_values=-1)
  size = g.shape[axis] - width
  total = None
  for n in range(k):
    start = width - n * step
    part = jnp.where(lax.slice_in_dim(idx, start, start + size, axis=axis) == n,
                     lax.slice_in_dim(g, start, start + size, axis=axis), 0)
    total = part if total is None else total + part
  return total


def _separable_max_pool_passes(x, window):
  """The per-row maxima over kw columns (materialised) and the kh x kw maxima made from them."""
  (kh, kw) = window
  cols = _reduce_window_max(x, (1, kw), (1, 1))
  return cols, _reduce_window_max(cols, (kh, 1), (1, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _separable_max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  return _separable_max_pool_passes(x, window)[1]


def _separable_max_pool_fwd(x, window):
  cols, out = _separable_max_pool_passes(x, window)
  return out, (x, cols, out)


def _separable_max_pool_bwd(window, residuals, g):
  """Stride-1 max-pool backward in two passes, along H and then along W.

  A kh x kw maximum is the maximum over kh rows of the per-row maxima over kw columns; the
  forward computes it that way, two 1-D reduce_windows (one 3 x 3 reduce_window took ~5x as
  long as both, 0.72 vs 0.13 ms, for MNISTNet's first pool at batch 32 in a profile on
  XLA:CPU), and keeps the per-row maxima ``cols`` for this backward. Each pass only compares
  stored values: the winner row is the first whose ``cols`` equals the output, the winner
  column the first whose input equals ``cols``. (An elementwise slice-maximum for ``cols`` or
  the forward is faster alone but slower in the model: XLA fuses it into every consumer and
  recomputes it.) Columns-within-row, then rows, makes the winner the first maximum in
  row-major window order -- the element select-and-scatter (the `xla` gradient) picks, ties
  included. Autodiff of a `jnp.maximum` chain instead gives an expression that XLA fuses with
  the forward recomputed once per window tap, several times slower.

  The (w, c) axes are flattened so that a column shift is a contiguous slice of the minor axis
  (offset j * c), which XLA:CPU vectorises well.
  """
  x, cols, out = residuals
  (kh, kw), (b, h, w, c), (_, oh, ow, _) = window, x.shape, out.shape
  cols = cols.reshape(b, h, ow * c)
  out, x = out.reshape(b, oh, ow * c), x.reshape(b, h, w * c)
  idx_h = _first_equal([cols[:, i:i + oh, :] for i in range(kh)], out)
  g_cols = _scatter_back(g.reshape(b, oh, ow * c), idx_h, kh, 1, 1)
  idx_w = _first_equal([x[:, :, j * c:(j + ow) * c] for j in range(kw)], cols)
  return (_scatter_back(g_cols, idx_w, kw, 2, c).reshape(b, h, w, c),)


_separable_max_pool.defvjp(_separable_max_pool_fwd, _separable_max_pool_bwd)


def _block_candidates(x, window):
  """The kh * kw members of each non-overlapping window, row-major, each [b, oh, ow, c]."""
  (kh, kw), (b, h, w, c) = window, x.shape
  oh, ow = h // kh, w // kw
  # Crop to whole windows (floor mode, as VALID pooling) and split each spatial axis into
  # (blocks, window): the members are then plain strided views, no slicing arithmetic.
  xr = x[:, :oh * kh, :ow * kw, :].reshape(b, oh, kh, ow, kw, c)
  return [xr[:, :, i, :, j, :] for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _block_max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  return _reduce_window_max(x, window, window)


def _block_max_pool_fwd(x, window):
  out = _reduce_window_max(x, window, window)
  return out, (x, out)


def _block_max_pool_bwd(window, residuals, g):
  # Each input element belongs to exactly one window, so the backward is a select per window
  # member and the inverse reshape: no scatter. The winner is the first member (row-major) equal
  # to the output, the element select-and-scatter picks, ties included.
  x, out = residuals
  (kh, kw), (b, h, w, c), (_, oh, ow, _) = window, x.shape, g.shape
  idx = _first_equal(_block_candidates(x, window), out)
  parts = [jnp.where(idx == n, g, jnp.zeros_like(g)) for n in range(kh * kw)]
  gx = jnp.stack(parts, axis=3).reshape(b, oh, ow, kh, kw, c)
  gx = gx.transpose(0, 1, 3, 2, 4, 5).reshape(b, oh * kh, ow * kw, c)
  return (jnp.pad(gx, ((0, 0), (0, h - oh * kh), (0, w - ow * kw), (0, 0))),)


_block_max_pool.defvjp(_block_max_pool_fwd, _block_max_pool_bwd)


def max_pool(
    x: jax.Array,
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = 'VALID',
    impl: str = 'auto',
) -> jax.Array:
  """Max-pooling over the two spatial axes of an NHWC input (as `flax.linen.max_pool`).

  ``impl='xla'`` uses `lax.reduce_window`; its gradient is a select-and-scatter, which XLA:CPU
  runs slowly (for a 2x2/2 pool of Conv4 about 9x the reshape formulation below).
  ``impl='matmul'`` and ``impl='fwdconv'`` (the loop-friendly formulation) use

  * non-overlapping windows (``window == strides``, e.g. 2x2 stride 2): crop to whole windows,
    reshape, maximum over the window members;
  * stride 1 (e.g. 3x3 stride 1): a separable two-pass maximum (along W, then along H);
  * anything else: `lax.reduce_window`, as ``'xla'``.

  Both formulations have a hand-written backward made of selects, pads, slices, sums and
  reshapes only, which routes the gradient to the same element as select-and-scatter -- the
  first maximum in row-major window order, ties included -- so both impls give the same
  gradients up to float32 summation order where windows overlap (NaN inputs aside: no
  candidate equals a NaN maximum).

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
  padded_size = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[1:3], pads))
  if any(n < k for n, k in zip(padded_size, window)):
    raise ValueError(f'Window {window} does not fit the (padded) input of size {padded_size}.')
  impl = resolve_impl(impl)
  if impl == 'xla' or (window != strides and strides != (1, 1)):
    return nn.max_pool(x, window, strides, padding=pads)
  x = _pad_spatial(x, pads, value=-jnp.inf)
  if window == strides:
    return _block_max_pool(x, window)
  return _separable_max_pool(x, window)


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
    >>> import jax.numpy as jnp
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
