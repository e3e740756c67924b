"""One compile for many runs: an 8-seed sweep against 8 separate runs, wall time and memory.

For each workload, three ways to run the same 8 seeds, each in a fresh Python process (so
peak memory is its own, read from the OS as the process's maximum resident set size):

* ``separate``: 8 calls of `fedsparse.train.run`, one after another in one process (each
  builds its experiment and compiles its own round; the Python and JAX start-up that 8
  separate commands would also pay is not counted);
* ``sweep-sequential``: `fedsparse.sweep.run_sweep` with members mapped one after another
  inside the one compiled round (what ``auto`` picks on the CPU);
* ``sweep-vmap``: the same with members vectorised side by side (``auto`` on GPU/TPU).

Every variant writes the same files (config.json, metrics.jsonl, events, checkpoints per
member). Wall time covers everything from the config to the last file; compile time is the
round's compile as the run loop reports it (``compile_seconds``; 8 of them for ``separate``).
Each number is the median of ``--repeats`` runs; the variants alternate within a repeat so
that machine noise hits them alike. Ratios are separate / sweep, measured in the same run.

Workloads: ``digits`` is digits_fedavg (Conv4, 20 clients, 5 per round, 2 local epochs) cut to
``--digits_rounds`` rounds; ``mnist_ssfl`` is mnist_ssfl:smoke (8 clients, 3 per round, 2 local
steps; MNIST from ``--npz``, default ``$FEDSPARSE_MNIST_NPZ``, else ``mnist.npz``) run for
``--ssfl_rounds`` rounds.

Usage::

  python scripts/bench_sweep.py                      # the README table
  python scripts/bench_sweep.py --workloads=digits --repeats=1 --digits_rounds=5
"""

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ('separate', 'sweep-sequential', 'sweep-vmap')
WORKLOADS = ('digits', 'mnist_ssfl')

_WORKLOADS = flags.DEFINE_list('workloads', list(WORKLOADS), f'Of {", ".join(WORKLOADS)}.')
_VARIANTS = flags.DEFINE_list('variants', list(VARIANTS), f'Of {", ".join(VARIANTS)}.')
_SEEDS = flags.DEFINE_integer('seeds', 8, 'Sweep members (seeds 0..N-1).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Runs per variant; the median is reported.')
_DIGITS_ROUNDS = flags.DEFINE_integer('digits_rounds', 20, 'Rounds of the digits workload.')
_SSFL_ROUNDS = flags.DEFINE_integer('ssfl_rounds', 10, 'Rounds of the mnist_ssfl workload.')
_NPZ = flags.DEFINE_string('npz', os.environ.get('FEDSPARSE_MNIST_NPZ', 'mnist.npz'),
                           'MNIST .npz for the mnist_ssfl workload (default: '
                           '$FEDSPARSE_MNIST_NPZ, else mnist.npz).')
_CHILD = flags.DEFINE_string('child', None, 'Internal: WORKLOAD,VARIANT,WORKDIR to run.')
_OUT = flags.DEFINE_string('out', '', 'Also write the results as JSON here.')


def workload_config(name: str):
  """The base config of a workload (the config files' own, with the benchmark's rounds)."""
  sys.path.insert(0, str(ROOT))
  from experiments.configs import digits_fedavg  # pylint: disable=g-import-not-at-top
  from experiments.configs import mnist_ssfl  # pylint: disable=g-import-not-at-top
  if name == 'digits':
    config = digits_fedavg.get_config()
    config.num_rounds = _DIGITS_ROUNDS.value
    config.eval_every = 10
  elif name == 'mnist_ssfl':
    config = mnist_ssfl.get_config('smoke')
    config.dataset = f'npz:{_NPZ.value}'
    config.num_rounds = _SSFL_ROUNDS.value
    config.eval_every = 5
  else:
    raise app.UsageError(f'Unknown workload {name!r}; valid: {", ".join(WORKLOADS)}.')
  return config


def child(workload: str, variant: str, workdir: str) -> dict[str, Any]:
  """Runs one variant in this process; returns wall and compile seconds and final accuracies."""
  from fedsparse import sweep  # pylint: disable=g-import-not-at-top
  from fedsparse import train  # pylint: disable=g-import-not-at-top
  base = workload_config(workload)
  members = sweep.sweep('seed', range(_SEEDS.value))
  root = pathlib.Path(workdir)
  t0 = time.perf_counter()
  if variant == 'separate':
    for m in members:
      train.run(sweep.member_config(base, m), root / sweep.member_name(m))
  else:
    rows = sweep.run_sweep(base, members, root, strategy=variant.split('-', 1)[1])
    failed = [r for r in rows if r['status'] != 'done']
    if failed:
      raise RuntimeError(f'members failed: {failed}')
  wall = time.perf_counter() - t0
  firsts = [json.loads((root / sweep.member_name(m) / 'metrics.jsonl').read_text()
                       .splitlines()[0]) for m in members]
  lasts = [json.loads((root / sweep.member_name(m) / 'metrics.jsonl').read_text()
                      .splitlines()[-1]) for m in members]
  compiles = [r['compile_seconds'] for r in firsts]
  # A sweep's members report their group's one compile: count it once.
  compile_s = sum(compiles) if variant == 'separate' else max(compiles)
  return {'wall_s': wall, 'compile_s': compile_s,
          'accuracy': [r['test_accuracy'] for r in lasts]}


def run_child(workload: str, variant: str) -> dict[str, Any]:
  """One variant in a fresh process: its results and its peak resident memory."""
  workdir = tempfile.mkdtemp(prefix=f'bench_sweep_{workload}_')
  try:
    args = [sys.executable, __file__, f'--child={workload},{variant},{workdir}',
            f'--seeds={_SEEDS.value}', f'--digits_rounds={_DIGITS_ROUNDS.value}',
            f'--ssfl_rounds={_SSFL_ROUNDS.value}', f'--npz={_NPZ.value}']
    out_path = pathlib.Path(workdir) / 'result.json'
    proc = subprocess.Popen(args + [f'--out={out_path}'], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate()
    if proc.returncode != 0:
      raise RuntimeError(f'{workload} {variant} failed:\n{stderr[-3000:]}')
    return json.loads(out_path.read_text())
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str]) -> None:
  del argv
  if _CHILD.value:
    workload, variant, workdir = _CHILD.value.split(',', 2)
    import resource  # pylint: disable=g-import-not-at-top
    result = child(workload, variant, workdir)
    # The process's own peak resident memory (kB on Linux): each variant runs alone in one.
    result['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pathlib.Path(_OUT.value).write_text(json.dumps(result))
    return
  for v in _VARIANTS.value:
    if v not in VARIANTS:
      raise app.UsageError(f'Unknown variant {v!r}; valid: {", ".join(VARIANTS)}.')
  import jax  # pylint: disable=g-import-not-at-top
  print(f'backend {jax.default_backend()}, {os.cpu_count()} CPUs; {_SEEDS.value} seeds, median '
        f'of {_REPEATS.value}')
  results = []
  for workload in _WORKLOADS.value:
    workload_config(workload)  # fails fast on an unknown name
    runs = {v: [] for v in _VARIANTS.value}
    for r in range(_REPEATS.value):
      for v in _VARIANTS.value:
        runs[v].append(run_child(workload, v))
        print(f'  {workload} {v} repeat {r + 1}: {runs[v][-1]["wall_s"]:.1f} s', flush=True)
    for v, rs in runs.items():
      results.append({
          'workload': workload, 'variant': v,
          'wall_s': statistics.median(x['wall_s'] for x in rs),
          'compile_s': statistics.median(x['compile_s'] for x in rs),
          'peak_rss_mb': statistics.median(x['peak_rss_mb'] for x in rs),
          'walls': [round(x['wall_s'], 2) for x in rs],
          'mean_final_accuracy': statistics.mean(rs[0]['accuracy'])})
  print(markdown_table(results))
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(results, indent=2))


def markdown_table(results: list[dict[str, Any]]) -> str:
  lines = ['| workload | variant | wall (s) | compile (s) | peak RSS (MB) | separate / this | '
           'mean final acc. |', '|---|---|---:|---:|---:|---:|---:|']
  for r in results:
    separate = next((x for x in results if x['workload'] == r['workload']
                     and x['variant'] == 'separate'), None)
    ratio = f'{separate["wall_s"] / r["wall_s"]:.2f}x' if separate else '-'
    lines.append(f'| {r["workload"]} | {r["variant"]} | {r["wall_s"]:.1f} | '
                 f'{r["compile_s"]:.1f} | {r["peak_rss_mb"]:.0f} | {ratio} | '
                 f'{r["mean_final_accuracy"]:.4f} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(main)
