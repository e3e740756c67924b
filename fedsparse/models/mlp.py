"""A fully connected classifier (the usual MNIST/FEMNIST baseline of FedAvg-style papers)."""

from collections.abc import Sequence

import flax.linen as nn
import jax

__all__ = ['MLP']


class MLP(nn.Module):
  """Flatten, then ``Dense -> relu`` per hidden layer, then a linear classifier.

  Attributes:
    num_classes: number of output logits.
    hidden_sizes: widths of the hidden layers; the default ``(200, 200)`` is the 2NN of
      McMahan et al. (2017).

  Example:
    >>> import jax.numpy as jnp
    >>> model = MLP(num_classes=10)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
    >>> sorted(params)
    ['Dense_0', 'Dense_1', 'Dense_2']
  """

  num_classes: int
  hidden_sizes: Sequence[int] = (200, 200)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Returns float32 logits ``[batch, num_classes]`` for an NHWC (or any ``[batch, ...]``) x."""
    del train  # No dropout or batch statistics: the model behaves the same in both modes.
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden_sizes:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)
