"""notebooks/quickstart.ipynb: committed without outputs, and runs end to end on CPU.

The notebook is executed by nbclient in a fresh kernel whose working directory is a temporary
folder; ``FEDSPARSE_QUICKSTART_DIR`` tells it where to write its runs and figure, which are then
checked together with the outputs of the executed notebook.
"""

import base64
import json
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'notebooks' / 'quickstart.ipynb'
# The notebook's run labels and the folders it writes them to.
RUNS = {'FedAvg': 'fedavg', 'SSFL d=0.3': 'ssfl_d0.3', 'SSFL d=0.1': 'ssfl_d0.1'}
CONV4_DIGITS_PARAMS = 458_698  # Conv4 on 8x8 inputs with 10 classes
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
CELL_TIMEOUT_S = 900  # the longest cell takes well under a minute on 2 busy CPU cores


def _execute(nb, cwd: pathlib.Path):
  """Runs ``nb`` in place in a fresh ``python3`` kernel started in ``cwd``; errors raise."""
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   resources={'metadata': {'path': str(cwd)}})
  return client.execute()


def _outputs(nb, output_type: str) -> list:
  return [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs
          if o.output_type == output_type]


def test_committed_clean():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb['metadata']['kernelspec']['name'] == 'python3'
  code = [cell for cell in nb['cells'] if cell['cell_type'] == 'code']
  assert code
  for cell in code:
    assert cell['outputs'] == [], 'commit the notebook with its outputs cleared'
    assert cell['execution_count'] is None, 'commit the notebook with its outputs cleared'
  nbformat = pytest.importorskip('nbformat')
  nbformat.validate(nbformat.reads(NOTEBOOK.read_text(), as_version=4))


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """The kernel's environment (it inherits this process's): CPU, and the output folder."""
  out = tmp_path / 'out'
  monkeypatch.setenv('FEDSPARSE_QUICKSTART_DIR', str(out))
  # Two thirds of the notebook's 30 rounds: every run well above chance, and the same cells.
  monkeypatch.setenv('FEDSPARSE_QUICKSTART_ROUNDS', '20')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  return cwd, out


@pytest.mark.slow
def test_quickstart_runs(kernel_env):
  nbformat = pytest.importorskip('nbformat')
  cwd, out = kernel_env
  nb = nbformat.read(NOTEBOOK, as_version=4)
  _execute(nb, cwd)
  assert not _outputs(nb, 'error')
  stdout = ''.join(o.text for o in _outputs(nb, 'stream') if o.name == 'stdout')

  configs, lasts = {}, {}
  for label, folder in RUNS.items():
    config = json.loads((out / folder / 'config.json').read_text())
    rows = [json.loads(line) for line in (out / folder / 'metrics.jsonl').read_text().splitlines()]
    assert [r['round'] for r in rows] == list(range(1, config['num_rounds'] + 1)), label
    last = rows[-1]
    # Well above chance (10 classes) for every run, FedAvg included.
    assert last['test_accuracy'] > 0.5, (label, last['test_accuracy'])
    assert f'{label}: {last["test_accuracy"]:.1%} test accuracy' in stdout, label
    configs[label], lasts[label] = config, last

  # Comparable runs: the same data, partition, seed and schedule; only the algorithm differs.
  shared = ('dataset', 'model', 'partition', 'dirichlet_alpha', 'num_clients',
            'clients_per_round', 'num_rounds', 'local_epochs', 'batch_size', 'seed')
  for label, config in configs.items():
    assert {k: config[k] for k in shared} == {k: configs['FedAvg'][k] for k in shared}, label
  assert configs['FedAvg']['algorithm'] == 'fedavg'
  for label, density in (('SSFL d=0.3', 0.3), ('SSFL d=0.1', 0.1)):
    assert configs[label]['algorithm'] == 'ssfl'
    assert configs[label]['ssfl']['density'] == density
    assert lasts[label]['density'] == pytest.approx(density, abs=1e-3)

  # FedAvg uploads every float32 weight of every cohort client each round; SSFL less, and the
  # sparser mask less still (its one-time saliency upload included).
  fedavg = configs['FedAvg']
  assert lasts['FedAvg']['cum_bits_up'] == (fedavg['num_rounds'] * fedavg['clients_per_round']
                                            * CONV4_DIGITS_PARAMS * 32)
  up = [lasts[label]['cum_bits_up'] for label in RUNS]
  assert up[0] > up[1] > up[2] > 0

  # The figure: shown inline and saved beside the runs.
  images = [o for o in _outputs(nb, 'display_data') if 'image/png' in o.data]
  assert len(images) == 1
  assert base64.b64decode(images[0].data['image/png']).startswith(PNG_MAGIC)
  assert (out / 'accuracy_vs_upload.png').read_bytes().startswith(PNG_MAGIC)

  # The summary table: one row per run with its final accuracy and upload.
  tables = [o.data['text/markdown'] for o in _outputs(nb, 'display_data')
            if 'text/markdown' in o.data]
  assert len(tables) == 1
  rows = {line.split('|')[1].strip(): line for line in tables[0].splitlines()[2:]}
  assert list(rows) == list(RUNS)
  for label, last in lasts.items():
    assert f'| {last["test_accuracy"]:.1%} |' in rows[label], rows[label]
    assert f'| {last["cum_bits_up"] / 8e6:,.1f} |' in rows[label], rows[label]


def test_failing_cell_fails(kernel_env):
  """The harness does not swallow errors: a cell that raises fails the run."""
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  cwd, _ = kernel_env
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.insert(3, nbformat.v4.new_code_cell("raise RuntimeError('broken notebook')"))
  with pytest.raises(nbclient.exceptions.CellExecutionError, match='broken notebook'):
    _execute(nb, cwd)
