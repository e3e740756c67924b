"""Multi-process runs: two `jax.distributed` processes on localhost, one CPU device each.

They must compute what one process with two devices computes (the same two-shard layout of the
``sharded`` strategy, over clients for a run and over members for a sweep), resume from their
checkpoint, and write each file once. Every run is a subprocess (this test process has 8
devices, see conftest) with a timeout, so that a hang fails the test instead of blocking the
suite.
"""

import csv
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import run as run_lib
from experiments.configs import digits_fedavg
from fedsparse import distributed
from fedsparse import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = [sys.executable, '-m', 'experiments.run',
        '--config=experiments/configs/digits_fedavg.py:smoke', '--config.model=mlp',
        '--config.strategy=sharded', '--config.checkpoint_every=2']
SWEEP_ARGS = [sys.executable, '-m', 'experiments.sweep',
              '--config=experiments/configs/digits_fedavg.py:smoke', '--config.model=mlp',
              '--config.checkpoint_every=2']
# Two members, so that each of two devices holds one (the member axis sharded).
SWEEP_FILE = """from fedsparse import sweep


def get_sweep(arg=None):
  return sweep.sweep('learning_rate', [0.05, 0.1])
"""
SWEEP_MEMBERS = ['learning_rate=0.05', 'learning_rate=0.1']
TIMEOUT = 180  # seconds for one launch; a run takes about 10 s of CPU per process


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices))
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), env.get('PYTHONPATH')]))
  # A device-count flag in XLA_FLAGS would override JAX_NUM_CPU_DEVICES.
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if 'host_platform_device_count' not in f)
  return env


def _free_port() -> int:
  try:
    with socket.socket() as s:
      s.bind(('localhost', 0))
      return s.getsockname()[1]
  except OSError as e:
    pytest.skip(f'no localhost networking for the jax.distributed coordinator ({e})')


def _launch(commands: list[list[str]], env: dict[str, str] | list[dict[str, str]],
            logs: pathlib.Path) -> tuple[list[int], list[str]]:
  """Runs the commands at once; returns their exit codes and outputs (killed at TIMEOUT).

  Args:
    commands: the command lines.
    env: their environment, or one per command.
    logs: a folder for their outputs.
  """
  envs = env if isinstance(env, list) else [env] * len(commands)
  logs.mkdir(exist_ok=True)
  first = len(list(logs.iterdir()))
  paths = [logs / f'{first + i}.log' for i in range(len(commands))]
  procs = []
  for command, path, env_ in zip(commands, paths, envs):
    with path.open('w') as out:
      procs.append(subprocess.Popen(command, cwd=ROOT, env=env_, stdout=out,
                                    stderr=subprocess.STDOUT))
  deadline = time.monotonic() + TIMEOUT
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in procs], [path.read_text() for path in paths]


def _process_commands(workdir: pathlib.Path, extra: list[str],
                      flags: list[list[str]] | None = None,
                      command: list[str] | None = None) -> list[list[str]]:
  """The command line in each of two processes.

  ``command`` defaults to the run's (`ARGS`); ``flags`` adds further flags per process.
  """
  port = _free_port()
  return [(command or ARGS) + extra + (flags[i] if flags else []) + [
      f'--workdir={workdir}', f'--coordinator_address=localhost:{port}',
      '--num_processes=2', f'--process_id={i}'] for i in range(2)]


def _check(codes: list[int], outputs: list[str]) -> None:
  if any(codes):
    tails = '\n'.join(f'--- process {i} (exit {c}):\n{out[-3000:]}'
                      for i, (c, out) in enumerate(zip(codes, outputs)))
    raise AssertionError(f'a run failed or hung (exit codes {codes}):\n{tails}')


def _rows(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl without timings."""
  return [{k: v for k, v in json.loads(line).items() if not k.endswith('seconds')}
          for line in (workdir / train.METRICS_FILE).read_text().splitlines()]


def _assert_same_rows(got: list[dict], expected: list[dict]) -> None:
  assert [sorted(r) for r in got] == [sorted(r) for r in expected]
  for g, e in zip(got, expected):
    for key, value in e.items():
      if isinstance(value, float):  # bit-exact so far; summation order may differ elsewhere
        np.testing.assert_allclose(g[key], value, rtol=1e-6, err_msg=f'round {e["round"]} {key}')
      else:
        assert g[key] == value, f'round {e["round"]} {key}'


def _config():
  """The config of `ARGS`, for `train.run` in this process."""
  config = digits_fedavg.get_config('smoke')
  config.model, config.strategy, config.checkpoint_every = 'mlp', 'sharded', 2
  return config


def _files(workdir: pathlib.Path) -> list[str]:
  return sorted('events' if p.name.startswith('events.') else p.name
                for p in workdir.iterdir())


@pytest.mark.slow
def test_two_processes_compute_what_one_process_with_two_devices_does(tmp_path):
  """2 rounds in 2 processes, resumed to 4: the rows of 4 rounds in 1 process, 2 devices."""
  reference, workdir, logs = tmp_path / 'reference', tmp_path / 'multi', tmp_path / 'logs'
  # The reference runs beside the first two processes (the machine may have 2 cores only).
  codes, outputs = _launch(
      [ARGS + ['--config.num_rounds=4', f'--workdir={reference}']]
      + _process_commands(workdir, ['--config.num_rounds=2']),
      [_env(devices=2)] + [_env(devices=1)] * 2, logs)
  _check(codes, outputs)
  expected = _rows(reference)
  assert len(expected) == 4
  _assert_same_rows(_rows(workdir), expected[:2])
  # Each file once, by process 0: one TensorBoard file per start, one progress log.
  assert _files(workdir) == ['.lock', 'checkpoints', 'config.json', 'events', 'metrics.jsonl']
  assert [p.name for p in (workdir / train.CHECKPOINT_DIR).iterdir()] == ['2']
  assert 'round 2/2' in outputs[1] and 'round 2/2' not in outputs[2]
  assert 'Final (round 2)' in outputs[1] and 'Final' not in outputs[2]

  codes, outputs = _launch(_process_commands(workdir, ['--config.num_rounds=4']),
                           _env(devices=1), logs)
  _check(codes, outputs)
  assert 'Resumed' in outputs[0]
  _assert_same_rows(_rows(workdir), expected)
  assert _files(workdir) == ['.lock', 'checkpoints', 'config.json', 'events', 'events',
                             'metrics.jsonl']
  assert [p.name for p in (workdir / train.CHECKPOINT_DIR).iterdir()] == ['4']
  assert json.loads((workdir / train.CONFIG_FILE).read_text()) == json.loads(
      (reference / train.CONFIG_FILE).read_text())


def test_processes_with_different_configs_fail_fast(tmp_path):
  """A process started with other flags stops the whole job at once, before any file."""
  workdir = tmp_path / 'multi'
  codes, outputs = _launch(
      _process_commands(workdir, ['--config.num_rounds=2'], flags=[[], ['--config.seed=1']]),
      _env(devices=1), tmp_path / 'logs')
  assert codes == [run_lib.USAGE_ERROR] * 2, outputs
  for out in outputs:
    assert 'processes of this job disagree on the config' in out, out
    assert 'process(es) 1 differ from process 0' in out, out
  assert not workdir.exists()


def test_a_workdir_that_process_0_cannot_use_stops_every_process(tmp_path):
  (tmp_path / 'file').write_text('')
  codes, outputs = _launch(
      _process_commands(tmp_path / 'file', ['--config.num_rounds=2']), _env(devices=1),
      tmp_path / 'logs')
  assert codes == [run_lib.USAGE_ERROR] * 2, outputs
  assert 'is a file, not a directory' in outputs[0], outputs[0]
  assert 'Process 0 could not create or lock the workdir' in outputs[1], outputs[1]


def test_a_checkpoint_of_eight_devices_resumes_on_one(tmp_path):
  """Restores into this run's devices, not the writer's (was: orbax's "Topology mismatch")."""
  config = _config()
  config.num_rounds = 2
  train.run(config, tmp_path / 'run')  # this process: 8 devices (conftest)
  codes, outputs = _launch([ARGS + ['--config.num_rounds=3', f'--workdir={tmp_path / "run"}']],
                           _env(devices=1), tmp_path / 'logs')
  _check(codes, outputs)
  assert 'Resumed' in outputs[0]
  assert [r['round'] for r in _rows(tmp_path / 'run')] == [1, 2, 3]


def _sweep_command(tmp_path: pathlib.Path) -> list[str]:
  """`SWEEP_ARGS` with `SWEEP_FILE` written into ``tmp_path``."""
  path = tmp_path / 'lr_sweep.py'
  path.write_text(SWEEP_FILE)
  return SWEEP_ARGS + [f'--sweep={path}']


def _summary(root: pathlib.Path) -> list[dict[str, str]]:
  with (root / 'summary.csv').open() as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_sweep_in_two_processes_computes_what_one_process_with_two_devices_does(tmp_path):
  """A 2-member sweep in 2 processes computes what 1 process with 2 devices does, resumed too.

  2 rounds in 2 processes (one member on each process's device), resumed to 4; the reference
  runs 4 rounds in 1 process, its members sharded over its 2 devices.
  """
  command = _sweep_command(tmp_path)
  reference, root, logs = tmp_path / 'reference', tmp_path / 'multi', tmp_path / 'logs'
  # The reference runs beside the first two processes (the machine may have 2 cores only).
  codes, outputs = _launch(
      [command + ['--member_mapping=sharded', '--config.num_rounds=4', f'--workdir={reference}']]
      + _process_commands(root, ['--config.num_rounds=2'], command=command),
      [_env(devices=2)] + [_env(devices=1)] * 2, logs)
  _check(codes, outputs)
  # `auto` shards the members of a multi-process sweep, as the reference asked for explicitly.
  for out in outputs[:2]:
    assert 'the member axis is sharded over 2 device(s)' in out, out
  expected = {m: _rows(reference / m) for m in SWEEP_MEMBERS}
  assert [len(rows) for rows in expected.values()] == [4, 4]
  assert expected[SWEEP_MEMBERS[0]][0]['train_loss'] != expected[SWEEP_MEMBERS[1]][0][
      'train_loss']  # the members differ: a mix-up would show
  for m in SWEEP_MEMBERS:
    _assert_same_rows(_rows(root / m), expected[m][:2])
    # Each file once, by process 0 (one TensorBoard file per start); checkpoints by both.
    assert _files(root / m) == ['.lock', 'checkpoints', 'config.json', 'events',
                                'metrics.jsonl', 'status.json']
    assert [p.name for p in (root / m / train.CHECKPOINT_DIR).iterdir()] == ['2']
    assert json.loads((root / m / 'status.json').read_text())['status'] == 'done'
  assert _files(root) == ['.lock'] + SWEEP_MEMBERS + ['summary.csv', 'summary.png']
  assert [(r['member'], r['status'], r['rounds']) for r in _summary(root)] == [
      (m, 'done', '2') for m in SWEEP_MEMBERS]
  # Process 0 reports; the other process computes the same and says nothing.
  assert '2 of 2 members finished' in outputs[1] and 'members finished' not in outputs[2]
  assert 'round 2/2' in outputs[1] and 'round 2/2' not in outputs[2]

  codes, outputs = _launch(_process_commands(root, ['--config.num_rounds=4'], command=command),
                           _env(devices=1), logs)
  _check(codes, outputs)
  assert outputs[0].count('Resumed') == 2, outputs[0]
  # Resumed after round 2, not run from round 1.
  assert 'round 3/4' in outputs[0] and 'round 1/4' not in outputs[0], outputs[0]
  for m in SWEEP_MEMBERS:
    _assert_same_rows(_rows(root / m), expected[m])
    assert _files(root / m) == ['.lock', 'checkpoints', 'config.json', 'events', 'events',
                                'metrics.jsonl', 'status.json']
    assert [p.name for p in (root / m / train.CHECKPOINT_DIR).iterdir()] == ['4']
    assert json.loads((root / m / train.CONFIG_FILE).read_text()) == json.loads(
        (reference / m / train.CONFIG_FILE).read_text())
  assert [(r['member'], r['status'], r['rounds']) for r in _summary(root)] == [
      (m, 'done', '4') for m in SWEEP_MEMBERS]


def test_processes_with_different_sweeps_fail_fast(tmp_path):
  """A process started with another sweep stops the whole job at once, before any file."""
  root = tmp_path / 'multi'
  codes, outputs = _launch(
      _process_commands(root, ['--config.num_rounds=2'], flags=[[], ['--config.seed=1']],
                        command=_sweep_command(tmp_path)),
      _env(devices=1), tmp_path / 'logs')
  assert codes == [run_lib.USAGE_ERROR] * 2, outputs
  for out in outputs:
    assert 'processes of this job disagree on the sweep' in out, out
  assert not root.exists()


# Two processes that agree on an error only one of them raised, and on process 0's decision.
_AGREE = """
import sys
import jax
from fedsparse import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
error = ValueError('only here') if jax.process_index() == 1 else None
agreed = distributed.agree_on_error(error)
same = distributed.agree_on_error(KeyError('everywhere'))
decided = distributed.broadcast_json({'done': [jax.process_index()] * 3})
anywhere = distributed.any_process([jax.process_index() == 0, False, jax.process_index() == 1])
print('RESULT', type(agreed).__name__, agreed, '|', type(same).__name__, '|', decided, '|',
      anywhere.tolist())
"""


def test_processes_agree_on_an_error_that_one_of_them_raised(tmp_path):
  port = _free_port()
  codes, outputs = _launch(
      [[sys.executable, '-c', _AGREE, f'localhost:{port}', str(i)] for i in range(2)],
      _env(devices=1), tmp_path / 'logs')
  _check(codes, outputs)
  results = [next(line for line in out.splitlines() if line.startswith('RESULT'))
             for out in outputs]
  assert results[0] == results[1], results
  assert results[0] == ("RESULT RuntimeError process(es) 1 of 2 failed, process 1 with "
                        "ValueError: only here | KeyError | {'done': [0, 0, 0]} | "
                        "[True, False, True]")


# Process 0 alone fails to write member 0's round-2 row (its files are process 0's).
_FAIL_ON_PRIMARY = '''
import runpy
import sys
import jax
from fedsparse import loop
plain = loop._log_row
def failing(m, row, t, *args):
  if t == 1 and m.workdir.name == 'learning_rate=0.05' and jax.process_index() == 0:
    raise OSError('No space left on device (injected)')
  return plain(m, row, t, *args)
loop._log_row = failing
sys.argv = ['sweep'] + sys.argv[1:]
runpy.run_module('experiments.sweep', run_name='__main__')
'''


def test_a_member_that_fails_in_process_0_only_fails_in_every_process(tmp_path):
  """A member whose file write fails on process 0 fails everywhere; the other one finishes.

  Without agreement the other process would checkpoint the failed member alone, waiting for
  process 0 in orbax's save (the test would time out).
  """
  root = tmp_path / 'multi'
  commands = _process_commands(root, ['--config.num_rounds=3'],
                               command=_sweep_command(tmp_path))
  commands = [[sys.executable, '-c', _FAIL_ON_PRIMARY] + c[3:] for c in commands]
  codes, outputs = _launch(commands, _env(devices=1), tmp_path / 'logs')
  assert codes[0] == codes[1] != 0, (codes, outputs)
  failed, done = (root / m for m in SWEEP_MEMBERS)
  assert [(r['member'], r['status'], r['rounds']) for r in _summary(root)] == [
      (SWEEP_MEMBERS[0], 'failed', '1'), (SWEEP_MEMBERS[1], 'done', '3')]
  assert 'No space left on device (injected)' in (failed / 'status.json').read_text()
  assert len(_rows(done)) == 3


@pytest.mark.parametrize('flags, message', [
    (['--num_processes=2'], 'missing: --coordinator_address, --process_id'),
    (['--coordinator_address=localhost', '--num_processes=2', '--process_id=0'],
     '--coordinator_address must be host:port'),
    (['--coordinator_address=localhost:1234', '--num_processes=2', '--process_id=2'],
     '--process_id must be in [0, 2)'),
    (['--coordinator_address=localhost:1234', '--num_processes=0', '--process_id=0'],
     '--num_processes must be >= 1'),
    (['--coordinator_address=auto', '--process_id=0'], 'omit --process_id'),
])
def test_bad_process_flags_fail_fast(flags, message, tmp_path, capsys):
  code = run_lib.cli(['run'] + ARGS[3:] + flags + [f'--workdir={tmp_path / "w"}'])
  assert code == run_lib.USAGE_ERROR
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'w').exists()


def test_single_process_helpers():
  assert distributed.is_primary()
  distributed.barrier('nothing to wait for')
  distributed.check_same({'a': 1}, 'anything')
  x = distributed.to_global({'w': np.arange(6, dtype=np.float32).reshape(2, 3)})
  assert x['w'].sharding.is_fully_replicated and len(x['w'].sharding.device_set) == 8
  np.testing.assert_array_equal(distributed.to_host(x)['w'], np.arange(6).reshape(2, 3))
  assert int(distributed.broadcast(np.int32(3))) == 3
  assert distributed.broadcast_json({'a': [1, None]}) == {'a': [1, None]}
  error = ValueError('x')
  assert distributed.agree_on_error(error) is error and distributed.agree_on_error(None) is None
  y = jax.device_put(np.zeros((8, 2), np.float32), distributed.sharded())
  assert [s.data.shape for s in y.addressable_shards] == [(1, 2)] * 8
