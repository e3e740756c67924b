"""Multi-process runs: one program in every process of a `jax.distributed` job.

JAX runs a multi-host job as one Python process per host (or per GPU), each driving its local
devices, all executing the same program; ``jax.devices()`` lists the devices of every process,
so the engine's client mesh (`fedsparse.engine.map_clients`, strategy ``sharded``) spans the
whole job. What this asks of the run loop, and what this module provides:

* Every input of a computation over the global mesh must be a global ``jax.Array``:
  `to_global` turns host-local values (identical in every process: the data, the initial
  params, the round keys) into fully replicated global arrays on `replicated`.
* A global array cannot be read with ``jax.device_get`` (it is not fully addressable):
  `to_host` reads the local copy of a replicated array, or gathers a sharded one.
* Files are written once: by the primary process (`is_primary`), except checkpoints, which
  orbax writes from every process in concert. `barrier` orders one process's file work before
  the others'.
* The processes must agree on what they run (same flags, config, files); a mismatch would make
  their collectives disagree, i.e. hang or silently compute something else. `check_same` fails
  fast instead, in every process at once; `broadcast_json` hands process 0's decisions (e.g.
  which sweep members are done) to the others, and `agree_on_error` turns an error raised in
  some processes into the same error in all, so that they take the same path afterwards.
* A stacked axis (a sweep's members) may be split over every device of every process
  (`sharded`) instead of replicated.

With one process every function here is cheap and correct, so callers need no special case.

Example (single process)::

  >>> import numpy as np
  >>> x = to_global({'w': np.arange(3.0, dtype=np.float32)})
  >>> x['w'].is_fully_replicated, to_host(x)['w'].tolist()
  (True, [0.0, 1.0, 2.0])
  >>> check_same({'seed': 0}, 'the config')  # a no-op with one process
"""

import hashlib
import json
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

__all__ = ['agree_on_error', 'any_process', 'barrier', 'broadcast', 'broadcast_json',
           'check_same', 'initialize', 'is_primary', 'replicated', 'sharded', 'to_global',
           'to_host']


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to a `jax.distributed` job; call it before anything uses a device.

  Give all three arguments, or none: then JAX detects them from the cluster it runs on (Cloud
  TPU pod slices, SLURM, Open MPI, Kubernetes).

  Args:
    coordinator_address: ``host:port`` of process 0, the same string in every process; the
      port must be free there (process 0 listens on it).
    num_processes: the number of processes in the job, the same in every process.
    process_id: this process's index, ``0 <= process_id < num_processes``; process 0 is the
      primary, which writes the run's files.

  Raises:
    ValueError: for some but not all arguments, a malformed address, a count or id out of
      range, or (without arguments) a cluster JAX cannot detect; the message says what is
      valid. JAX's own errors (e.g. a device already in use) pass through.
  """
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  missing = [name for name, value in given.items() if value is None]
  if missing and len(missing) < len(given):
    raise ValueError(f'Multi-process runs need all of coordinator_address, num_processes and '
                     f'process_id (or none, to let JAX detect them on a TPU pod slice, SLURM '
                     f'or Open MPI); missing: {", ".join(missing)}.')
  if not missing:
    _check_address(coordinator_address)
    for name in ('num_processes', 'process_id'):
      if isinstance(given[name], bool) or not isinstance(given[name], int):
        raise ValueError(f'{name} must be an integer, got {given[name]!r}.')
    if num_processes < 1:
      raise ValueError(f'num_processes must be >= 1, got {num_processes}.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'process_id must be in [0, {num_processes}) for num_processes='
                       f'{num_processes}, got {process_id}.')
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except ValueError as e:
    if not missing:
      raise
    # JAX found no cluster to read the arguments from (its message names only the first).
    raise ValueError(f'No cluster detected to take the coordinator address, process count and '
                     f'process id from ({e}); pass all three.') from e


def _check_address(address: Any) -> None:
  """Raises ValueError unless ``address`` is ``host:port`` with a port in [1, 65535]."""
  host, sep, port = str(address).rpartition(':')
  if (not isinstance(address, str) or not sep or not host.strip('[]') or not port.isdigit()
      or not 1 <= int(port) <= 65535):
    raise ValueError(f'coordinator_address must be host:port (e.g. 10.0.0.1:1234, the first '
                     f'host\'s address and a free port), got {address!r}.')


def is_primary() -> bool:
  """Whether this is process 0, the one that writes the run's files (always, in one process)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op with one process).

  Used where one process's file work must precede the others' reads (e.g. process 0 clears a
  workdir that all then read); ``name`` must be the same in every process.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _mesh() -> jax.sharding.Mesh:
  """A 1-D mesh with the axis ``'devices'`` over every device of every process."""
  devices = jax.devices()
  # The same device order as the engine's client mesh (`jax.make_mesh` over `jax.devices()`):
  # jit requires one device assignment for its arguments, its outputs and the meshes inside.
  return jax.make_mesh((len(devices),), ('devices',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated() -> NamedSharding:
  """A full copy on every device of every process, over the global device mesh."""
  return NamedSharding(_mesh(), P())


def sharded() -> NamedSharding:
  """The leading axis split evenly over every device of every process, in `replicated`'s mesh.

  The layout of the engine's ``sharded`` mapping (`fedsparse.engine.map_clients`) for an axis
  whose length is a multiple of ``jax.device_count()``: device ``d`` holds the ``d``-th block.
  """
  return NamedSharding(_mesh(), P('devices'))


def to_global(tree: Any) -> Any:
  """Host-local values (NumPy or single-process ``jax.Array``) as replicated global arrays.

  Every process must pass the same values: each contributes its own copy to its devices, and
  nothing checks that they agree. Arrays that are already global pass through unchanged.
  """
  sharding = replicated()
  return multihost_utils.host_local_array_to_global_array(tree, sharding.mesh, P())


def to_host(tree: Any) -> Any:
  """Every array leaf as a NumPy array holding its whole (global) value.

  In a multi-process job every process must call this for the same arrays, in the same order:
  reading an array that is sharded over several processes is a collective. A replicated
  array is read from the local copy, without communication.
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)
  return jax.tree.map(fetch, tree)


def broadcast(value: Any) -> Any:
  """Process 0's ``value`` (a NumPy-convertible pytree, same shapes everywhere) in every process."""
  if jax.process_count() == 1:
    return value
  return multihost_utils.broadcast_one_to_all(value)


def broadcast_json(value: Any, source: int = 0) -> Any:
  """Process ``source``'s ``value`` (anything JSON-serialisable) in every process.

  Every process must call it (a collective), each with a value of its own, whose size may
  differ; only the source's counts. With one process, ``value`` itself is returned.

  Example::

    >>> broadcast_json({'done': ['lr=0.1']})  # one process: returned as it is
    {'done': ['lr=0.1']}
  """
  if jax.process_count() == 1:
    return value
  is_source = jax.process_index() == source
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_source else None
  # Two rounds: the length first, since every process must pass arrays of the same shape.
  length = int(multihost_utils.broadcast_one_to_all(
      np.int32(len(data) if is_source else 0), is_source=is_source))
  payload = data if is_source else np.zeros(length, np.uint8)
  received = multihost_utils.broadcast_one_to_all(payload, is_source=is_source)
  return json.loads(np.asarray(received, np.uint8).tobytes().decode())


def any_process(flags: np.ndarray) -> np.ndarray:
  """The elementwise OR of a boolean vector over all processes (a collective: every process
  calls it at the same point with the same length)."""
  flags = np.asarray(flags, bool)
  if jax.process_count() == 1:
    return flags
  return np.any(multihost_utils.process_allgather(flags.astype(np.uint8)) > 0, axis=0)


def agree_on_error(error: BaseException | None) -> BaseException | None:
  """The error that every process acts on, given this process's (None: it succeeded).

  Every process must call it at the same point (a collective). When processes take different
  paths after an error raised in only some of them, the others would wait in a collective that
  never comes; with this, all take the same path.

  Returns:
    None if no process failed; ``error`` itself if every process failed with the same message
    (e.g. a deterministic error of the work they share, which keeps its type); otherwise a
    RuntimeError naming the first process that failed and its message, the same in every
    process.
  """
  if jax.process_count() == 1:
    return error
  text = '' if error is None else f'{type(error).__name__}: {error}'
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint32)
  mine = np.concatenate([np.array([error is not None], np.uint32), digest])
  everyone = multihost_utils.process_allgather(mine)  # [num_processes, 9]
  failed = [i for i in range(len(everyone)) if everyone[i][0]]
  if not failed:
    return None
  if len(failed) == len(everyone) and all(np.array_equal(row, mine) for row in everyone):
    return error
  message = broadcast_json(text, source=failed[0])
  return RuntimeError(
      f'process(es) {", ".join(map(str, failed))} of {len(everyone)} failed, process '
      f'{failed[0]} with {message}')


def check_same(value: Any, what: str) -> None:
  """Raises ValueError in every process unless all processes hold the same ``value``.

  Args:
    value: anything JSON-serialisable (others are compared by ``str``), e.g. the config.
    what: what ``value`` is, for the message (``'the config'``).

  Raises:
    ValueError: naming the processes whose value differs from process 0's. It is raised in
      every process (not only in those that differ), so none waits for the others in a later
      collective.
  """
  if jax.process_count() == 1:
    return
  text = json.dumps(value, sort_keys=True, default=str)
  # A fixed-size digest: process_allgather needs the same shape in every process.
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint32)
  everyone = multihost_utils.process_allgather(digest)  # [num_processes, 8], in every process
  differ = [i for i in range(len(everyone)) if not np.array_equal(everyone[i], everyone[0])]
  if differ:
    raise ValueError(
        f'The {len(everyone)} processes of this job disagree on {what}: process(es) '
        f'{", ".join(map(str, differ))} differ from process 0 (this is process '
        f'{jax.process_index()}). Start every process with the same flags, config and files.')
