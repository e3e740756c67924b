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
* :func:`mask_message_bits` -- a mask whose per-layer counts the receiver knows (FedDST's masks
  always hold each layer's target count), sent in the cheapest of three encodings
  (`MASK_ENCODINGS`): a bitmap, a list of indices, or the mask's rank among all masks of its
  count (enumerative coding, T. Cover, "Enumerative source encoding", IEEE Trans. IT 1973: the
  shortest code for a uniformly random subset of known size, which an entropy-coded bitmap
  approaches but never beats). :func:`enumerative_encode` / :func:`enumerative_decode` are the
  coder itself, so the counted length is checked by decoding.
* :func:`bernoulli_encode` / :func:`bernoulli_decode` -- a bit vector arithmetic-coded (a range
  coder of the maintained ``constriction`` library) under one probability ``p`` for every bit
  (FedPM's uplink with the client's empirical frequency, sent as its count of ones), or under a
  probability of its own for each bit that both sides know (FedPM's global ``θ``). The length
  counted is the real stream's, and :func:`bernoulli_decode` gets the bits back.
  :func:`bernoulli_entropy_bits` is the estimate ``n · H2(p̂) + log2 n`` papers report.
* :func:`categorical_encode` / :func:`categorical_decode` -- small integers ``0..m-1`` (FedPM's
  per-parameter counts of ones, its lossless downlink) range-coded under their own histogram,
  which travels first.

Per-client counts are int32 arrays inside the jitted round (JAX runs without 64-bit types by
default); the run loop sums them over clients and rounds in Python integers, so totals never
overflow. :func:`check_int32` guards the per-client counts themselves.

Example::

  >>> import jax.numpy as jnp
  >>> params = {'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)}
  >>> dense_bits(params)
  512
"""

from collections.abc import Sequence
import functools
import math
from typing import Any, NamedTuple

import constriction
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'FLOAT_BITS',
    'num_elements',
    'dense_bits',
    'known_positions_bits',
    'raw_mask_bits',
    'MASK_ENCODINGS',
    'enumerative_bits',
    'enumerative_encode',
    'enumerative_decode',
    'mask_encoding_bits',
    'mask_message_bits',
    'counted_mask_bits',
    'BernoulliCode',
    'bernoulli_encode',
    'bernoulli_decode',
    'bernoulli_entropy_bits',
    'CategoricalCode',
    'categorical_encode',
    'categorical_decode',
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


# How a mask of known per-layer counts can travel; `mask_message_bits` picks the cheapest.
MASK_ENCODINGS = ('bitmap', 'index_list', 'enumerative')


def _ceil_log2(n: int) -> int:
  """``ceil(log2 n)`` for a positive int, exactly (0 for n = 1)."""
  return (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def enumerative_bits(n: int, k: int) -> int:
  """``ceil(log2 C(n, k))``, exactly: the length of the enumerative code of a k-of-n mask.

  ``lgamma`` in float64 gives ``log2 C(n, k)`` to about 1e-9 bits for any layer size; only
  when that lands within 1e-6 of an integer is the exact binomial computed (for a 2.4M-entry
  layer that takes seconds, the estimate microseconds).
  """
  if not 0 <= k <= n:
    raise ValueError(f'A layer of {n} entries cannot keep {k}.')
  if k in (0, n):
    return 0
  estimate = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
  if abs(estimate - round(estimate)) > 1e-6:
    return math.ceil(estimate)
  return _ceil_log2(math.comb(n, k))


def enumerative_encode(mask: np.ndarray) -> int:
  """The rank of a bool mask among all masks of its size and count (the enumerative code).

  The combinatorial number system (colexicographic order): the set positions
  ``p_0 < p_1 < … < p_{k-1}`` have rank ``Σ_j C(p_j, j + 1)``, an integer in ``[0, C(n, k))``,
  so it fits in :func:`enumerative_bits` bits. A reference coder (exact big integers, one
  binomial per set position): it shows that the counted length decodes, and is not run inside
  training rounds.

  Example::

    >>> rank = enumerative_encode(np.array([0, 1, 0, 1, 1], bool))
    >>> rank, enumerative_bits(5, 3), enumerative_decode(rank, 5, 3).astype(int).tolist()
    (8, 4, [0, 1, 0, 1, 1])
  """
  positions = np.flatnonzero(np.asarray(mask).reshape(-1))
  return sum(math.comb(int(p), j + 1) for j, p in enumerate(positions))


def enumerative_decode(rank: int, n: int, k: int) -> np.ndarray:
  """The k-of-n bool mask of a rank from :func:`enumerative_encode`.

  Raises:
    ValueError: for a rank outside ``[0, C(n, k))``.
  """
  if not 0 <= rank < math.comb(n, k):
    raise ValueError(f'Rank {rank} is not in [0, C({n}, {k})).')
  mask = np.zeros(n, bool)
  high = n
  for j in range(k, 0, -1):
    # The largest p < high with C(p, j) <= rank (C(p, j) grows with p): a binary search.
    lo, hi = j - 1, high - 1
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if math.comb(mid, j) <= rank:
        lo = mid
      else:
        hi = mid - 1
    mask[lo] = True
    rank -= math.comb(lo, j)
    high = lo
  return mask


def mask_encoding_bits(sizes: Sequence[int], counts: Sequence[int]) -> dict[str, int]:
  """Exact bits of a mask under each of `MASK_ENCODINGS`, layer by layer.

  The receiver knows every layer's size ``n`` and count ``k`` (from the configuration), so no
  length travels:

  * ``bitmap``: ``n`` bits per layer;
  * ``index_list``: ``k * ceil(log2 n)`` bits per layer (each kept position as a fixed-width
    index);
  * ``enumerative``: ``ceil(log2 C(n, k))`` bits per layer (:func:`enumerative_bits`), the rank
    of the mask among all ``C(n, k)`` masks with ``k`` of ``n`` positions set
    (:func:`enumerative_encode`; 0 bits for an empty or full layer).

  Args:
    sizes: the layers' sizes ``n``.
    counts: their kept counts ``k``, each in ``[0, n]``.

  Returns:
    ``{encoding: bits}`` as Python ints.

  Raises:
    ValueError: for mismatched lengths or a count outside ``[0, n]``.
  """
  sizes, counts = [int(n) for n in sizes], [int(k) for k in counts]
  if len(sizes) != len(counts):
    raise ValueError(f'One count per layer: {len(sizes)} sizes, {len(counts)} counts.')
  for n, k in zip(sizes, counts):
    if n < 0 or not 0 <= k <= n:
      raise ValueError(f'A layer of {n} entries cannot keep {k}.')
  return {
      'bitmap': sum(sizes),
      'index_list': sum(k * _ceil_log2(n) for n, k in zip(sizes, counts) if n),
      'enumerative': sum(enumerative_bits(n, k) for n, k in zip(sizes, counts)),
  }


def mask_message_bits(sizes: Sequence[int], counts: Sequence[int]) -> tuple[int, str]:
  """Bits of a mask message in the cheapest encoding, and that encoding's name.

  Sender and receiver both know the layers' sizes and counts, so both know which encoding is
  cheapest (:func:`mask_encoding_bits`; ties go to the first of `MASK_ENCODINGS`): no tag
  travels. Since ``C(n, k) <= min(2^n, n^k)``, the enumerative code is never longer than the
  other two; they remain for comparison (and tie with it on layers of 0 or 1 entries).

  Example::

    >>> mask_encoding_bits([1000], [2])  # a bitmap, two 10-bit indices, ceil(log2 499500)
    {'bitmap': 1000, 'index_list': 20, 'enumerative': 19}
    >>> mask_message_bits([100], [50])  # C(100, 50) ~ 2^96.3
    (97, 'enumerative')
  """
  bits = mask_encoding_bits(sizes, counts)
  name = min(MASK_ENCODINGS, key=lambda e: (bits[e], MASK_ENCODINGS.index(e)))
  return check_int32(bits[name]), name


def counted_mask_bits(sizes: Sequence[int], counts: Sequence[int]) -> int:
  """Bits of a mask message whose per-layer counts the receiver does not know.

  Each layer sends its count ``k`` in ``ceil(log2(n + 1))`` bits (enough for any of ``0..n``),
  then the enumerative code of its positions (``ceil(log2 C(n, k))`` bits,
  :func:`enumerative_bits`, the shortest of `MASK_ENCODINGS` for a known count). FLASH's masks
  change their per-layer counts, so they travel this way.

  Example::

    >>> counted_mask_bits([1000, 16], [2, 16])  # 10 + 19 bits, then 5 + 0 bits
    34
  """
  sizes, counts = [int(n) for n in sizes], [int(k) for k in counts]
  bits = mask_encoding_bits(sizes, counts)['enumerative']  # validates
  return bits + sum(_ceil_log2(n + 1) for n in sizes)


# Probabilities reach the coder clipped to [_P_MIN, 1 - _P_MIN]: a bit the model deems impossible
# could not be coded at all, and the clip costs at most ~n · 2^-20 / ln 2 bits.
_P_MIN = 2.0 ** -20


class BernoulliCode(NamedTuple):
  """A coded bit vector.

  Attributes:
    words: the range coder's compressed stream (uint32 words).
    ones: the count of ones, sent ahead of the stream when the model is the empirical frequency
      (``None`` under per-bit probabilities both sides know).
    bits: the message length: ``32 · len(words)``, plus ``ceil(log2(n + 1))`` for ``ones``.
  """
  words: np.ndarray
  ones: int | None
  bits: int


def _bernoulli_family():
  return constriction.stream.model.Bernoulli(perfect=False)


def _bernoulli_model(ones: int, n: int):
  # One model for every bit: p̂ = ones / n, which the receiver rebuilds from the count.
  p = float(np.clip(ones / n, _P_MIN, 1.0 - _P_MIN))
  return constriction.stream.model.Bernoulli(p, perfect=False)


def _clipped(p: np.ndarray) -> np.ndarray:
  return np.clip(np.asarray(p, np.float64), _P_MIN, 1.0 - _P_MIN)


def bernoulli_encode(bits: np.ndarray, probabilities: np.ndarray | None = None) -> BernoulliCode:
  """Arithmetic-codes a bit vector (range coding, `constriction.stream.queue.RangeEncoder`).

  Args:
    bits: ``[n]`` bools (or 0/1).
    probabilities: ``None``: every bit under one ``p̂`` = the vector's own frequency of ones,
      whose count travels first in ``ceil(log2(n + 1))`` bits (the receiver rebuilds ``p̂``
      from it). Or ``[n]`` probabilities of a one that the receiver already holds: each bit is
      coded under its own, and nothing else travels.

  Returns:
    A :class:`BernoulliCode`; :func:`bernoulli_decode` inverts it.

  Example::

    >>> code = bernoulli_encode(np.arange(1000) % 10 == 0)  # p̂ = 0.1: ~469 + 10 bits
    >>> code.ones, code.bits, round(bernoulli_entropy_bits(1000, 100))
    (100, 490, 479)
    >>> bool(np.all(bernoulli_decode(code, 1000) == (np.arange(1000) % 10 == 0)))
    True
  """
  bits = np.asarray(bits).reshape(-1)
  symbols = bits.astype(np.int32)
  if np.any((symbols != 0) & (symbols != 1)):
    raise ValueError('bernoulli_encode codes bits: every entry must be 0 or 1 (or a bool).')
  encoder = constriction.stream.queue.RangeEncoder()
  n = symbols.size
  if probabilities is None:
    ones = int(symbols.sum())
    if n:
      encoder.encode(symbols, _bernoulli_model(ones, n))
  else:
    ones = None
    probs = _clipped(np.asarray(probabilities).reshape(-1))
    if probs.size != n:
      raise ValueError(f'{probs.size} probabilities for {n} bits.')
    if n:
      encoder.encode(symbols, _bernoulli_family(), probs)
  words = np.asarray(encoder.get_compressed(), np.uint32)
  length = 32 * words.size + (_ceil_log2(n + 1) if ones is not None else 0)
  return BernoulliCode(words=words, ones=ones, bits=length)


def bernoulli_decode(code: BernoulliCode, n: int, probabilities: np.ndarray | None = None
                     ) -> np.ndarray:
  """The ``[n]`` bools :func:`bernoulli_encode` coded (with the same ``probabilities``)."""
  if n == 0:
    return np.zeros(0, bool)
  decoder = constriction.stream.queue.RangeDecoder(code.words)
  if probabilities is None:
    if code.ones is None:
      raise ValueError('This code was made under per-bit probabilities; pass them.')
    symbols = decoder.decode(_bernoulli_model(code.ones, n), n)
  else:
    symbols = decoder.decode(_bernoulli_family(), _clipped(np.asarray(probabilities).reshape(-1)))
  return np.asarray(symbols, np.int32).astype(bool)


def bernoulli_entropy_bits(n: int, ones: int) -> float:
  """The estimate ``n · H2(p̂) + log2 n`` of a coded ``n``-bit vector with ``ones`` ones.

  FedPM's paper and code report this figure (``p̂ = ones / n``, plus ``log2 n`` bits for
  ``p̂``); :func:`bernoulli_encode` gives the length of a real stream.
  """
  if n <= 0 or not 0 <= ones <= n:
    raise ValueError(f'Need n >= 1 and 0 <= ones <= n, got n={n}, ones={ones}.')
  p = ones / n
  h2 = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
  return n * h2 + math.log2(n)


class CategoricalCode(NamedTuple):
  """Coded integers in ``0..m-1``.

  Attributes:
    words: the range coder's stream (uint32 words).
    histogram: ``[m]`` counts of each value, sent ahead of the stream.
    bits: the message length: ``32 · len(words) + m · ceil(log2(n + 1))``.
  """
  words: np.ndarray
  histogram: np.ndarray
  bits: int


def _categorical_model(histogram: np.ndarray):
  probs = np.asarray(histogram, np.float64) / max(int(np.sum(histogram)), 1)
  return constriction.stream.model.Categorical(probs, perfect=False)


def categorical_encode(values: np.ndarray, num_values: int) -> CategoricalCode:
  """Range-codes integers in ``0..num_values-1`` under their own frequencies.

  The histogram travels first (``num_values`` counts of ``ceil(log2(n + 1))`` bits each), so
  the receiver holds the model; the stream then costs about ``n`` times the histogram's entropy.

  Example::

    >>> code = categorical_encode(np.arange(1000) % 4, 4)  # 2 bits each (63 words), 4 x 10 bits
    >>> code.bits, bool(np.all(categorical_decode(code) == np.arange(1000) % 4))
    (2056, True)
  """
  values = np.asarray(values).reshape(-1)
  if values.size and (values.min() < 0 or values.max() >= num_values):
    raise ValueError(f'categorical_encode codes integers in [0, {num_values}), got values in '
                     f'[{values.min()}, {values.max()}].')
  histogram = np.bincount(values.astype(np.int64), minlength=num_values)
  encoder = constriction.stream.queue.RangeEncoder()
  if values.size:
    encoder.encode(values.astype(np.int32), _categorical_model(histogram))
  words = np.asarray(encoder.get_compressed(), np.uint32)
  return CategoricalCode(words, histogram,
                         32 * words.size + num_values * _ceil_log2(values.size + 1))


def categorical_decode(code: CategoricalCode) -> np.ndarray:
  """The integers :func:`categorical_encode` coded."""
  n = int(np.sum(code.histogram))
  if n == 0:
    return np.zeros(0, np.int32)
  decoder = constriction.stream.queue.RangeDecoder(code.words)
  return np.asarray(decoder.decode(_categorical_model(code.histogram), n), np.int32)


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
