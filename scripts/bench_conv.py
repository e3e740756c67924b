"""Micro-benchmark behind `fedsparse.models.layers`: which conv formulation, which client mapping.

On XLA:CPU a convolution gradient inside `lax.scan`/`lax.map` or under `vmap` leaves the fast
path (see the `fedsparse.models.layers` module docstring). This script measures, for MNISTNet
and Conv4 (batch 32, 28x28x1 random data, plain SGD), seconds per "round" = ``--clients``
clients x S local steps followed by a FedAvg mean, for:

  (a) ``loop``: Python loop over clients and steps, one jitted SGD step per call (how most FL
      simulators run), `block_until_ready` at the end; the reference is ``loop/xla``.
  (b) ``vmap``: one jit, `lax.scan` over steps inside `vmap` over clients.
  (c) ``map``: one jit, `lax.scan` inside `lax.map` over clients.
  (d) ``chunkN``: one jit, `lax.map(..., batch_size=N)` (chunked vmap) over clients.
  (e) other ideas: ``unrollN`` (``map`` with ``lax.scan(unroll=N)``), ``flat`` (one jit, the
      whole round unrolled in Python: no loops at all, long compiles), ``clientjit`` (Python
      loop over clients, one jitted scan per client), and XLA flags (``--xla_flags_sets``, each
      set run in a subprocess since flags are read once per process).

Each variant is ``mapping/impl`` with impl ``xla`` (`lax.conv_general_dilated` +
`reduce_window`, autodiff gradients), ``fwdconv`` (same forward; both conv gradients rewritten
as canonical forward convolutions, pooling gradients as selects and pads) or ``matmul`` (im2col +
one matmul; same pooling as ``fwdconv``); see `fedsparse.models.layers`. A ``--layers`` section
times single layers (forward, and forward+backward) inside a `lax.scan` for four conv
formulations -- ``xla``, ``fwdconv``, ``im2col`` (``matmul``), ``shiftsum`` (a sum of kh*kw
shifted-slice matmuls, no im2col buffer) -- and both pooling formulations. The GFLOP/s column
is XLA's FLOP count of one SGD step times the steps run, over the run time.

Compile time (ahead-of-time ``lower().compile()``; for ``loop`` the step function's) is
reported apart from run time, the median of ``--repeats`` runs after one warm-up run; a setting
whose warm-up exceeds ``--slow_s`` seconds is reported from that one run (marked ``*``). The
machine is shared, so compare ratios within one run.

Usage::

  python scripts/bench_conv.py                      # layer table + both models (~10 min)
  python scripts/bench_conv.py --models=conv4 --variants=loop/xla,map/fwdconv --repeats=5
  python scripts/bench_conv.py --models=conv4 --steps=conv4=1 --repeats=1 \
      --variants=loop/xla,map/xla,vmap/xla,map/fwdconv   # the slow one-jit xla variants
  python scripts/bench_conv.py --xla_flags_sets='--xla_cpu_use_xnnpack=true' --variants=loop/xla
"""

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
import optax

from fedsparse import models
from fedsparse.models import layers

_MODELS = flags.DEFINE_list('models', ['mnistnet', 'conv4'], 'Models to time.')
_VARIANTS = flags.DEFINE_list(
    'variants',
    ['loop/xla', 'loop/fwdconv', 'loop/matmul', 'vmap/xla', 'vmap/matmul', 'vmap/fwdconv',
     'map/xla', 'map/matmul', 'map/fwdconv', 'chunk2/matmul', 'chunk5/matmul',
     'unroll5/fwdconv', 'clientjit/fwdconv'],
    'mapping/impl pairs; mapping in loop, vmap, map, chunkN, unrollN, flat, clientjit; impl in '
    'xla, matmul, fwdconv.')
_STEPS = flags.DEFINE_list('steps', ['mnistnet=5', 'conv4=3'], 'Local steps S per model.')
_CLIENTS = flags.DEFINE_integer('clients', 10, 'Clients per round.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Minibatch size.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs (median reported) after a warm-up.')
_SLOW_S = flags.DEFINE_float('slow_s', 60.0, 'Report one run when the warm-up exceeds this.')
_LAYERS = flags.DEFINE_bool('layers', True, 'Also time single layers (forward, backward).')
_SLOW_XLA_LOOPS = flags.DEFINE_bool(
    'slow_xla_loops', False,
    'With the default --variants, also run the one-jit xla variants (vmap/xla, map/xla, ...) of '
    'models other than mnistnet: XLA:CPU conv gradients inside loops make them take minutes per '
    'round (see the layer section). Variants named explicitly always run.')
_XLA_FLAG_SETS = flags.DEFINE_list(
    'xla_flags_sets', [],
    'XLA_FLAGS strings (";"-separated flags inside one set) to rerun --flags_variant under.')
_FLAGS_VARIANT = flags.DEFINE_string('flags_variant', 'map/fwdconv',
                                     'The variant rerun under each --xla_flags_sets entry.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON line per result (for subprocesses).')

LR = 0.01


def _loss(model, params, x, y):
  logits = model.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _sgd_step(model, params, x, y):
  grads = jax.grad(functools.partial(_loss, model))(params, x, y)
  return jax.tree.map(lambda p, g: p - LR * g, params, grads)


def _mean_over_clients(stacked):
  # Reduce over the client axis only (a bare jnp.mean would average every axis).
  return jax.tree.map(lambda a: jnp.mean(a, axis=0), stacked)


def _client_scan(model, unroll, params, xs, ys):
  """S local SGD steps of one client: xs [S, B, ...], ys [S, B]."""
  def body(p, batch):
    return _sgd_step(model, p, *batch), None
  return lax.scan(body, params, (xs, ys), unroll=unroll)[0]


def _one_jit_round(model, mapping: str):
  """The whole round as one function of (global params, xs [C, S, B, ...], ys [C, S, B])."""
  if mapping == 'flat':
    def round_fn(params, xs, ys):
      finals = []
      for c in range(xs.shape[0]):
        p = params
        for s in range(xs.shape[1]):
          p = _sgd_step(model, p, xs[c, s], ys[c, s])
        finals.append(p)
      return jax.tree.map(lambda *a: sum(a[1:], a[0]) / len(a), *finals)
    return round_fn

  unroll = int(mapping[len('unroll'):]) if mapping.startswith('unroll') else 1
  client = functools.partial(_client_scan, model, unroll)

  def round_fn(params, xs, ys):
    if mapping == 'vmap':
      finals = jax.vmap(client, in_axes=(None, 0, 0))(params, xs, ys)
    elif mapping == 'map' or mapping.startswith('unroll'):
      finals = lax.map(lambda b: client(params, *b), (xs, ys))
    elif mapping.startswith('chunk'):
      finals = lax.map(lambda b: client(params, *b), (xs, ys),
                       batch_size=int(mapping[len('chunk'):]))
    else:
      raise ValueError(f'Unknown mapping {mapping!r}.')
    return _mean_over_clients(finals)
  return round_fn


def _time_runs(fn: Callable[[], Any]) -> tuple[float, int]:
  """Median seconds of fn over --repeats runs after a warm-up (or the warm-up if too slow)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  warm = time.perf_counter() - t0
  if warm > _SLOW_S.value:
    return warm, 1
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), len(times)


def build_variant(name: str, variant: str, steps: int) -> tuple[float, Callable[[], Any], float]:
  """(compile seconds, a function running one round, XLA's FLOP count of one SGD step)."""
  mapping, impl = variant.split('/')
  model = models.get_model(name, 10, conv_impl=impl)
  c, b = _CLIENTS.value, _BATCH.value
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  xs = jax.random.normal(kx, (c, steps, b, 28, 28, 1), jnp.float32)
  ys = jax.random.randint(ky, (c, steps, b), 0, 10)
  params = jax.jit(model.init)(kp, xs[0, 0])['params']

  if mapping in ('loop', 'clientjit'):
    if mapping == 'loop':
      unit = jax.jit(functools.partial(_sgd_step, model))
      unit_args = (params, xs[0, 0], ys[0, 0])
      # Batches pre-sliced, as a data loader would hand them over: only the step is timed.
      batches = [[(xs[i, s], ys[i, s]) for s in range(steps)] for i in range(c)]
    else:
      unit = jax.jit(functools.partial(_client_scan, model, 1))
      unit_args = (params, xs[0], ys[0])
      batches = [[(xs[i], ys[i])] for i in range(c)]
    t0 = time.perf_counter()
    unit = unit.lower(*unit_args).compile()
    compile_s = time.perf_counter() - t0
    mean = jax.jit(lambda *ps: jax.tree.map(lambda *a: sum(a[1:], a[0]) / len(a), *ps))

    def run():
      finals = []
      for client_batches in batches:
        p = params
        for batch in client_batches:
          p = unit(p, *batch)
        finals.append(p)
      return mean(*finals)
  else:
    t0 = time.perf_counter()
    compiled = jax.jit(_one_jit_round(model, mapping)).lower(params, xs, ys).compile()
    compile_s = time.perf_counter() - t0
    run = lambda: compiled(params, xs, ys)  # pylint: disable=unnecessary-lambda-assignment

  step_flops = jax.jit(functools.partial(_sgd_step, model)).lower(
      params, xs[0, 0], ys[0, 0]).compile().cost_analysis().get('flops', float('nan'))
  return compile_s, run, step_flops


def bench_model(name: str, variants: list[str], steps: int) -> list[dict[str, Any]]:
  """Times every variant of one model, interleaving the repeats.

  The machine is shared: running variant after variant would let a change of load favour one of
  them. Here each repeat runs every variant once, so all see the same conditions.
  """
  built, results = {}, {}
  for variant in variants:
    compile_s, run, flops = build_variant(name, variant, steps)
    t0 = time.perf_counter()
    jax.block_until_ready(run())  # warm-up
    warm = time.perf_counter() - t0
    built[variant] = run
    results[variant] = dict(model=name, variant=variant, steps=steps, compile_s=compile_s,
                            times=[warm] if warm > _SLOW_S.value else [],
                            step_gflop=flops / 1e9, xla_flags=os.environ.get('XLA_FLAGS', ''))
  for _ in range(_REPEATS.value):
    for variant, run in built.items():
      r = results[variant]
      if len(r['times']) == 1 and r['times'][0] > _SLOW_S.value:
        continue  # too slow to repeat: reported from its warm-up run
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      r['times'].append(time.perf_counter() - t0)
  for r in results.values():
    r['run_s'], r['runs'] = statistics.median(r['times']), len(r['times'])
    r['gflops'] = r['step_gflop'] * _CLIENTS.value * steps / r['run_s']
  return [results[v] for v in variants]


# ---------------------------------------------------------------------------------------------
# Layer-level section.


def _conv_shiftsum(x, kernel, strides, pads):
  """Conv as a sum of kh*kw matmuls of shifted slices (no im2col buffer; K = cin per matmul)."""
  kh, kw, _, _ = kernel.shape
  slices, _ = layers._shifted_slices(layers._pad_spatial(x, pads), (kh, kw), strides)  # pylint: disable=protected-access
  out = None
  for idx, s in enumerate(slices):
    t = lax.dot_general(s, kernel[idx // kw, idx % kw], (((3,), (0,)), ((), ())))
    out = t if out is None else out + t
  return out


_CONV_FORMULATIONS = {
    'xla': functools.partial(layers.conv2d, impl='xla'),
    'fwdconv': functools.partial(layers.conv2d, impl='fwdconv'),
    'im2col': functools.partial(layers.conv2d, impl='matmul'),
}


def _shiftsum(x, kernel, strides=1, padding='SAME'):
  strides = (strides, strides)
  pads = layers._explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)  # pylint: disable=protected-access
  return _conv_shiftsum(x, kernel, strides, pads)


_CONV_FORMULATIONS['shiftsum'] = _shiftsum

# (label, input HWC, kernel HWIO, padding): the dominant conv layers of the two models.
_LAYER_CASES = (
    ('mnistnet conv2', (22, 22, 10), (5, 5, 10, 20), 'VALID'),
    ('conv4 conv2', (28, 28, 64), (3, 3, 64, 64), 'SAME'),
)
_POOL_CASES = (
    ('mnistnet pool1 3x3/1', (24, 24, 10), 3, 1),
    ('conv4 pool1 2x2/2', (28, 28, 64), 2, 2),
)


def bench_layers(steps: int = 5) -> list[dict[str, Any]]:
  """Forward and forward+backward of single layers, S times inside a `lax.scan`."""
  results = []
  b = _BATCH.value

  def scan_time(fn, x, k):
    # k is carried (updated by its gradient) so XLA cannot hoist the layer out of the loop.
    def body(k, xb):
      return fn(k, xb)
    looped = jax.jit(lambda k, xs: lax.scan(body, k, xs)[0])
    xs = jnp.broadcast_to(x, (steps,) + x.shape)
    t0 = time.perf_counter()
    compiled = looped.lower(k, xs).compile()
    compile_s = time.perf_counter() - t0
    run_s, n = _time_runs(lambda: compiled(k, xs))
    return compile_s, run_s / steps, n

  for label, hwc, khwio, padding in _LAYER_CASES:
    x = jax.random.normal(jax.random.key(1), (b,) + hwc, jnp.float32)
    k = 0.1 * jax.random.normal(jax.random.key(2), khwio, jnp.float32)
    for form, conv in _CONV_FORMULATIONS.items():
      def fwd(k, xb, conv=conv, padding=padding):
        # A max, not a mean: XLA may rewrite the sum of a convolution into something cheaper.
        y = conv(xb, k, padding=padding)
        return k + 1e-6 * jnp.max(y), None

      def fwd_bwd(k, xb, conv=conv, padding=padding):
        loss = lambda k, xb: jnp.sum(jnp.tanh(conv(xb, k, padding=padding)))  # pylint: disable=unnecessary-lambda-assignment
        gk, gx = jax.grad(loss, argnums=(0, 1))(k, xb)
        # The input gradient feeds the carry so that it is really computed.
        return k - 1e-6 * gk - 1e-9 * jnp.mean(gx), None
      for what, fn in (('fwd', fwd), ('fwd+bwd', fwd_bwd)):
        compile_s, per_step, n = scan_time(fn, x, k)
        results.append(dict(layer=label, form=form, what=what, compile_s=compile_s,
                            run_s=per_step, runs=n))
        _print_layer(results[-1])

  for label, hwc, window, stride in _POOL_CASES:
    x = jax.random.normal(jax.random.key(1), (b,) + hwc, jnp.float32)
    k = jnp.ones(hwc[-1:], jnp.float32)  # a per-channel scale so the pool input is "trained"
    for impl in ('xla', 'matmul'):
      def pool_loss(k, xb, impl=impl, window=window, stride=stride):
        y = layers.max_pool(xb * k.reshape(1, 1, 1, -1), window, stride, impl=impl)
        return jnp.sum(jnp.tanh(y))

      def fwd(k, xb, pool_loss=pool_loss):
        return k + 1e-6 * pool_loss(k, xb), None

      def fwd_bwd(k, xb, pool_loss=pool_loss):
        return k - 1e-6 * jax.grad(pool_loss)(k, xb), None
      for what, fn in (('fwd', fwd), ('fwd+bwd', fwd_bwd)):
        compile_s, per_step, n = scan_time(fn, x, k)
        form = 'reduce_window' if impl == 'xla' else 'slices/reshape'
        results.append(dict(layer=label, form=form, what=what, compile_s=compile_s,
                            run_s=per_step, runs=n))
        _print_layer(results[-1])
  return results


def _print_layer(r):
  print(f"  {r['layer']:22s} {r['form']:15s} {r['what']:8s} "
        f"{1e3 * r['run_s']:9.2f} ms/step  (compile {r['compile_s']:.1f} s)", flush=True)


# ---------------------------------------------------------------------------------------------


def _print_row(r, baseline):
  ratio = baseline / r['run_s'] if baseline else float('nan')
  mark = '*' if r['runs'] == 1 else ' '
  flags_note = f"  [{r['xla_flags']}]" if r['xla_flags'] else ''
  print(f"{r['model']:9s} S={r['steps']} {r['variant']:18s} {r['compile_s']:9.1f} "
        f"{r['run_s']:9.3f}{mark} {ratio:8.2f}x {r['gflops']:8.1f}{flags_note}", flush=True)


def main(argv):
  del argv
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, '
        f'{os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  steps = dict(s.split('=') for s in _STEPS.value)
  if _LAYERS.value and not _JSON.value:
    print('\nLayer level: one layer, batch %d, S=5 steps inside lax.scan' % _BATCH.value)
    bench_layers()

  for name in _MODELS.value:
    s = int(steps.get(name, 5))
    if not _JSON.value:
      print(f'\n{"model":9s} {"":3s} {"variant":18s} {"compile s":>9s} {"run s":>9s}  '
            f'{"vs loop/xla":>9s} {"GFLOP/s":>8s}   '
            f'({_CLIENTS.value} clients x S steps, batch {_BATCH.value})')
    variants = list(_VARIANTS.value)
    if name != 'mnistnet' and not _SLOW_XLA_LOOPS.value and not flags.FLAGS['variants'].present:
      slow = [v for v in variants if v.endswith('/xla') and not v.startswith('loop/')]
      variants = [v for v in variants if v not in slow]
      if slow and not _JSON.value:
        print(f'(skipped {", ".join(slow)}: minutes per round; --slow_xla_loops runs them)')
    baseline = None
    for r in bench_model(name, variants, s):
      if r['variant'] == 'loop/xla':
        baseline = r['run_s']
      if _JSON.value:
        print('RESULT ' + json.dumps(r), flush=True)
      else:
        _print_row(r, baseline)
    for flag_set in _XLA_FLAG_SETS.value:
      env = dict(os.environ, XLA_FLAGS=flag_set.replace(';', ' '))
      cmd = [sys.executable, __file__, f'--models={name}', f'--variants={_FLAGS_VARIANT.value}',
             f'--steps={name}={s}', f'--clients={_CLIENTS.value}',
             f'--batch_size={_BATCH.value}', f'--repeats={_REPEATS.value}', '--json']
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
      lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
      if not lines:
        print(f'  XLA_FLAGS={flag_set!r} failed: {out.stderr.strip()[-300:]}', flush=True)
        continue
      _print_row(json.loads(lines[0][len('RESULT '):]), baseline)


if __name__ == '__main__':
  app.run(main)
