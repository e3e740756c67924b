"""fedsparse: a JAX/Flax simulator for sparse, communication-efficient federated learning."""

__version__ = '0.1.0'
