"""sharding.aot: topology parsing, errors and the step it lowers, built on the CPU (always); TPU
plans compiled with libtpu (if installed).

The plans run the command in a subprocess, as a user would, on small topologies and tiny models.
Their expectations come from the model, not from golden numbers: the state (parameters and two
Adam moments, float32) is 12 bytes a parameter, replicated under `dp` and split four ways under
`fsdp`, whose step must gather parameters where `dp` need not.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from sharding import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
UNITS = {'KiB': 2**10, 'MiB': 2**20, 'GiB': 2**30}


def run_aot(*flags, hide_libtpu=False):
  code = ('import sys; sys.modules["libtpu"] = None; ' if hide_libtpu else 'import sys; ')
  code += 'from sharding import aot; aot.main(sys.argv)'
  env = {k: v for k, v in os.environ.items() if k != 'TPU_LIBRARY_PATH'}
  return subprocess.run([sys.executable, '-c', code, *flags], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=300)


def tiny(*flags, topology):
  return (f'--config={ROOT}/configs/transformer.py:preset=llama_tiny,runlocal',
          '--config.model.pattern=AF', f'--topology={topology}', *flags)


def error_line(proc):
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-2000:]
  return lines[0]


@pytest.mark.parametrize('text, expected', [
    ('v5p:2x2x1', ('v5p', (2, 2, 1))),
    ('v5p:4x4x4', ('v5p', (4, 4, 4))),
    ('V5E:4x4', ('v5e', (4, 4))),
    ('v6e:2x2', ('v6e', (2, 2))),
    ('v4:2x2x2', ('v4', (2, 2, 2))),
])
def test_parse_topology(text, expected):
  assert aot.parse_topology(text) == expected


@pytest.mark.parametrize('text, message', [
    ('v5p', 'is not CHIP:AxB[xC]'),
    ('v5p:2x2x', 'is not CHIP:AxB[xC]'),
    ('v5p-8', 'is not CHIP:AxB[xC]'),
    ('v7x:2x2x1', "unknown chip 'v7x'; one of v4, v5e, v5p, v6e"),
    ('v5p:2x2', 'v5p topologies have 3 dimensions'),
    ('v5e:2x2x1', 'v5e topologies have 2 dimensions'),
    ('v5p:0x2x2', 'every dimension must be at least 1'),
])
def test_parse_topology_errors(text, message):
  with pytest.raises(aot.PlanError, match=re.escape(message)) as e:
    aot.parse_topology(text)
  assert str(e.value).startswith(f'--topology={text!r}')


def test_count_collectives():
  hlo = '\n'.join([
      '%all-reduce.1 = f32[8]{0} all-reduce(f32[8]{0} %p), replica_groups={}',
      '%ars = (f32[8]{0}, u32[]) all-reduce-start(f32[8]{0} %q)',
      '%ard = f32[8]{0} all-reduce-done((f32[8]{0}, u32[]) %ars)',
      '%ag = f32[16]{0} all-gather(f32[4]{0} %r), dimensions={0}',
      '%rs = f32[2]{0} reduce-scatter(f32[8]{0} %s), dimensions={0}',
      '%cp = (f32[8]{0}, f32[8]{0}) collective-permute-start(f32[8]{0} %t)',
      '%cpd = f32[8]{0} collective-permute-done((f32[8]{0}, f32[8]{0}) %cp)',
      '%fusion.all-gather = f32[8]{0} fusion(f32[8]{0} %u), kind=kLoop',
  ])
  assert aot.count_collectives(hlo) == {'all-reduce': 2, 'all-gather': 1, 'reduce-scatter': 1,
                                        'all-to-all': 0, 'collective-permute': 1}


def test_bad_topology_flag_is_one_line():
  line = error_line(run_aot(*tiny(topology='v9:2x2')))
  assert line == "sharding.aot: error: --topology='v9:2x2': unknown chip 'v9'; one of v4, v5e, v5p, v6e"


def test_without_libtpu_says_how_to_install():
  line = error_line(run_aot(*tiny(topology='v5p:2x2x1'), hide_libtpu=True))
  assert 'libtpu is not installed: pip install -r requirements-tpu.txt' in line


def parse_plan(stdout):
  """The printed plan as numbers: memory rows in bytes, collectives, verdict."""
  out = {}
  for row in ('arguments', 'outputs', 'temporaries', 'generated code', 'total'):
    m = re.search(rf'^  {row} +([\d.]+) (KiB|MiB|GiB)', stdout, re.M)
    assert m, (row, stdout)
    out[row] = float(m.group(1)) * UNITS[m.group(2)]
  out['hbm'] = float(re.search(r'of ([\d.]+) GiB HBM', stdout).group(1)) * UNITS['GiB']
  out['params'] = int(re.search(r'model: ([\d,]+) parameters', stdout).group(1).replace(',', ''))
  out['collectives'] = {k: int(v) for k, v in re.findall(
      r'(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute) (\d+)', stdout)}
  out['xla_flops'] = float(re.search(r'FLOPs per step: ([\d.e+]+) from compiled', stdout).group(1))
  out['verdict'] = re.search(r'^verdict: (.*)$', stdout, re.M).group(1)
  return out


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install -r requirements-tpu.txt)')
def test_plan_dp_against_fsdp_on_v5p():
  plans = {}
  for rules in ('dp', 'fsdp'):
    proc = run_aot(*tiny(f'--config.sharding_rules={rules}', '--config.mesh.data=1',
                         '--config.mesh.fsdp=4', topology='v5p:2x2x1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'topology v5p:2x2x1: 4 chips (TPU v5), 4 devices' in proc.stdout
    plans[rules] = parse_plan(proc.stdout)
  dp, fsdp = plans['dp'], plans['fsdp']
  assert dp['hbm'] == pytest.approx(95.74 * 2**30, rel=1e-3)
  state_bytes = 12 * dp['params']  # parameters, Adam mu and nu, float32
  assert state_bytes <= dp['arguments'] <= 1.1 * state_bytes + 2**20
  assert fsdp['arguments'] < 0.5 * dp['arguments']  # the state is split over 4 chips
  for p in (dp, fsdp):
    assert p['total'] >= p['arguments']
    assert p['verdict'].startswith('fits (')
    assert p['xla_flops'] > 0
  assert dp['collectives']['all-reduce'] > 0 and dp['collectives']['all-gather'] == 0
  assert fsdp['collectives']['all-gather'] > 0


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install -r requirements-tpu.txt)')
def test_plan_too_big_does_not_fit():
  # 2.06B parameters: 25 GB of float32 state on one 16 GB v5e chip.
  proc = run_aot(*tiny('--config.model.d_model=2048', '--config.model.vocab_size=500000',
                       '--config.data.seq_len=8', '--config.train.batch_size=2',
                       topology='v5e:1x1'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  verdict = re.search(r'^verdict: (.*)$', proc.stdout, re.M).group(1)
  m = re.fullmatch(r'does not fit \(needs ([\d.]+) GiB of ([\d.]+) GiB per chip\)', verdict)
  assert m, verdict
  needs, hbm = float(m.group(1)), float(m.group(2))
  assert hbm == 15.75
  assert needs > 12 * 2.06e9 / 2**30 > hbm


def test_build_step_is_the_loop_step_on_any_devices():
  """The planner lowers trainer/loop.py's own step (loop.jit_functions): built over this
  machine's CPU device it has the run's budget, state layout and shapes, and compiles."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from configs import transformer  # pylint: disable=g-import-not-at-top
  from trainer import loop  # pylint: disable=g-import-not-at-top

  config = transformer.get_config('preset=llama_tiny,runlocal')
  config.model.pattern = 'AF'
  train_jit, state, batch, mesh, rules, info = aot.build_step(config, jax.devices()[:1])
  run = loop.setup(config, workdir=None, devices=jax.devices()[:1])
  assert info['analytic_flops_per_step'] == run.train_flops_per_step
  assert info['tokens_per_step'] == run.tokens_per_step
  want = loop.abstract_state(run)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  assert jax.tree.leaves(jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype),
                                      state, want)) == [True] * len(jax.tree.leaves(want))
  assert batch['inputs'].shape == (config.train.batch_size, config.data.seq_len)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = train_jit.lower(state, batch).compile()
  assert compiled.cost_analysis()
