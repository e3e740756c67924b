"""Federated algorithms, one paper per module."""

from fedsparse.algorithms.fedavg import FedAvgState, fedavg, fedavg_round_core, fedavgm
from fedsparse.algorithms.ssfl import MASKS as SSFL_MASKS
from fedsparse.algorithms.ssfl import SCORES as SALIENCY_SCORES
from fedsparse.algorithms.ssfl import WEIGHTINGS as SALIENCY_WEIGHTINGS
from fedsparse.algorithms.ssfl import SSFLState, population_saliency, ssfl

__all__ = ['ALGORITHMS', 'FedAvgState', 'SALIENCY_SCORES', 'SALIENCY_WEIGHTINGS', 'SSFLState',
           'SSFL_MASKS', 'fedavg', 'fedavg_round_core', 'fedavgm', 'population_saliency', 'ssfl']

ALGORITHMS = ('fedavg', 'fedavgm', 'ssfl')
