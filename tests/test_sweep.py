"""Sweeps: members equal separate runs, one compile per group, failures recorded, resume."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import sweep as sweep_cli
from experiments.configs import base as base_configs
from fedsparse import algorithms
from fedsparse import loop
from fedsparse import sweep
from fedsparse import train

from tests import test_train
from tests import test_workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'experiments' / 'configs'


def digits(rounds: int = 3, algorithm: str = 'fedavg'):
  """digits_fedavg:smoke with the MLP and a few rounds: seconds per member."""
  config = test_train.load_config('digits_fedavg')
  if algorithm != 'fedavg':
    base_configs.set_algorithm(config, algorithm, **test_train.LEARNING_HPARAMS.get(algorithm, {}))
  config.model, config.num_rounds, config.eval_every = 'mlp', rounds, 2
  config.weighted_aggregation = algorithm != 'fedpm'  # FedPM's posterior has no client weights
  return config


def rows_of(workdir: pathlib.Path) -> list[dict]:
  return test_train.read_rows(workdir)


def assert_rows_close(got: list[dict], want: list[dict], rtol: float) -> None:
  """Same rounds, same keys; integers (bits, rounds) equal, floats within ``rtol``."""
  assert [r['round'] for r in got] == [r['round'] for r in want]
  for g, w in zip(got, want):
    keys = {k for k in w if not k.endswith('seconds')}
    assert keys == {k for k in g if not k.endswith('seconds')}, (g, w)
    for k in keys:
      if isinstance(w[k], int) and not isinstance(w[k], bool):
        assert g[k] == w[k], (k, g, w)
      elif isinstance(w[k], float):
        assert g[k] == pytest.approx(w[k], rel=rtol, abs=rtol), (k, g['round'])
      else:
        assert g[k] == w[k], k


def assert_members_equal_separate_runs(base, members, sweep_dir: pathlib.Path,
                                       runs_dir: pathlib.Path, rtol: float,
                                       metric: str = 'train_loss') -> set:
  """Runs each member alone with `train.run`; its rows must equal the sweep's within ``rtol``.

  Returns:
    The members' final ``metric`` values (to check that the members really differ).
  """
  finals = set()
  for m in members:
    name = sweep.member_name(m)
    train.run(sweep.member_config(base, m), runs_dir / name)
    want = rows_of(runs_dir / name)
    assert_rows_close(rows_of(sweep_dir / name), want, rtol)
    finals.add(want[-1][metric])
  return finals


def count_compiles(monkeypatch) -> list[int]:
  """Counts `_GroupProgram.compile` calls (each is one XLA compile of a group's round)."""
  calls = []
  original = sweep._GroupProgram.compile  # pylint: disable=protected-access

  def counted(self, state):
    calls.append(self.num_members)
    return original(self, state)
  monkeypatch.setattr(sweep._GroupProgram, 'compile', counted)  # pylint: disable=protected-access
  return calls


# --------------------------------------------------------------------------------------------------
# Members equal separate runs.


# Each traceable hyperparameter (registry Spec.traceable), two values, with settings that reach
# every count the algorithm's layout carries: swept beside the seed and the learning rate.
TRACED_DENSITIES = {
    'ssfl': ('ssfl.density', [0.3, 0.1], {'ties': 'keep', 'warmup_rounds': 1}),
    'feddst': ('feddst.sparsity', [0.7, 0.9], {'readjust_every': 1, 'readjust_end': 2}),
    'random_mask': ('random_mask.sparsity', [0.5, 0.8], {}),
    'flash': ('flash.density', [0.3, 0.15], {'mode': 'jmwst', 'hunt_epochs': 1}),
}


def test_every_traceable_hyperparameter_is_swept():
  assert {k: v[0] for k, v in TRACED_DENSITIES.items()} == {
      n: f'{n}.{algorithms.registry.get(n).traceable[0]}' for n in algorithms.registry.names()
      if algorithms.registry.get(n).traceable}


@pytest.mark.parametrize('algorithm', algorithms.registry.names())
def test_every_algorithms_members_equal_separate_runs(algorithm, tmp_path, monkeypatch):
  """Members differing in seed, learning rate and (where traceable) density: one compile, and
  each equals its separate run; a one-member sweep equals the run bit for bit."""
  compiles = count_compiles(monkeypatch)
  base = digits(algorithm=algorithm)
  axes = [sweep.sweep('seed', [0, 1]), sweep.sweep('learning_rate', [0.05, 0.1])]
  if algorithm in TRACED_DENSITIES:
    key, values, extra = TRACED_DENSITIES[algorithm]
    for name, value in extra.items():
      base[algorithm][name] = value
    axes.append(sweep.sweep(key, values))
  members = sweep.zipit(*axes)
  rows = sweep.run_sweep(base, members, tmp_path / 'sweep', strategy='sequential')
  assert [r['status'] for r in rows] == ['done', 'done'], rows
  assert compiles == [2]  # both members in one group, one compile
  densities = set()
  for m in members:
    name = sweep.member_name(m)
    train.run(sweep.member_config(base, m), tmp_path / name)
    assert_rows_close(rows_of(tmp_path / 'sweep' / name), rows_of(tmp_path / name), 1e-5)
    densities.add(rows_of(tmp_path / name)[-1].get('density'))
    if m is members[0]:
      # A sweep of one member is the same experiment as the run (the same builder): bit for bit.
      sweep.run_sweep(base, [m], tmp_path / 'one', strategy='sequential')
      assert_rows_close(rows_of(tmp_path / 'one' / name), rows_of(tmp_path / name), 0.0)
    # The config a member records is its own: resuming it alone with train.run is allowed.
    assert (json.loads((tmp_path / 'sweep' / name / 'config.json').read_text())
            == json.loads((tmp_path / name / 'config.json').read_text()))
  if algorithm in TRACED_DENSITIES:
    assert len(densities) == 2  # the members really kept different counts


@pytest.mark.parametrize('strategy', ['sequential', 'vmap'])
def test_every_traceable_key_is_traced_per_member(strategy, tmp_path, monkeypatch):
  """Members differing in all traced keys at once share one compile and keep their values."""
  compiles = count_compiles(monkeypatch)
  base = digits(algorithm='fedavgm')
  base.num_clients, base.clients_per_round = 6, 6  # every client every round: lr reaches all
  members = sweep.zipit(
      sweep.sweep('seed', [3, 3, 4]),
      sweep.sweep('learning_rate', [0.05, 0.1, 0.02]),
      sweep.sweep('lr_decay', [1.0, 0.7, 0.9]),
      sweep.sweep('momentum', [0.0, 0.5, 0.9]),
      sweep.sweep('weight_decay', [0.0, 1e-2, 1e-3]),
      sweep.sweep('server_learning_rate', [1.0, 0.5, 2.0]),
      sweep.sweep('server_momentum', [0.0, 0.9, 0.5]))
  rows = sweep.run_sweep(base, members, tmp_path / 'sweep', strategy=strategy)
  assert [r['status'] for r in rows] == ['done'] * 3 and compiles == [3]
  losses = assert_members_equal_separate_runs(base, members, tmp_path / 'sweep', tmp_path, 1e-4)
  assert len(losses) == 3  # the members really differ (the same seed twice, too)


# Variants of the traced densities above whose layouts carry other counts (per-layer ones).
DENSITY_SWEEPS = {
    'ssfl_layerwise': ('ssfl.density', [0.3, 0.1],
                       {'mask': 'random_layerwise', 'layerwise_allocation': 'erk'}),
    'flash_pdst': ('flash.density', [0.3, 0.15], {'mode': 'pdst'}),
}


@pytest.mark.parametrize('case', sorted(DENSITY_SWEEPS))
def test_a_density_sweep_is_one_group_of_exact_members(case, tmp_path, monkeypatch):
  """Members of different densities share one compile and equal their separate runs."""
  compiles = count_compiles(monkeypatch)
  key, values, extra = DENSITY_SWEEPS[case]
  algorithm = key.split('.')[0]
  base = digits(rounds=3 if algorithm == 'feddst' else 2, algorithm=algorithm)
  for name, value in extra.items():
    base[algorithm][name] = value
  members = sweep.zipit(sweep.sweep('seed', [0, 1]), sweep.sweep(key, values))
  rows = sweep.run_sweep(base, members, tmp_path / 'sweep', strategy='sequential')
  assert [r['status'] for r in rows] == ['done', 'done'], rows
  assert compiles == [2]
  densities = assert_members_equal_separate_runs(base, members, tmp_path / 'sweep', tmp_path,
                                                 1e-5, 'density')
  assert len(densities) == 2  # the members really kept different counts


@pytest.mark.slow
def test_the_ssfl_density_sweep_compiles_once_for_its_12_members(tmp_path, monkeypatch,
                                                                  caplog):
  """experiments/sweeps/ssfl_density.py on mnist_ssfl:smoke: one group, one compile, and each
  member's rows (two checked: other densities and seeds) equal its separate run's."""
  compiles = count_compiles(monkeypatch)
  base = test_train.load_config('mnist_ssfl')
  base.dataset = test_train.smoke_dataset(base, tmp_path)
  members = sweep_cli.load_sweep(str(ROOT / 'experiments' / 'sweeps' / 'ssfl_density.py'))
  assert len(members) == 12
  caplog.set_level('INFO')
  rows = sweep.run_sweep(base, members, tmp_path / 'sweep', strategy='sequential')
  assert [r['status'] for r in rows] == ['done'] * 12
  assert compiles == [12]
  assert 'Sweep: 12 members, 12 to run in 1 group(s)' in caplog.text
  assert 'Round compiled' in caplog.text and 'for 12 runs' in caplog.text
  # Two of them alone: density 0.05 seed 2, density 0.5 seed 1.
  assert_members_equal_separate_runs(base, [members[2], members[10]], tmp_path / 'sweep',
                                     tmp_path, 1e-5)
  assert len({r['final_train_loss'] for r in rows}) == 12


def test_members_whose_density_keeps_no_weight_fail_alone(tmp_path, monkeypatch):
  compiles = count_compiles(monkeypatch)
  base = digits(rounds=2, algorithm='ssfl')
  members = sweep.sweep('ssfl.density', [0.3, 1e-7, 0.1])
  rows = sweep.run_sweep(base, members, tmp_path, strategy='sequential')
  assert [r['status'] for r in rows] == ['done', 'failed', 'done']
  assert 'keeps no weight' in rows[1]['error']
  assert compiles == [2]  # the others still share one compile


def test_static_differences_make_groups(tmp_path, monkeypatch):
  compiles = count_compiles(monkeypatch)
  members = sweep.product(sweep.sweep('batch_size', [8, 16]), sweep.sweep('seed', [0, 1, 2]))
  rows = sweep.run_sweep(digits(rounds=2), members, tmp_path, strategy='sequential')
  assert [r['status'] for r in rows] == ['done'] * 6
  assert sorted(compiles) == [3, 3]  # one compile per batch size, its three seeds inside
  # Seeds differ in data split, init and cohorts: their numbers differ.
  assert len({r['final_train_loss'] for r in rows}) == 6


# --------------------------------------------------------------------------------------------------
# Failures, resume, summary.


def test_a_failing_member_is_recorded_and_the_others_finish(tmp_path):
  base = digits(rounds=3)
  members = [{'learning_rate': 0.05}, {'learning_rate': 1e8}, {'learning_rate': -1.0},
             {'seed': 1.5}, {'learning_rate': 0.1}]
  rows = sweep.run_sweep(base, members, tmp_path, strategy='sequential')
  status = {r['member']: (r['status'], r['error']) for r in rows}
  assert status['learning_rate=0.05'] == ('done', '')
  assert status['learning_rate=0.1'] == ('done', '')
  assert status['learning_rate=1e+08'][0] == 'failed'  # diverged: NaN loss
  assert 'FloatingPointError' in status['learning_rate=1e+08'][1]
  assert status['learning_rate=-1'][0] == 'failed'  # invalid: never ran
  assert 'learning_rate must be positive' in status['learning_rate=-1'][1]
  assert status['seed=1.5'][0] == 'failed' and 'seed' in status['seed=1.5'][1]
  assert not (tmp_path / 'learning_rate=-1' / 'metrics.jsonl').exists()
  diverged = rows_of(tmp_path / 'learning_rate=1e+08')
  assert diverged[-1]['train_loss'] is None  # its last row, as a single run writes it
  assert len(diverged) < base.num_rounds  # it failed mid-run; its group went on without it
  test_workdir.assert_events_match_metrics(tmp_path / 'learning_rate=1e+08')
  test_workdir.assert_events_match_metrics(tmp_path / 'learning_rate=0.05')
  # The finished members are exactly what they are alone (the NaN member shared their group).
  train.run(sweep.member_config(base, members[0]), tmp_path / 'alone')
  assert_rows_close(rows_of(tmp_path / 'learning_rate=0.05'), rows_of(tmp_path / 'alone'), 1e-5)
  with (tmp_path / sweep.SUMMARY_FILE).open() as f:
    table = {r['member']: r for r in csv.DictReader(f)}
  assert table['learning_rate=1e+08']['status'] == 'failed'
  assert 'FloatingPointError' in table['learning_rate=1e+08']['error']
  assert float(table['learning_rate=0.05']['final_test_accuracy']) == pytest.approx(
      rows_of(tmp_path / 'alone')[-1]['test_accuracy'])
  assert table['learning_rate=1e+08']['final_test_accuracy'] == ''
  for name, (state, _) in status.items():
    assert json.loads((tmp_path / name / sweep.STATUS_FILE).read_text())['status'] == state


def test_rerunning_keeps_finished_and_failed_members_unless_asked(tmp_path, monkeypatch):
  base = digits(rounds=2)
  members = [{'learning_rate': 0.05}, {'learning_rate': 1e8}]
  sweep.run_sweep(base, members, tmp_path, strategy='sequential')
  runs = []
  original = loop.run_members
  monkeypatch.setattr(loop, 'run_members', lambda p, ms, s: (runs.append(len(ms)),
                                                              original(p, ms, s)))
  rows = sweep.run_sweep(base, members, tmp_path, strategy='sequential')
  assert runs == [] and [r['status'] for r in rows] == ['done', 'failed']
  rows = sweep.run_sweep(base, members, tmp_path, strategy='sequential', retry_failed=True)
  assert runs == [1] and [r['status'] for r in rows] == ['done', 'failed']


def test_a_crashing_group_fails_its_members_and_the_others_finish(tmp_path, monkeypatch):
  original = sweep._GroupProgram.compile  # pylint: disable=protected-access

  def compile_or_crash(self, state):
    if self.batch_size == 8:
      raise MemoryError('out of memory compiling the round')
    return original(self, state)
  monkeypatch.setattr(sweep._GroupProgram, 'compile', compile_or_crash)  # pylint: disable=protected-access
  members = sweep.product(sweep.sweep('batch_size', [8, 16]), sweep.sweep('seed', [0, 1]))
  rows = sweep.run_sweep(digits(rounds=2), members, tmp_path, strategy='sequential')
  assert [(r['batch_size'], r['status']) for r in rows] == [
      (8, 'failed'), (8, 'failed'), (16, 'done'), (16, 'done')]
  assert all('MemoryError: out of memory' in r['error'] for r in rows[:2])


def _with(config, **overrides):
  config = config.copy_and_resolve_references()
  config.update(overrides)
  return config


def test_a_config_change_or_fewer_rounds_fails_the_sweep_before_it_runs(tmp_path):
  base = digits(rounds=2)
  members = [{'seed': 0}, {'seed': 1}]
  sweep.run_sweep(base, members, tmp_path, strategy='sequential')
  before = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file() and '.lock' not in p.name}
  changed = base.copy_and_resolve_references()
  changed.learning_rate = 0.1
  with pytest.raises(train.UsageError,
                     match=r'2 member\(s\) cannot continue .*\(seed=0, seed=1\).*different config'):
    sweep.run_sweep(changed, members, tmp_path, strategy='sequential')
  fewer = base.copy_and_resolve_references()
  fewer.num_rounds = 1
  with pytest.raises(train.UsageError, match='num_rounds=1 is below'):
    sweep.run_sweep(fewer, members, tmp_path, strategy='sequential')
  with pytest.raises(train.UsageError, match='Unknown sweep key'):
    sweep.run_sweep(base, [{'learning_rat': 0.1}], tmp_path, strategy='sequential')
  for sharded_base, sharded_members in ((base, [{'seed': 0, 'strategy': 'sharded'}]),
                                        (_with(base, strategy='sharded'), members)):
    with pytest.raises(train.UsageError, match='one device axis cannot split both'):
      sweep.run_sweep(sharded_base, sharded_members, tmp_path, strategy='sharded')
  after = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file() and '.lock' not in p.name}
  assert after == before  # nothing changed: still two finished members
  assert [r['status'] for r in sweep.run_sweep(base, members, tmp_path)] == ['done', 'done']


def test_an_invalid_member_runs_once_the_base_config_is_fixed(tmp_path):
  base = digits(rounds=2)
  base.lr_schedule, base.cosine_min_lr, base.cosine_epochs = 'cosine', 0.04, 1
  members = [{'learning_rate': 0.03}, {'learning_rate': 0.05}]  # 0.03 is below cosine_min_lr
  rows = sweep.run_sweep(base, members, tmp_path, strategy='sequential')
  assert [r['status'] for r in rows] == ['failed', 'done']
  assert 'cosine_min_lr' in rows[0]['error']
  base.cosine_min_lr = 0.01  # a new base: the finished member no longer matches it either
  with pytest.raises(train.UsageError, match='different config'):
    sweep.run_sweep(base, members, tmp_path, strategy='sequential')
  rows = sweep.run_sweep(base, members[:1], tmp_path, strategy='sequential')
  assert [r['status'] for r in rows] == ['done']  # not kept as failed: it was never run


def test_a_grown_sweep_resumes_from_checkpoints(tmp_path):
  """num_rounds raised: members continue from their checkpoints to an uninterrupted sweep."""
  members = sweep.product(sweep.sweep('learning_rate', [0.05, 0.1]), sweep.sweep('seed', [0, 1]))
  full = digits(rounds=4)
  full.checkpoint_every = 1
  sweep.run_sweep(full, members, tmp_path / 'full', strategy='sequential')
  short = full.copy_and_resolve_references()
  short.num_rounds = 2
  sweep.run_sweep(short, members, tmp_path / 'cut', strategy='sequential')
  rows = sweep.run_sweep(full, members, tmp_path / 'cut', strategy='sequential')
  assert [r['rounds'] for r in rows] == [4] * 4
  for m in members:
    name = sweep.member_name(m)
    assert_rows_close(rows_of(tmp_path / 'cut' / name), rows_of(tmp_path / 'full' / name), 0)


@pytest.mark.slow
def test_cli_killed_mid_sweep_resumes_to_the_same_numbers(tmp_path):
  sweep_file = tmp_path / 'lr.py'
  sweep_file.write_text(
      'from fedsparse import sweep\n\n\ndef get_sweep(arg=None):\n'
      '  return sweep.product(sweep.sweep("learning_rate", [0.05, 0.1]), '
      'sweep.sweep("batch_size", [8, 16]))\n')
  args = [sys.executable, '-m', 'experiments.sweep', f'--config={CONFIGS / "digits_fedavg.py"}',
          '--config.model=mlp', '--config.num_rounds=6', '--config.local_steps=100',
          '--config.eval_every=2', '--config.checkpoint_every=2',
          f'--sweep={sweep_file}']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  full = subprocess.run(args + [f'--workdir={tmp_path / "full"}'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-2000:]
  assert '4 of 4 members finished' in full.stdout
  assert (tmp_path / 'full' / sweep.PLOT_FILE).stat().st_size > 0
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(args + [f'--workdir={workdir}'], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  first = workdir / 'learning_rate=0.05,batch_size=8' / 'metrics.jsonl'
  while time.monotonic() < deadline and proc.poll() is None:
    if first.exists() and first.read_text().count('\n') >= 3:  # past a checkpoint
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  again = subprocess.run(args + [f'--workdir={workdir}'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  for member in sorted(p.name for p in (tmp_path / 'full').iterdir() if p.is_dir()):
    assert_rows_close(rows_of(workdir / member), rows_of(tmp_path / 'full' / member), 0)
  with (workdir / sweep.SUMMARY_FILE).open() as f:
    assert [r['status'] for r in csv.DictReader(f)] == ['done'] * 4


# --------------------------------------------------------------------------------------------------
# Writing sweeps and bad input.


def test_sweep_builders():
  lr = sweep.sweep('learning_rate', [0.1, 0.2])
  seeds = sweep.sweep('seed', np.arange(3))
  assert sweep.product(lr, seeds)[:4] == [
      {'learning_rate': 0.1, 'seed': 0}, {'learning_rate': 0.1, 'seed': 1},
      {'learning_rate': 0.1, 'seed': 2}, {'learning_rate': 0.2, 'seed': 0}]
  assert type(seeds[0]['seed']) is int  # NumPy scalars become Python numbers (JSON, configs)
  assert sweep.zipit(lr, sweep.sweep('momentum', [0.0, 0.9])) == [
      {'learning_rate': 0.1, 'momentum': 0.0}, {'learning_rate': 0.2, 'momentum': 0.9}]
  assert sweep.chain(lr, seeds) == lr + seeds
  with pytest.raises(ValueError, match='equal length'):
    sweep.zipit(lr, seeds)
  with pytest.raises(ValueError, match='no values'):
    sweep.sweep('seed', [])
  draws = sweep.random_search(200, seed=1, learning_rate=sweep.loguniform(1e-3, 1e-1),
                              momentum=sweep.uniform(0.0, 0.9),
                              **{'ssfl.density': sweep.choice(0.1, 0.2)})
  assert draws == sweep.random_search(200, seed=1, learning_rate=sweep.loguniform(1e-3, 1e-1),
                                      momentum=sweep.uniform(0.0, 0.9),
                                      **{'ssfl.density': sweep.choice(0.1, 0.2)})
  logs = np.log10([d['learning_rate'] for d in draws])
  assert logs.min() >= -3 and logs.max() < -1 and abs(np.median(logs) + 2) < 0.2
  assert {d['ssfl.density'] for d in draws} == {0.1, 0.2}
  assert sweep.member_name({'learning_rate': 0.1, 'ssfl.density': 0.05}) == (
      'learning_rate=0.1,ssfl.density=0.05')


def test_member_config_reaches_sections_and_rejects_unknown_keys():
  base = test_train.load_config('mnist_ssfl')
  config = sweep.member_config(base, {'ssfl.density': 0.2, 'seed': 4})
  assert config.ssfl.density == 0.2 and config.seed == 4 and base.ssfl.density != 0.2
  with pytest.raises(ValueError, match='valid there: .*density'):
    sweep.member_config(base, {'ssfl.densty': 0.2})
  with pytest.raises(ValueError, match='Unknown sweep key'):
    sweep.member_config(base, {'learning_rat': 0.2})


@pytest.mark.parametrize('args, message', [
    (['--sweep=/nonexistent.py'], 'not found'),
    (['--sweep={empty}'], 'non-empty list'),
    (['--sweep={noget}'], 'get_sweep'),
    ([], '--sweep is required'),
    (['--sweep={ok}', '--member_mapping=fast'], 'member_mapping'),
    (['--sweep={dup}'], 'more than once'),
])
def test_cli_bad_input_fails_before_anything_runs(args, message, tmp_path, capsys):
  files = {'empty': 'def get_sweep(arg=None):\n  return []\n', 'noget': 'x = 1\n',
           'ok': 'def get_sweep(arg=None):\n  return [{"seed": 0}]\n',
           'dup': 'def get_sweep(arg=None):\n  return [{"seed": 0}, {"seed": 0}]\n'}
  for name, text in files.items():
    (tmp_path / f'{name}.py').write_text(text)
  args = [a.format(**{n: tmp_path / f'{n}.py' for n in files}) for a in args]
  code = sweep_cli.cli(['sweep', f'--config={CONFIGS / "digits_fedavg.py"}:smoke',
                        f'--workdir={tmp_path / "out"}', *args])
  assert code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').iterdir())


def test_help_lists_the_flags(capsys):
  from experiments import run as run_cli  # pylint: disable=g-import-not-at-top
  assert sweep_cli.cli(['sweep', '--help']) == 0
  out = capsys.readouterr().out
  assert '--member_mapping' in out and '--retry_failed' in out and '--sweep' in out
  assert run_cli.cli(['run', '-h']) == 0
  out = capsys.readouterr().out
  assert '--workdir' in out and '--coordinator_address' in out
