"""A workdir never lies: metrics, checkpoints and config agree; kill -9 and resume is exact."""

import json
import os
import pathlib
import re
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import run as run_lib
from fedsparse import train
from fedsparse import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'experiments' / 'configs'
DIGITS = [f'--config={CONFIGS / "digits_fedavg.py"}:smoke', '--config.model=mlp']


def rows_of(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def strip(rows: list[dict]) -> list[dict]:
  """Rows without wall-clock fields, which differ between any two runs."""
  return [{k: v for k, v in r.items() if not k.endswith('seconds')} for r in rows]


def cli(*args: str) -> int:
  return run_lib.cli(['run', *args])


def assert_true_totals(rows: list[dict]) -> None:
  assert [r['round'] for r in rows] == list(range(1, len(rows) + 1))
  assert [r['cum_bits_up'] for r in rows] == np.cumsum([r['bits_up'] for r in rows]).tolist()
  assert [r['cum_bits_down'] for r in rows] == np.cumsum(
      [r['bits_down'] for r in rows]).tolist()


def events_of(workdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """What TensorBoard shows for ``workdir``: ``{tag: {round: value}}``, purges applied; fails
  when it would show a round twice."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  events = {}
  for tag in acc.Tags()['scalars']:
    steps = [e.step for e in acc.Scalars(tag)]
    assert len(steps) == len(set(steps)), f'{tag} shows a round twice: {steps}'
    events[tag] = {e.step: e.value for e in acc.Scalars(tag)}
  return events


def assert_events_match_metrics(workdir: pathlib.Path) -> None:
  """Every number of metrics.jsonl, and nothing else, is a TensorBoard scalar at its round
  (stored as float32; a ``null`` of the ``nonfinite`` list is a NaN or infinite scalar)."""
  want: dict[str, dict[int, float]] = {}
  for row in rows_of(workdir):
    for key, value in row.items():
      if key != 'round' and isinstance(value, (int, float)):
        want.setdefault(key, {})[row['round']] = float(np.float32(value))
      elif key in row.get('nonfinite', ()):
        want.setdefault(key, {})[row['round']] = None
  got = events_of(workdir)
  assert sorted(got) == sorted(want)
  for key, values in want.items():
    assert sorted(got[key]) == sorted(values), key
    for step, value in values.items():
      if value is None:
        assert not np.isfinite(got[key][step]), (key, step)
      else:
        assert got[key][step] == value, (key, step, got[key][step], value)


def test_stale_checkpoints_never_corrupt_metrics(tmp_path):
  # The sequence of the issue: a finished 6-round run with checkpoints; a run without
  # checkpoints cannot shrink it; a longer run resumes with the true totals.
  workdir = tmp_path / 'run'
  assert cli(*DIGITS, '--config.num_rounds=6', '--config.checkpoint_every=3',
             f'--workdir={workdir}') == 0
  assert cli(*DIGITS, '--config.num_rounds=3', '--config.checkpoint_every=0',
             f'--workdir={workdir}') == run_lib.USAGE_ERROR
  assert cli(*DIGITS, '--config.num_rounds=8', '--config.checkpoint_every=5',
             f'--workdir={workdir}') == 0
  rows = rows_of(workdir)
  assert len(rows) == 8
  assert_true_totals(rows)
  fresh = tmp_path / 'fresh'
  assert cli(*DIGITS, '--config.num_rounds=8', f'--workdir={fresh}') == 0
  assert strip(rows_of(fresh)) == strip(rows)


def test_without_a_checkpoint_a_run_starts_over_and_clears_stale_saves(tmp_path):
  workdir = tmp_path / 'run'
  assert cli(*DIGITS, '--config.num_rounds=2', f'--workdir={workdir}') == 0
  first = strip(rows_of(workdir))
  (workdir / 'checkpoints').mkdir()
  (workdir / 'checkpoints' / 'tmp-partial-save').mkdir()  # e.g. a save killed mid-way
  assert cli(*DIGITS, '--config.num_rounds=3', f'--workdir={workdir}') == 0
  rows = rows_of(workdir)
  assert strip(rows[:2]) == first and len(rows) == 3
  assert_true_totals(rows)
  assert not (workdir / 'checkpoints').exists()


def test_checkpoint_without_its_metrics_is_refused(tmp_path):
  workdir = tmp_path / 'run'
  assert cli(*DIGITS, '--config.num_rounds=4', '--config.checkpoint_every=2',
             f'--workdir={workdir}') == 0
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  (workdir / 'metrics.jsonl').write_text('\n'.join(lines[:1]) + '\n')  # edited by hand
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file() and p.name != '.lock'}
  with pytest.raises(train.UsageError, match='checkpoint after round 4 .* only 1 rounds'):
    train.run(_config(num_rounds=6, checkpoint_every=2), workdir)
  assert {p: p.read_bytes() for p in workdir.rglob('*')
          if p.is_file() and p.name != '.lock'} == before


def _config(**changes):
  from experiments.configs import digits_fedavg  # pylint: disable=g-import-not-at-top
  config = digits_fedavg.get_config('smoke')
  config.model = 'mlp'
  config.update(changes)
  return config


def test_overwrite_starts_over(tmp_path):
  workdir = tmp_path / 'run'
  assert cli(*DIGITS, '--config.num_rounds=2', '--config.checkpoint_every=1',
             f'--workdir={workdir}') == 0
  assert cli(*DIGITS, '--config.num_rounds=2', '--config.learning_rate=0.2',
             f'--workdir={workdir}') == run_lib.USAGE_ERROR
  assert cli(*DIGITS, '--config.num_rounds=2', '--config.learning_rate=0.2', '--overwrite',
             f'--workdir={workdir}') == 0
  assert json.loads((workdir / 'config.json').read_text())['learning_rate'] == 0.2
  other = tmp_path / 'other'
  assert cli(*DIGITS, '--config.num_rounds=2', '--config.learning_rate=0.2',
             f'--workdir={other}') == 0
  assert strip(rows_of(workdir)) == strip(rows_of(other))


def test_batch_size_is_capped_at_the_largest_client(tmp_path, caplog):
  capped = tmp_path / 'capped'
  with caplog.at_level('INFO'):
    train.run(_config(batch_size=100_000, local_steps=0, local_epochs=1), capped)
  assert 'batch_size 100000 exceeds the largest client' in caplog.text
  exp = train.build_experiment(_config(batch_size=100_000))
  largest = exp.partition_info.max_size
  assert exp.batch_size == largest < 100_000
  exact = tmp_path / 'exact'
  train.run(_config(batch_size=largest, local_steps=0, local_epochs=1), exact)
  for a, b in zip(rows_of(capped), rows_of(exact)):
    assert a['bits_up'] == b['bits_up']
    np.testing.assert_allclose(a['train_loss'], b['train_loss'], rtol=1e-5)


def test_config_json_stores_an_absolute_npz_path(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / 'd.npz', x_train=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
           y_train=rng.integers(0, 10, 64), x_test=rng.integers(0, 256, (20, 8, 8),
                                                               dtype=np.uint8),
           y_test=rng.integers(0, 10, 20))
  monkeypatch.chdir(tmp_path)
  train.run(_config(dataset='npz:d.npz', num_rounds=1), tmp_path / 'run')
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['dataset'] == f'npz:{tmp_path / "d.npz"}'


def test_metric_rows_are_strict_json():
  line = workdir_lib.json_row({'round': 3, 'train_loss': float('nan'), 'x': float('-inf'),
                               'ok': 1.5})
  assert json.loads(line) == {'round': 3, 'train_loss': None, 'x': None, 'ok': 1.5,
                              'nonfinite': ['train_loss', 'x']}


def test_logs_are_quiet(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.run', *DIGITS, '--config.num_rounds=3',
       '--config.checkpoint_every=1', f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, capture_output=True, text=True, check=True)
  assert 'orbax' not in out.stderr.lower() and 'Unable to initialize backend' not in out.stderr
  assert out.stderr.count('ETA') == 3  # progress lines are kept
  # INFO lines come from the run loop only (progress, data and model, compile time): none per
  # checkpoint save. Absl's INFO prefix names the source file: "I1122 00:00:00.0 123 loop.py:9]".
  sources = {m.group(1) for m in re.finditer(r'^I\d{4} [\d:.]+ +\d+ (\S+?):\d+\]', out.stderr,
                                             re.M)}
  assert sources == {'loop.py'}, out.stderr


def test_a_run_cut_to_its_checkpoint_evaluates_the_final_round(tmp_path, capsys):
  workdir = tmp_path / 'run'
  args = [*DIGITS, '--config.num_rounds=3', '--config.checkpoint_every=3',
          '--config.eval_every=5', f'--workdir={workdir}']
  assert cli(*args) == 0
  evaluated = rows_of(workdir)
  # As if round 3 were the checkpoint of a longer run that did not evaluate it (eval_every=5)
  # and was cut there: the last row lacks the evaluation.
  rows = [dict(r) for r in evaluated]
  rows[-1] = {k: v for k, v in rows[-1].items() if 'accuracy' not in k and 'test' not in k}
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  capsys.readouterr()
  assert cli(*args) == 0
  assert 'Final (round 3)' in capsys.readouterr().out
  assert strip(rows_of(workdir)) == strip(evaluated)
  assert_events_match_metrics(workdir)  # the late evaluation is an event too, shown once


def test_a_failed_start_does_not_tie_the_workdir_to_its_config(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"learning_rate": 123}')  # no metrics, no checkpoint
  assert cli(*DIGITS, '--config.num_rounds=1', f'--workdir={workdir}') == 0
  assert json.loads((workdir / 'config.json').read_text())['learning_rate'] == 0.05


@pytest.mark.slow
@pytest.mark.parametrize('config', ['digits_fedavg', 'mnist_ssfl'])
def test_kill_9_at_a_random_moment_then_rerun_reproduces_the_run(config, tmp_path):
  # 200 local steps per client make each round take a visible time, so the kills land inside
  # the run: before the first round, and at a random moment between later rounds or saves.
  args = [sys.executable, '-m', 'experiments.run', f'--config={CONFIGS / config}.py:smoke',
          '--config.dataset=digits', '--config.model=mlp', '--config.num_rounds=10',
          '--config.local_steps=200', '--config.checkpoint_every=2']
  subprocess.run(args + [f'--workdir={tmp_path / "full"}'], cwd=ROOT, check=True,
                 capture_output=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  workdir = tmp_path / 'killed'
  rng = random.Random(config)  # a reproducible "random" moment per case
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # exact float equality across processes
  for wanted_rows in (0, rng.randint(2, 5)):
    proc = subprocess.Popen(args + [f'--workdir={workdir}'], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
      path = workdir / 'metrics.jsonl'
      # wanted_rows = 0: once the run has written its config.json (locked, data loaded).
      started = (workdir / 'config.json').exists()
      rows = path.read_text().count('\n') if path.exists() else 0
      if started and rows >= wanted_rows:
        break
      time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    assert len(rows_of(workdir)) < 10
  subprocess.run(args + [f'--workdir={workdir}'], cwd=ROOT, env=env, check=True,
                 capture_output=True)
  assert strip(rows_of(workdir)) == strip(rows_of(tmp_path / 'full'))
  # TensorBoard shows each round once, with the resumed run's numbers: the killed runs' events
  # past their checkpoints are purged, those before them kept.
  assert_events_match_metrics(workdir)
  assert_events_match_metrics(tmp_path / 'full')
