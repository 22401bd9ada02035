"""The sweep runner: planning around the optimum, running, skipping, recording failures."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from configs.sweeps import arch_compare
from experiments import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_plan_has_the_stated_grid_centred_on_the_optimum(tmp_path):
  sweep = arch_compare.get_config('preset=quick')
  runs = sweep_lib.plan(arch_compare, sweep, str(tmp_path))
  assert len(runs) == 2 * 2 * 3
  assert {r.architecture for r in runs} == {'llama', 'gpt2'}
  for r in runs:
    assert r.tokens == pytest.approx(r.budget / r.train_flops_per_token)
    assert f'--config.train.flops={r.budget}' in r.command
    assert f'--workdir={tmp_path}/runs/{r.name}' in r.command
  # cpu_small: 5 sizes per budget around sqrt(C / (6 x 80)) parameters, strictly inside.
  sweep = arch_compare.get_config('preset=cpu_small')
  for budget in sweep.budgets:
    sizes = sorted(r.params for r in sweep_lib.plan(arch_compare, sweep, str(tmp_path))
                   if r.budget == budget and r.architecture == 'llama')
    assert len(sizes) == 5
    assert sweep.tokens_per_param == 80.0
    assert sizes[0] < math.sqrt(budget / (6 * 80)) < sizes[-1]


def test_ladder_rule():
  sweep = ml_collections.ConfigDict(dict(max_layers=12))
  fields = arch_compare.size_overrides('llama', 96, sweep)
  assert fields['model.num_heads'] == 6 and fields['model.num_kv_heads'] == 3
  assert fields['model.pattern'] == 'AF' * 4 and fields['model.mlp_dim'] == 256
  assert arch_compare.size_overrides('gpt2', 96, sweep)['model.mlp_dim'] == 384
  assert arch_compare.size_overrides('llama', 2048, sweep)['model.pattern'] == 'AF' * 12


def test_runs_skip_finished_and_record_failures(tmp_path, monkeypatch):
  monkeypatch.setitem(arch_compare.ARCHITECTURES, 'broken', dict(
      config='configs/transformer.py', arg='preset=llama_tiny', unit='AF', gated=True, gqa=True,
      overrides={'data.corpus': 'text', 'data.paths': str(tmp_path / 'none' / '*.txt')}))
  sweep = ml_collections.ConfigDict(dict(
      architectures=['llama', 'broken'], budgets=[3e9], sizes=1, seq_len=32, batch_size=4,
      seeds=[0], eval_batches=1, widths=[32, 48], max_layers=2, tokens_per_param=20.0))
  sweep_dir = str(tmp_path / 'sweep')
  runs = sweep_lib.plan(arch_compare, sweep, sweep_dir)
  assert [r.architecture for r in runs] == ['llama', 'broken']
  failed = sweep_lib.execute(arch_compare, sweep, runs, sweep_dir)
  assert failed == [runs[1].name]
  state = json.load(open(os.path.join(sweep_dir, 'sweep.json')))
  by_name = {r['name']: r for r in state['runs']}
  assert by_name[runs[0].name]['status'] == 'finished'
  assert 'data.paths' in by_name[runs[1].name]['error']
  summary = json.load(open(os.path.join(sweep_dir, 'runs', runs[0].name, 'summary.json')))
  assert summary['flops'] >= 3e9 and summary['config']['model']['d_model'] == 32
  # Again: the finished run is skipped, the failed one is tried again.
  sweep_lib.execute(arch_compare, sweep, runs, sweep_dir)
  by_name = {r['name']: r for r in json.load(open(os.path.join(sweep_dir, 'sweep.json')))['runs']}
  assert by_name[runs[0].name]['skipped'] is True
  assert by_name[runs[1].name]['status'] == 'failed'


def test_command_line_print_commands_and_bad_preset(tmp_path):
  cmd = [sys.executable, '-m', 'experiments.sweep',
         '--sweep=configs/sweeps/arch_compare.py:preset=quick', f'--dir={tmp_path}',
         '--print_commands']
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, check=True)
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 12 and all('train.py' in line for line in lines)
  assert not os.path.exists(tmp_path / 'sweep.json')
  cmd[3] = '--sweep=configs/sweeps/arch_compare.py:preset=huge'
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode != 0 and "preset='huge'" in proc.stderr
  assert 'Traceback' not in proc.stderr and proc.stderr.startswith('sweep: error: ')

