"""The algorithm interface: a pair of pure functions, in the manner of ``optax``.

Bits. Every round reports the bits each participant sends and receives. A count that is a fixed
formula of shapes and masks (dense float32, values at known positions, a raw bitmap) is computed
inside the jitted round (`fedsparse.comm`) and returned as ``bits_up`` / ``bits_down``. A length
that depends on the data in a way jit cannot compute (an arithmetic-coded mask, the cheapest of
several position encodings) follows one rule: the round returns what is sent, or sufficient
statistics of it, under metric names starting with ``payload_``; the algorithm's ``host_bits``
turns them, on the host, into per-client bit counts with `fedsparse.comm`; the run loop adds
those to the round's totals and never logs the payloads themselves.
"""

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from fedsparse.data import FederatedData

__all__ = ['PAYLOAD_PREFIX', 'Algorithm']

# Metrics whose name starts with this are payloads for `Algorithm.host_bits`, not logged.
PAYLOAD_PREFIX = 'payload_'


class Algorithm(NamedTuple):
  """A federated algorithm.

  Attributes:
    init: ``init(key, params, data) -> state``. ``params`` are the freshly initialised model
      params; ``data`` the federated data, for one-time work that needs it (e.g. FLASH's
      density hunting) -- most algorithms ignore it. The state is a small pytree of arrays with
      an int32 ``round`` counter. The key is the algorithm's own stream (not the model init's).
    round: ``round(state, data, key) -> (state, metrics)``, one whole federated round, meant to be
      wrapped in ONE ``jax.jit`` (`fedsparse.engine.jit`). ``metrics`` holds at least
      ``train_loss`` (scalar), ``client_loss`` and ``clients`` ([K]), ``bits_up`` and
      ``bits_down`` ([K] int32 per participant); optionally ``bits_up_all`` and
      ``bits_down_all`` ([N] int32, one entry per client of the population) for traffic that
      involves every client, e.g. SSFL's one-time saliency upload; ``payload_*`` entries for
      ``host_bits`` (see the module docstring); and further scalars, which the run loop logs as
      they are (e.g. ``padding_ratio``).
    eval_params: ``eval_params(state, key) -> params`` of the global model to evaluate (a
      stochastic model such as FedPM's samples with ``key``).
    host_bits: optional ``host_bits(metrics) -> {'bits_up': [K], 'bits_down': [K]}`` (NumPy
      int64, either key optional) computed on the host from the round's ``payload_*`` metrics,
      added to the round's bits. Further entries (scalars, e.g. FedPM's entropy estimate of its
      coded uplink) are logged as they are.
    eval_variants: optional ``eval_variants(state, key) -> {name: params}``: further models
      evaluated beside ``eval_params``'s, logged as ``name/test_accuracy`` etc. (e.g.
      hetero-FLASH's global model at each smaller density budget).
    export: optional ``export(state, key) -> {name: array}``: the final model in the
      algorithm's own compact form, written by the run loop as ``model.npz`` in the workdir
      (``key``: the last evaluation's, so the file reproduces the last logged accuracy; e.g.
      FedPM's seed and coded mask).
    layout: optional ``layout(params) -> pytree of numbers``: what the round derives from the
      algorithm's density-like hyperparameters and the model's shapes -- exact keep counts,
      schedules of counts, message sizes -- computed on the host (Python integers, NumPy
      arrays), raising ValueError for a setting the shapes cannot take (a density that keeps
      no weight). An algorithm built with ``layout=`` (its factory's argument) reads these
      numbers from that pytree instead, as traced arrays if need be: a sweep stacks its
      members' layouts and runs members of different densities through one compiled round.
  """
  init: Callable[[jax.Array, Any, FederatedData], Any]
  round: Callable[[Any, FederatedData, jax.Array], tuple[Any, dict[str, jax.Array]]]
  eval_params: Callable[[Any, jax.Array], Any]
  host_bits: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
  eval_variants: Callable[[Any, jax.Array], dict[str, Any]] | None = None
  export: Callable[[Any, jax.Array], dict[str, np.ndarray]] | None = None
  layout: Callable[[Any], Any] | None = None
