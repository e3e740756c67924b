"""Federated algorithms, one paper per module, each registered in `registry` by name."""

from fedsparse.algorithms import registry
from fedsparse.algorithms.fedavg import (FedAvgHparams, FedAvgMHparams, FedAvgState, fedavg,
                                         fedavg_round_core)
from fedsparse.algorithms.ssfl import MASKS as SSFL_MASKS
from fedsparse.algorithms.ssfl import SCORES as SALIENCY_SCORES
from fedsparse.algorithms.ssfl import WEIGHTINGS as SALIENCY_WEIGHTINGS
from fedsparse.algorithms.ssfl import SSFLHparams, SSFLState, population_saliency, ssfl
from fedsparse.algorithms.feddst import FedDSTHparams, FedDSTState, RandomMaskHparams, feddst
from fedsparse.algorithms.flash import FLASHHparams, FLASHState, flash
from fedsparse.algorithms.fedpm import FedPMHparams, FedPMState, fedpm

__all__ = ['ALGORITHMS', 'FLASHHparams', 'FLASHState', 'FedAvgHparams', 'FedAvgMHparams',
           'FedAvgState', 'FedDSTHparams', 'FedDSTState', 'FedPMHparams', 'FedPMState',
           'RandomMaskHparams', 'SALIENCY_SCORES', 'SALIENCY_WEIGHTINGS', 'SSFLHparams',
           'SSFLState', 'SSFL_MASKS', 'fedavg', 'fedavg_round_core', 'feddst', 'fedpm', 'flash',
           'population_saliency', 'registry', 'ssfl']

ALGORITHMS = registry.names()
