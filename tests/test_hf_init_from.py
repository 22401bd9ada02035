"""`init_from=hf:` for the linear-time families: a train.py run starts from a Qwen3-Next,
Mamba-2 or Nemotron-H checkpoint's parameters, not from a fresh initialisation.

Tier 5 (through the training loop). Tiny random transformers checkpoints (the parity tests'
configs). For each family, `init_from`'s two steps (`prepare`: the run's model config against
the checkpoint's; `load_params`: the parameters laid out for the run, here with the layers
scanned) give exactly the imported parameters, and a model field that differs is refused in
one line. Mamba-2 also goes through train.py's loop: a 2-step run at learning rate 0 must
checkpoint exactly the imported parameters, and a refused run writes nothing. (The loop
itself is family-agnostic, llama's case is in tests/test_hf.py, and compiling Qwen3-Next's
training step costs the most: one family through it, the cheapest, keeps the suite short.)
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

import trainer  # noqa: E402
from configs import transformer  # noqa: E402
from experiments import convert  # noqa: E402
from models import hf  # noqa: E402
from tests import test_hf_mamba  # noqa: E402
from tests import test_hf_qwen3_next  # noqa: E402
from models.hf import init_from  # noqa: E402
from tests.test_hf import _leaves, make_hf_model  # noqa: E402

FAMILIES = {
    'qwen3_next': ('qwen3_next', test_hf_qwen3_next.FIELDS),
    'mamba2': test_hf_mamba.VARIANTS['mamba2'],
    'nemotron_h': test_hf_mamba.VARIANTS['nemotron_h'],
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A few stdlib sources as a text corpus (building the whole stdlib corpus costs more than
  these runs)."""
  out = tmp_path_factory.mktemp('data')
  for name in ('textwrap.py', 'shlex.py', 'glob.py', 'fnmatch.py', 'bisect.py', 'colorsys.py'):
    source = os.path.join(os.path.dirname(os.__file__), name)
    (out / (name + '.txt')).write_text(open(source).read())
  return str(out)


def _run_config(model, data_dir):
  """A runlocal run of 2 steps at lr 0 with the given model fields (bytes: every byte id is
  below the checkpoints' vocabulary of 300)."""
  config = transformer.get_config('preset=llama_tiny,runlocal')
  config.data.corpus, config.data.paths = 'text', os.path.join(data_dir, '*.txt')
  config.data.val_fraction = 0.3
  config.model = model
  config.model.scan_layers = True
  config.data.seq_len, config.data.eval_batches = 24, 1
  config.train.batch_size, config.train.steps = 2, 2
  config.train.eval_every = config.train.checkpoint_every = 2
  config.train.progress_bar = False
  config.optim.lr = 0.0
  config.peak_flops = 1e12
  return config


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """{family: (checkpoint dir, its imported run config)}."""
  out = {}
  for family, (model_type, fields) in FAMILIES.items():
    path = str(tmp_path_factory.mktemp(family))
    make_hf_model(model_type, path, **dict(fields))
    out[family] = (path, hf.import_hf(path)[0])
  return out


def _same_leaves(want, got):
  want, got = dict(_leaves(want)), dict(_leaves(got))
  assert sorted(want) == sorted(got)
  for path, value in want.items():
    np.testing.assert_array_equal(value, got[path], err_msg=path)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_prepare_and_load_params(family, checkpoints, data_dir):
  path, imported_config = checkpoints[family]
  config = _run_config(imported_config.model.copy_and_resolve_references(), data_dir)
  config.init_from = f'hf:{path}'
  init_from.prepare(config)
  _same_leaves(hf.import_hf(path, config)[1], init_from.load_params(config)[0])
  wrong = _run_config(imported_config.model.copy_and_resolve_references(), data_dir)
  wrong.model.d_model *= 2
  wrong.init_from = f'hf:{path}'
  with pytest.raises(ValueError, match=r'model.d_model=\d+ but the checkpoint has \d+') as e:
    init_from.prepare(wrong)
  assert '\n' not in str(e.value)


def test_a_mamba2_run_starts_from_the_checkpoint(checkpoints, data_dir, tmp_path):
  hf_dir, imported_config = checkpoints['mamba2']
  wrong = _run_config(imported_config.model.copy_and_resolve_references(), data_dir)
  wrong.model.mamba.state_dim *= 2
  wrong.init_from = f'hf:{hf_dir}'
  with pytest.raises(ValueError, match=r'model.mamba.state_dim=16 but the checkpoint has 8'):
    trainer.train_and_evaluate(wrong, str(tmp_path / 'refused'))
  assert not os.path.exists(tmp_path / 'refused' / 'checkpoints')

  config = _run_config(imported_config.model.copy_and_resolve_references(), data_dir)
  config.init_from = f'hf:{hf_dir}'
  workdir = str(tmp_path / 'run')
  summary = trainer.train_and_evaluate(config, workdir)
  assert np.isfinite(summary['final_eval_loss'])
  model_config, trained, _ = convert.read_archlab(workdir)
  assert model_config.scan_layers and model_config.pattern == imported_config.model.pattern
  _same_leaves(hf.import_hf(hf_dir, config)[1], trained)
