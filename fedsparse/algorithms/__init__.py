"""Federated algorithms, one paper per module, each registered in `registry` by name."""

from fedsparse.algorithms import registry
from fedsparse.algorithms.fedavg import (FedAvgConfig, FedAvgMConfig, FedAvgState, fedavg,
                                         fedavg_round_core, fedavgm)
from fedsparse.algorithms.ssfl import MASKS as SSFL_MASKS
from fedsparse.algorithms.ssfl import SCORES as SALIENCY_SCORES
from fedsparse.algorithms.ssfl import WEIGHTINGS as SALIENCY_WEIGHTINGS
from fedsparse.algorithms.ssfl import SSFLConfig, SSFLState, population_saliency, ssfl
from fedsparse.algorithms.feddst import FedDSTConfig, FedDSTState, RandomMaskConfig, feddst
from fedsparse.algorithms.flash import FLASHConfig, FLASHState, flash
from fedsparse.algorithms.fedpm import FedPMConfig, FedPMState, fedpm

__all__ = ['ALGORITHMS', 'FLASHConfig', 'FLASHState', 'FedAvgConfig', 'FedAvgMConfig',
           'FedAvgState', 'FedDSTConfig', 'FedDSTState', 'FedPMConfig', 'FedPMState',
           'RandomMaskConfig', 'SALIENCY_SCORES', 'SALIENCY_WEIGHTINGS', 'SSFLConfig', 'SSFLState',
           'SSFL_MASKS', 'fedavg', 'fedavg_round_core', 'fedavgm', 'feddst', 'fedpm', 'flash',
           'population_saliency', 'registry', 'ssfl']

ALGORITHMS = registry.names()
