"""Sharded == unsharded on 8 forced CPU devices: one training step of every family under the
rules presets that change its layout (every preset with ARCHLAB_SHARDING_FULL=1), the parameter layouts against checked-in tables, and the collectives that dp,
fsdp and (for MoE) fsdp_ep compile to. The 8-device work runs in one subprocess
(tests/sharding_worker.py); the tests compare what it reports."""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import pytest

from sharding import rules
from tests import sharding_worker
from trainer import step as step_lib

# One worker runs the whole module: its `steps` fixture (one 8-device subprocess) runs once.
pytestmark = pytest.mark.xdist_group('sharding')

FAMILIES = sorted(sharding_worker.FAMILIES)
MOE = ('gpt_oss', 'deepseek_v3', 'deepseek_v3_dropless', 'qwen3_next', 'deepseek_v32')
REGENERATE = ('regenerate with `python -m tests.sharding_worker tables --write` and review the '
              'diff of tests/sharding_tables/')


# The default keeps llama (the dense base) and deepseek_v3 (MLA, MoE, shared expert, routing
# bias) under every preset and every other family under the presets that change its layout
# most: fsdp_tp (fsdp=4 x tensor=2, so the fsdp axis too) and fsdp_ep for MoE: 25 pairs, about
# 2.5 CPU-minutes on this 2-core machine. dp and fsdp lay out every family alike (the batch
# over the mesh; every parameter over fsdp), so running them per family is what
# ARCHLAB_SHARDING_FULL=1 adds: every family under every preset, 41 pairs, about 4 minutes.
FULL = os.environ.get('ARCHLAB_SHARDING_FULL') == '1'
# The attention-ratio hybrids hold the parameters of qwen3_next's G and nemotron_h's M (which
# run under every preset) with llama's attention: fsdp_tp (heads on `tensor`) alone.
TP_ONLY = ('deltanet_hybrid', 'mamba2_hybrid')
# Sparse attention reuses the parameters of the families above (MLA and its MoE, llama's
# attention): under fsdp_tp, the layout that moves most, and fsdp_ep for DSA's MoE.
TP_ONLY += ('deepseek_v32', 'moba')
# The diffusion objectives on llama-like backbones: the batch over fsdp, and fsdp_tp.
DIFFUSION = ('mdlm', 'bd3lm')
CASES = [(f, p) for f in FAMILIES for p in sorted(sharding_worker.MESHES)
         if (FULL and f not in TP_ONLY + DIFFUSION) or f in ('llama', 'deepseek_v3') or (
             f in MOE and p == 'fsdp_ep') or (p == 'fsdp_tp' and f != 'deepseek_v3_dropless')
         or (f in DIFFUSION and p == 'fsdp')]


@pytest.fixture(scope='module')
def steps():
  return sharding_worker.run('steps', '--cases=' + ','.join(f'{f}:{p}' for f, p in CASES))


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


@pytest.mark.parametrize('family', sorted({f for f, p in CASES if p == 'fsdp_tp'}))
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


def forms(shape) -> set:
  """The shapes a parameter (or its gradient) takes around a matmul: itself, or flattened to
  2-D (common.project), either way round."""
  flat = {(shape[0], math.prod(shape[1:])), (math.prod(shape[:-1]), shape[-1])}
  return {tuple(shape)} | flat | {(b, a) for a, b in flat}


def unmatched(params: dict, names, results: list, accept) -> list:
  """Parameters in `names` without a collective result (each used once) that `accept`s it."""
  left, missing = list(results), []
  for name in names:
    hit = next((r for r in left if accept(params[name], r)), None)
    if hit is None:
      missing.append(name)
    else:
      left.remove(hit)
  return missing


def results_of(collectives, *ops) -> list:
  return [(op, tuple(shape)) for op, shapes in collectives if op in ops for shape in shapes]


@pytest.mark.parametrize('family', ['llama', 'deepseek_v3'])
def test_dp_all_reduces_gradients_and_fsdp_gathers_parameters(steps, family):
  """The compiled step's collectives, matched to parameters by shape (XLA may gather a 3-D
  projection reshaped to 2-D, and reduce a gradient transposed). dp: parameters are replicated, so every gradient
  is all-reduced and nothing is gathered (MoE routed tokens included).
  fsdp: every parameter sharded over `fsdp` is all-gathered before use (the token table
  excepted: XLA partitions its row lookup without gathering it), and its gradient is
  reduced: reduce-scatter, or on XLA:CPU all-reduce and a slice."""
  dp, fsdp = steps[family]['dp']['collectives'], steps[family]['fsdp']['collectives']
  params = dp['param_shapes']
  assert not dp['fsdp_sharded'] and len(fsdp['fsdp_sharded']) >= len(params) // 2
  is_form = lambda shape, result: result[1] in forms(shape)
  dp_gathers = results_of(dp['collectives'], 'all-gather', 'reduce-scatter')
  gathered_params = [k for k in params if any(is_form(params[k], r) for r in dp_gathers)]
  assert not gathered_params, f'dp gathers parameters: {gathered_params}'
  # MoE capacity dispatch keeps a buffer per batch row, so the routed tokens stay on their
  # device too: nothing at all is gathered, and the experts' gradients are all-reduced.
  assert not dp_gathers, f'dp gathers {dp_gathers}'
  missing = unmatched(params, list(params), results_of(dp['collectives'], 'all-reduce'), is_form)
  assert not missing, f'dp: gradients not all-reduced: {missing}'

  sharded = [k for k in fsdp['fsdp_sharded'] if k != 'embed']
  missing = unmatched(params, sharded, results_of(fsdp['collectives'], 'all-gather'), is_form)
  assert not missing, f'fsdp: parameters not all-gathered: {missing}'
  reduced = lambda shape, r: (r[0] == 'all-reduce' and r[1] in forms(shape)) or (
      r[0] == 'reduce-scatter' and 8 * math.prod(r[1]) == math.prod(shape))
  missing = unmatched(params, sharded,
                      results_of(fsdp['collectives'], 'all-reduce', 'reduce-scatter'), reduced)
  assert not missing, f'fsdp: gradients not reduced: {missing}'


def test_a_layout_the_mesh_cannot_hold_is_one_line():
  mesh = jax.sharding.AbstractMesh((1, 2, 4, 1), rules.MESH_AXES)
  sharding = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  abstract = {'params': {'k': jax.ShapeDtypeStruct((32, 2, 8), jnp.float32)}}
  state_sharding = {'params': {'k': sharding('fsdp', 'tensor', None)}}
  with pytest.raises(ValueError, match=r'^params/k \(32, 2, 8\): dimension 1 \(2\) does not '
                     r'divide by mesh axes tensor = 4; change config.mesh'):
    step_lib.check_divisible(state_sharding, abstract, mesh, batch_size=8)
  with pytest.raises(ValueError, match='train.batch_size=5 does not divide by the batch mesh '
                     'axes data x fsdp x expert = 2'):
    step_lib.check_divisible({}, {}, mesh, batch_size=5)
  step_lib.check_divisible({'params': {'k': sharding('fsdp', None, None)}}, abstract, mesh, 8)


@pytest.mark.parametrize('family', ['deepseek_v3', 'deepseek_v3_dropless'])
def test_fsdp_ep_moves_tokens_not_experts(steps, family):
  """Under fsdp_ep each device keeps its share of the routed experts: they are never gathered
  whole (capacity dispatch gathers them over `fsdp` only: E / 4 experts of full width); the
  tokens travel instead."""
  report = steps[family]['fsdp_ep']['collectives']
  params = report['param_shapes']
  experts = [k for k in params if re.search(r'\dE/op/w[iuo]$', k)]
  assert experts
  gathers = results_of(report['collectives'], 'all-gather')
  whole = [k for k in experts if any(r[1] in forms(params[k]) for r in gathers)]
  assert not whole, f'{family} under fsdp_ep gathers whole expert weights: {whole}'
  if family == 'deepseek_v3':  # capacity dispatch: each device runs its 2 experts, full width
    local = [k for k in experts if (params[k][0] // 4, *params[k][1:]) in {r[1] for r in gathers}]
    assert local == experts, f'experts not gathered over fsdp: {set(experts) - set(local)}'
