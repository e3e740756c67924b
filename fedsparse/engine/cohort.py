"""Client sampling and aggregation over the cohort axis.

Key streams: a round's key (``fold_in(fold_in(root, 1), t)`` in the run loop) is divided by
:func:`draw_cohort` into fixed ``fold_in`` paths -- 0: who takes part, 1: the clients' keys (one
per cohort slot), 2: the server's own randomness. The cohort of round ``t`` therefore depends only
on (seed, t, population, cohort settings): every algorithm run at the same seed trains the same
clients in the same rounds, on the same minibatch orders, which makes comparisons paired.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ['Cohort', 'CohortConfig', 'aggregation_weights', 'draw_cohort', 'sample_cohort',
           'server_key', 'weighted_mean']


def sample_cohort(key: jax.Array, num_clients: int, cohort_size: int,
                  replace: bool = False) -> jax.Array:
  """Draws the ids of the round's participants, uniformly, with or without replacement."""
  return jax.random.choice(key, num_clients, (cohort_size,), replace=replace).astype(jnp.int32)


class Cohort(NamedTuple):
  """A round's participants and keys (see the module docstring)."""
  clients: jax.Array  # [K] int32 client ids
  keys: jax.Array  # [K] PRNG keys, one per cohort slot
  server_key: jax.Array  # the server's randomness this round (masks, sampling of its own)


def draw_cohort(key: jax.Array, num_clients: int, config: 'CohortConfig') -> Cohort:
  """Samples round participants and splits the round key along fixed paths.

  Example:
    >>> import jax
    >>> a = draw_cohort(jax.random.key(0), 100, CohortConfig(5))
    >>> b = draw_cohort(jax.random.key(0), 100, CohortConfig(5))
    >>> bool((a.clients == b.clients).all()), a.keys.shape
    (True, (5,))
  """
  k = config.clients_per_round
  clients = sample_cohort(jax.random.fold_in(key, 0), num_clients, k, config.replace)
  keys = jax.random.split(jax.random.fold_in(key, 1), k)  # one key per slot, never shared
  return Cohort(clients=clients, keys=keys, server_key=server_key(key))


def server_key(key: jax.Array) -> jax.Array:
  """The server's stream of a round key (``Cohort.server_key``), without drawing a cohort."""
  return jax.random.fold_in(key, 2)


def aggregation_weights(sizes: jax.Array, weighted: bool) -> jax.Array:
  """Normalised per-client weights: ∝ n_k (FedAvg's default) or uniform."""
  w = sizes.astype(jnp.float32) if weighted else jnp.ones(sizes.shape, jnp.float32)
  return w / jnp.maximum(jnp.sum(w), 1e-12)


def weighted_mean(trees: Any, weights: jax.Array) -> Any:
  """Σ_k w_k · tree_k over the leading client axis of every leaf.

  The reduction names the client axis explicitly: ``jax.tree.map(jnp.mean, trees)`` would average
  every axis and silently broadcast a scalar back.
  """
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=(0, 0)), trees)


@dataclasses.dataclass(frozen=True)
class CohortConfig:
  """Who takes part in a round and how their updates are combined.

  Attributes:
    clients_per_round: the cohort size K.
    replace: sample clients with replacement (the FedDST code's behaviour) or without.
    weighted: aggregate with weights ∝ n_k (FedAvg) or uniformly (FLASH's default).
  """
  clients_per_round: int = 10
  replace: bool = False
  weighted: bool = True

  def __post_init__(self):
    if self.clients_per_round < 1:
      raise ValueError(f'clients_per_round must be positive, got {self.clients_per_round}.')
