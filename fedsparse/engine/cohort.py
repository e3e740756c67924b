"""Client sampling and aggregation over the cohort axis."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ['CohortConfig', 'sample_cohort', 'aggregation_weights', 'weighted_mean']


def sample_cohort(key: jax.Array, num_clients: int, cohort_size: int,
                  replace: bool = False) -> jax.Array:
  """Draws the ids of the round's participants, uniformly, with or without replacement."""
  return jax.random.choice(key, num_clients, (cohort_size,), replace=replace).astype(jnp.int32)


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
