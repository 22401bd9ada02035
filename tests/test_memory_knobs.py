"""Memory knobs give the same model: rematerialisation policies, layer scan on or off, and
float32 master weights with bfloat16 compute (one device; the sharded cases are in
tests/test_sharding.py)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import lm
from tests import sharding_worker
from tests.conftest import next_token_objective
from tests.conftest import packed_batch
from tests.conftest import tiny_model_config

VOCAB = 260
# Dense (llama) and MoE with the aux-loss-free routing bias, a mutable collection that
# remat and scan must carry (2 repeats of the unit, so the scanned model really scans).
MODELS = {
    'llama': dict(pattern='AFAF'),
    'moe': {'pattern': 'AEAE', 'moe.num_experts': 4, 'moe.expert_mlp_dim': 32,
            'moe.bias_update_rate': 1e-3, 'moe.dispatch': 'capacity'},
    # The linear-time mixers, chunks of 8 so the 16-token rows cross a chunk boundary (their
    # chunk loops and carried states are what remat and scan must replay).
    'mixers': {'pattern': 'GMGM', 'deltanet.chunk': 8, 'mamba.chunk': 8,
               'mamba.head_dim': 8, 'mamba.state_dim': 8},
}
BF16_TOLERANCE = 2e-2  # relative, on the loss: bfloat16 keeps 8 bits of mantissa


def model_config(name, **overrides):
  fields = {'d_model': 32, 'num_heads': 4, 'num_kv_heads': 2, 'mlp_dim': 64, 'scan_layers': True,
            **MODELS[name], **overrides}
  return tiny_model_config('llama_tiny', **fields)


@functools.lru_cache(maxsize=None)
def batch():
  tokens_BT, positions_BT, segments_BT = packed_batch(jax.random.key(0), 4, 16, VOCAB)
  return {'inputs': tokens_BT, 'targets': jnp.roll(tokens_BT, -1, 1), 'positions': positions_BT,
          'segment_ids': segments_BT, 'weights': jnp.ones(tokens_BT.shape, jnp.float32)}


def init_variables(config, shapes_only=False):
  """The model's variables, initialised by one jitted program (op by op is much slower);
  `shapes_only`: their shapes and dtypes only (jax.eval_shape, nothing compiled)."""
  b = batch()
  model = models.build(config)
  init = lambda: nn.meta.unbox(model.init(jax.random.key(1), b['inputs'],
                                          positions_BT=b['positions'],
                                          segment_ids_BT=b['segment_ids']))
  return jax.eval_shape(init) if shapes_only else jax.jit(init)()


def unrolled_to_scanned(tree, repeats):
  """block_0 .. block_{r-1} stacked into `blocks`, the scanned layout (every collection)."""
  out = {k: v for k, v in tree.items() if not k.startswith('block_')}
  out['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[f'block_{r}'] for r in range(repeats)])
  return out


def loss_and_grads(config, variables):
  """Loss, gradients and the updated collections of one training forward/backward, jitted."""
  model = models.build(config)
  collections = {k: v for k, v in variables.items() if k != 'params'}

  def loss_fn(params):
    loss, _, new = next_token_objective(VOCAB)(model, params, batch(), jax.random.key(0),
                                               collections=collections,
                                               update_collections=bool(collections))
    return loss, new

  (loss, new), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  return float(loss), grads, new


def max_rel(a, b):
  """max over leaves of |a - b| / |b| in 2-norms."""
  return max(float(jnp.linalg.norm((x - y).astype(jnp.float32)) / jnp.linalg.norm(y.astype(jnp.float32)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@functools.lru_cache(maxsize=None)
def reference(name):
  """The unrolled model without remat in float32: its variables, loss, grads, collections."""
  config = model_config(name, scan_layers=False)
  variables = init_variables(config)
  return variables, loss_and_grads(config, variables)


def test_remat_policies_cover_the_standard_ones():
  assert {'none', 'full', 'save_dots', 'save_dots_no_batch'} <= set(lm.REMAT_POLICIES)
  with pytest.raises(ValueError, match="model.remat='nope' is not one of"):
    models.build(model_config('llama', remat='nope'))


# Against the unrolled model without remat: every policy on llama, scan on its own and with
# remat; the MoE model (a mutable routing bias the step updates) scanned, without and with
# remat, which must carry the collection through both; G and M scanned under the policy that
# replays everything and the one that keeps the dots (their chunk loops replayed two ways).
CASES = [('llama', 'none', True), ('llama', 'full', False), ('llama', 'full', True),
         ('llama', 'save_dots', True), ('llama', 'save_dots_no_batch', False),
         ('moe', 'none', True), ('moe', 'full', True)] + [
             ('mixers', remat, True) for remat in ('full', 'save_dots')]


@pytest.mark.parametrize('name,remat,scan', CASES)
def test_remat_and_scan_give_the_reference_loss_and_gradients(name, remat, scan):
  variables, (ref_loss, ref_grads, ref_collections) = reference(name)
  config = model_config(name, remat=remat, scan_layers=scan)
  _, repeats = lm.split_pattern(config.pattern)
  if scan:
    variables = {c: unrolled_to_scanned(tree, repeats) for c, tree in variables.items()}
  loss, grads, collections = loss_and_grads(config, variables)
  assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
  if scan:
    ref_grads = unrolled_to_scanned(ref_grads, repeats)
    ref_collections = {k: unrolled_to_scanned(v, repeats) for k, v in ref_collections.items()}
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  assert max_rel(grads, ref_grads) <= 1e-5
  if ref_collections:  # the MoE routing bias moved, the same way
    assert max_rel(collections, ref_collections) <= 1e-5


def test_remat_policies_trade_memory_as_named():
  """XLA's temporary buffers of the gradient step: full < save_dots(_no_batch) < none."""
  temp = {}
  for remat in lm.REMAT_POLICIES:
    config = model_config('llama', remat=remat, d_model=64, mlp_dim=256)
    variables = init_variables(config, shapes_only=True)
    model = models.build(config)

    def loss_fn(params):
      return next_token_objective(VOCAB)(model, params, batch(), None)[0]  # pylint: disable=cell-var-from-loop

    compiled = jax.jit(jax.grad(loss_fn)).lower(variables['params']).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temp['full'] < temp['save_dots_no_batch'] < temp['none'], temp
  assert temp['full'] < temp['save_dots'] < temp['none'], temp


@pytest.mark.parametrize('param_dtype', ['float32'])
def test_bfloat16_compute_gives_the_float32_loss_within_tolerance(param_dtype):
  variables, (ref_loss, ref_grads, _) = reference('llama')
  low = model_config('llama', scan_layers=False, dtype='bfloat16', param_dtype=param_dtype)
  low_variables = init_variables(low, shapes_only=True)
  assert {x.dtype for x in jax.tree.leaves(low_variables)} == {jnp.dtype(param_dtype)}
  variables = jax.tree.map(lambda x: x.astype(param_dtype), variables)  # the same weights
  model = models.build(low)
  jaxpr = str(jax.make_jaxpr(lambda p: next_token_objective(VOCAB)(model, p, batch(), None)[0])(
      variables['params']))
  assert 'dot_general' in jaxpr and 'bf16[' in jaxpr  # the matmuls really run in bfloat16
  loss, grads, _ = loss_and_grads(low, variables)
  assert loss != ref_loss and abs(loss - ref_loss) <= BF16_TOLERANCE * ref_loss, (loss, ref_loss)
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(param_dtype)}
  assert max_rel(jax.tree.map(lambda g: g.astype(jnp.float32), grads), ref_grads) <= 0.1


def test_training_step_keeps_float32_master_weights_under_bfloat16_compute(tmp_path):
  """One step of the real loop: parameters and optimizer state stay float32, loss close."""
  corpus = sharding_worker.write_corpus(str(tmp_path / 'corpus'))
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = sharding_worker.family_config('llama', corpus, **{'model.dtype': dtype})
    _, init, new, metrics, _ = sharding_worker.one_step(config, jax.devices()[:1], str(tmp_path))
    assert {x.dtype for x in jax.tree.leaves(new['params'])} == {np.dtype('float32')}, dtype
    results[dtype] = float(metrics['loss'])
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new['params'], init['params'])
    assert min(jax.tree.leaves(moved)) > 0, dtype
  assert abs(results['bfloat16'] - results['float32']) <= BF16_TOLERANCE * results['float32'], results
