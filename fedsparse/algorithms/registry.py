"""The algorithm registry: each algorithm module declares its names, hyperparameters and factory.

An algorithm's own hyperparameters are a frozen dataclass validated in ``__post_init__``; in an
experiment config they live in a section named after the algorithm (``config.ssfl.density``),
while settings every algorithm shares (data, model, cohort, local training, server optimizer,
mapping) stay flat. The run loop builds any algorithm through :func:`get` and holds no code for
a particular one.

Example:
  >>> from fedsparse import algorithms
  >>> spec = algorithms.registry.get('ssfl')
  >>> spec.hparams(density=0.05).density
  0.05
  >>> algorithms.registry.get('fedsgd')
  Traceback (most recent call last):
  ...
  ValueError: Unknown algorithm 'fedsgd'; valid: fedavg, fedavgm, ssfl, feddst, random_mask, flash, fedpm.
"""

import dataclasses
from typing import Any, Callable

import jax
import optax

from fedsparse.checks import check_choice, check_int  # pylint: disable=unused-import (re-exported)
from fedsparse.engine import Algorithm, ClientMapping, CohortConfig, LocalConfig

__all__ = ['Common', 'Spec', 'check_choice', 'check_int', 'check_learning_rates',
           'check_weight_averaging', 'get', 'names', 'register', 'unregister']


@dataclasses.dataclass(frozen=True)
class Common:
  """What every algorithm gets from the shared (flat) part of a config.

  Attributes:
    apply_fn: the flax ``Module.apply`` of the model.
    cohort: cohort size, sampling and aggregation weighting.
    local: local training settings.
    learning_rate: client learning rate at round 0.
    lr_decay: per-round multiplicative decay of the client learning rate.
    server_optimizer: the optax optimizer applied to −Δ̄ by algorithms that average deltas.
    mapping: how clients are mapped over the cohort axis.
    num_rounds: the run's length, for schedules that end relative to it (FedDST's readjustment
      ends at ``num_rounds // 2`` by default); not passed on by :meth:`kwargs`.
    layout: the algorithm's layout (`fedsparse.engine.Algorithm.layout`) given from outside,
      leaves possibly traced (a sweep's member), or None: derived from the hyperparameters.
      Passed on by :meth:`kwargs` only when set, so algorithms without a layout never see it.
  """
  apply_fn: Callable[..., Any]
  cohort: CohortConfig
  local: LocalConfig
  learning_rate: float
  lr_decay: float = 1.0
  server_optimizer: optax.GradientTransformation | None = None
  mapping: ClientMapping = ClientMapping()
  num_rounds: int | None = None
  layout: Any = None

  def kwargs(self) -> dict[str, Any]:
    """The shared keyword arguments of the algorithm factories (all fields but ``apply_fn``,
    ``num_rounds`` and an unset ``layout``)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    del out['apply_fn'], out['num_rounds']
    if self.layout is None:
      del out['layout']
    return out


@dataclasses.dataclass(frozen=True)
class Spec:
  """A registered algorithm.

  Attributes:
    name: the config's ``algorithm`` value and the name of its config section.
    hparams: a frozen dataclass of the algorithm's own hyperparameters (defaults = the paper's),
      validated in ``__post_init__``.
    build: ``build(hparams, common) -> Algorithm``.
    summary: one line for listings.
    server_momentum: whether ``server_optimizer='auto'`` means server momentum (FedAvgM).
    check: optional ``check(hparams, config)`` raising ValueError where the hyperparameters
      conflict with the shared settings of a run config (e.g. more warm-up than rounds).
    resolve: optional ``resolve(hparams, config) -> hparams`` filling defaults that depend on
      the shared settings (FedDST's ``readjust_end=0`` becomes ``num_rounds // 2``), so that the
      saved config records what the run really does and a resume that would change it is
      refused.
    traceable: the hyperparameters that enter the round only through the algorithm's layout
      (`fedsparse.engine.Algorithm.layout`), e.g. a density: sweep members that differ in them
      share one compiled round, each with its own exact counts.
  """
  name: str
  hparams: type
  build: Callable[[Any, Common], Algorithm]
  summary: str
  server_momentum: bool = False
  check: Callable[[Any, Any], None] | None = None
  resolve: Callable[[Any, Any], Any] | None = None
  traceable: tuple[str, ...] = ()


_REGISTRY: dict[str, Spec] = {}


def register(spec: Spec) -> Spec:
  """Adds an algorithm (called at import time of its module)."""
  if not dataclasses.is_dataclass(spec.hparams) or not spec.hparams.__dataclass_params__.frozen:
    raise TypeError(f'{spec.name}: hparams must be a frozen dataclass, got {spec.hparams!r}.')
  unknown = sorted(set(spec.traceable) - {f.name for f in dataclasses.fields(spec.hparams)})
  if unknown:
    raise TypeError(f'{spec.name}: traceable names {unknown}, which are not fields of '
                    f'{spec.hparams.__name__}.')
  old = _REGISTRY.get(spec.name)
  # A module imported again (e.g. reloaded in a notebook) re-registers the same algorithm.
  if old is not None and (old.hparams.__module__, old.hparams.__qualname__) != (
      spec.hparams.__module__, spec.hparams.__qualname__):
    raise ValueError(f'Algorithm {spec.name!r} is registered twice, by {old.hparams.__module__} '
                     f'and {spec.hparams.__module__}.')
  _REGISTRY[spec.name] = spec
  return spec


def unregister(name: str) -> None:
  """Removes a registered algorithm (e.g. one a test or notebook registered for a while)."""
  get(name)  # fails with the valid names
  del _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered algorithm names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> Spec:
  """The registered algorithm ``name``; fails with the valid names."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown algorithm {name!r}; valid: {", ".join(_REGISTRY)}.')
  return _REGISTRY[name]


# --------------------------------------------------------------------------------------------------
# Checks the algorithm modules share (hyperparameter dataclasses and factories).


def check_learning_rates(learning_rate: Any, lr_decay: Any) -> None:
  """Raises unless the client learning rate is positive and finite and its decay in (0, 1].

  Arrays pass unchecked: they are swept values (`fedsparse.sweep`), traced inside the jitted
  round and checked as numbers in each member's config before anything compiles.
  """
  if isinstance(learning_rate, jax.Array) or isinstance(lr_decay, jax.Array):
    return
  if not learning_rate > 0 or learning_rate == float('inf'):
    raise ValueError(f'learning_rate must be positive and finite, got {learning_rate}.')
  if not 0 < lr_decay <= 1:
    raise ValueError(f'lr_decay must be in (0, 1], got {lr_decay}.')


def check_weight_averaging(paper: str, server_optimizer: Any = None, config: Any = None) -> None:
  """Raises for a server optimizer given to an algorithm that averages weights entry by entry.

  Args:
    paper: the algorithm's name for the message.
    server_optimizer: the factory's argument (must be None), or
    config: a run config, whose ``server_optimizer`` must be ``auto`` or ``sgd`` at
      ``server_learning_rate=1.0``.
  """
  if server_optimizer is not None:
    raise ValueError(f'{paper} averages the clients\' weights and has no server optimizer; pass '
                     'server_optimizer=None.')
  if config is not None and (config.server_optimizer == 'momentum'
                             or config.server_learning_rate != 1.0):
    raise ValueError(f'{paper} averages weights and has no server optimizer: use '
                     'server_optimizer=auto or sgd with server_learning_rate=1.0, got '
                     f'{config.server_optimizer!r} with {config.server_learning_rate}.')
