"""Seconds per federated round: every client mapping strategy against a Python-loop baseline.

For each model and cohort size, one FedAvg round (K clients × ``local_steps`` SGD steps on
minibatches of ``batch_size`` MNIST-shaped images) runs

* in fedsparse: the whole round is one jitted function, clients mapped by each strategy
  (``vmap``, ``chunked``, ``sequential``, ``sharded`` over all local devices), with the conv
  formulation ``auto`` picks for the backend;
* as the baseline: the same clients and the same minibatches run as a Python loop over clients
  and steps, each step one call of a jitted SGD step on XLA's own convolution (how most FL
  simulators run clients), the batch copied from host memory as a data loader would, then
  averaged; compiled with XLA's default options.

Transparency rows (not baselines) run the same Python loop with fedsparse's XLA compiler options
(`fedsparse.engine.compiler_options`: on CPU, convolutions on XLA's Eigen kernels rather than
YNNPACK's) and then also with fedsparse's CPU conv formulation, so the table shows what each
change contributes.

Compile time is reported separately (ahead-of-time ``lower().compile()``; the baseline's first
call). Each timing is the median of ``--repeats`` runs after a warm-up. Achieved GFLOP/s counts
the XLA cost-analysis FLOPs of one SGD step times the steps run, against the peak of a 2048²
float32 matmul measured in the same run.

With ``--feddst`` it times the FedDST paper's reference round instead, on uneven clients:
MNISTNet, MNIST split as FedDST does (400 clients, Dirichlet α = 0.1 over clients per class:
1 to 1,138 examples each), 20 clients per round sampled with replacement, 10 local epochs of
batch 32, SGD lr 0.01, momentum 0.9, weight decay 1e-3 (dense: the round FedDST's sparse rounds
are built on). The baseline is a Python loop of jitted SGD steps over each client's *own* steps
(the last minibatch of an epoch at its real size, as PyTorch's DataLoader gives it), on exactly
the minibatches the jitted round draws. Each row shows the padding ratio: example slots
computed over examples really trained on. Two more rows time FedDST itself on the same cohort
(sparsity 0.8, ``sequential``): a plain round and a readjustment round. MNIST is read from
``--npz`` (default: ``$FEDSPARSE_MNIST_NPZ``, else ``mnist.npz``; the README explains its
layout); without it, random MNIST-shaped data with
MNIST's class counts.

Usage::

  python scripts/bench_round.py                       # the README table (takes a while on CPU)
  python scripts/bench_round.py --models=mnistnet --cohorts=10 --repeats=3
  python scripts/bench_round.py --feddst --repeats=3   # the FedDST reference round
  # the README's FedDST table: the CPU split into 2 XLA devices, so `sharded` uses both cores
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python scripts/bench_round.py --feddst --repeats=3
"""

import functools
import json
import os
import statistics
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsparse import algorithms
from fedsparse import data as data_lib
from fedsparse import engine
from fedsparse import models

_MODELS = flags.DEFINE_list('models', ['mlp', 'mnistnet', 'conv4'], 'Models to time.')
_COHORTS = flags.DEFINE_list('cohorts', ['10', '100'], 'Clients per round.')
_STRATEGIES = flags.DEFINE_list('strategies', ['vmap', 'chunked', 'sequential', 'sharded'],
                                'Client mapping strategies.')
_LOCAL_STEPS = flags.DEFINE_integer('local_steps', 5, 'Local SGD steps per client.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Minibatch size.')
_CHUNK = flags.DEFINE_integer('chunk_size', 10, 'Clients per vmap chunk for `chunked`.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per setting (median reported).')
_SKIP_SLOW = flags.DEFINE_float('skip_slower_than', 120.0,
                                'Skip the other repeats of a setting whose warm-up round takes '
                                'longer than this many seconds (reported with one run).')
_JSON = flags.DEFINE_string('json', '', 'Optional path for the results as JSON lines.')
_FEDDST = flags.DEFINE_bool('feddst', False, 'Time the FedDST reference round (uneven clients).')
_NPZ = flags.DEFINE_string('npz', os.environ.get('FEDSPARSE_MNIST_NPZ', 'mnist.npz'),
                           'MNIST .npz (default: $FEDSPARSE_MNIST_NPZ, else mnist.npz) for --feddst (random data of the same shape if absent).')
_FEDDST_MAPPINGS = flags.DEFINE_list(
    'feddst_mappings', ['sequential', 'sequential:pad', 'sharded', 'chunked:5', 'vmap:4', 'vmap'],
    'Strategies for --feddst: NAME[:ARG], ARG = chunk size (chunked), size groups (vmap) or '
    '"pad" (sequential with padded partial minibatches).')

NUM_TRAIN = 100 * 64  # 100 clients of 64 images: enough for cohorts of 100 without replacement


def synthetic_mnist(seed: int = 0) -> data_lib.Dataset:
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (NUM_TRAIN + 1000, 28, 28, 1), dtype=np.uint8)
  y = rng.integers(0, 10, NUM_TRAIN + 1000).astype(np.int32)
  return data_lib.Dataset(name='synthetic', x_train=x[:NUM_TRAIN], y_train=y[:NUM_TRAIN],
                          x_test=x[NUM_TRAIN:], y_test=y[NUM_TRAIN:], num_classes=10,
                          scale=255.0, mean=(0.5,), std=(0.29,))


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, float, list[float]]:
  """(first-call seconds, median of the next ``repeats`` calls, all timings)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats if first < _SKIP_SLOW.value else 0):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, (statistics.median(times) if times else first), times


def matmul_peak_gflops() -> float:
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  _, t, _ = median_seconds(lambda: f(a), 10)
  return 2 * 2048 ** 3 / t / 1e9


def step_flops(apply_fn, params, batch_size: int) -> float:
  """XLA's FLOP count of one SGD step (forward + backward + update) at ``batch_size``."""
  opt = optax.sgd(0.01)
  def step(p, s, x, y):
    def loss(p):
      logits = apply_fn({'params': p}, x, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s
  x = jnp.zeros((batch_size, 28, 28, 1), jnp.float32)
  y = jnp.zeros((batch_size,), jnp.int32)
  cost = jax.jit(step).lower(params, opt.init(params), x, y).compile().cost_analysis()
  if isinstance(cost, list):  # older jax returned a list of dicts
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def time_round(alg: engine.Algorithm, state: Any, mapping: engine.ClientMapping,
               fd: data_lib.FederatedData, key: jax.Array
               ) -> tuple[float, float, list[float], dict[str, Any]]:
  """Compiles a round ahead of time, then times it: (compile s, median s, timings, metrics).

  Raises `jax.errors.JaxRuntimeError` (e.g. a wide vmap running out of memory).
  """
  t0 = time.perf_counter()
  compiled = engine.jit(alg.round, batched_clients=mapping.batches_clients).lower(
      state, fd, key).compile()
  compile_s = time.perf_counter() - t0
  _, t, times = median_seconds(lambda: compiled(state, fd, key), _REPEATS.value)
  return compile_s, t, times, jax.device_get(compiled(state, fd, key)[1])


def baseline_round(model_xla, params, fd: data_lib.FederatedData, host_x: np.ndarray,
                   host_y: np.ndarray, clients: np.ndarray, schedules: np.ndarray,
                   lr: float, compiler_options: dict[str, str] | None = None
                   ) -> Callable[[], Any]:
  """The Python-loop baseline: one jitted SGD step per call, batches fed from host memory.

  The baseline proper is compiled with XLA's defaults (``compiler_options=None``), as other
  simulators run; the transparency rows pass fedsparse's options or conv formulation.
  """
  opt = optax.sgd(lr)

  @functools.partial(jax.jit, compiler_options=compiler_options)
  def sgd_step(p, s, x, y):
    def loss(p):
      logits = model_xla.apply({'params': p}, x, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  index = schedules  # [K, steps, B] training-set indices
  sizes = np.asarray(fd.client_size)[clients].astype(np.float32)
  weights = sizes / sizes.sum()
  normalize = lambda x: data_lib.normalize(x, fd.scale, fd.mean, fd.std)

  def run():
    total = None
    for k in range(len(clients)):
      p, s = params, opt.init(params)
      for i in range(index.shape[1]):
        batch = index[k, i]
        p, s = sgd_step(p, s, normalize(host_x[batch]), host_y[batch])
      scaled = jax.tree.map(lambda x: weights[k] * x, p)
      total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
    return total

  return run


def bench_setting(model_name: str, cohort: int, peak: float, rows: list[dict[str, Any]]) -> None:
  dataset = synthetic_mnist()
  fd, _ = data_lib.make_federated_data(dataset, 100, 'iid', seed=0)
  local = engine.LocalConfig(batch_size=_BATCH.value, local_steps=_LOCAL_STEPS.value)
  model = models.get_model(model_name, 10, conv_impl=models.resolve_impl('auto'))
  model_xla = models.get_model(model_name, 10, conv_impl='xla')
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.float32))['params']
  flops = step_flops(model_xla.apply, params, _BATCH.value) * cohort * _LOCAL_STEPS.value
  key = jax.random.key(1)

  def record(name, compile_s, run_s, times):
    rows.append({'model': model_name, 'clients': cohort, 'strategy': name,
                 'compile_s': compile_s, 'round_s': run_s, 'runs': len(times) or 1,
                 'gflops': flops / run_s / 1e9, 'peak_frac': flops / run_s / 1e9 / peak})
    print(f'{model_name:9s} K={cohort:<4d} {name:22s} compile {compile_s:7.2f} s   '
          f'round {run_s:8.3f} s   {flops / run_s / 1e9:6.1f} GFLOP/s', flush=True)

  # The cohort and the minibatches every client uses, exactly as the jitted round draws them.
  drawn = engine.draw_cohort(key, fd.num_clients, engine.CohortConfig(cohort))
  clients = np.asarray(drawn.clients)
  schedules = np.stack([np.stack(engine.client_minibatches(drawn.keys[i], fd, int(c), local))
                        for i, c in enumerate(clients)])
  base = baseline_round(model_xla, params, fd, dataset.x_train, dataset.y_train, clients,
                        schedules, 0.05)
  first, t, times = median_seconds(base, _REPEATS.value)
  record('baseline: python loop', first - t if times else float('nan'), t, times)
  baseline_s = t
  # For transparency (not the baseline): the same loop with what fedsparse changes -- its XLA
  # compiler options, then also its CPU conv formulation -- to show where the speed-up comes from.
  options = engine.compiler_options()
  variants = []
  if options:
    variants.append(('python loop, xla, fs opts', model_xla, options))
  if model_name != 'mlp' and models.resolve_impl('auto') != 'xla':
    variants.append((f'python loop, {models.resolve_impl("auto")}, fs opts', model, options))
  for label, loop_model, loop_options in variants:
    loop = baseline_round(loop_model, params, fd, dataset.x_train, dataset.y_train, clients,
                          schedules, 0.05, loop_options)
    first, t, times = median_seconds(loop, _REPEATS.value)
    record(label, first - t if times else float('nan'), t, times)
    rows[-1]['speedup'] = baseline_s / t

  for strategy in _STRATEGIES.value:
    mapping = engine.ClientMapping(strategy, chunk_size=_CHUNK.value)
    # The conv formulation `auto` resolves to for this strategy (as the run loop does).
    impl = models.resolve_impl('auto', batched_clients=mapping.batches_clients)
    model = models.get_model(model_name, 10, conv_impl=impl)
    alg = algorithms.fedavg(model.apply, cohort=engine.CohortConfig(cohort), local=local,
                            learning_rate=0.05, mapping=mapping)
    state = alg.init(key, params)
    label = strategy if strategy != 'sharded' else f'sharded ({jax.device_count()} dev)'
    label += f', {impl}' if model_name != 'mlp' else ''
    try:
      compile_s, t, times, _ = time_round(alg, state, mapping, fd, key)
    except jax.errors.JaxRuntimeError as e:  # e.g. a wide vmap running out of memory
      print(f'{model_name:9s} K={cohort:<4d} {label:22s} failed: {str(e)[:120]}', flush=True)
      continue
    record(label, compile_s, t, times)
    rows[-1]['speedup'] = baseline_s / t
    print(f'{"":38s}→ {baseline_s / t:.2f}× the baseline', flush=True)


def feddst_data() -> data_lib.FederatedData:
  """MNIST split as the FedDST paper does: 400 clients, Dirichlet α = 0.1 over clients."""
  if os.path.exists(_NPZ.value):
    dataset = data_lib.load_dataset(f'npz:{_NPZ.value}')
  else:
    print(f'{_NPZ.value} not found: random MNIST-shaped data with MNIST\'s class counts')
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 6000).astype(np.int32)
    x = rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
    dataset = data_lib.Dataset('synthetic', x, y, x[:1000], y[:1000], 10, 255.0, (0.13,),
                               (0.31,))
  fd, info = data_lib.make_federated_data(dataset, 400, 'dirichlet', seed=0, alpha=0.1)
  print(f'FedDST split: {info.num_clients} clients ({info.dropped_clients} empty dropped), '
        f'{info.min_size}/{info.mean_size:.1f}/{info.max_size} examples (min/mean/max)')
  return fd


def bench_feddst(peak: float, rows: list[dict[str, Any]]) -> None:
  """The FedDST reference round: every strategy against a Python loop of each client's steps."""
  fd = feddst_data()
  cohort = engine.CohortConfig(20, replace=True)
  local = engine.LocalConfig(batch_size=32, local_epochs=10, momentum=0.9, weight_decay=1e-3)
  lr = 0.01
  key = jax.random.key(1)
  drawn = engine.draw_cohort(key, fd.num_clients, cohort)
  clients = np.asarray(drawn.clients)
  batches = [engine.client_minibatches(drawn.keys[i], fd, int(c), local)
             for i, c in enumerate(clients)]
  sizes = np.asarray(fd.client_size)[clients]
  real = int(local.local_epochs * sizes.sum())
  print(f'cohort sizes {sorted(sizes.tolist())}: {sum(map(len, batches))} steps, '
        f'{real} sample-steps')
  model_xla = models.get_model('mnistnet', 10, conv_impl='xla')
  params = model_xla.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.float32))['params']
  flops_per_example = step_flops(model_xla.apply, params, 32) / 32
  flops = flops_per_example * real
  host_x, host_y = np.asarray(fd.x_train), np.asarray(fd.y_train)
  weights = sizes / sizes.sum()

  def record(name, compile_s, run_s, times, ratio, baseline_s=None):
    row = {'model': 'mnistnet', 'clients': 20, 'strategy': name, 'compile_s': compile_s,
           'round_s': run_s, 'runs': len(times) or 1, 'gflops': flops / run_s / 1e9,
           'peak_frac': flops / run_s / 1e9 / peak, 'padding_ratio': ratio}
    if baseline_s is not None:
      row['speedup'] = baseline_s / run_s
    rows.append(row)
    print(f'feddst {name:30s} compile {compile_s:6.2f} s  round {run_s:8.3f} s  '
          f'padding {ratio:5.2f}  {row["gflops"]:6.1f} GFLOP/s'
          + (f'  {row["speedup"]:.2f}× the baseline' if 'speedup' in row else ''), flush=True)

  def loop(model, compiler_options):
    opt = optax.chain(optax.add_decayed_weights(local.weight_decay),
                      optax.sgd(lr, momentum=local.momentum))

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def sgd_step(p, s, x, y):
      def loss(p):
        logits = model.apply({'params': p}, x, train=True)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
      u, s = opt.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    normalize = lambda x: data_lib.normalize(x, fd.scale, fd.mean, fd.std)

    def run():
      total = None
      for k, client_batches in enumerate(batches):
        p, s = params, opt.init(params)
        for idx in client_batches:  # the client's own steps; a partial batch at its real size
          p, s = sgd_step(p, s, normalize(host_x[idx]), host_y[idx])
        scaled = jax.tree.map(lambda x: weights[k] * x, p)
        total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
      return total
    return run

  first, base_s, times = median_seconds(loop(model_xla, None), _REPEATS.value)
  record('baseline: python loop', first - base_s if times else float('nan'), base_s, times, 1.0)
  options = engine.compiler_options()
  impl = models.resolve_impl('auto')
  if impl != 'xla':
    model = models.get_model('mnistnet', 10, conv_impl=impl)
    first, t, times = median_seconds(loop(model, options), _REPEATS.value)
    record(f'python loop, {impl}, fs opts', first - t if times else float('nan'), t, times,
           1.0, base_s)

  for spec in _FEDDST_MAPPINGS.value:
    name, _, arg = spec.partition(':')
    partial = 'pad' if arg == 'pad' else 'split'
    kwargs = {}
    if name == 'chunked' and arg:
      kwargs['chunk_size'] = int(arg)
    if name == 'vmap' and arg:
      kwargs['size_groups'] = int(arg)
    mapping = engine.ClientMapping(name, **kwargs)
    impl = models.resolve_impl('auto', batched_clients=mapping.batches_clients)
    model = models.get_model('mnistnet', 10, conv_impl=impl)
    alg = algorithms.fedavg(
        model.apply, cohort=cohort, learning_rate=lr, mapping=mapping,
        local=engine.LocalConfig(batch_size=32, local_epochs=10, momentum=0.9,
                                 weight_decay=1e-3, partial_batches=partial))
    state = alg.init(key, params)
    label = name + (f' ({jax.device_count()} dev)' if name == 'sharded' else '')
    label += {'chunked': f', chunks of {arg}', 'vmap': f', {arg} size groups'}.get(
        name, '') if arg and arg != 'pad' else ''
    label += ', padded partial batches' if partial == 'pad' else ''
    label += f', {impl}'
    try:
      compile_s, t, times, metrics = time_round(alg, state, mapping, fd, key)
      ratio = float(metrics['padding_ratio'])
    except jax.errors.JaxRuntimeError as e:
      print(f'feddst {label:30s} failed: {str(e)[:120]}', flush=True)
      continue
    record(label, compile_s, t, times, ratio, base_s)

  # FedDST itself (S = 0.8, the MNIST reference) on the same cohort, beside FedAvg's rounds:
  # a plain sparse round and a readjustment round (round index 1: clients prune and regrow at
  # the end of their last epoch, the server votes).
  mapping = engine.ClientMapping('sequential')
  model = models.get_model('mnistnet', 10, conv_impl=models.resolve_impl('auto'))
  alg = algorithms.feddst(model.apply, cohort=cohort, local=local, learning_rate=lr,
                          mapping=mapping, num_rounds=100, sparsity=0.8, alpha=0.05,
                          readjust_every=10)
  state = alg.init(key, params, fd)
  for round_index, name in ((2, 'FedDST S=0.8, sequential'),
                            (1, 'FedDST readjustment round, sequential')):
    state = state._replace(round=jnp.int32(round_index))
    compile_s, t, times, metrics = time_round(alg, state, mapping, fd, key)
    record(name, compile_s, t, times, float(metrics['padding_ratio']), base_s)


def markdown_table(rows: list[dict[str, Any]], peak: float) -> str:
  """The README's table: one line per (model, cohort, way of running the clients)."""
  padding = any('padding_ratio' in r for r in rows)
  lines = [f'| model | clients | how clients run | compile s | s / round | '
           + ('padding ratio | ' if padding else '')
           + f'GFLOP/s (% of {peak:.0f} peak) | vs baseline |',
           '|---|---|---|---|---|' + ('---|' if padding else '') + '---|---|']
  for r in rows:
    speedup = f'{r["speedup"]:.2f}×' if 'speedup' in r else '1.00× (baseline)'
    ratio = f'{r["padding_ratio"]:.2f} | ' if padding else ''
    lines.append(f'| {r["model"]} | {r["clients"]} | {r["strategy"]} | {r["compile_s"]:.1f} | '
                 f'{r["round_s"]:.3f} | {ratio}{r["gflops"]:.1f} ({100 * r["peak_frac"]:.0f} %)'
                 f' | {speedup} |')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, '
        f'auto strategy {engine.default_strategy()}')
  peak = matmul_peak_gflops()
  print(f'measured 2048² float32 matmul peak: {peak:.1f} GFLOP/s')
  rows: list[dict[str, Any]] = []
  if _FEDDST.value:
    bench_feddst(peak, rows)
  else:
    for model_name in _MODELS.value:
      for cohort in map(int, _COHORTS.value):
        bench_setting(model_name, cohort, peak, rows)
  print()
  print(markdown_table(rows, peak))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      for row in rows:
        f.write(json.dumps({**row, 'peak_gflops': peak, 'backend': jax.default_backend(),
                            'local_steps': _LOCAL_STEPS.value,
                            'batch_size': _BATCH.value}) + '\n')


if __name__ == '__main__':
  app.run(main)
