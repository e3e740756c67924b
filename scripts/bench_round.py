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

Usage::

  python scripts/bench_round.py                       # the README table (takes a while on CPU)
  python scripts/bench_round.py --models=mnistnet --cohorts=10 --repeats=3
"""

import functools
import json
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


def baseline_round(model_xla, params, fd: data_lib.FederatedData, host_x: np.ndarray,
                   host_y: np.ndarray, clients: np.ndarray, schedules: engine.Schedule,
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

  index = np.asarray(schedules.index)
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
  sample_key, clients_key = jax.random.split(key)
  clients = np.asarray(engine.sample_cohort(sample_key, fd.num_clients, cohort))
  client_keys = jax.random.split(clients_key, cohort)
  schedules = jax.vmap(lambda c, k: engine.make_schedule(
      jax.random.split(k)[0], fd.client_index[c], fd.client_size[c], local))(
          jnp.asarray(clients), client_keys)
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
      t0 = time.perf_counter()
      compiled = engine.jit(alg.round, batched_clients=mapping.batches_clients).lower(
          state, fd, key).compile()
      compile_s = time.perf_counter() - t0
      _, t, times = median_seconds(lambda: compiled(state, fd, key), _REPEATS.value)
    except jax.errors.JaxRuntimeError as e:  # e.g. a wide vmap running out of memory
      print(f'{model_name:9s} K={cohort:<4d} {label:22s} failed: {str(e)[:120]}', flush=True)
      continue
    record(label, compile_s, t, times)
    rows[-1]['speedup'] = baseline_s / t
    print(f'{"":38s}→ {baseline_s / t:.2f}× the baseline', flush=True)


def markdown_table(rows: list[dict[str, Any]], peak: float) -> str:
  """The README's table: one line per (model, cohort, way of running the clients)."""
  lines = [f'| model | clients | how clients run | compile s | s / round | GFLOP/s '
           f'(% of {peak:.0f} peak) | vs baseline |', '|---|---|---|---|---|---|---|']
  for r in rows:
    speedup = f'{r["speedup"]:.2f}×' if 'speedup' in r else '1.00× (baseline)'
    lines.append(f'| {r["model"]} | {r["clients"]} | {r["strategy"]} | {r["compile_s"]:.1f} | '
                 f'{r["round_s"]:.3f} | {r["gflops"]:.1f} ({100 * r["peak_frac"]:.0f} %) | '
                 f'{speedup} |')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, '
        f'auto strategy {engine.default_strategy()}')
  peak = matmul_peak_gflops()
  print(f'measured 2048² float32 matmul peak: {peak:.1f} GFLOP/s')
  rows: list[dict[str, Any]] = []
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
