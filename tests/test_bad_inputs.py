"""Every bad input is one clear line, exit code 2, and nothing new in the workdir.

Each case runs the command-line entry point in-process (`experiments.run.cli`, the same code
``python -m experiments.run`` runs) and checks the exit code, that stderr is one ``FATAL:`` line
naming the problem and what is valid, and that the workdir holds exactly what it held before.
"""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from experiments import run as run_lib
from fedsparse import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'experiments' / 'configs'
DIGITS = f'--config={CONFIGS / "digits_fedavg.py"}:smoke'
SSFL = f'--config={CONFIGS / "mnist_ssfl.py"}:smoke'
FAST = ['--config.model=mlp']  # digits + MLP: a run takes seconds


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
  """Every file under ``folder`` with its content (lock-file content excluded: it holds a pid)."""
  if not folder.exists():
    return {}
  return {str(p.relative_to(folder)): (b'' if p.name == workdir_lib.LOCK_FILE else p.read_bytes())
          for p in folder.rglob('*') if p.is_file()}


def cli(args: list[str], capsys) -> tuple[int, str, str]:
  capsys.readouterr()  # drop anything printed before
  code = run_lib.cli(['run'] + args)
  out = capsys.readouterr()
  return code, out.out, out.err


def assert_one_line_error(code: int, err: str, expected: list[str]) -> None:
  assert code == run_lib.USAGE_ERROR, err
  lines = [line for line in err.splitlines() if line.startswith('FATAL:')]
  assert len(lines) == 1 and 'Traceback' not in err, err
  for text in expected:
    assert text in lines[0], (text, lines[0])


def npz(tmp_path: pathlib.Path, name: str = 'data.npz', **changes) -> str:
  """A small valid MNIST-shaped npz, with ``changes`` applied to its arrays."""
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.integers(0, 256, (96, 8, 8), dtype=np.uint8),
                y_train=rng.integers(0, 10, 96), x_test=rng.integers(0, 256, (40, 8, 8),
                                                                     dtype=np.uint8),
                y_test=rng.integers(0, 10, 40))
  for key, value in changes.items():
    if value is None:
      del arrays[key]
    elif callable(value):
      arrays[key] = value(arrays[key])
    else:
      arrays[key] = value
  path = tmp_path / name
  np.savez(path, **arrays)
  return f'--config.dataset=npz:{path}'


def _nan_pixels(x):
  x = x.astype(np.float32)
  x[3, 2, 2] = np.nan
  return x


def _big_label(y):
  y = y.copy()
  y[7] = 1_000_000
  return y


# (extra flags, texts the one line must contain). Flags are added to the digits smoke config.
CASES = {
    # Choices.
    'algorithm': (['--config.algorithm=fedprox'], ['fedprox', 'fedavg, fedavgm, ssfl']),
    'model': (['--config.model=vgg'], ['vgg', 'mlp']),
    'dataset': (['--config.dataset=imagenet'], ['imagenet', 'npz:PATH']),
    'partition': (['--config.partition=zipf'], ['zipf', 'iid']),
    'strategy': (['--config.strategy=pmap'], ['pmap', 'sequential']),
    'conv_impl': (['--config.conv_impl=cudnn'], ['cudnn', 'fwdconv']),
    'lr_schedule': (['--config.lr_schedule=step'], ['step', 'constant, cosine']),
    'server_optimizer': (['--config.server_optimizer=adam'], ['adam', 'auto, sgd, momentum']),
    'partial_batches': (['--config.partial_batches=drop'], ['drop', 'split, pad']),
    # Ranges.
    'num_clients': (['--config.num_clients=0'], ['num_clients', 'positive integer']),
    'clients_per_round': (['--config.clients_per_round=0'], ['clients_per_round', 'positive']),
    'cohort > population': (['--config.clients_per_round=30', '--config.num_clients=20'],
                            ['clients_per_round (30) exceeds num_clients (20)',
                             'sample_with_replacement']),
    'num_rounds': (['--config.num_rounds=0'], ['num_rounds', 'positive integer']),
    'batch_size': (['--config.batch_size=0'], ['batch_size', 'positive integer']),
    'eval_every': (['--config.eval_every=0'], ['eval_every', 'positive integer']),
    'eval_batch_size': (['--config.eval_batch_size=-5'], ['eval_batch_size', 'positive']),
    'chunk_size': (['--config.chunk_size=0'], ['chunk_size', 'positive integer']),
    'size_groups': (['--config.size_groups=0'], ['size_groups', 'positive integer']),
    'local_steps': (['--config.local_steps=-1'], ['local_steps', '>= 0']),
    'no local work': (['--config.local_steps=0', '--config.local_epochs=0'],
                      ['local_epochs must be positive when local_steps is 0']),
    'learning_rate 0': (['--config.learning_rate=0'], ['learning_rate must be positive']),
    'learning_rate inf': (['--config.learning_rate=inf'], ['learning_rate', 'finite', 'inf']),
    'learning_rate nan': (['--config.learning_rate=nan'], ['learning_rate', 'finite', 'nan']),
    'weight_decay inf': (['--config.weight_decay=inf'], ['weight_decay', 'finite']),
    'weight_decay negative': (['--config.weight_decay=-1.0'], ['weight_decay must be >= 0']),
    'server_learning_rate inf': (['--config.server_learning_rate=inf'],
                                 ['server_learning_rate', 'finite']),
    'momentum 1': (['--config.momentum=1.0'], ['momentum must be in [0, 1)']),
    'server_momentum': (['--config.server_momentum=-0.5'], ['server_momentum', '[0, 1)']),
    'lr_decay': (['--config.lr_decay=0.0'], ['lr_decay must be in (0, 1]']),
    'clip_norm': (['--config.clip_norm=-1.0'], ['clip_norm must be >= 0']),
    'dirichlet_alpha': (['--config.dirichlet_alpha=0.0'], ['dirichlet_alpha must be > 0']),
    'seed negative': (['--config.seed=-1'], ['seed', '[0, 2**32)', '-1']),
    'checkpoint_every': (['--config.checkpoint_every=-2'], ['checkpoint_every', '>= 0']),
    'cosine_min_lr': (['--config.lr_schedule=cosine', '--config.cosine_min_lr=1.0'],
                      ['cosine_min_lr must be in [0, learning_rate)']),
    'cosine with fixed steps': (['--config.lr_schedule=cosine'], ['needs cosine_epochs']),
    # Keys.
    'flat key of another algorithm': (['--config.density=0.1'],
                                      ["Unknown config key 'density'", 'learning_rate']),
    'section of another algorithm': (['--config.ssfl.density=0.1'],
                                     ["'ssfl'", "algorithm 'fedavg'"]),
    'misspelt key': (['--config.learning_rat=0.1'], ["'learning_rat'", 'learning_rate']),
    'value of the wrong type': (['--config.num_rounds=many'], ['num_rounds', 'many']),
    # Files.
    'missing config file': (['--config=experiments/configs/nope.py'],
                            ['nope.py', 'not found']),
    'misspelt config argument': ([f'--config={CONFIGS / "digits_fedavg.py"}:smok'],
                                 ["'smok'", 'smoke']),
    'missing npz': (['--config.dataset=npz:/nonexistent/data.npz'],
                    ['/nonexistent/data.npz', 'not found', 'x_train']),
}

SSFL_CASES = {
    'ssfl density 0': (['--config.ssfl.density=0.0'], ['density must be in (0, 1]']),
    'ssfl density 2': (['--config.ssfl.density=2.0'], ['density must be in (0, 1]']),
    'ssfl density abc': (['--config.ssfl.density=abc'], ['ssfl.density', 'abc']),
    'ssfl mask': (['--config.ssfl.mask=snip'], ['snip', 'saliency, random_global']),
    'ssfl misspelt key': (['--config.ssfl.densty=0.1'], ["'ssfl.densty'", 'density, ']),
    'ssfl warmup': (['--config.ssfl.warmup_rounds=5'], ['warmup_rounds must be in']),
    'ssfl density keeps nothing': (['--config.ssfl.density=1e-9'], ['keeps no weight']),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_flag_is_one_line_and_writes_nothing(name, tmp_path, capsys):
  extra, expected = CASES[name]
  config = [a for a in extra if a.startswith('--config=')] or [DIGITS]
  rest = [a for a in extra if not a.startswith('--config=')]
  workdir = tmp_path / 'run'
  code, _, err = cli(config + FAST + rest + [f'--workdir={workdir}'], capsys)
  assert_one_line_error(code, err, expected)
  assert not workdir.exists()


@pytest.mark.parametrize('name', sorted(SSFL_CASES))
def test_bad_ssfl_flag_is_one_line_and_writes_nothing(name, tmp_path, capsys):
  extra, expected = SSFL_CASES[name]
  workdir = tmp_path / 'run'
  code, _, err = cli([SSFL, '--config.dataset=digits'] + FAST + extra + [f'--workdir={workdir}'],
                     capsys)
  assert_one_line_error(code, err, expected)
  assert not workdir.exists()


def _text_file(folder: pathlib.Path) -> str:
  (folder / 'data.npz').write_text('hello')
  return f'npz:{folder / "data.npz"}'


def _single_array(folder: pathlib.Path) -> str:
  np.save(folder / 'one.npy', np.zeros(3))
  (folder / 'one.npy').rename(folder / 'data.npz')
  return f'npz:{folder / "data.npz"}'


NPZ_CASES = {
    'not a zip': (_text_file, ['data.npz', 'not a .npz (zip) archive', 'numpy.savez']),
    'one array': (_single_array, ['data.npz', 'not a .npz (zip) archive']),
    'object arrays': (lambda p: npz(p, y_test=lambda y: y.astype(object)).split('=', 1)[1],
                      ['data.npz', 'object (pickled) arrays']),
    'missing array': (lambda p: npz(p, y_test=None).split('=', 1)[1], ['lacks', 'y_test']),
    'label 1e6': (lambda p: npz(p, y_train=_big_label).split('=', 1)[1],
                  ['label 1000000', 'y_train[7]', '10,000', 'num_classes']),
    'label above declared classes': (
        lambda p: npz(p, num_classes=np.int64(5)).split('=', 1)[1],
        ['out of range', 'labels must be in [0, 5)', 'declares']),
    'float labels': (lambda p: npz(p, y_train=lambda y: y + 0.5).split('=', 1)[1],
                     ['y_train', 'integer labels', 'float64']),
    'negative label': (lambda p: npz(p, y_test=lambda y: y - 3).split('=', 1)[1],
                       ['y_test', 'non-negative']),
    'nan pixels': (lambda p: npz(p, x_train=_nan_pixels).split('=', 1)[1],
                   ['x_train', 'non-finite', 'example 3']),
    'label count mismatch': (lambda p: npz(p, y_train=lambda y: y[:50]).split('=', 1)[1],
                             ['y_train must have shape [96]']),
    'no train examples': (lambda p: npz(p, x_train=lambda x: x[:0],
                                        y_train=lambda y: y[:0]).split('=', 1)[1],
                          ['data.npz', 'no train examples']),
    'image shapes differ': (lambda p: npz(p, x_test=lambda x: x[:, :7]).split('=', 1)[1],
                            ['image shapes differ']),
}


@pytest.mark.parametrize('name', sorted(NPZ_CASES))
def test_bad_npz_is_one_line_naming_the_file(name, tmp_path, capsys):
  make, expected = NPZ_CASES[name]
  dataset = make(tmp_path)
  workdir = tmp_path / 'run'
  code, _, err = cli([DIGITS] + FAST + [f'--config.dataset={dataset}', f'--workdir={workdir}'],
                     capsys)
  assert_one_line_error(code, err, expected)
  assert not workdir.exists()


def test_model_too_deep_for_the_input_names_model_and_input(tmp_path, capsys):
  workdir = tmp_path / 'run'
  code, _, err = cli([DIGITS, '--config.model=mnistnet', f'--workdir={workdir}'], capsys)
  assert_one_line_error(code, err, ["'mnistnet'", '(8, 8, 1)', 'valid models'])
  assert not workdir.exists()


def test_unwritable_workdir(tmp_path, capsys):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  code, _, err = cli([DIGITS] + FAST + [f'--workdir={blocker / "run"}'], capsys)
  assert_one_line_error(code, err, [str(blocker / 'run'), 'writable'])
  assert blocker.read_text() == 'not a directory'


def test_bad_data_leaves_an_existing_workdir_as_it_was(tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  code, _, err = cli([DIGITS] + FAST + [npz(tmp_path, y_train=_big_label),
                                         f'--workdir={workdir}'], capsys)
  assert_one_line_error(code, err, ['label 1000000'])
  assert sorted(p.name for p in workdir.iterdir()) == ['notes.txt']


def test_workdir_that_is_a_file(tmp_path, capsys):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  code, _, err = cli([DIGITS] + FAST + [f'--workdir={blocker}'], capsys)
  assert_one_line_error(code, err, [str(blocker), 'is a file, not a directory'])
  assert blocker.read_text() == 'not a directory'


def test_missing_workdir_flag(capsys):
  code, _, err = cli([DIGITS], capsys)
  assert_one_line_error(code, err, ['--workdir is required'])


def test_traceback_on_request(tmp_path, capsys):
  code, _, err = cli([DIGITS, '--config.model=vgg', '--traceback',
                      f'--workdir={tmp_path / "run"}'], capsys)
  assert code == run_lib.USAGE_ERROR and 'Traceback' in err and 'FATAL:' in err


# --------------------------------------------------------------------------------------------
# A workdir belongs to one config.

@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished 4-round run with a checkpoint every 2 rounds (and the args that made it)."""
  workdir = tmp_path_factory.mktemp('finished')
  args = [DIGITS] + FAST + ['--config.num_rounds=4', '--config.checkpoint_every=2',
                            f'--workdir={workdir}']
  assert run_lib.cli(['run'] + args) == 0
  return workdir, args


@pytest.mark.parametrize('change, expected', [
    (['--config.learning_rate=0.5'], ['learning_rate: 0.05 -> 0.5', '--overwrite']),
    (['--config.model=conv4'], ["model: 'mlp' -> 'conv4'"]),
    (['--config.seed=1'], ['seed: 0 -> 1']),
    (['--config.num_rounds=3'], ['num_rounds=3 is below the 4 rounds', 'only grow']),
    (['--config.num_rounds=2', '--config.checkpoint_every=0'], ['num_rounds=2 is below']),
])
def test_changed_config_fails_before_anything_changes(finished, change, expected, capsys):
  workdir, args = finished
  before = snapshot(workdir)
  code, _, err = cli(args + change, capsys)
  assert_one_line_error(code, err, expected)
  assert snapshot(workdir) == before


def test_a_second_run_on_a_busy_workdir_fails_at_once(finished, capsys):
  workdir, args = finished
  before = snapshot(workdir)
  with workdir_lib.lock(workdir):
    code, _, err = cli(args + ['--config.num_rounds=6'], capsys)
  assert_one_line_error(code, err, ['in use by another run', f'pid {os.getpid()}'])
  assert snapshot(workdir) == before


def test_operational_keys_may_change_and_rounds_may_grow(finished, tmp_path, capsys):
  original, args = finished
  workdir = tmp_path / 'copy'  # the shared workdir stays as it is for the other tests
  shutil.copytree(original, workdir)
  args = [a for a in args if not a.startswith('--workdir=')] + [f'--workdir={workdir}']
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  code, out, _ = cli(args + ['--config.eval_every=3'], capsys)  # finished: nothing to do
  assert code == 0 and 'round 4' in out
  assert [json.loads(line) for line in
          (workdir / 'metrics.jsonl').read_text().splitlines()] == rows
  code, out, _ = cli(args + ['--config.num_rounds=6', '--config.checkpoint_every=3'], capsys)
  assert code == 0 and 'round 6' in out
  grown = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert grown[:4] == rows and [r['round'] for r in grown] == list(range(1, 7))
