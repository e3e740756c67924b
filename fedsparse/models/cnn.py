"""The small convolutional networks of the sparse-FL papers.

* `MNISTNet`, `CIFAR10Net`, `CIFAR100Net`: the FedDST models (Bibikar et al., AAAI 2022,
  arXiv 2112.09824), also FLASH's MNIST model (arXiv 2208.13092). The official PyTorch code
  applies a softmax before the cross-entropy; these return logits.
* `Conv4`, `Conv6`, `Conv10`: the VGG-like stacks of FedPM (Isik et al., ICLR 2023,
  arXiv 2209.15328), after Ramanujan et al. / Zhou et al.: pairs of 3x3 SAME convolutions with
  bias and relu, a 2x2 max-pool after each pair, then ``256 -> 256 -> classes``.

Every convolution and pooling takes ``conv_impl`` (see `fedsparse.models.layers`); the choice
changes only speed, never parameters or results beyond float32 rounding.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from fedsparse.models import layers

__all__ = ['FedDSTNet', 'MNISTNet', 'CIFAR10Net', 'CIFAR100Net', 'ConvStack', 'Conv4', 'Conv6',
           'Conv10']


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0], -1))


class FedDSTNet(nn.Module):
  """FedDST's CNN family: 5x5 VALID convs, each with a 3x3 stride-1 max-pool and relu, then MLP.

  Per conv width: ``conv kxk VALID, maxpool 3 stride 1, relu``; then flatten, a relu dense layer
  per hidden width, and the classifier. The official code pools before the relu; the two commute
  (both are monotone), and pooling first applies the relu to fewer elements.

  Attributes:
    num_classes: number of output logits.
    conv_features: output channels of each conv.
    dense_features: widths of the hidden dense layers.
    conv_impl: implementation of convolutions and pooling, one of `layers.IMPLS`.
  """

  num_classes: int = 10
  conv_features: Sequence[int] = (10, 20)
  dense_features: Sequence[int] = (50,)
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Returns float32 logits ``[batch, num_classes]`` for a normalised NHWC ``x``."""
    del train  # Deterministic model.
    for features in self.conv_features:
      x = layers.Conv(features, (5, 5), padding='VALID', impl=self.conv_impl)(x)
      x = nn.relu(layers.max_pool(x, 3, strides=1, impl=self.conv_impl))
    x = _flatten(x)
    for width in self.dense_features:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class MNISTNet(FedDSTNet):
  """FedDST's MNIST CNN: 261,840 parameters at 28x28x1 with 10 classes.

  ``conv 1->10, conv 10->20 (each k5 VALID, maxpool 3 stride 1, relu), flatten (5120), fc 50,
  relu, fc classes``.
  """

  conv_features: Sequence[int] = (10, 20)
  dense_features: Sequence[int] = (50,)


class CIFAR10Net(FedDSTNet):
  """FedDST's CIFAR-10 CNN: 782,006 parameters at 32x32x3 with 10 classes.

  ``conv 3->6, conv 6->16 (each k5 VALID, maxpool 3 stride 1, relu), flatten (6400), fc 120,
  relu, fc 84, relu, fc classes``.
  """

  conv_features: Sequence[int] = (6, 16)
  dense_features: Sequence[int] = (120, 84)


class CIFAR100Net(FedDSTNet):
  """FedDST's CIFAR-100 CNN: 783,092 parameters at 32x32x3 with 100 classes.

  ``conv 3->6, conv 6->16 (each k5 VALID, maxpool 3 stride 1, relu), flatten (6400), fc 120,
  relu, fc classes`` (CIFAR10Net without its fc 84).
  """

  conv_features: Sequence[int] = (6, 16)
  dense_features: Sequence[int] = (120,)


class ConvStack(nn.Module):
  """A VGG-like stack: per stage, 3x3 SAME conv + relu per width, then 2x2 max-pool stride 2.

  Pooling crops odd sizes (floor mode, as PyTorch's ``max_pool2d``): 28 -> 14 -> 7.

  Attributes:
    num_classes: number of output logits.
    stages: conv widths per stage, e.g. ``((64, 64), (128, 128))`` for Conv4.
    dense_sizes: widths of the hidden fully connected layers.
    conv_impl: implementation of convolutions and pooling, one of `layers.IMPLS`.
  """

  num_classes: int = 10
  stages: Sequence[Sequence[int]] = ((64, 64), (128, 128))
  dense_sizes: Sequence[int] = (256, 256)
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Returns float32 logits ``[batch, num_classes]`` for a normalised NHWC ``x``."""
    del train  # Deterministic model.
    for stage in self.stages:
      for features in stage:
        x = nn.relu(layers.Conv(features, (3, 3), padding='SAME', impl=self.conv_impl)(x))
      x = layers.max_pool(x, 2, strides=2, impl=self.conv_impl)
    x = _flatten(x)
    for width in self.dense_sizes:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class Conv4(ConvStack):
  """FedPM's Conv4 (MNIST/EMNIST): 1,933,258 parameters at 28x28x1 with 10 classes."""

  stages: Sequence[Sequence[int]] = ((64, 64), (128, 128))


class Conv6(ConvStack):
  """FedPM's Conv6 (CIFAR-10): 2,262,602 parameters at 32x32x3 with 10 classes."""

  stages: Sequence[Sequence[int]] = ((64, 64), (128, 128), (256, 256))


class Conv10(ConvStack):
  """FedPM's Conv10 (CIFAR-100): 19,197,092 parameters at 32x32x3 with 100 classes.

  Five stages up to 1024 channels; at 32x32 the last pool leaves 1x1x1024, so the first fully
  connected layer has 1024 inputs, as in the official ``Mask10CNN``.
  """

  num_classes: int = 100
  stages: Sequence[Sequence[int]] = (
      (64, 64), (128, 128), (256, 256), (512, 512), (1024, 1024))
