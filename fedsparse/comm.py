"""Exact accounting of the bits every client sends and receives.

Every algorithm reports, per round and per participating client, the number of bits it uploads
(``bits_up``) and downloads (``bits_down``) under the encoding it actually needs. The encodings
are small pure functions of the payload; algorithms add up the payloads of a message.

Encodings provided here:

* :func:`dense_bits` -- every element as a float32 (FedAvg, FedAvgM; the dense, non-prunable
  parameters of sparse models).
* :func:`known_positions_bits` -- float32 values at positions both sides already know (a static
  mask held by server and clients): only the kept values travel.
* :func:`raw_mask_bits` -- a mask as a plain bitmap, one bit per position (SSFL's one-time mask
  download).

Per-client counts are int32 arrays inside the jitted round (JAX runs without 64-bit types by
default); the run loop sums them over clients and rounds in Python integers, so totals never
overflow. :func:`check_int32` guards the per-client counts themselves.

Example::

  >>> import jax.numpy as jnp
  >>> params = {'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)}
  >>> dense_bits(params)
  512
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'FLOAT_BITS',
    'num_elements',
    'dense_bits',
    'known_positions_bits',
    'raw_mask_bits',
    'per_client',
    'check_int32',
]

FLOAT_BITS = 32  # Every value travels as an IEEE float32.

_INT32_MAX = np.iinfo(np.int32).max


def num_elements(tree: Any) -> int:
  """Total number of elements over the leaves of ``tree`` (static: from shapes only)."""
  return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(tree))


def dense_bits(tree: Any) -> int:
  """Bits to send every element of ``tree`` as a float32."""
  return FLOAT_BITS * num_elements(tree)


def known_positions_bits(mask: Any) -> jax.Array:
  """Bits to send the values kept by a boolean ``mask`` whose positions the receiver knows.

  Args:
    mask: a boolean pytree (True = kept). Positions cost nothing: both sides hold the mask.

  Returns:
    An int32 scalar: 32 bits per True entry.
  """
  kept = sum(jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(mask))
  return jnp.int32(FLOAT_BITS) * kept


def raw_mask_bits(num_positions: int) -> int:
  """Bits to send a mask over ``num_positions`` positions as a raw bitmap: one bit each."""
  return int(num_positions)


def per_client(bits: int | jax.Array, num_clients: int) -> jax.Array:
  """Broadcasts a per-client bit count to an int32 vector of length ``num_clients``."""
  if isinstance(bits, int):
    check_int32(bits)
  return jnp.broadcast_to(jnp.asarray(bits, jnp.int32), (num_clients,))


def check_int32(bits: int) -> int:
  """Raises if one client's per-round count would overflow the int32 used inside jit."""
  if bits > _INT32_MAX:
    raise ValueError(
        f'A per-client message of {bits} bits does not fit the int32 counters used inside the '
        f'jitted round (max {_INT32_MAX} bits, i.e. about {_INT32_MAX // FLOAT_BITS:,} float32 '
        'values); use a smaller model.')
  return bits
