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
