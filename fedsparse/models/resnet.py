"""ResNet-18 for 32x32 inputs with GroupNorm (FLASH's CIFAR model, made federated-friendly).

He et al. (2016) BasicBlock ResNet-18 with the CIFAR stem (one 3x3 stride-1 convolution, no
max-pool). FLASH (arXiv 2208.13092) uses BatchNorm and averages the running statistics across
clients; this model replaces every BatchNorm by GroupNorm so that the only collection is
``params`` -- no per-client batch statistics to aggregate, and `train=True` changes nothing.

Convolutions have no bias (each is followed by a normalisation, which has its own). The 3x3
convolutions pad by one pixel on each side, as the PyTorch model does, so a stride-2 3x3
convolution samples the same positions as the 1x1 stride-2 shortcut; `flax.linen.Conv`'s
``'SAME'`` would put the extra pad on the high side only and shift one against the other.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedsparse.models import layers

__all__ = ['BasicBlock', 'ResNet', 'ResNet18']


class BasicBlock(nn.Module):
  """``conv3x3(stride) - GN - relu - conv3x3 - GN`` plus a shortcut, then relu.

  The shortcut is the identity, or ``conv1x1(stride) - GN`` when the shape changes.

  Attributes:
    features: output channels.
    strides: stride of the first convolution and of the shortcut.
    num_groups: GroupNorm groups (reduced by `layers.group_norm_groups` when needed).
    conv_impl: one of `layers.IMPLS`.
  """

  features: int
  strides: int = 1
  num_groups: int = 32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    groups = layers.group_norm_groups(self.features, self.num_groups)

    def norm():
      return nn.GroupNorm(num_groups=groups, epsilon=1e-5)

    y = layers.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False,
                    impl=self.conv_impl)(x)
    y = nn.relu(norm()(y))
    y = layers.Conv(self.features, (3, 3), 1, padding=1, use_bias=False,
                    impl=self.conv_impl)(y)
    y = norm()(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = layers.Conv(self.features, (1, 1), self.strides, padding=0, use_bias=False,
                      impl=self.conv_impl)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A CIFAR-style ResNet of `BasicBlock`\\ s with GroupNorm.

  Attributes:
    num_classes: number of output logits.
    stage_sizes: blocks per stage.
    widths: channels per stage; stages after the first start with stride 2.
    num_groups: GroupNorm groups (fewer where a width is not a multiple).
    conv_impl: one of `layers.IMPLS`.
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  num_groups: int = 32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Returns float32 logits ``[batch, num_classes]`` for a normalised NHWC ``x``."""
    del train  # GroupNorm has no batch statistics: train and eval behave the same.
    stem = self.widths[0]
    x = layers.Conv(stem, (3, 3), 1, padding=1, use_bias=False, impl=self.conv_impl)(x)
    x = nn.GroupNorm(num_groups=layers.group_norm_groups(stem, self.num_groups),
                     epsilon=1e-5)(x)
    x = nn.relu(x)
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, self.num_groups, self.conv_impl)(x)
    x = jnp.mean(x, axis=(1, 2))  # Global average pooling.
    return nn.Dense(self.num_classes)(x)


class ResNet18(ResNet):
  """ResNet-18-GN: 11,173,962 parameters with 10 classes (11,220,132 with 100)."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
