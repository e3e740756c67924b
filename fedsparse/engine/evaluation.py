"""Jitted, batched evaluation of a global model on the pooled and per-client test sets.

Per-client test sets are index arrays into the pooled test set, so the model runs once over the
pooled set; each client's accuracy is then a gather of the per-example correctness. Evaluating
1,000 clients costs one pass over 10,000 test images, not 1,000 passes.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedsparse.data import FederatedData, normalize
from fedsparse.engine.compilation import jit

__all__ = ['make_evaluator']


def make_evaluator(apply_fn: Callable[..., jax.Array], batch_size: int = 1000, *,
                   jitted: bool = True
                   ) -> Callable[[Any, FederatedData], dict[str, jax.Array]]:
  """Builds ``evaluate(params, data) -> metrics``, one jitted function.

  Args:
    apply_fn: the flax ``Module.apply``.
    batch_size: test examples per forward pass (bounds memory; the last batch is padded).
    jitted: False returns the plain function, to be traced inside another jitted function (a
      sweep maps it over its members); `jit` cannot be nested with its compiler options.

  Returns:
    A jitted function returning ``test_loss`` and ``test_accuracy`` on the pooled test set, and
    ``client_accuracy_mean``: the unweighted mean over clients of their local-test accuracy.
  """
  if batch_size < 1:
    raise ValueError(f'eval batch_size must be positive, got {batch_size}.')

  def evaluate(params: Any, data: FederatedData) -> dict[str, jax.Array]:
    n = data.x_test.shape[0]
    bs = min(batch_size, n)
    num_batches = -(-n // bs)
    # The last batch is padded by repeating the final example; padding is sliced off below.
    index = jnp.minimum(jnp.arange(num_batches * bs, dtype=jnp.int32), n - 1)
    index = index.reshape(num_batches, bs)

    def one_batch(idx):
      x = normalize(jnp.take(data.x_test, idx, axis=0), data.scale, data.mean, data.std)
      y = jnp.take(data.y_test, idx, axis=0)
      logits = apply_fn({'params': params}, x, train=False)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss, jnp.argmax(logits, axis=-1) == y

    loss, correct = jax.lax.map(one_batch, index)
    loss, correct = loss.reshape(-1)[:n], correct.reshape(-1)[:n]
    correctf = correct.astype(jnp.float32)

    client_mask = (jnp.arange(data.client_test_index.shape[1])[None, :]
                   < data.client_test_size[:, None])
    client_correct = jnp.sum(jnp.where(client_mask, correctf[data.client_test_index], 0.0), axis=1)
    client_acc = client_correct / jnp.maximum(data.client_test_size, 1).astype(jnp.float32)
    return {
        'test_loss': jnp.mean(loss),
        'test_accuracy': jnp.mean(correctf),
        'client_accuracy_mean': jnp.mean(client_acc),
    }

  return jit(evaluate) if jitted else evaluate
