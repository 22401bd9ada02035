"""The notebooks under colab/ run top to bottom (RUNLOCAL = True) and are committed clean.

Each notebook has a cell tagged `parameters`; like papermill, the test inserts a cell after it
that sets RUNLOCAL = True (and a fresh WORKDIR where the notebook has one), then executes the
notebook with nbclient on the `python3` kernel (ipykernel, requirements-test.txt).
"""

import os

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
NOTEBOOKS = ('quickstart.ipynb', 'architecture_tour.ipynb', 'scaling_report.ipynb')


def _path(name):
  return os.path.join(ROOT, 'colab', name)


def _present():
  return [n for n in NOTEBOOKS if os.path.exists(_path(n))]


@pytest.mark.parametrize('name', _present())
def test_committed_without_outputs(name):
  nb = nbformat.read(_path(name), as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == 'code'
           and (c.get('outputs') or c.get('execution_count') is not None)]
  assert not dirty, f'{name}: cells {dirty} hold outputs; clear them before committing'
  tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1 and 'RUNLOCAL = False' in tagged[0].source, name


@pytest.mark.parametrize('name', _present())
def test_runs_top_to_bottom(name, tmp_path):
  nb = nbformat.read(_path(name), as_version=4)
  i = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  injected = 'RUNLOCAL = True\n'
  if 'WORKDIR' in nb.cells[i].source:
    injected += f'WORKDIR = {str(tmp_path / "run")!r}\n'
  nb.cells.insert(i + 1, nbformat.v4.new_code_cell(injected))
  client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=300,
                                   resources={'metadata': {'path': os.path.join(ROOT, 'colab')}})
  client.execute()  # raises CellExecutionError naming the cell on any error
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if o.output_type == 'error']
  assert not errors, errors
