"""The sweep runner: planning around the optimum, running, skipping, recording failures, and
sweep files loaded from any path with their own architectures and size rules."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

import errors
import models
from configs import common
from configs import transformer
from configs.sweeps import arch_compare
from configs.sweeps import sparsity
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
  runs = sweep_lib.plan(arch_compare, sweep, str(tmp_path))
  assert {r.architecture for r in runs} == set(arch_compare.ARCHITECTURES)
  for budget in sweep.budgets:
    sizes = sorted(r.params for r in runs if r.budget == budget and r.architecture == 'llama')
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
  # The hybrids: a quarter of the mixers attention (Qwen3-Next's 3:1), Mamba-2 heads of 16.
  assert arch_compare.size_overrides('deltanet_hybrid', 192, sweep)['model.pattern'] == (
      'GFGFGFAF' * 2)
  mamba = arch_compare.size_overrides('mamba2_hybrid', 96, sweep)
  assert mamba['model.pattern'] == 'MFMFMFAF' and mamba['model.mamba.num_heads'] == 12
  assert mamba['model.mamba.head_dim'] == 16


def test_runs_skip_finished_and_record_failures(tmp_path, monkeypatch):
  monkeypatch.setitem(arch_compare.ARCHITECTURES, 'broken', dict(
      config='configs/transformer.py', arg='preset=llama_tiny', unit='AF', gated=True, gqa=True,
      overrides={'data.corpus': 'text', 'data.paths': str(tmp_path / 'none' / '*.txt')}))
  sweep = ml_collections.ConfigDict(dict(
      architectures=['llama', 'broken'], budgets=[1e9], sizes=1, seq_len=32, batch_size=4,
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
  assert summary['flops'] >= 1e9 and summary['config']['model']['d_model'] == 32
  # Again: the finished run is skipped, the failed one is tried again.
  sweep_lib.execute(arch_compare, sweep, runs, sweep_dir)
  by_name = {r['name']: r for r in json.load(open(os.path.join(sweep_dir, 'sweep.json')))['runs']}
  assert by_name[runs[0].name]['skipped'] is True
  assert by_name[runs[1].name]['status'] == 'failed'


def test_command_line_print_commands_and_bad_preset(tmp_path):
  """The micro MQAR sweep (one run: one model to size, where arch_compare's quick preset
  sizes 18) prints the command the in-process plan makes; test_quick_plan_... counts quick's."""
  path = 'configs/sweeps/mqar.py:preset=micro'
  cmd = [sys.executable, '-m', 'experiments.sweep', f'--sweep={path}', f'--dir={tmp_path}',
         '--print_commands']
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, check=True)
  lines = proc.stdout.strip().splitlines()
  sweep, module = sweep_lib.load_sweep(path)
  runs = sweep_lib.plan(module, sweep, str(tmp_path))
  assert lines == [' '.join(r.command) for r in runs] and all('train.py' in line for line in lines)
  assert not os.path.exists(tmp_path / 'sweep.json')
  cmd[3] = '--sweep=configs/sweeps/arch_compare.py:preset=huge'
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode != 0 and "preset='huge'" in proc.stderr
  assert 'Traceback' not in proc.stderr and proc.stderr.startswith('sweep: error: ')


# A complete sweep file of the kind a user writes: its own architectures (llama_tiny with
# sliding-window attention, and with MoE layers) and a size rule that sets more than widths.
SWEEP_FILE = """
import ml_collections

from configs import common

ARCHITECTURES = {
    'window': dict(config='configs/transformer.py', arg='preset=llama_tiny', window=8),
    'moe': dict(config='configs/transformer.py', arg='preset=llama_tiny', experts=4),
}


def get_config(arg=None):
  args = common.parse_arg(arg, depth=1)
  return ml_collections.ConfigDict(dict(
      architectures=list(ARCHITECTURES), budgets=[1e9], sizes=1, seeds=[0], seq_len=32,
      batch_size=4, eval_batches=1, widths=[32, 48], tokens_per_param=20.0, depth=args.depth))


def size_overrides(architecture, width, sweep):
  arch = ARCHITECTURES[architecture]
  fields = {'model.d_model': width, 'model.num_heads': width // 16,
            'model.num_kv_heads': width // 16, 'model.mlp_dim': 2 * width,
            'peak_flops': 1e11}  # for MFU: no matmul benchmark at start-up
  if 'window' in arch:
    return {**fields, 'model.pattern': 'WF' * sweep.depth,
            'model.attention.window': arch['window']}
  return {**fields, 'model.pattern': 'AE' * sweep.depth,
          'model.moe.num_experts': arch['experts'], 'model.moe.dispatch': 'capacity'}
"""


def _write_sweep_file(tmp_path) -> str:
  path = tmp_path / 'my_sweep.py'
  path.write_text(SWEEP_FILE)
  return str(path)


def test_a_sweep_file_from_any_path_plans_and_runs_its_own_size_rule(tmp_path):
  sweep, module = sweep_lib.load_sweep(f'{_write_sweep_file(tmp_path)}:depth=2')
  assert sweep.depth == 2 and sorted(module.ARCHITECTURES) == ['moe', 'window']
  sweep_dir = str(tmp_path / 'sweep')
  runs = sweep_lib.plan(module, sweep, sweep_dir)
  assert [r.architecture for r in runs] == ['window', 'moe']
  window, moe = runs
  assert {'--config.model.pattern=WFWF', '--config.model.attention.window=8'} <= set(window.command)
  assert {'--config.model.pattern=AEAE', '--config.model.moe.num_experts=4'} <= set(moe.command)
  assert moe.params > window.params  # four experts' MLPs against one
  assert sweep_lib.execute(module, sweep, runs, sweep_dir, parallel=2) == []
  state = json.load(open(os.path.join(sweep_dir, 'sweep.json')))
  assert state['sweep_file'] == module.__file__ and state['sweep']['depth'] == 2
  model = {r.architecture: json.load(open(os.path.join(sweep_dir, 'runs', r.name, 'summary.json'))
                                     )['config']['model'] for r in runs}
  assert [model[r.architecture]['d_model'] for r in runs] == [r.width for r in runs]
  assert model['window']['pattern'] == 'WFWF' and model['window']['attention']['window'] == 8
  assert model['moe']['pattern'] == 'AEAE' and model['moe']['moe']['num_experts'] == 4


def test_refusals_are_one_line_naming_what_is_wrong(tmp_path, monkeypatch):
  path = _write_sweep_file(tmp_path)
  sweep, module = sweep_lib.load_sweep(path)

  def refused(match, fn, *args):
    with pytest.raises(errors.ConfigError, match=match) as e:
      fn(*args)
    assert '\n' not in str(e.value)

  # A size rule that sets a field the config does not have: architecture, width and field.
  monkeypatch.setattr(module, 'size_overrides', lambda a, w, s: {'model.moe.num_expert': 4})
  sweep.architectures = ['moe']
  refused(r"architecture 'moe' at width 32: the size rule sets 'model\.moe\.num_expert', a field "
          r"configs/transformer\.py:preset=llama_tiny does not have; did you mean "
          r"'model\.moe\.num_experts'", sweep_lib.plan, module, sweep, str(tmp_path))
  # An architecture the module does not define: the known ones.
  sweep.architectures = ['mamba']
  refused(r"'mamba' is not one of \['moe', 'window'\]", sweep_lib.plan, module, sweep,
          str(tmp_path))
  # A sweep file without the interface: the file.
  bare = tmp_path / 'bare.py'
  bare.write_text('def get_config(arg=None):\n  return None\n')
  refused(f'sweep file {bare} has no ARCHITECTURES and no size_overrides', sweep_lib.load_sweep,
          f'{bare}:x')
  refused(f'sweep file {tmp_path / "none.py"} does not exist', sweep_lib.load_sweep,
          str(tmp_path / 'none.py'))


def test_attention_ratio_sweep_expands_to_every_fraction_of_both_mixers(tmp_path):
  """configs/sweeps/attention_ratio.py:preset=quick: 2 mixers x 5 fractions x 2 seeds, one
  budget and one width for all, the pattern's share of attention layers the architecture's."""
  sweep, module = sweep_lib.load_sweep('configs/sweeps/attention_ratio.py:preset=quick')
  runs = sweep_lib.plan(module, sweep, str(tmp_path))
  assert len(runs) == 2 * 5 * 2
  assert {r.budget for r in runs} == {1e11} and {r.width for r in runs} == {64}
  seen = set()
  for r in runs:
    fraction, mixer = sweep.attention_fraction[r.architecture], sweep.mixer[r.architecture]
    char = {'deltanet': 'G', 'mamba2': 'M'}[mixer]
    pattern = next(c.split('=', 1)[1] for c in r.command if c.startswith('--config.model.pattern='))
    mixers = pattern[::2]
    assert len(mixers) == 8 and set(mixers) <= {'A', char} and set(pattern[1::2]) == {'F'}
    assert mixers.count('A') == round(8 * fraction), (r.name, pattern)
    assert f'--config.train.flops={r.budget}' in r.command
    seen.add((mixer, fraction, r.seed))
  assert seen == {(m, f, s) for m in ('deltanet', 'mamba2')
                  for f in (0.0, 0.125, 0.25, 0.5, 1.0) for s in (0, 1)}
  # Fraction 1 is the same transformer whichever family it starts from.
  full = {sweep.mixer[r.architecture]: r for r in runs if sweep.attention_fraction[
      r.architecture] == 1.0 and r.seed == 0}
  assert full['deltanet'].params == full['mamba2'].params
  assert 'GFGFGFAFGFGFGFAF' == module.size_overrides('deltanet_a1_4', 64, sweep)['model.pattern']


def test_sparsity_sweep_plans_every_stack_at_the_same_keys_per_query(tmp_path):
  """configs/sweeps/sparsity.py: dense, window, MoBA, MLA and DSA ladders, each sparse layer
  seeing `keys_per_query` keys; every planned model builds (shapes only)."""
  sweep, module = sweep_lib.load_sweep('configs/sweeps/sparsity.py:preset=quick')
  runs = sweep_lib.plan(module, sweep, str(tmp_path))
  assert {r.architecture for r in runs} == set(sparsity.ARCHITECTURES)
  assert len(runs) == len(sparsity.ARCHITECTURES) * 2 * 3
  keys = sweep.keys_per_query
  fields = {a: sparsity.size_overrides(a, 48, sweep) for a in sparsity.ARCHITECTURES}
  assert fields['window']['model.attention.window'] == keys
  assert fields['moba']['model.moba.block'] * (fields['moba']['model.moba.topk'] + 1) == keys
  assert fields['dsa']['model.dsa.topk'] == keys and fields['dsa']['model.attention.kind'] == 'mla'
  assert {f['model.pattern'][0] for f in fields.values()} == {'A', 'W', 'B', 'S'}
  ids = jnp.zeros((1, sweep.seq_len), jnp.int32)
  for arch, overrides in fields.items():
    config = transformer.get_config(sparsity.ARCHITECTURES[arch]['arg'])
    for field, value in overrides.items():
      common.set_field(config, field, value)
    config.model.vocab_size = 256
    model = models.build(config.model)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), ids, positions_BT=ids,
                                                   segment_ids_BT=ids + 1))
    assert shapes['params'], arch
  with pytest.raises(errors.ConfigError, match=r"preset='tiny' is not one of .*sparsity.py"):
    sparsity.get_config('preset=tiny')
