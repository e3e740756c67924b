"""`jax.jit` with the XLA compiler options fedsparse chooses per backend.

On XLA:CPU, jax 0.10 hands every convolution to YNNPACK (``ynn_fusion`` thunks). On this
project's 2-core CPU machine those run a single Conv4/MNISTNet SGD step 20-25 % slower than
XLA's own (Eigen) convolutions, whichever conv formulation the model uses.
`CPU_COMPILER_OPTIONS` therefore keeps YNNPACK for individual dots only. That is the right
choice for clients that run one after another (convolutions: ``fwdconv``), but not for vmapped
clients, whose convolutions are im2col matmuls (``matmul``): there XLA's default YNNPACK
fusions are 2.2x faster (Conv4, 10 clients x 5 steps: 6.3 s vs 14.0 s per round), so
``batched_clients=True`` keeps the defaults. Measured with `scripts/bench_round.py` (which also
reports the Python-loop baseline compiled with these options, for transparency); on GPU/TPU no
option is set.

The option is experimental in XLA. If a jaxlib does not know it, `compiler_options` logs a
warning once and returns no options rather than failing the run.
"""

from collections.abc import Callable, Mapping
import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

__all__ = ['CPU_COMPILER_OPTIONS', 'compiler_options', 'jit']

# YNNPACK for dots only: convolutions go back to XLA's Eigen kernels (see the module docstring).
CPU_COMPILER_OPTIONS: Mapping[str, str] = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
}


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib compiles a trivial program with ``options`` (XLA parses them all)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
        jnp.zeros((), jnp.float32)).compile()
  except Exception as e:  # pylint: disable=broad-except -- any rejection means "do not use"
    logging.warning('XLA rejected compiler options %s (%s); compiling with defaults.',
                    dict(options), str(e).splitlines()[0][:200])
    return False
  return True


def compiler_options(backend: str | None = None, *,
                     batched_clients: bool = False) -> dict[str, str]:
  """The XLA compiler options fedsparse compiles with on ``backend``.

  Args:
    backend: ``'cpu'``, ``'gpu'``, ``'tpu'``...; defaults to `jax.default_backend()`.
    batched_clients: whether clients run under ``vmap`` (`ClientMapping.batches_clients`),
      i.e. with im2col convolutions on the CPU.

  Returns:
    `CPU_COMPILER_OPTIONS` on the CPU backend for clients run one after another (if this
    jaxlib accepts them), else ``{}``.
  """
  backend = backend or jax.default_backend()
  if backend != 'cpu' or batched_clients:
    return {}
  options = tuple(sorted(CPU_COMPILER_OPTIONS.items()))
  return dict(options) if _accepted(options) else {}


def jit(fun: Callable[..., Any], *, batched_clients: bool = False,
        **kwargs: Any) -> Callable[..., Any]:
  """`jax.jit` with `compiler_options` for the default backend added.

  Use it wherever fedsparse code runs on the device (the round, evaluation); for your own
  loops, ``jax.jit(fun, compiler_options=fedsparse.engine.compiler_options())`` does the same.

  Args:
    fun: the function to compile.
    batched_clients: as for `compiler_options`; pass the round's
      ``ClientMapping.batches_clients``.
    **kwargs: passed to `jax.jit` (``donate_argnums``, ``static_argnames``...); explicit
      ``compiler_options`` are merged over fedsparse's.

  Returns:
    The jitted function.

  Example:
    >>> import jax.numpy as jnp
    >>> jit(lambda x: 2 * x)(jnp.ones(2))
    Array([2., 2.], dtype=float32)
  """
  options = {**compiler_options(batched_clients=batched_clients),
             **kwargs.pop('compiler_options', {})}
  return jax.jit(fun, compiler_options=options, **kwargs)
