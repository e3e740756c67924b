"""Federated algorithms, one paper per module."""

from fedsparse.algorithms.fedavg import FedAvgState, fedavg, fedavgm

__all__ = ['ALGORITHMS', 'FedAvgState', 'fedavg', 'fedavgm']

ALGORITHMS = ('fedavg', 'fedavgm')
