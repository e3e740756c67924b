"""The federated round engine: client programs, client mapping, sampling and aggregation."""

from fedsparse.engine.algorithm import Algorithm
from fedsparse.engine.client import (ENFORCEMENTS, Broadcast, ClientInfo, ClientProgram,
                                     CohortResult, Context, EpochInfo, Gradients, MaskedState,
                                     SGDState, local_sgd, masked_client,
                                     StepInfo, bernoulli_mask, client_minibatches, client_streams,
                                     cohort_metrics,
                                     enforcement_transform, identity_transform, masked_transform,
                                     run_clients, sgd_client, supervised_loss)
from fedsparse.engine.cohort import (Cohort, CohortConfig, aggregation_weights, draw_cohort,
                                     sample_cohort, server_key, weighted_mean)
from fedsparse.engine.compilation import CPU_COMPILER_OPTIONS, compiler_options, jit
from fedsparse.engine.evaluation import make_evaluator
from fedsparse.engine.local import (LR_SCHEDULES, PARTIAL_BATCHES, Batch, LocalConfig,
                                    StepSlice, client_optimizer, client_steps,
                                    example_orders, gather_batch, host_minibatches, step_slice,
                                    steps_per_epoch)
from fedsparse.engine.mapping import (STRATEGIES, ClientMapping, computed_iterations,
                                      default_strategy, map_clients, sum_clients)

__all__ = [
    'CPU_COMPILER_OPTIONS', 'ENFORCEMENTS', 'LR_SCHEDULES', 'PARTIAL_BATCHES', 'STRATEGIES',
    'Algorithm', 'Batch', 'Broadcast', 'ClientInfo', 'ClientMapping', 'ClientProgram', 'Cohort',
    'CohortConfig', 'CohortResult', 'Context', 'EpochInfo', 'Gradients', 'LocalConfig',
    'MaskedState', 'SGDState', 'StepInfo', 'StepSlice', 'aggregation_weights', 'bernoulli_mask',
    'client_minibatches', 'client_optimizer', 'client_streams', 'client_steps',
    'cohort_metrics',
    'compiler_options', 'computed_iterations', 'default_strategy',
    'draw_cohort', 'enforcement_transform', 'example_orders', 'gather_batch', 'host_minibatches',
    'identity_transform', 'jit', 'local_sgd', 'make_evaluator', 'map_clients', 'masked_client',
    'masked_transform', 'run_clients', 'sample_cohort', 'server_key', 'sgd_client', 'step_slice',
    'steps_per_epoch', 'sum_clients', 'supervised_loss', 'weighted_mean',
]
