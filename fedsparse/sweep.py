"""Sweeps: many runs of one experiment, compiled once per group of runs that share their shapes.

A sweep is a base config and a list of members, each a dict of overrides (``{'seed': 2,
'learning_rate': 0.1}``), written with :func:`sweep`, :func:`product`, :func:`zipit`,
:func:`chain` and :func:`random_search`. `run_sweep` runs every member into ``DIR/<member>/``,
each with the ``config.json``, ``metrics.jsonl``, TensorBoard events and checkpoints its own
`fedsparse.train.run` would write, and returns a summary row per member.

One compile for many runs. Members that differ only in their seed and in numbers that enter
the round as values form one *group*: the group's round is every member's round mapped over a
member axis by the engine's own mapping strategies (`fedsparse.engine.map_clients`), inside
ONE jitted function, with each member's own state, keys, data split (partitions depend on the
seed) and metrics. The members are built by the builder of a separate run
(`fedsparse.experiment`). Traced are the shared `fedsparse.experiment.TRACEABLE_KEYS` (client
and server learning rates, momentum, weight decay, lr decay), which become float32 arrays, and
the algorithm's `fedsparse.algorithms.registry.Spec.traceable` hyperparameters (SSFL's and
FLASH's ``density``, FedDST's and RandomMask's ``sparsity``): each member's exact keep counts
are computed on the host from its own value (`fedsparse.engine.Algorithm.layout`) and enter
the round as int32 arrays, so a density sweep is one group and one compile. Everything else
that differs (model, batch size, clients per round, FLASH's budgets) starts another group and
compile. Numbers equal a separate run's within float tolerance (the swept values become traced
float32 operands, and a swept momentum or weight decay keeps its optimizer state even at 0,
where it is exact; counts are the same integers). Mapped by ``vmap``, a member's convolutions
may run in another formulation or order than alone (`fedsparse.models.resolve_impl` picks by
``batched_clients``): the same math, rounded differently, which training then amplifies as it
would any rounding difference.

Member mapping (``strategy``): ``vmap`` (the default on GPU/TPU) runs the members side by
side; on the CPU ``auto`` runs them one after another (``sequential``) inside the one compiled
round, measured fastest there (README, "Sweeps"; ``scripts/bench_sweep.py``).

Multi-process jobs (`fedsparse.distributed`): every process calls `run_sweep` with the same
arguments. A group's members are sharded over the devices of all processes (``strategy`` then
maps each device's share); the stacked state's member axis is split over the devices when the
members divide evenly among them, and replicated otherwise (the log says which). Metrics,
evaluation rows and each member's state (for its checkpoint and export) come back replicated,
so every process holds them, as for `fedsparse.loop.SingleProgram`. Process 0 locks the
directories, decides which members still run and writes every file; orbax saves the
checkpoints from all processes in concert.

Failures. A member whose config is invalid is recorded as failed with the error and never
runs; a member whose loss becomes non-finite is marked failed in its round while the others of
its group go on; an error that stops a whole group (e.g. out of memory) fails its members and
the other groups still run. Each member's ``status.json`` holds its fate. Re-running the sweep
resumes: finished and failed members are kept as they are (``retry_failed`` reruns the
failed), the others continue from their last checkpoint, grouped again by the round they resume
from.

Example::

  members = product(sweep('learning_rate', [0.02, 0.05]), sweep('seed', range(3)))
  rows = run_sweep(digits_fedavg.get_config(), members, '/tmp/digits_lr')
"""

import contextlib
import dataclasses
import json
import math
import pathlib
import time
import traceback
from typing import Any, Iterable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedsparse import data as data_lib
from fedsparse import distributed
from fedsparse import engine
from fedsparse import experiment
from fedsparse import loop
from fedsparse import workdir as workdir_lib
from fedsparse.workdir import UsageError

__all__ = ['PLOT_FILE', 'STATUS_FILE', 'SUMMARY_FILE', 'chain', 'choice', 'format_summary',
           'loguniform', 'member_config', 'member_name', 'plot_summary', 'product',
           'random_search', 'run_sweep', 'summary_table', 'sweep', 'uniform', 'write_summary',
           'zipit']

STATUS_FILE = 'status.json'
SUMMARY_FILE = 'summary.csv'
PLOT_FILE = 'summary.png'

# --------------------------------------------------------------------------------------------------
# Writing sweeps: lists of override dicts.


def sweep(key: str, values: Iterable[Any]) -> list[dict[str, Any]]:
  """One axis: ``[{key: v} for v in values]`` (``key`` dotted for sections: ``ssfl.density``)."""
  values = list(values)
  if not values:
    raise ValueError(f'sweep({key!r}, ...) has no values.')
  return [{key: _plain(v)} for v in values]


def product(*axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Every combination of the axes (the last varies fastest)."""
  out = [{}]
  for axis in axes:
    out = [{**a, **b} for a in out for b in axis]
  return out


def zipit(*axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The axes side by side (they must have the same length)."""
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise ValueError(f'zipit needs axes of equal length, got {sorted(lengths)}.')
  return [dict(kv for part in parts for kv in part.items()) for parts in zip(*axes)]


def chain(*sweeps: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The members of several sweeps one after another."""
  return [m for s in sweeps for m in s]


@dataclasses.dataclass(frozen=True)
class _Distribution:
  kind: str
  args: tuple[Any, ...]

  def draw(self, rng: np.random.Generator) -> Any:
    if self.kind == 'uniform':
      return float(rng.uniform(*self.args))
    if self.kind == 'loguniform':
      low, high = self.args
      return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return _plain(self.args[int(rng.integers(len(self.args)))])


def uniform(low: float, high: float) -> _Distribution:
  """A uniform draw in ``[low, high)`` for `random_search`."""
  if not low < high:
    raise ValueError(f'uniform needs low < high, got {low}, {high}.')
  return _Distribution('uniform', (float(low), float(high)))


def loguniform(low: float, high: float) -> _Distribution:
  """A draw uniform in log space in ``[low, high)`` (learning rates) for `random_search`."""
  if not 0 < low < high:
    raise ValueError(f'loguniform needs 0 < low < high, got {low}, {high}.')
  return _Distribution('loguniform', (float(low), float(high)))


def choice(*values: Any) -> _Distribution:
  """One of ``values``, uniformly, for `random_search`."""
  if not values:
    raise ValueError('choice needs at least one value.')
  return _Distribution('choice', values)


def random_search(num: int, seed: int = 0, **distributions: _Distribution
                  ) -> list[dict[str, Any]]:
  """``num`` members with each key drawn from its distribution (reproducible from ``seed``).

  Keys with a dot (``ssfl.density``) are passed as ``**{'ssfl.density': uniform(...)}``.
  """
  if num < 1:
    raise ValueError(f'random_search needs num >= 1, got {num}.')
  rng = np.random.default_rng(seed)
  return [{k: d.draw(rng) for k, d in distributions.items()} for _ in range(num)]


def _plain(value: Any) -> Any:
  """NumPy scalars as Python numbers (configs and JSON take only those)."""
  return value.item() if isinstance(value, np.generic) else value


def member_name(overrides: dict[str, Any]) -> str:
  """The member's directory name: ``key=value`` pairs in the sweep's order, joined by commas."""
  def fmt(v):
    return f'{v:.6g}' if isinstance(v, float) else str(v)
  name = ','.join(f'{k}={fmt(v)}' for k, v in overrides.items()) or 'base'
  return name.replace('/', '_')


def member_config(base: ml_collections.ConfigDict,
                  overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """``base`` with ``overrides`` applied (dotted keys reach into sections).

  Raises:
    ValueError: for a key the config lacks (naming the valid ones) or a value of the wrong type.
  """
  config = ml_collections.ConfigDict(base.to_dict())
  for key, value in overrides.items():
    *path, last = key.split('.')
    node = config
    for i, part in enumerate(path + [last]):
      if part not in node:
        where = '.'.join(path[:i]) or 'the config'
        raise ValueError(f'Unknown sweep key {key!r}: {where} has no {part!r}; valid there: '
                         f'{", ".join(sorted(node.keys()))}.')
      if i < len(path):
        node = node[part]
    try:
      node[last] = value
    except TypeError as e:
      raise ValueError(f'Sweep value {key}={value!r}: {e}') from None
  return config


# --------------------------------------------------------------------------------------------------
# A group: members compiled together.


@dataclasses.dataclass
class _Entry:
  """A member on its way through a sweep."""
  name: str
  overrides: dict[str, Any]
  workdir: pathlib.Path
  config: ml_collections.ConfigDict | None = None
  status: str = 'pending'  # pending | done | failed
  error: str = ''
  seconds: float = 0.0
  group: int = -1
  stage: str = 'run'  # where it failed: 'config' (checked again on every run) or 'run'
  saved: dict[str, Any] | None = None  # the config.json it writes (`_configure`)


class _MemberFailures(Exception):
  """Members of a group that cannot run (their own settings fail), by index in the group."""

  def __init__(self, failures: dict[int, Exception]):
    # Every failure in the message: processes compare it to agree that they failed alike.
    super().__init__(f'{len(failures)} member(s) cannot run (' + '; '.join(
        f'{i}: {type(e).__name__}: {e}' for i, e in sorted(failures.items())) + ')')
    self.failures = failures


def _member_mapping(strategy: str, clients: engine.ClientMapping) -> engine.ClientMapping:
  """How a group maps its members, given the sweep's ``strategy`` and the clients' mapping.

  In one process, ``strategy`` as it is (``auto``: `fedsparse.engine.default_strategy`). In a
  multi-process job the members are sharded over every device of every process, each device
  mapping its share by ``strategy`` (``auto`` and ``sharded``: the backend's default) --
  unless the clients are sharded already: then every device maps all members (one mesh axis
  cannot split both).
  """
  if jax.process_count() == 1:
    return engine.ClientMapping(strategy)
  if clients.resolved() == 'sharded':
    return engine.ClientMapping(strategy)  # 'sharded' here is refused by run_sweep
  return engine.ClientMapping('sharded', inner=(
      'auto' if strategy in ('auto', 'sharded') else strategy))


class _GroupProgram(loop.Program):
  """The rounds of a group of members mapped over a member axis, each jitted once.

  Where the state lives (`placement`), as for `fedsparse.loop.SingleProgram`: on one device,
  unless members or clients are sharded over several devices or processes (`on_mesh`). Then
  the data, the keys and the members' values are replicated over the global mesh, and the
  stacked state's member axis is split over its devices (`fedsparse.distributed.sharded`) when
  the members divide evenly among them, else replicated. The round returns its metrics and
  the evaluation its rows replicated, and `member_state` a member's state replicated: every
  process reads the numbers from its own copy and checkpoints and exports every member.
  """
  multiprocess = True

  def __init__(self, configs: list[ml_collections.ConfigDict], traced: tuple[str, ...],
               strategy: str):
    self.configs = configs
    self.num_members = len(configs)
    base = configs[0]
    self.traced = traced
    dataset = data_lib.load_dataset(base.dataset, data_dir=base.get('data_dir') or None)
    # Each member's own split, model init and batch cap: the builder of a separate run.
    splits = [experiment.federated_split(c, dataset) for c in configs]
    self.infos = [info for _, info in splits]
    num_clients = {fd.num_clients for fd, _ in splits}
    if len(num_clients) > 1:
      raise ValueError(f'members keep different numbers of clients ({sorted(num_clients)})')
    # Index arrays padded to the group's widest client: entries past a client's size are never
    # read, and a client's example orders are the same at any padded width.
    wide = max(fd.max_client_size for fd, _ in splits)
    wide_test = max(fd.client_test_index.shape[1] for fd, _ in splits)
    pad = lambda x, w: jnp.pad(x, ((0, 0), (0, w - x.shape[1])))
    self.member_data = (
        jnp.stack([pad(fd.client_index, wide) for fd, _ in splits]),
        jnp.stack([fd.client_size for fd, _ in splits]),
        jnp.stack([pad(fd.client_test_index, wide_test) for fd, _ in splits]),
        jnp.stack([fd.client_test_size for fd, _ in splits]))
    self.data = splits[0][0]  # the images (shared) and member 0's split, replaced per member
    self.mapping = experiment.client_mapping(base)
    self.member_mapping = _member_mapping(strategy, self.mapping)
    if self.member_mapping.resolved() == 'sharded' and self.mapping.resolved() == 'sharded':
      raise ValueError('members and clients cannot both be sharded; use strategy=sequential '
                       'or vmap for the clients of a sharded sweep')
    self.batched_clients = (self.mapping.batches_clients
                            or self.member_mapping.batches_clients)
    self.model = experiment.make_model(base, dataset.num_classes, self.batched_clients)
    self.hparams = [experiment.algorithm_hparams(c) for c in configs]
    capped = {experiment.batch_cap(c, info) for c, info in zip(configs, self.infos)}
    if len(capped) > 1:
      # A separate run caps its minibatch at its own largest client: members whose caps
      # differ compute different minibatches, so they cannot share a compiled round.
      raise ValueError(f'members cap batch_size at different sizes ({sorted(capped)})')
    (self.batch_size,) = capped
    params = [experiment.init_params(self.model, c, self.data.input_shape) for c in configs]
    self.params = _stack(params)
    self.values = {k: jnp.asarray([c[k] for c in configs], jnp.float32)
                   for k in traced if k in experiment.TRACEABLE_KEYS}
    if len(traced) > len(self.values):
      # Traced algorithm hyperparameters (a density): each member's exact counts, computed on
      # the host from its own values, enter the one compiled round as arrays.
      layouts, failures = [], {}
      for i, p in enumerate(params):
        try:
          layouts.append(self.member_algorithm(i).layout(p))
        except ValueError as err:  # e.g. a density that keeps no weight of this model
          failures[i] = err
      if failures:
        raise _MemberFailures(failures)
      shapes = {str(jax.tree.map(np.shape, lay)) for lay in layouts}
      if len(shapes) > 1:
        raise ValueError(f'members\' layouts differ in shape ({sorted(shapes)})')
      self.values['layout'] = _stack([jax.tree.map(jnp.asarray, lay) for lay in layouts])
    self.algorithm_keys = _stack([experiment.algorithm_key(c.seed) for c in configs])
    self.round_keys = _stack([experiment.round_stream(c.seed) for c in configs])
    self.eval_keys = _stack([experiment.eval_stream(c.seed) for c in configs])
    self.evaluator = engine.make_evaluator(self.model.apply, base.eval_batch_size, jitted=False)
    self._round = self._evaluate = self._init = self._take = self._stacker = None
    self.on_mesh = jax.process_count() > 1 or 'sharded' in (self.member_mapping.resolved(),
                                                            self.mapping.resolved())
    if self.on_mesh:
      self._place()

  def _place(self) -> None:
    """Puts the group's inputs on the global mesh and decides where its state lives."""
    # A computation over the global mesh takes global arrays only (identical in every process:
    # each builds them from the same configs and data).
    for name in ('data', 'member_data', 'values', 'params', 'algorithm_keys', 'round_keys',
                 'eval_keys'):
      setattr(self, name, distributed.to_global(getattr(self, name)))
    devices, processes = jax.device_count(), jax.process_count()
    where = f'{devices} device(s) of {processes} process(es)'
    if self.member_mapping.resolved() != 'sharded':
      self.placement = distributed.replicated()
      logging.info('Sweep group of %d member(s): the clients are sharded over %s, so every '
                   'device maps all members (%s); the group state is replicated.',
                   self.num_members, where, self.member_mapping.local_strategy)
    elif self.num_members % devices == 0:
      self.placement = distributed.sharded()
      logging.info('Sweep group of %d member(s): the member axis is sharded over %s, %d '
                   'member(s) per device (%s).', self.num_members, where,
                   self.num_members // devices, self.member_mapping.local_strategy)
    else:
      # An uneven split has no NamedSharding; the round pads the members to a multiple of the
      # devices (copies of member 0, dropped) and gathers its outputs.
      self.placement = distributed.replicated()
      per_device = -(-self.num_members // devices)
      logging.info('Sweep group of %d member(s): the members do not divide evenly over %s, so '
                   'the group state is replicated (the round pads them to %d, %d per device, '
                   '%s).', self.num_members, where, per_device * devices, per_device,
                   self.member_mapping.local_strategy)

  def _round_index(self, t: int) -> jax.Array:
    return distributed.to_global(np.int32(t)) if self.on_mesh else jnp.int32(t)

  def _to_host(self, tree: Any) -> Any:
    # Global arrays are read from this process's copy; otherwise one device_get for the tree.
    return distributed.to_host(tree) if self.on_mesh else jax.device_get(tree)

  def member_algorithm(self, i: int) -> engine.Algorithm:
    """Member ``i``'s algorithm with its own (concrete) values, for host coding and export."""
    return experiment.build_algorithm(self.configs[i], self.hparams[i], self.model.apply,
                                      self.mapping, self.batch_size)

  def _algorithm(self, values: dict[str, jax.Array]) -> engine.Algorithm:
    values = dict(values)
    layout = values.pop('layout', None)
    return experiment.build_algorithm(self.configs[0], self.hparams[0], self.model.apply,
                                      self.mapping, self.batch_size, traced=values,
                                      layout=layout)

  def _member_data(self, data: data_lib.FederatedData, split: tuple[jax.Array, ...]
                   ) -> data_lib.FederatedData:
    index, size, test_index, test_size = split
    return data.replace(client_index=index, client_size=size, client_test_index=test_index,
                        client_test_size=test_size)

  def _map(self, fn, shared, *members):
    return engine.map_clients(fn, shared, *members, mapping=self.member_mapping)

  def _init_all(self, data, values, split, key, params):
    def one(data_, values_, split_, key_, params_):
      return self._algorithm(values_).init(key_, params_, self._member_data(data_, split_))
    return self._map(one, data, values, split, key, params)

  def _init_args(self):
    return self.data, self.values, self.member_data, self.algorithm_keys, self.params

  def init(self):
    if self._init is None:
      self._init = self.jit(self._init_all)
    return self._init(*self._init_args())

  def abstract_state(self):
    abstract = jax.eval_shape(self._init_all, *self._init_args())
    if not self.on_mesh:
      return abstract
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.placement),
                        abstract)

  def member_state(self, state, i):
    if isinstance(jax.tree.leaves(state)[0], jax.ShapeDtypeStruct):
      # A resume restores each member's checkpoint replicated (whatever devices wrote it).
      kwargs = {'sharding': distributed.replicated()} if self.on_mesh else {}
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, **kwargs), state)
    if not self.on_mesh:
      return jax.tree.map(lambda x: x[i], state)
    if self._take is None:
      # One compile for every member (the index is an operand); the member's state gathered
      # to every device, so each process holds all of it (orbax saves it in concert).
      self._take = self.jit(lambda s, j: jax.tree.map(lambda x: x[j], s),
                            distributed.replicated())
    return self._take(state, distributed.to_global(np.int32(i)))

  def stack(self, states):
    if not self.on_mesh:
      return _stack(states)
    if self._stacker is None:
      self._stacker = self.jit(_stack)
    return self._stacker(list(states))

  def _round_all(self, state, shared, values, split, bases):
    data, t = shared

    def one(shared_, values_, split_, state_, base_):
      data_, t_ = shared_
      algorithm = self._algorithm(values_)
      return algorithm.round(state_, self._member_data(data_, split_),
                             jax.random.fold_in(base_, t_))
    return self._map(one, (data, t), values, split, state, bases)

  def compile(self, state):
    self._round = self.jit(self._round_all, (self.placement, distributed.replicated()),
                           donate_argnums=0).lower(
        state, (self.data, self._round_index(0)), self.values, self.member_data,
        self.round_keys).compile()

  def step(self, state, t):
    state, metrics = self._round(state, (self.data, self._round_index(t)), self.values,
                                 self.member_data, self.round_keys)
    metrics = self._to_host(metrics)
    return state, [{k: v[i] for k, v in metrics.items()} for i in range(self.num_members)]

  def _evaluate_all(self, state, shared, values, split, bases):
    def one(shared_, values_, split_, state_, base_):
      data_, t_ = shared_
      return experiment.evaluate(self.evaluator, self._algorithm(values_), state_,
                                 jax.random.fold_in(base_, t_), self._member_data(data_, split_))
    return self._map(one, shared, values, split, state, bases)

  def evaluate(self, state, t):
    if self._evaluate is None:
      self._evaluate = self.jit(self._evaluate_all, distributed.replicated())
    out = self._to_host(self._evaluate(state, (self.data, self._round_index(t)), self.values,
                                       self.member_data, self.eval_keys))
    return [{k: float(v[i]) for k, v in out.items()} for i in range(self.num_members)]


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


# --------------------------------------------------------------------------------------------------
# The sweep.


def _static_key(config: ml_collections.ConfigDict, traced: tuple[str, ...]) -> str:
  """What must be equal for members to share a compile: the config without seed and traced keys."""
  flat = workdir_lib.flatten(config.to_dict())
  # Also per member, not in the compiled round: checkpoint cadence, events, the data's folder.
  for key in traced + ('seed', 'checkpoint_every', 'tensorboard', 'data_dir'):
    flat.pop(key, None)
  return json.dumps(flat, sort_keys=True, default=str)


def _write_status(entry: _Entry, stage: str = 'run') -> None:
  """``stage``: where a failure happened, ``config`` (re-checked on every run) or ``run``.

  Written by process 0 only: in a multi-process job the others hold the same fate.
  """
  if not distributed.is_primary():
    return
  entry.workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_atomic(entry.workdir / STATUS_FILE, json.dumps(
      {'status': entry.status, 'error': entry.error, 'overrides': entry.overrides,
       'seconds': entry.seconds, 'stage': stage}, indent=2, sort_keys=True) + '\n')


def _read_status(workdir: pathlib.Path) -> dict[str, Any]:
  try:
    return json.loads((workdir / STATUS_FILE).read_text())
  except (OSError, json.JSONDecodeError):
    return {}


def run_sweep(base: ml_collections.ConfigDict, members: Sequence[dict[str, Any]],
              workdir: str | pathlib.Path, *, strategy: str = 'auto',
              retry_failed: bool = False) -> list[dict[str, Any]]:
  """Runs (or resumes) every member of a sweep and returns the summary (`summary_table`).

  In a multi-process `jax.distributed` job every process calls it with the same arguments
  (checked first). Each group's members are then sharded over the devices of all processes
  (`_GroupProgram`); process 0 locks the directories, decides from their files which members
  still run (its verdicts are broadcast) and writes every file but the checkpoints, which all
  processes save in concert (`fedsparse.loop.run_members`). An error that stops a group in
  some processes stops it in all (`fedsparse.distributed.agree_on_error`), so every process
  returns the same statuses.

  Args:
    base: the experiment config every member starts from.
    members: the members' overrides (`sweep`, `product`, ...); names must be distinct.
    workdir: ``DIR``; member ``m`` runs in ``DIR/<member_name(m)>/``, and ``DIR/summary.csv``
      lists them all.
    strategy: how a group maps its members (`fedsparse.engine.STRATEGIES`; ``auto``:
      ``sequential`` on the CPU, ``vmap`` elsewhere; in a multi-process job the members are
      sharded over all devices and ``strategy`` maps each device's share, see
      `_member_mapping`).
    retry_failed: rerun members recorded as failed (by default they are kept as they are).

  Returns:
    One summary row per member, in the sweep's order.

  Raises:
    UsageError: an empty sweep, duplicate member names, an unknown strategy, members and
      clients both sharded, a workdir that cannot be used, or processes that disagree on the
      sweep (before anything runs). Errors of single members are recorded, not raised.
  """
  root = pathlib.Path(workdir)
  # Before any check that could fail in some processes only (the others would wait for them in
  # a collective): the processes of a job must run the same sweep into the same directory.
  try:
    distributed.check_same([base.to_dict(), list(members), str(root.absolute()), strategy,
                            retry_failed], 'the sweep (its base config, members, --workdir, '
                           '--member_mapping or --retry_failed)')
  except ValueError as err:
    raise UsageError(str(err)) from None
  if not members:
    raise UsageError('The sweep has no members.')
  if strategy not in engine.STRATEGIES:
    raise UsageError(f'Unknown sweep strategy {strategy!r}; valid: '
                     f'{", ".join(engine.STRATEGIES)}.')
  entries = [_Entry(member_name(m), dict(m), root / member_name(m)) for m in members]
  names = [e.name for e in entries]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UsageError(f'The sweep lists the same member more than once: {", ".join(duplicates)}.')
  swept = sorted({k for m in members for k in m})
  try:
    experiment.validate_config(base)
  except ValueError as err:
    raise UsageError(f'The sweep\'s base config is invalid: {err}') from None
  for m in members:  # a misspelt key fails the sweep, not each member
    for key in m:
      try:
        member_config(base, {key: _get(base, key)})
      except ValueError as err:
        raise UsageError(str(err)) from None
  client_strategies = {m.get('strategy', base.strategy) for m in members}
  if strategy == 'sharded' and 'sharded' in client_strategies:
    # One mesh axis cannot split both; found here, not after each group has been set up.
    raise UsageError('The sweep shards its members over the devices (member mapping '
                     '\'sharded\') and the clients too (strategy=sharded); one device axis '
                     'cannot split both. Map the clients by another strategy (sequential, '
                     'vmap, chunked) or the members by another mapping.')
  # Traced: the swept keys whose values enter the round as numbers. Chosen from the sweep (not
  # from a group's values), so a member's state has the same structure on every resume.
  traced = experiment.traced_keys(base, swept)
  with contextlib.ExitStack() as held:
    # Process 0 alone creates and locks DIR (the others learn whether it could); all must see
    # the same directory, where they read the members' files and save checkpoints.
    workdir_lib.on_primary(lambda: _open_root(root, held), None)
    workdir_lib.check_shared(root)
    for e in entries:
      _configure(e, base)
    # Process 0 judges the members' directories; its verdicts hold in every process.
    workdir_lib.on_primary(lambda: [_prepare(e, retry_failed) for e in entries], None,
                     what='read the members\' directories')
    fates = distributed.broadcast_json([[e.status, e.error, e.stage, e.seconds]
                                        for e in entries])
    for e, (status, error, stage, seconds) in zip(entries, fates):
      e.status, e.error, e.stage, e.seconds = status, error, stage, seconds
    unusable = [e for e in entries if e.status == 'unusable']
    if unusable:
      raise UsageError(
          f'{len(unusable)} member(s) cannot continue the runs in their directories '
          f'({", ".join(e.name for e in unusable[:4])}{", ..." if len(unusable) > 4 else ""}): '
          f'{unusable[0].error}. Use a new --workdir for this sweep, or delete those members\' '
          f'directories in {str(root)!r} to run them from the start.')
    for e in entries:
      if e.stage == 'config':
        _write_status(e, stage='config')
    pending = [e for e in entries if e.status == 'pending']
    groups: dict[str, list[_Entry]] = {}
    for e in pending:
      groups.setdefault(_static_key(e.config, traced), []).append(e)
    logging.info('Sweep: %d members, %d to run in %d group(s) (traced: %s; members mapped by '
                 '%s).', len(entries), len(pending), len(groups), ', '.join(traced) or 'seed',
                 _describe_mapping(strategy))
    for g, group in enumerate(groups.values()):
      for e in group:
        e.group = g
      _run_group(group, traced, strategy)
    rows = summary_table(entries)
    if distributed.is_primary():
      write_summary(rows, root / SUMMARY_FILE)
  return rows


def _describe_mapping(strategy: str) -> str:
  """How members are mapped, for the log (`_member_mapping` decides per group)."""
  local = engine.default_strategy() if strategy in ('auto', 'sharded') else strategy
  if jax.process_count() > 1:
    return (f'sharded over the {jax.device_count()} devices of {jax.process_count()} processes, '
            f'{local} on each, unless the clients are sharded')
  return engine.default_strategy() if strategy == 'auto' else strategy


def _open_root(root: pathlib.Path, held: contextlib.ExitStack) -> None:
  """Creates the sweep's directory if needed and locks it until ``held`` closes."""
  workdir_lib.make_workdir(root)
  held.enter_context(workdir_lib.lock(root))


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  """``config``'s value at dotted ``key`` (None where the path does not exist)."""
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return None
    node = node[part]
  return node


def _configure(e: _Entry, base: ml_collections.ConfigDict) -> None:
  """Builds and validates a member's config (in every process: no files are read)."""
  try:
    e.config = member_config(base, e.overrides)
    experiment.validate_config(e.config)
    e.saved = experiment.saved_config(e.config, experiment.algorithm_hparams(e.config))
  except (ValueError, TypeError) as err:
    # Recomputed on every run (never read back): fixing the base config fixes the member.
    e.status, e.error, e.stage = 'failed', f'{type(err).__name__}: {err}', 'config'


def _prepare(e: _Entry, retry_failed: bool) -> None:
  """Decides from its directory whether a configured member (`_configure`) still has to run.

  Marks it ``done``, ``failed`` (kept from an earlier run), ``unusable`` (its directory holds a
  run of another config, or more rounds than ``num_rounds``: what `fedsparse.train.run`
  refuses; `run_sweep` then fails before anything runs) or leaves it ``pending``.
  """
  status = _read_status(e.workdir)
  e.seconds = status.get('seconds', 0.0)
  if e.stage == 'config':
    return
  if status.get('status') == 'failed' and status.get('stage') == 'run' and not retry_failed:
    e.status, e.error = 'failed', status.get('error', '')
    return
  try:
    workdir_lib.check_resumable(e.workdir, e.saved, e.config, log=False)
  except UsageError as err:
    e.status, e.error = 'unusable', str(err).split('; use a new --workdir')[0]
    return
  rows = workdir_lib.read_metrics(e.workdir / workdir_lib.METRICS_FILE)
  if (status.get('status') == 'done' and len(rows) == e.config.num_rounds
      and 'test_accuracy' in rows[-1]):
    e.status = 'done'


def _run_group(group: list[_Entry], traced: tuple[str, ...], strategy: str) -> None:
  """Runs one group (split further by the round each member resumes from).

  In a multi-process job every process runs the same group: errors are agreed on
  (`fedsparse.distributed.agree_on_error`) and process 0's verdicts broadcast, so that all
  processes take the same path and record the same fates.
  """
  t0 = time.perf_counter()
  program = error = None
  try:
    program = _GroupProgram([e.config for e in group], traced, strategy)
  except Exception as err:  # pylint: disable=broad-except -- recorded per member
    error = err
  error = distributed.agree_on_error(error)
  if isinstance(error, _MemberFailures):
    # Those members alone fail; the others keep their one compile.
    for i, failure in error.failures.items():
      _fail_all([group[i]], failure)
    rest = [e for i, e in enumerate(group) if i not in error.failures]
    if rest:
      _run_group(rest, traced, strategy)
    return
  if error is not None:
    if len(group) > 1:
      # E.g. seeds whose partitions keep different numbers of clients: each member alone.
      logging.info('Sweep: the group cannot run as one (%s); running its members one by one.',
                   error)
      for e in group:
        _run_group([e], traced, strategy)
    else:
      _fail_all(group, error)
    return
  by_start: dict[int, list[int]] = {}
  with contextlib.ExitStack() as stack:
    # Busy (a run of its own holds it) or unwritable: nothing about the member is wrong, so
    # nothing is recorded in its workdir; the next run of the sweep tries again.
    busy = dict(distributed.broadcast_json(workdir_lib.on_primary(
        lambda: _lock_members(group, stack), [], what='lock the members\' directories')))
    members, outcomes = {}, []
    for i, e in enumerate(group):
      if str(i) in busy:
        e.status, e.error = 'failed', busy[str(i)]
        continue
      try:
        saved = experiment.saved_config(e.config, program.hparams[i])
        start, history = workdir_lib.check_resumable(e.workdir, saved, e.config)
        members[i] = loop.Member(e.config, e.workdir, saved, history,
                                 program.member_algorithm(i))
      except Exception as err:  # pylint: disable=broad-except -- recorded per member
        _fail_all([e], err)
        outcomes.append([i, _message(err)])
        continue
      outcomes.append([i, start, history])
      by_start.setdefault(start, []).append(i)
    try:
      # Each process read the directories itself (it restores from them): they must resume
      # the same members from the same rounds, as for a single run.
      distributed.check_same(outcomes, 'the state of the members\' directories')
    except ValueError as err:
      _fail_all([group[i] for i in members], err)
      by_start = {}
    for start, indices in sorted(by_start.items()):
      t1 = time.perf_counter()
      for i in indices:
        group[i].status = 'running'
        _write_status(group[i])
      error = sub = None
      try:
        sub = program if len(indices) == len(group) else _GroupProgram(
            [group[i].config for i in indices], traced, strategy)
      except Exception as err:  # pylint: disable=broad-except -- recorded per member
        error = err
      # Agreed before the loop: a process whose build failed must not leave the others waiting
      # in the loop's collectives.
      error = distributed.agree_on_error(error)
      if error is None:
        try:
          loop.run_members(sub, [members[i] for i in indices], start)
        except Exception as err:  # pylint: disable=broad-except -- recorded per member
          error = err
        error = distributed.agree_on_error(error)
      if error is not None:
        logging.error('Sweep group failed: %s', ''.join(traceback.format_exception(error)))
        _fail_all([group[i] for i in indices], error)
        continue
      seconds = time.perf_counter() - t1
      # Process 0's account of its members' fates (it wrote their rows) holds in every process.
      fates = distributed.broadcast_json(
          [None if members[i].error is None else _message(members[i].error, first_line=False)
           for i in indices])
      for i, fate in zip(indices, fates):
        e = group[i]
        e.seconds += seconds
        e.status, e.error = ('done', '') if fate is None else ('failed', fate)
        _write_status(e)
  logging.info('Sweep group of %d member(s) took %.1f s.', len(group), time.perf_counter() - t0)


def _lock_members(group: list[_Entry], stack: contextlib.ExitStack) -> list[tuple[str, str]]:
  """Creates and locks the members' directories until ``stack`` closes (process 0's work).

  Returns:
    ``(index, error)`` of each member whose directory cannot be used (the index as a string:
    the list is sent to the other processes as JSON).
  """
  busy = []
  for i, e in enumerate(group):
    try:
      workdir_lib.make_workdir(e.workdir)
      stack.enter_context(workdir_lib.lock(e.workdir))
    except UsageError as err:
      busy.append((str(i), f'{type(err).__name__}: {err}'))
  return busy


def _message(err: BaseException, first_line: bool = True) -> str:
  """``err`` as recorded in ``status.json`` and the summary."""
  text = str(err)
  if first_line:
    text = text.splitlines()[0] if text else ''
  return f'{type(err).__name__}: {text}'


def _fail_all(entries: list[_Entry], err: BaseException) -> None:
  message = _message(err)
  for e in entries:
    e.status, e.error = 'failed', message
    _write_status(e)


# --------------------------------------------------------------------------------------------------
# Summary.

SUMMARY_COLUMNS = ('member', 'status', 'rounds', 'final_test_accuracy', 'best_test_accuracy',
                   'final_train_loss', 'cum_bits_up', 'cum_bits_down', 'seconds', 'error')


def summary_table(entries: Sequence[_Entry]) -> list[dict[str, Any]]:
  """One row per member: its swept values, status, final and best accuracy, bits, error."""
  rows = []
  for e in entries:
    metrics = workdir_lib.read_metrics(e.workdir / workdir_lib.METRICS_FILE)
    evaluated = [r['test_accuracy'] for r in metrics if r.get('test_accuracy') is not None]
    last = metrics[-1] if metrics else {}
    row = {'member': e.name, **e.overrides, 'status': e.status, 'rounds': len(metrics),
           'final_test_accuracy': evaluated[-1] if evaluated and e.status == 'done' else None,
           'best_test_accuracy': max(evaluated) if evaluated else None,
           'final_train_loss': last.get('train_loss'), 'cum_bits_up': last.get('cum_bits_up'),
           'cum_bits_down': last.get('cum_bits_down'), 'seconds': round(e.seconds, 2),
           'error': e.error}
    rows.append(row)
  return rows


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
  swept = [k for r in rows for k in r if k not in SUMMARY_COLUMNS]
  return ['member'] + list(dict.fromkeys(swept)) + list(SUMMARY_COLUMNS[1:])


def write_summary(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
  """The summary as CSV (written atomically); empty cells for missing values."""
  import csv  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=_columns(rows), extrasaction='ignore')
  writer.writeheader()
  writer.writerows(rows)
  workdir_lib.write_atomic(path, buffer.getvalue())


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
  """The summary as an aligned text table (errors cut to one line)."""
  columns = [c for c in _columns(rows) if c not in ('member', 'cum_bits_down')]

  def cell(value):
    if value is None:
      return '-'
    if isinstance(value, float):
      return f'{value:.4g}'
    text = str(value)
    return text if len(text) <= 60 else text[:57] + '...'
  table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(line[j]) for line in table) for j in range(len(columns))]
  return '\n'.join('  '.join(v.ljust(w) for v, w in zip(line, widths)).rstrip()
                   for line in table)


def plot_summary(rows: Sequence[dict[str, Any]], path: str | pathlib.Path,
                 metric: str = 'final_test_accuracy') -> list[str]:
  """Plots ``metric`` against each swept value (one panel per key) into a PNG.

  Each finished member is a point; a line joins the mean over members with the same value
  (e.g. over seeds). ``seed`` gets a panel only when it is the sole swept key. Non-numeric
  values are placed as categories. Failed members are left out (they are in the table).

  Returns:
    The keys plotted (an empty list, and no file, when no member finished).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top  (slow import; plots are optional)
  matplotlib.use('Agg')  # files only; no display on servers
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  done = [r for r in rows if r.get(metric) is not None]
  keys = [c for c in _columns(rows) if c not in SUMMARY_COLUMNS and c != 'member']
  if len(keys) > 1:
    keys = [k for k in keys if k != 'seed']
  if not done or not keys:
    return []
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    values = [r.get(key) for r in done]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    categories = list(dict.fromkeys(map(str, values)))
    where = (lambda v: v) if numeric else (lambda v: categories.index(str(v)))
    ax.scatter([where(v) for v in values], [r[metric] for r in done], s=14, alpha=0.6)
    means = {}
    for v, r in zip(values, done):
      means.setdefault(where(v), []).append(r[metric])
    xs = sorted(means)
    ax.plot(xs, [float(np.mean(means[x])) for x in xs], marker='o', lw=1.5)
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
      ax.set_xscale('log')  # e.g. learning rates over decades
    if not numeric:
      ax.set_xticks(range(len(categories)), categories, rotation=30)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return keys
