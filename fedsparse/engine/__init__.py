"""The federated round engine: client mapping, local training, sampling and aggregation."""

from fedsparse.engine.algorithm import Algorithm
from fedsparse.engine.compilation import CPU_COMPILER_OPTIONS, compiler_options, jit
from fedsparse.engine.cohort import (CohortConfig, aggregation_weights, sample_cohort,
                                     weighted_mean)
from fedsparse.engine.evaluation import make_evaluator
from fedsparse.engine.local import (ENFORCEMENTS, LR_SCHEDULES, Batch, LocalConfig, Schedule,
                                    client_optimizer, cross_entropy, gather_batch,
                                    make_schedule, run_local, sgd_step, steps_per_epoch)
from fedsparse.engine.mapping import (STRATEGIES, ClientMapping, default_strategy, map_clients,
                                      sum_clients)

__all__ = [
    'CPU_COMPILER_OPTIONS', 'ENFORCEMENTS', 'LR_SCHEDULES', 'STRATEGIES', 'Algorithm', 'Batch',
    'ClientMapping', 'CohortConfig', 'LocalConfig', 'Schedule', 'aggregation_weights',
    'client_optimizer', 'compiler_options', 'cross_entropy', 'default_strategy', 'gather_batch',
    'jit', 'make_evaluator', 'make_schedule', 'map_clients', 'run_local', 'sample_cohort',
    'sgd_step', 'steps_per_epoch', 'sum_clients', 'weighted_mean',
]
