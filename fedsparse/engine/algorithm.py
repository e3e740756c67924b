"""The algorithm interface: a pair of pure functions, in the manner of ``optax``."""

from typing import Any, Callable, NamedTuple

import jax

from fedsparse.data import FederatedData

__all__ = ['Algorithm']


class Algorithm(NamedTuple):
  """A federated algorithm.

  Attributes:
    init: ``init(key, params) -> state``. ``params`` are the freshly initialised model params;
      the state is a small pytree of arrays with an int32 ``round`` counter.
    round: ``round(state, data, key) -> (state, metrics)``, one whole federated round, meant to be
      wrapped in ONE ``jax.jit`` (`fedsparse.engine.jit`). ``metrics`` holds at least
      ``train_loss`` (scalar), ``client_loss`` and ``clients`` ([K]), ``bits_up`` and
      ``bits_down`` ([K] int32 per participant); optionally ``bits_up_all`` and
      ``bits_down_all`` ([N] int32, one entry per client of the population) for traffic that
      involves every client, e.g. SSFL's one-time saliency upload, and further scalars, which
      the run loop logs as they are.
    eval_params: ``eval_params(state) -> params`` of the global model to evaluate.
  """
  init: Callable[[jax.Array, Any], Any]
  round: Callable[[Any, FederatedData, jax.Array], tuple[Any, dict[str, jax.Array]]]
  eval_params: Callable[[Any], Any]
