"""Adaptation from an autoregressive run (trainer/init_from.py): a causal run's parameters
start a masked diffusion run (the causal mask dropped), which trains and whose NELBO falls."""

import json

import jax
import numpy as np
import pytest

import errors
from configs import transformer
from trainer import checkpoint
from trainer import init_from
from trainer import loop

TINY = {'d_model': 32, 'num_heads': 2, 'num_kv_heads': 2, 'mlp_dim': 64, 'pattern': 'AF'}


def tiny(preset, steps, eval_every):
  config = transformer.get_config(f'preset={preset},runlocal')
  config.model.update(TINY)
  config.data.seq_len, config.train.batch_size = 32, 8
  config.train.steps, config.train.eval_every, config.train.log_every = steps, eval_every, eval_every
  config.train.checkpoint_every = steps
  config.train.progress_bar, config.peak_flops = False, 1e11
  return config


@pytest.fixture(scope='module')
def causal_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ar')
  loop.train_and_evaluate(tiny('llama_tiny', 20, 20), str(workdir))
  return workdir


def test_a_masked_diffusion_run_starts_from_a_causal_run_and_its_nelbo_falls(causal_run,
                                                                             tmp_path):
  config = tiny('llada_tiny', 20, 10)
  config.init_from = f'run:{causal_run}'
  prepared = init_from.prepare(config.copy_and_resolve_references())
  assert prepared.model.vocab_size == 260  # the run's
  _, ar_params, _ = checkpoint.read_model(str(causal_run))
  loaded = jax.tree.leaves(init_from.load_params(prepared))
  assert loaded and all(np.array_equal(x, y) for x, y in zip(loaded, jax.tree.leaves(ar_params)))
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['objective'] == 'masked_diffusion'
  assert summary['final_eval_bits_per_byte_is_upper_bound'] is True
  evals = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  evals = [r['eval_bits_per_byte'] for r in evals if 'eval_bits_per_byte' in r]
  assert len(evals) == 2 and evals[1] < evals[0], evals


def test_adaptation_changes_only_the_mask(causal_run):
  config = tiny('llada_tiny', 20, 10)
  config.init_from = f'run:{causal_run}'
  config.model.d_model = 64
  with pytest.raises(errors.ConfigError, match=r'model.d_model=64 but the run has 32'):
    init_from.prepare(config)
  # A causal objective from a causal run may not change the mask.
  config = tiny('llama_tiny', 20, 10)
  config.init_from = f'run:{causal_run}'
  config.model.bidirectional = True
  with pytest.raises(errors.ConfigError, match=r'model.bidirectional=True but the run has False'):
    init_from.prepare(config)
  config.init_from = 'nowhere:/x'
  with pytest.raises(errors.ConfigError, match=r'neither hf:/checkpoint_dir nor run:/workdir'):
    init_from.prepare(config)


def test_a_block_diffusion_run_from_the_causal_run_samples_with_the_command(causal_run,
                                                                            tmp_path):
  """Adaptation into block diffusion (L' = 4) trains; `experiments.sample` reads the run back
  and samples it block by block with its cache."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  config = tiny('bd3lm_tiny', 10, 10)
  config.model.update(dict(norm='rmsnorm', mlp_activation='swiglu', mlp_dim=64))  # llama's
  config.init_from = f'run:{causal_run}'
  summary = loop.train_and_evaluate(config, str(tmp_path / 'bd3'))
  assert summary['objective'] == 'block_diffusion' and summary['final_eval_bits_per_byte'] > 0
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'samples.jsonl'
  cmd = [sys.executable, '-m', 'experiments.sample', f'--workdir={tmp_path / "bd3"}',
         '--prompt=def', '--max_new_tokens=12', '--steps=6', '--sampler=confidence_threshold',
         f'--output={out}']
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(out.read_text())
  # Prompt 'def' after BOS: 4 tokens, one block; 12 new tokens fill 3 more blocks.
  assert 0 < len(row['tokens']) <= 12 and row['model_evals'] >= 3 + 4


def test_a_masked_diffusion_run_starts_from_a_hugging_face_checkpoint(tmp_path):
  """`init_from=hf:` of a (random, tiny) transformers Llama into a masked diffusion model:
  the same weights with the causal mask dropped; any other difference is refused."""
  pytest.importorskip('transformers')
  from models import hf  # pylint: disable=g-import-not-at-top
  from tests import test_hf  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'llama')
  test_hf.make_hf_model('llama', path, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
  imported, params = hf.import_hf(path, tiny('llada_tiny', 4, 4))
  config = tiny('llada_tiny', 4, 4)
  config.model = imported.model.copy_and_resolve_references()
  config.model.bidirectional = True
  config.init_from = f'hf:{path}'
  prepared = init_from.prepare(config)
  loaded = init_from.load_params(prepared)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
  config.model.num_heads = 4
  with pytest.raises(errors.ConfigError, match=r'model.num_heads=4 but the checkpoint has 2'):
    init_from.prepare(config)
