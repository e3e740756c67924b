"""How the per-client computation is mapped over the cohort: the one place that decides.

Algorithms write the work of ONE client as a function and hand it to :func:`map_clients`; they
never call ``jax.vmap``, ``lax.map`` or sharding APIs themselves, so every algorithm gets every
strategy for free and strategies can be compared on the same code.

Strategies:

* ``vmap`` -- all clients at once along a batch axis. Fastest on GPU/TPU; memory grows with the
  cohort.
* ``chunked`` -- ``vmap`` over chunks of ``chunk_size`` clients, chunks in sequence
  (``lax.map(..., batch_size=chunk_size)``): bounded memory for large cohorts, e.g. scoring
  1,000 clients at once.
* ``sequential`` -- one client after another (``lax.map``). Least memory.
* ``sharded`` -- the client axis split over all devices of a ``jax.sharding.Mesh`` with axis
  ``'clients'`` (``jax.shard_map``); each device maps its share with ``inner`` (one of the
  strategies above). The cohort is padded to a multiple of the device count. In a
  multi-process `jax.distributed` job the mesh spans every process's devices
  (``jax.devices()`` is global): the caller passes global arrays (`fedsparse.distributed`).
* ``auto`` -- chosen per backend by :func:`default_strategy` from measurement (see README).

:func:`map_clients` stacks the per-client outputs (a cohort's deltas); :func:`sum_clients`
reduces them as it goes, so that work over a whole population (e.g. saliency scores of 1,000
clients) costs one client's (one chunk's) memory.

Uneven clients. Given the clients' sizes, :func:`map_clients` lays the cohort out so that the
work follows the examples clients really hold. A client's loop has a data-dependent trip count;
run one after another (``sequential``) each client costs exactly its own steps. Under ``vmap`` a
loop runs until its slowest lane is done, so batched strategies sort the cohort by size and run
groups of similar clients together (``chunked``: groups of ``chunk_size``; ``vmap``:
``size_groups`` groups), each group only as long as its own largest client; ``sharded`` deals
the size-sorted cohort over the devices in snake order, so every device gets a similar share.
Results always come back in cohort order. :func:`computed_iterations` counts the loop
iterations a layout computes, padding lanes included, for the padding ratio the round logs.

Example::

  >>> mapping = ClientMapping('chunked', chunk_size=4)
  >>> out = map_clients(lambda shared, x: shared * x, 2.0, jnp.arange(10.0), mapping=mapping)
"""

import dataclasses
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

__all__ = ['STRATEGIES', 'ClientMapping', 'computed_iterations', 'default_strategy',
           'map_clients', 'sum_clients']

STRATEGIES = ('auto', 'vmap', 'chunked', 'sequential', 'sharded')
_LOCAL_STRATEGIES = ('vmap', 'chunked', 'sequential')


def default_strategy(backend: str | None = None) -> str:
  """The strategy ``auto`` resolves to on ``backend`` (default: JAX's default backend).

  On GPU/TPU one wide ``vmap`` keeps the accelerator busy. On XLA:CPU the conv nets run with
  ``conv_impl='fwdconv'`` (``fedsparse.models.layers``), whose gradients stay on XLA:CPU's fast
  convolution path inside loops but not under ``vmap`` (per-client kernels become grouped
  convolutions); running clients one after another inside the jit is then the fastest, and each
  client's convolutions are already large enough to use every core (numbers in the README's
  benchmark table, ``scripts/bench_round.py``).
  """
  backend = backend or jax.default_backend()
  return 'sequential' if backend == 'cpu' else 'vmap'


@dataclasses.dataclass(frozen=True)
class ClientMapping:
  """A client mapping strategy (static configuration, never part of jitted state).

  Attributes:
    strategy: one of :data:`STRATEGIES`.
    chunk_size: clients per ``vmap`` chunk for ``chunked`` (and for ``sharded`` with
      ``inner='chunked'``).
    inner: how each device maps its share of clients under ``sharded``; ``auto`` follows the
      backend like the top-level ``auto``.
    size_groups: for ``vmap`` of clients of known sizes: the size-sorted cohort is split into
      groups of ``ceil(K / size_groups)`` clients (at most this many groups; the first padded
      with size-0 lanes), run one after another, each as long as its own largest client (1:
      one ``vmap`` over the whole cohort, the default, which bounds nothing: on uneven
      cohorts use ``size_groups > 1`` or ``chunked``).
  """
  strategy: str = 'auto'
  chunk_size: int = 8
  inner: str = 'auto'
  size_groups: int = 1

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(
          f'Unknown client mapping strategy {self.strategy!r}; valid: {", ".join(STRATEGIES)}.')
    if self.inner not in ('auto',) + _LOCAL_STRATEGIES:
      raise ValueError(f'Unknown inner strategy {self.inner!r} for sharded mapping; valid: '
                       f'{", ".join(("auto",) + _LOCAL_STRATEGIES)}.')
    for name in ('chunk_size', 'size_groups'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}.')

  def resolved(self) -> str:
    """The concrete strategy name (``auto`` replaced by the backend's default)."""
    return default_strategy() if self.strategy == 'auto' else self.strategy

  @property
  def local_strategy(self) -> str:
    """The strategy each device runs: the resolved strategy, or ``inner`` under sharding."""
    strategy = self.resolved()
    if strategy == 'sharded':
      return default_strategy() if self.inner == 'auto' else self.inner
    return strategy

  @property
  def batches_clients(self) -> bool:
    """Whether clients run under ``vmap`` (decides the CPU conv formulation, see models)."""
    return self.local_strategy in ('vmap', 'chunked')


def _map_local(strategy: str, fn: Callable[..., Any], shared: Any, xs: tuple[Any, ...],
               chunk_size: int) -> Any:
  """Maps ``fn(shared, *x)`` over the leading axis of ``xs`` on the current device(s)."""
  def one(x):
    return fn(shared, *x)

  if strategy == 'vmap':
    return jax.vmap(one)(xs)
  if strategy == 'sequential':
    return jax.lax.map(one, xs)
  if strategy == 'chunked':
    return jax.lax.map(one, xs, batch_size=chunk_size)
  raise ValueError(f'Unknown local strategy {strategy!r}; valid: {", ".join(_LOCAL_STRATEGIES)}.')


def _pad_leading(tree: Any, multiple: int) -> tuple[Any, int]:
  """Pads the leading axis of every leaf to a multiple by repeating its first row."""
  n = jax.tree.leaves(tree)[0].shape[0]
  pad = -n % multiple
  if pad == 0:
    return tree, n
  def pad_leaf(x):
    filler = jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])
    return jnp.concatenate([x, filler], axis=0)
  return jax.tree.map(pad_leaf, tree), n


def _group_len(strategy: str, num: int, mapping: 'ClientMapping') -> int:
  """Clients per ``vmap`` group of a local strategy over ``num`` clients of known sizes."""
  if strategy == 'chunked':
    return min(mapping.chunk_size, num)
  if strategy == 'vmap':
    return -(-num // min(mapping.size_groups, num))
  return 1


def _pad_sized(sizes: jax.Array, tree: Any, multiple: int) -> tuple[jax.Array, Any]:
  """Pads the client axis to a multiple; padding clients repeat row 0 with size 0 (no work)."""
  (tree, sizes), n = _pad_leading((tree, sizes), multiple)
  sizes = jnp.where(jnp.arange(sizes.shape[0]) < n, sizes, 0)
  return sizes, tree


def _size_order(sizes: jax.Array, num_real: int) -> jax.Array:
  """A stable ascending order by size with padding clients (rows >= num_real) first."""
  key = jnp.where(jnp.arange(sizes.shape[0]) < num_real, sizes, -1)
  return jnp.argsort(key, stable=True)


def _map_sized_local(strategy: str, fn: Callable[..., Any], shared: Any, sizes: jax.Array,
                     xs: tuple[Any, ...], mapping: 'ClientMapping') -> Any:
  """``fn(shared, size, *x)`` per client on the current device(s), size-grouped under vmap."""
  def one(size, x):
    return fn(shared, size, *x)

  n = sizes.shape[0]
  if strategy == 'sequential':
    return jax.lax.map(lambda a: one(*a), (sizes, xs))
  if strategy not in ('vmap', 'chunked'):
    raise ValueError(
        f'Unknown local strategy {strategy!r}; valid: {", ".join(_LOCAL_STRATEGIES)}.')
  group = _group_len(strategy, n, mapping)
  sizes_p, xs_p = _pad_sized(sizes, xs, group)
  order = _size_order(sizes_p, n)
  sorted_args = jax.tree.map(lambda x: x[order], (sizes_p, xs_p))
  grouped = jax.tree.map(lambda x: x.reshape((-1, group) + x.shape[1:]), sorted_args)
  out = jax.lax.map(lambda a: jax.vmap(one)(*a), grouped)
  out = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
  inverse = jnp.argsort(order)
  return jax.tree.map(lambda x: x[inverse][:n], out)


def _snake_layout(sizes: jax.Array, num_real: int, num_devices: int) -> jax.Array:
  """Slot order dealing the size-sorted clients over devices in snake order.

  Returns ``order`` such that ``clients[order]`` reshaped to ``[devices, per_device]`` gives
  device ``d`` the clients ranked ``d, 2D - 1 - d, 2D + d, ...`` by decreasing size: every device
  gets a similar mix of large and small clients.
  """
  kp = sizes.shape[0]
  per_device = kp // num_devices
  key = jnp.where(jnp.arange(kp) < num_real, sizes, -1)
  by_size = jnp.argsort(-key, stable=True)  # rank r -> client
  rank = jnp.arange(kp)
  lap, pos = rank // num_devices, rank % num_devices
  device = jnp.where(lap % 2 == 0, pos, num_devices - 1 - pos)
  slot = device * per_device + lap
  return jnp.zeros((kp,), jnp.int32).at[slot].set(by_size.astype(jnp.int32))


def computed_iterations(steps: jax.Array, sizes: jax.Array, mapping: 'ClientMapping'
                        ) -> jax.Array:
  """Loop iterations a cohort's layout computes, padding lanes included.

  Args:
    steps: ``[K]`` int32 steps each client needs (a function of its size, non-decreasing in it).
    sizes: ``[K]`` int32 client sizes (the key the layout sorts by).
    mapping: the strategy.

  Returns:
    An int32 scalar: ``sum(steps)`` when clients run one after another; under ``vmap`` every
    lane of a group (padding lanes too) runs as long as the group's largest client.
  """
  def local(strategy, steps, sizes, num_real):
    if strategy == 'sequential':
      return jnp.sum(steps)
    group = _group_len(strategy, sizes.shape[0], mapping)
    sizes_p, steps_p = _pad_sized(sizes, steps, group)
    steps_p = jnp.where(jnp.arange(steps_p.shape[0]) < num_real, steps_p, 0)
    order = _size_order(sizes_p, num_real)
    per_group = jnp.max(steps_p[order].reshape(-1, group), axis=1)
    return group * jnp.sum(per_group)

  k = sizes.shape[0]
  strategy = mapping.resolved()
  if strategy != 'sharded':
    return local(strategy, steps, sizes, k)
  devices = jax.device_count()
  sizes_p, steps_p = _pad_sized(sizes, steps, devices)
  steps_p = jnp.where(jnp.arange(steps_p.shape[0]) < k, steps_p, 0)
  order = _snake_layout(sizes_p, k, devices)
  per_device = sizes_p.shape[0] // devices
  total = jnp.int32(0)
  for d in range(devices):
    idx = order[d * per_device:(d + 1) * per_device]
    # Within a device, padding clients are size-0 clients like any other: they cost nothing
    # sequentially and, under vmap, sort into the first group.
    total = total + local(mapping.local_strategy, steps_p[idx], sizes_p[idx], per_device)
  return total


def _clients_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh with the axis ``'clients'`` over every device of every process."""
  devices = jax.devices()  # global: with several processes, theirs too
  # Auto axes let XLA insert the resharding of inputs that arrive replicated.
  return jax.make_mesh((len(devices),), ('clients',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def map_clients(fn: Callable[..., Any], shared: Any, *client_args: Any,
                mapping: ClientMapping = ClientMapping(), sizes: jax.Array | None = None
                ) -> Any:
  """Runs ``fn(shared, *args_of_one_client)`` for every client and stacks the results.

  Args:
    fn: the work of one client. ``shared`` is passed unchanged to every client (e.g. the global
      params); each of ``client_args`` is a pytree whose leaves carry the clients on axis 0.
      With ``sizes``, it is called as ``fn(shared, size, *args)``.
    shared: a pytree shared by all clients (replicated under ``sharded``).
    *client_args: per-client pytrees with a leading client axis of the same length.
    mapping: the strategy.
    sizes: optional ``[K]`` int32 client sizes: the cohort is laid out by size (module
      docstring) and ``fn`` receives each client's size; padding clients that a layout adds
      receive size 0 and a copy of client 0's arguments, and their outputs are dropped.

  Returns:
    ``fn``'s outputs with a leading client axis, in client order.
  """
  strategy = mapping.resolved()
  if sizes is not None:
    return _map_sized(fn, shared, sizes, client_args, mapping)
  if strategy != 'sharded':
    return _map_local(strategy, fn, shared, client_args, mapping.chunk_size)

  mesh = _clients_mesh()
  padded, n = _pad_leading(client_args, mesh.size)

  def per_device(shared_, xs):
    return _map_local(mapping.local_strategy, fn, shared_, xs, mapping.chunk_size)

  # check_vma=False: client work starts from replicated values (the global params) that become
  # per-device inside loops; the type check would make every algorithm insert pcast calls.
  out = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('clients')),
                      out_specs=P('clients'), check_vma=False)(shared, padded)
  return jax.tree.map(lambda x: x[:n], out)


def _map_sized(fn: Callable[..., Any], shared: Any, sizes: jax.Array, xs: tuple[Any, ...],
               mapping: ClientMapping) -> Any:
  """`map_clients` with a size-aware layout (see the module docstring)."""
  sizes = jnp.asarray(sizes, jnp.int32)
  strategy = mapping.resolved()
  if strategy != 'sharded':
    return _map_sized_local(strategy, fn, shared, sizes, xs, mapping)
  mesh = _clients_mesh()
  k = sizes.shape[0]
  sizes_p, xs_p = _pad_sized(sizes, xs, mesh.size)
  order = _snake_layout(sizes_p, k, mesh.size)
  laid_out = jax.tree.map(lambda x: x[order], (sizes_p, xs_p))

  def per_device(shared_, sizes_, xs_):
    return _map_sized_local(mapping.local_strategy, fn, shared_, sizes_, xs_, mapping)

  out = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('clients'), P('clients')),
                      out_specs=P('clients'), check_vma=False)(shared, *laid_out)
  inverse = jnp.argsort(order)
  return jax.tree.map(lambda x: x[inverse][:k], out)


def _sum_local(strategy: str, fn: Callable[..., Any], shared: Any, xs: tuple[Any, ...],
               valid: jax.Array, chunk_size: int) -> Any:
  """Sums ``fn(shared, *x)`` over the leading axis of ``xs`` where ``valid``, in bounded memory."""
  def one(x, ok):
    out = fn(shared, *x)
    return jax.tree.map(lambda o: jnp.where(ok, o, jnp.zeros_like(o)), out)

  if strategy == 'vmap':
    return jax.tree.map(lambda o: jnp.sum(o, axis=0), jax.vmap(one)(xs, valid))
  if strategy not in ('sequential', 'chunked'):
    raise ValueError(
        f'Unknown local strategy {strategy!r}; valid: {", ".join(_LOCAL_STRATEGIES)}.')
  if strategy == 'sequential':
    chunks, chunk_sum = (xs, valid), lambda c: one(*c)
  else:
    (xs, valid), n = _pad_leading((xs, valid), chunk_size)
    valid = valid & (jnp.arange(valid.shape[0]) < n)  # padding rows repeat row 0: exclude them
    # [num_chunks, chunk_size, ...]: each chunk vmapped, chunks in a scan.
    chunks = jax.tree.map(lambda x: x.reshape((-1, chunk_size) + x.shape[1:]), (xs, valid))
    chunk_sum = lambda c: jax.tree.map(lambda o: jnp.sum(o, axis=0), jax.vmap(one)(*c))
  # The scan carries only the running sum: memory holds one client's (one chunk's) outputs,
  # whatever the number of clients. It starts from zeros shaped by an abstract evaluation, so
  # the client function is compiled once (inside the scan), not twice.
  first = jax.tree.map(lambda x: x[0], chunks)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk_sum, first))
  total, _ = jax.lax.scan(
      lambda acc, c: (jax.tree.map(jnp.add, acc, chunk_sum(c)), None), zeros, chunks)
  return total


def sum_clients(fn: Callable[..., Any], shared: Any, *client_args: Any,
                mapping: ClientMapping = ClientMapping()) -> Any:
  """``sum_k fn(shared, *args_of_client_k)`` in memory bounded by the strategy.

  Unlike :func:`map_clients`, per-client outputs are never stacked: ``sequential`` keeps one
  client's output and the running sum, ``chunked`` one chunk's, ``sharded`` that per device
  plus a ``psum``; only ``vmap`` materialises every client. This is what scoring the saliency
  of a whole population (e.g. 1,000 clients of a ResNet) needs. Weighted sums: scale inside
  ``fn`` (pass the weight as a client argument).

  Args:
    fn: the work of one client, returning a pytree of arrays.
    shared: a pytree shared by all clients.
    *client_args: per-client pytrees with a leading client axis of the same length.
    mapping: the strategy.

  Returns:
    The sum over clients of ``fn``'s outputs.

  Example::

    >>> sum_clients(lambda s, x: s * x, 2.0, jnp.arange(5.0),
    ...             mapping=ClientMapping('chunked', chunk_size=2))
    Array(20., dtype=float32)
  """
  n = jax.tree.leaves(client_args)[0].shape[0]
  valid = jnp.ones((n,), bool)
  strategy = mapping.resolved()
  if strategy != 'sharded':
    return _sum_local(strategy, fn, shared, client_args, valid, mapping.chunk_size)

  mesh = _clients_mesh()
  (padded, valid), _ = _pad_leading((client_args, valid), mesh.size)
  valid = valid & (jnp.arange(valid.shape[0]) < n)

  def per_device(shared_, xs, ok):
    partial = _sum_local(mapping.local_strategy, fn, shared_, xs, ok, mapping.chunk_size)
    return jax.tree.map(lambda x: jax.lax.psum(x, 'clients'), partial)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('clients'), P('clients')),
                       out_specs=P(), check_vma=False)(shared, padded, valid)
