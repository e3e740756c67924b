"""The algorithm contract (`fedsparse.testing.check_algorithm`) over every registered algorithm,
and algorithms that break each clause, which it must catch."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import pytest

from fedsparse import algorithms
from fedsparse import testing
from fedsparse.algorithms.fedavg import FedAvgState, fedavg
from fedsparse.algorithms.ssfl import SSFLHparams, ssfl
from fedsparse.algorithms import registry

# Settings that reach more of an algorithm in three toy rounds (the paper's defaults readjust,
# hunt or score too rarely for that); the others are checked at their defaults.
REACH = {'feddst': {'readjust_every': 1, 'readjust_end': 3, 'alpha': 0.3},
         'flash': {'mode': 'jmwst', 'hunt_epochs': 1},
         'ssfl': {'density': 0.3, 'warmup_rounds': 1}}


@pytest.mark.parametrize('name', algorithms.registry.names())
def test_every_registered_algorithm_keeps_the_contract(name):
  testing.check_algorithm(name, REACH.get(name))


# --------------------------------------------------------------------------------------------------
# Algorithms that break one clause each: FedAvg with one thing wrong, registered as a plugin.


@dataclasses.dataclass(frozen=True)
class BrokenHparams:
  clause: str = ''


class _OtherState(NamedTuple):
  """FedAvg's state fields under another type: a state whose structure changes each round."""
  params: Any
  opt_state: Any
  round: jax.Array


def _broken(hp, common):
  """FedAvg, broken as ``hp.clause`` says."""
  kwargs = common.kwargs()
  if hp.clause == 'lr_decay':
    # The decay shifted by one round (what the contract exists to catch).
    kwargs['learning_rate'] = kwargs['learning_rate'] * kwargs['lr_decay']
  alg = fedavg(common.apply_fn, **kwargs)
  traces = []

  def round_fn(state, data, key):
    if hp.clause == 'determinism':
      key = jax.random.fold_in(key, len(traces))  # a key that depends on the trace
    traces.append(None)
    if hp.clause == 'strategies' and common.mapping.strategy == 'vmap':
      key = jax.random.fold_in(key, 1)
    new, metrics = alg.round(FedAvgState(*state), data, key)
    if hp.clause == 'metrics':
      metrics['bits_up'] = metrics['bits_up'].astype(jnp.float32)
    if hp.clause == 'round':
      new = new._replace(round=new.round + 1)
    if hp.clause == 'retrace' and not isinstance(state, _OtherState):
      new = _OtherState(*new)
    return new, metrics
  return alg._replace(round=round_fn)


def _ssfl_ignoring_layout(hp, common):
  """SSFL that derives its counts from its own density even when given a layout."""
  kwargs = {k: v for k, v in common.kwargs().items() if k != 'layout'}
  return ssfl(common.apply_fn, **kwargs, **dataclasses.asdict(hp))


@pytest.fixture(name='broken')
def broken_fixture():
  """Plugin algorithms registered for the test only: FedAvg with one clause broken, and an SSFL
  that ignores the layout it is given (the `layout` clause)."""
  registry.register(registry.Spec(name='broken_for_tests', hparams=BrokenHparams, build=_broken,
                                  summary='FedAvg with one clause of the contract broken'))
  registry.register(registry.Spec(
      name='ssfl_ignoring_layout', hparams=SSFLHparams, build=_ssfl_ignoring_layout,
      traceable=('density',), summary='SSFL deaf to its layout'))
  yield
  registry.unregister('broken_for_tests')
  registry.unregister('ssfl_ignoring_layout')


@pytest.mark.parametrize('clause', testing.CLAUSES)
@pytest.mark.usefixtures('broken')
def test_the_contract_catches_an_algorithm_that_breaks_each_clause(clause):
  if clause == 'layout':
    with pytest.raises(AssertionError, match='^layout:'):
      testing.check_algorithm('ssfl_ignoring_layout')
    return
  with pytest.raises(AssertionError, match=f'^{clause}:'):
    testing.check_algorithm('broken_for_tests', {'clause': clause})
  testing.check_algorithm('broken_for_tests')  # unbroken, it passes
