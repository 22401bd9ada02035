"""Sharded == unsharded on 8 forced CPU devices: one training step of every family under every
rules preset, the parameter layouts against checked-in tables, and the collectives that dp
and fsdp compile to. The 8-device work runs in one subprocess per fixture
(tests/sharding_worker.py); the tests compare what it reports."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from sharding import rules
from tests import sharding_worker
from trainer import loop

FAMILIES = sorted(sharding_worker.FAMILIES)
MOE = ('gpt_oss', 'deepseek_v3')
REGENERATE = ('regenerate with `python -m tests.sharding_worker tables --write` and review the '
              'diff of tests/sharding_tables/')


# All 20 pairs take about 3 CPU-minutes on this 2-core machine. By default llama (the dense
# base) and deepseek_v3 (MLA, MoE, shared expert, routing bias) run every preset and the
# other families the presets that change their layout most; ARCHLAB_SHARDING_FULL=1 runs all.
FULL = os.environ.get('ARCHLAB_SHARDING_FULL') == '1'
CASES = [(f, p) for f in FAMILIES for p in sorted(sharding_worker.MESHES)
         if FULL or f in ('llama', 'deepseek_v3') or p == 'fsdp_tp' or (f in MOE and p == 'fsdp_ep')]


@pytest.fixture(scope='module')
def steps():
  return sharding_worker.run('steps', '--cases=' + ','.join(f'{f}:{p}' for f, p in CASES))


@pytest.fixture(scope='module')
def collectives():
  return sharding_worker.run('collectives', '--families=llama,deepseek_v3')


def test_presets_name_known_axes():
  assert sorted(rules.PRESETS) == sorted(sharding_worker.MESHES)
  for name, preset in rules.PRESETS.items():
    for logical, mesh_axes in preset:
      axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ()
      assert set(axes) <= set(rules.MESH_AXES), (name, logical, mesh_axes)
  with pytest.raises(ValueError, match="sharding_rules='tp' is not one of"):
    rules.get_rules('tp')


@pytest.mark.parametrize('family,preset', CASES)
def test_one_step_matches_one_device(steps, family, preset):
  ref, got = steps[family]['single'], steps[family][preset]
  where = f'{family} under {preset} {sharding_worker.MESHES[preset]}'
  assert abs(got['loss'] - ref['loss']) <= 1e-5 * abs(ref['loss']), where
  assert abs(got['grad_norm'] - ref['grad_norm']) <= 1e-5 * ref['grad_norm'], where
  assert got['moved'] > 1e-4, f'{where}: the step did not move the parameters'
  assert got['params'] <= 1e-5, f'{where}: updated parameters differ by {got["params"]:.2e}'
  # The step alone, a quantity ~40x smaller than the parameters: 2-6e-6 measured.
  assert got['update'] <= 3e-5, f'{where}: the step differs by {got["update"]:.2e}'
  assert got['opt_state'] <= 1e-5, f'{where}: optimizer moments differ by {got["opt_state"]:.2e}'
  assert got['collections'] <= 1e-5, f'{where}: the MoE routing bias differs'
  if family == 'deepseek_v3':  # the aux-loss-free bias is updated by the step
    assert got['collections_moved'] > 0, where
  # The preset really lays the parameters out over its mesh axes.
  used = {axis for spec in got['specs'].values() for axis in rules.MESH_AXES if f"'{axis}'" in spec}
  expected = {'dp': set(), 'fsdp': {'fsdp'}, 'fsdp_tp': {'fsdp', 'tensor'},
              'fsdp_ep': {'fsdp', 'expert'} if family in MOE else {'fsdp'}}[preset]
  assert used == expected, f'{where}: parameters use mesh axes {sorted(used)}'


@pytest.mark.parametrize('family', FAMILIES)
def test_parameter_shardings_match_the_table(steps, family):
  path = os.path.join(sharding_worker.TABLES_DIR, f'{family}.json')
  assert os.path.exists(path), f'no table {path}; {REGENERATE}'
  with open(path) as f:
    table = json.load(f)
  assert table['rules'] == 'fsdp_tp' and table['mesh'] == sharding_worker.MESHES['fsdp_tp']
  got = steps[family]['fsdp_tp']['specs']
  problems = [f'{k}: table {table["params"].get(k)}, now {got.get(k)}'
              for k in sorted(set(got) | set(table['params']))
              if got.get(k) != table['params'].get(k)]
  assert not problems, (f'{family} parameter shardings under fsdp_tp changed:\n  '
                        + '\n  '.join(problems[:20]) + f'\nIf intended, {REGENERATE}')


@pytest.mark.parametrize('family', ['llama', 'deepseek_v3'])
def test_dp_all_reduces_gradients_and_fsdp_gathers_parameters(collectives, family):
  """dp: replicated parameters, so gradients are all-reduced and nothing is gathered.
  fsdp: each parameter sharded over `fsdp` is all-gathered before use (forward, and again
  or kept for the backward) and its gradient reduced back to shards."""
  dp, fsdp = collectives[f'{family}/dp'], collectives[f'{family}/fsdp']
  dp_counts, fsdp_counts = dp['counts'], fsdp['counts']
  assert dp['fsdp_sharded_params'] == 0
  assert fsdp['fsdp_sharded_params'] >= 0.5 * fsdp['params'], fsdp
  assert dp_counts.get('all-reduce', 0) >= 1, dp_counts
  assert dp_counts.get('all-gather', 0) == 0, dp_counts
  assert dp_counts.get('reduce-scatter', 0) == 0, dp_counts
  assert fsdp_counts.get('all-gather', 0) >= fsdp['fsdp_sharded_params'], fsdp_counts
  # Gradients of sharded parameters come back as shards: reduce-scatter, or XLA:CPU's
  # equivalent all-reduce followed by a slice.
  reduce_ops = fsdp_counts.get('reduce-scatter', 0) + fsdp_counts.get('all-reduce', 0)
  assert reduce_ops >= 1, fsdp_counts


def test_a_layout_the_mesh_cannot_hold_is_one_line():
  mesh = jax.sharding.AbstractMesh((1, 2, 4, 1), rules.MESH_AXES)
  sharding = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  abstract = {'params': {'k': jax.ShapeDtypeStruct((32, 2, 8), jnp.float32)}}
  state_sharding = {'params': {'k': sharding('fsdp', 'tensor', None)}}
  with pytest.raises(ValueError, match=r'^params/k \(32, 2, 8\): dimension 1 \(2\) does not '
                     r'divide by mesh axes tensor = 4; change config.mesh'):
    loop.check_divisible(state_sharding, abstract, mesh, batch_size=8)
  with pytest.raises(ValueError, match='train.batch_size=5 does not divide by the batch mesh '
                     'axes data x fsdp x expert = 2'):
    loop.check_divisible({}, {}, mesh, batch_size=5)
  loop.check_divisible({'params': {'k': sharding('fsdp', None, None)}}, abstract, mesh, 8)
