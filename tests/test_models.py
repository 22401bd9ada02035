"""Model tests: option sweep, references for attention and RoPE, decode and packing consistency."""


import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import lm
from models.layers import attention
from models.layers import positions
from tests.conftest import packed_batch, pairwise, tiny_model_config


def init_and_apply(config, tokens_BT, positions_BT, segment_ids_BT, seed=0):
  """Jitted: run op by op, a tiny model's init and forward compile some 200 primitives."""
  model = models.build(config)
  params = jax.jit(lambda r, x, p, s: nn.meta.unbox(model.init(
      r, x, positions_BT=p, segment_ids_BT=s)['params']))(
          jax.random.key(seed), tokens_BT, positions_BT, segment_ids_BT)
  logits_BTV, aux, _ = jax.jit(lambda v, x, p, s: model.apply(
      v, x, positions_BT=p, segment_ids_BT=s))({'params': params}, tokens_BT, positions_BT,
                                               segment_ids_BT)
  return model, params, logits_BTV, aux


# Every pair of levels of two options in some row (tests/conftest.pairwise): 9 rows, not 72.
SWEEP = [tuple(row.values()) for row in pairwise(dict(
    preset=['gpt2_tiny', 'llama_tiny'], scan=[True, False], position=['rope', 'learned', 'none'],
    norm=['rmsnorm', 'layernorm'], activation=['swiglu', 'gelu', 'relu2']))]


@pytest.mark.parametrize('preset,scan,position,norm,activation', SWEEP)
def test_option_sweep_shapes_finite_and_gradients(preset, scan, position, norm, activation):
  config = tiny_model_config(preset, scan_layers=scan, position=position, norm=norm,
                             mlp_activation=activation)
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(1), 2, 16, 260)
  model, params, logits_BTV, _ = init_and_apply(config, tokens_BT, pos_BT, seg_BT)
  assert logits_BTV.shape == (2, 16, 260)
  assert logits_BTV.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits_BTV)))

  def loss(p):
    out, _, _ = model.apply({'params': p}, tokens_BT, positions_BT=pos_BT, segment_ids_BT=seg_BT)
    return jnp.mean(jax.nn.logsumexp(out, -1) - jnp.take_along_axis(out, tokens_BT[..., None], -1)[..., 0])

  grads = jax.jit(jax.grad(loss))(params)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(norms) > 0


def naive_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale):
  """Per-head loops in numpy, kv heads repeated: an independent reference for GQA."""
  q, k, v, mask = (np.asarray(a, np.float64) for a in (q_BTNH, k_BSKH, v_BSKH, mask_BTS))
  b, t, n, h = q.shape
  group = n // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for head in range(n):
      kh, vh = k[bi, :, head // group], v[bi, :, head // group]
      logits = q[bi, :, head] @ kh.T * scale
      logits = np.where(mask[bi] > 0, logits, -np.inf)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[bi, :, head] = probs @ vh
  return out


@pytest.mark.parametrize('impl', ['xla', 'dot_product'])
@pytest.mark.parametrize('num_heads,num_kv_heads', [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_naive_reference(impl, num_heads, num_kv_heads):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 12, num_heads, 8))
  k = jax.random.normal(keys[1], (2, 12, num_kv_heads, 8))
  v = jax.random.normal(keys[2], (2, 12, num_kv_heads, 8))
  _, pos_BT, seg_BT = packed_batch(keys[0], 2, 12, 10, num_segments=3)
  mask = attention.attention_mask(pos_BT, seg_BT, pos_BT, seg_BT, causal=True)
  fn = attention.dot_attention if impl == 'xla' else attention.library_attention
  got = fn(q, k, v, mask, 8 ** -0.5)
  np.testing.assert_allclose(got, naive_attention(q, k, v, mask, 8 ** -0.5), atol=1e-5)


@pytest.mark.parametrize('impl', ['xla', 'dot_product'])
@pytest.mark.parametrize('length,block', [(16, 4), (16, 8), (12, 5)])
def test_causal_blocks_equal_dense_attention(impl, length, block):
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (2, length, 4, 8))
  k = jax.random.normal(keys[1], (2, length, 2, 8))
  v = jax.random.normal(keys[2], (2, length, 2, 8))
  _, pos_BT, seg_BT = packed_batch(keys[0], 2, length, 10, num_segments=3)
  mask = attention.attention_mask(pos_BT, seg_BT, pos_BT, seg_BT, causal=True)
  fn = attention.dot_attention if impl == 'xla' else attention.library_attention
  got = attention.causal_blocks(fn, q, k, v, mask, 0.3, block)
  np.testing.assert_allclose(got, naive_attention(q, k, v, mask, 0.3), atol=1e-5)


def test_rope_dot_products_depend_only_on_relative_position():
  keys = jax.random.split(jax.random.key(0), 2)
  q = jax.random.normal(keys[0], (1, 1, 1, 16))
  k = jax.random.normal(keys[1], (1, 1, 1, 16))
  def score(pq, pk):
    rq = positions.apply_rope(q, jnp.array([[pq]]), 10000.0)
    rk = positions.apply_rope(k, jnp.array([[pk]]), 10000.0)
    return float(jnp.sum(rq * rk))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)
  # Position 0 is the identity.
  np.testing.assert_allclose(positions.apply_rope(q, jnp.zeros((1, 1), jnp.int32), 1e4), q, atol=1e-6)


@pytest.mark.parametrize('preset', ['gpt2_tiny', 'llama_tiny'])
@pytest.mark.parametrize('scan', [True, False])
def test_prefill_plus_decode_equals_full_forward(preset, scan):
  config = tiny_model_config(preset, scan_layers=scan)
  b, t = 2, 12
  tokens_BT = jax.random.randint(jax.random.key(3), (b, t), 0, 260)
  pos_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg_BT = jnp.ones((b, t), jnp.int32)
  model, params, full_BTV, _ = init_and_apply(config, tokens_BT, pos_BT, seg_BT)
  cache = lm.init_cache(model.cfg, b, t)
  apply = jax.jit(lambda c, x, p, s: model.apply({'params': params}, x, positions_BT=p,
                                                 segment_ids_BT=s, cache=c))
  prefill = 5
  out_BTV, _, cache = apply(cache, tokens_BT[:, :prefill], pos_BT[:, :prefill], seg_BT[:, :prefill])
  outs = [out_BTV]
  for i in range(prefill, t):
    out_BTV, _, cache = apply(cache, tokens_BT[:, i:i + 1], pos_BT[:, i:i + 1], seg_BT[:, i:i + 1])
    outs.append(out_BTV)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full_BTV, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('preset,causal_block', [('gpt2_tiny', 0), ('llama_tiny', 4)])
def test_packed_documents_do_not_see_each_other(preset, causal_block):
  config = tiny_model_config(preset, **{'attention.causal_block': causal_block})
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(5), 1, 16, 260, num_segments=2)
  model, params, packed_BTV, _ = init_and_apply(config, tokens_BT, pos_BT, seg_BT)
  apply = jax.jit(lambda x, p, s: model.apply({'params': params}, x, positions_BT=p,
                                              segment_ids_BT=s)[0])
  for seg in (1, 2):
    cols = np.nonzero(np.asarray(seg_BT[0]) == seg)[0]
    alone_BTV = apply(tokens_BT[:, cols], pos_BT[:, cols], jnp.ones_like(seg_BT[:, cols]))
    np.testing.assert_allclose(packed_BTV[:, cols], alone_BTV, atol=1e-5)


def test_scan_and_unrolled_layers_compute_the_same_function():
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(2), 2, 8, 260)
  scanned, params, scanned_BTV, _ = init_and_apply(tiny_model_config(scan_layers=True), tokens_BT, pos_BT, seg_BT)
  unrolled = models.build(tiny_model_config(scan_layers=False))
  flat = dict(params)
  blocks = flat.pop('blocks')
  for r in range(2):
    flat[f'block_{r}'] = jax.tree.map(lambda a, r=r: a[r], blocks)
  unrolled_BTV = jax.jit(lambda v: unrolled.apply(v, tokens_BT, positions_BT=pos_BT,
                                                  segment_ids_BT=seg_BT)[0])({'params': flat})
  np.testing.assert_allclose(unrolled_BTV, scanned_BTV, atol=1e-5)


def test_parameters_carry_logical_axis_names():
  config = tiny_model_config('llama_tiny', scan_layers=True)
  model = models.build(config)
  dummy = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, positions_BT=dummy,
                                            segment_ids_BT=dummy + 1))['params']
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(boxed))
  assert all(spec is not None and len(spec) > 0 for spec in specs.values()), specs
  assert specs[('blocks', '0A', 'op', 'q')] == jax.sharding.PartitionSpec('layers', 'embed', 'heads', 'head_dim')
  assert specs[('embed',)] == jax.sharding.PartitionSpec('vocab', 'embed')


@pytest.mark.parametrize('field,value,message', [
    ('num_kv_heads', 3, 'model.num_heads=4 must be a positive multiple of model.num_kv_heads=3'),
    ('pattern', 'AFX', "unknown sublayer(s) ['X']"),
    ('position', 'alibi', "model.position='alibi'"),
    ('mlp_activation', 'tanh', "model.mlp_activation='tanh'"),
    ('attention.impl', 'flashy', "model.attention.impl='flashy'"),
    ('num_heads', 3, 'model.d_model=64 is not divisible by model.num_heads=3'),
])
def test_bad_model_config_is_one_clear_line(field, value, message):
  with pytest.raises(ValueError) as err:
    models.build(tiny_model_config(**{field: value}))
  assert message in str(err.value) and '\n' not in str(err.value)


def test_registry_refuses_duplicates():
  with pytest.raises(ValueError, match="'A' is already taken"):
    models.register_sublayer('A')(type('Other', (), {}))
  with pytest.raises(ValueError, match='already registered'):
    models.register_model('lm')(lambda cfg: None)
  with pytest.raises(ValueError, match='model.name'):
    models.build(tiny_model_config(name='nope'))


def test_split_pattern():
  assert lm.split_pattern('AFAFAF') == ('AF', 3)
  assert lm.split_pattern('AFAE') == ('AFAE', 1)
  assert lm.split_pattern('A') == ('A', 1)


# Every preset's prefill + decode: tests/test_decode.py; its training step under every sharding
# preset: tests/test_sharding.py.
