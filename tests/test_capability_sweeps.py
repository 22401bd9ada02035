"""configs/sweeps/mqar.py and mad.py: the plans follow the references' grids over every model,
a new model joins by one entry, and the micro MQAR sweep runs end to end (train, evaluate the
sweep, report its accuracy table)."""

import json
import os

import numpy as np
import pytest

import errors
from configs.sweeps import capability
from experiments import evaluate
from experiments import report
from experiments import sweep as sweep_lib


def test_plans_cover_models_and_reference_grids(tmp_path):
  sweep, module = sweep_lib.load_sweep('configs/sweeps/mqar.py:preset=cpu')
  runs = sweep_lib.plan(module, sweep, str(tmp_path))
  assert len(runs) == len(capability.MODELS) * 4  # one seed
  assert {sweep.capability[r.architecture]['model'] for r in runs} == set(capability.MODELS)
  np.testing.assert_allclose(sorted({sweep.capability[r.architecture]['lr'] for r in runs}),
                             np.logspace(-3, -1.5, 4), rtol=1e-3)           # Zoology's grid
  assert any('--config.data.task=mqar:' in c for c in runs[0].command)
  assert '--config.model.vocab_size=1028' in runs[0].command  # the cpu preset's 1024 + 4
  # Zoology's layout: BaseConv then the mixer, no MLP, no positions, tied embeddings
  attention = next(r for r in runs if sweep.capability[r.architecture]['model'] == 'attention')
  for field in ('pattern=CA', 'position=none', 'norm=layernorm', 'tie_embeddings=True',
                'num_heads=1'):
    assert f'--config.model.{field}' in attention.command, field
  sweep, module = sweep_lib.load_sweep('configs/sweeps/mad.py:preset=mad,task=memorization')
  grid = {(sweep.capability[a]['lr'], sweep.capability[a]['weight_decay'])
          for a in sweep.architectures}
  assert grid == {(lr, wd) for lr in (1e-4, 5e-4, 1e-3) for wd in (0.0, 0.1)}  # MAD's grid
  assert sweep.seq_len == 32
  runs = sweep_lib.plan(module, sweep, str(tmp_path / 'mad'))
  attention = next(r for r in runs if sweep.capability[r.architecture]['model'] == 'attention')
  assert '--config.model.pattern=AFAF' in attention.command  # MAD's (mixer, MLP) blocks
  assert '--config.model.autoencoder=True' not in attention.command
  sweep, module = sweep_lib.load_sweep('configs/sweeps/mad.py:preset=cpu,task=selective_copying')
  runs = sweep_lib.plan(module, sweep, str(tmp_path / 'cpu'))
  attention = next(r for r in runs if sweep.capability[r.architecture]['model'] == 'attention')
  steps = 20 * int(next(c for c in attention.command if 'warmup_steps' in c).split('=')[1])
  assert len(runs) == len(capability.MODELS) and 900 <= steps <= 1300, steps  # 'about 1,000'
  assert '--config.data.seq_len=256' in attention.command          # the task's own length
  with pytest.raises(errors.ConfigError, match='preset=cpu needs task='):
    sweep_lib.load_sweep('configs/sweeps/mad.py:preset=cpu')
  sweep, module = sweep_lib.load_sweep('configs/sweeps/mad.py:preset=mad,task=compression')
  runs = sweep_lib.plan(module, sweep, str(tmp_path / 'compression'))
  assert all('--config.model.autoencoder=True' in r.command for r in runs)  # MAD's backbone


def test_a_new_model_joins_by_name(monkeypatch, tmp_path):
  monkeypatch.setitem(capability.MODELS, 'attention_wide_mlp',
                      dict(preset='llama_tiny', mixer='A', zoology='CAF',
                           overrides={'model.mlp_dim': 256}))
  sweep, module = sweep_lib.load_sweep('configs/sweeps/mqar.py:preset=micro,models=attention_wide_mlp')
  runs = sweep_lib.plan(module, sweep, str(tmp_path))
  assert len(runs) == 1 and '--config.model.mlp_dim=256' in runs[0].command
  assert '--config.model.pattern=CAF' in runs[0].command
  with pytest.raises(errors.ConfigError, match="model 'nsa' is not one of"):
    sweep_lib.load_sweep('configs/sweeps/mad.py:preset=micro,models=nsa')


def test_micro_mqar_sweep_end_to_end(tmp_path):
  sweep, module = sweep_lib.load_sweep('configs/sweeps/mqar.py:preset=micro')
  runs = sweep_lib.plan(module, sweep, str(tmp_path))
  assert sweep_lib.execute(module, sweep, runs, str(tmp_path)) == []
  assert evaluate.evaluate_sweep(str(tmp_path), [], [], instances=32) == [runs[0].name]
  assert evaluate.evaluate_sweep(str(tmp_path), [], [], instances=32) == []  # up to date
  result = report.write_report(str(tmp_path), n_bootstrap=10)
  row, = result['capability']
  assert row['model'] == 'attention' and row['task'] == 'mqar:seq_len=32,vocab_size=64'
  assert 0.0 <= row['mean'] <= 1.0 and row['chosen'] == [{'lr': 0.01, 'weight_decay': 0.0}]
  with open(os.path.join(tmp_path, 'runs', runs[0].name, 'eval.json')) as f:
    scored, = json.load(f)['tasks'].values()
  assert row['answer_nll'] == scored['answer_nll'] > 0
  with open(os.path.join(tmp_path, 'report.md')) as f:
    text = f.read()
  assert '## Capability evaluations' in text and f'| {row["answer_nll"]:.4f} |' in text
  assert os.path.isfile(os.path.join(tmp_path, 'accuracy.png'))
