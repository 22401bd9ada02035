"""MoBA `B` (models/layers/moba.py): block-sparse attention against its references.

Tier 3: with topk x block >= the row, `B` (both implementations) equals plain causal
attention `A` on the same parameters; the O(T k C) gather path equals the masked dense
reference in values and gradients while selection matters; both equal a numpy transcription
of the definition (per-document blocks, per-head top-k by q . mean key, the own block
causal). Tier 4: a packed row equals each document alone; prefill + one token a step equals
the full forward.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import errors
import models
from models import lm
from models.layers import attention
from models.layers import moba
from tests.conftest import packed_batch
from tests.conftest import prefill_then_decode
from tests.conftest import tiny_model_config

T = 37


def _cfg(**fields):
  return tiny_model_config('moba_tiny', **{'pattern': 'BF', 'moba.block': 4, 'moba.topk': 2,
                                           'moba.query_block': 16, **fields})


@pytest.fixture(scope='module')
def layer_setup():
  """One `B` sublayer's variables (GQA: 4 heads, 2 kv heads) and a packed input: 2 rows of
  37 tokens, the second two documents of 20 and 17 (blocks of 4 restart at the second)."""
  cfg = _cfg()
  x_BTD = jax.random.normal(jax.random.key(0), (2, T, cfg.d_model))
  seg_BT = jnp.asarray([[1] * T, [1] * 20 + [2] * 17], jnp.int32)
  pos_BT = jnp.asarray([list(range(T)), list(range(20)) + list(range(17))], jnp.int32)
  variables = nn.meta.unbox(moba.BlockSparseAttention(cfg).init(
      jax.random.key(1), x_BTD, positions_BT=pos_BT, segment_ids_BT=seg_BT))
  # Larger q and k weights spread the affinities, so no selection is near a tie.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 8 if jax.tree_util.keystr(path)[-3:] in ("'q']", "'k']") else v, variables)
  return cfg, variables, x_BTD, pos_BT, seg_BT


def _apply(cfg, variables, x_BTD, pos_BT, seg_BT):
  return moba.BlockSparseAttention(cfg).apply(variables, x_BTD, positions_BT=pos_BT,
                                              segment_ids_BT=seg_BT)[0]


def test_full_coverage_equals_dense_causal_attention(layer_setup):
  """topk=10 blocks of 4 >= 37 rows: gather and dense `B` == `A` (the same q, k, v, o) on
  the packed rows, within 1e-6; topk=2 differs."""
  cfg, variables, x_BTD, pos_BT, seg_BT = layer_setup
  want_BTD = attention.Attention(_cfg(pattern='AF')).apply(
      variables, x_BTD, positions_BT=pos_BT, segment_ids_BT=seg_BT)[0]
  for impl in moba.IMPLS:
    got_BTD = _apply(_cfg(**{'moba.topk': 10, 'moba.impl': impl}), variables, x_BTD, pos_BT, seg_BT)
    np.testing.assert_allclose(got_BTD, want_BTD, atol=1e-6, err_msg=impl)
  partial_BTD = _apply(cfg, variables, x_BTD, pos_BT, seg_BT)
  assert float(jnp.abs(partial_BTD - want_BTD).max()) > 1e-3, 'topk=2 should change the output'


def test_gather_equals_the_dense_reference_in_values_and_gradients(layer_setup):
  """impl=gather (query blocks of 16 rows, the last one padded) == impl=dense at topk=2 of
  up to 9 earlier blocks: outputs and every parameter's and the input's gradient within 1e-5."""
  cfg, variables, x_BTD, pos_BT, seg_BT = layer_setup
  r_BTD = jax.random.normal(jax.random.key(3), x_BTD.shape)

  def grads(impl):
    c = _cfg(**{'moba.impl': impl})
    fn = lambda v, x: jnp.sum(_apply(c, v, x, pos_BT, seg_BT) * r_BTD)
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(variables, x_BTD)

  (l_g, g_g), (l_d, g_d) = grads('gather'), grads('dense')
  np.testing.assert_allclose(l_g, l_d, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_g), jax.tree.leaves(g_d)):
    scale = float(jnp.abs(b).max())
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a / scale, b / scale, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def _numpy_moba(q, k, v, pos, seg, block, topk, scale):
  """The definition, one query head at a time, in float64."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    for ti in range(t):
      if seg[bi, ti] == 0:
        continue
      doc = np.flatnonzero((seg[bi] == seg[bi, ti]) & (pos[bi] <= pos[bi, ti]))  # visible keys
      own = pos[bi, ti] // block
      for ni in range(n):
        kh = ni // g
        blocks = {j: doc[pos[bi, doc] // block == j] for j in range(own + 1)}
        affinity = {j: q[bi, ti, ni] @ k[bi, rows, kh].mean(0) for j, rows in blocks.items()
                    if j < own}
        chosen = sorted(affinity, key=affinity.get, reverse=True)[:topk] + [own]
        rows = np.concatenate([blocks[j] for j in chosen])
        logits = q[bi, ti, ni] @ k[bi, rows, kh].T * scale
        p = np.exp(logits - logits.max())
        out[bi, ti, ni] = (p / p.sum()) @ v[bi, rows, kh]
  return out


def test_both_paths_follow_a_numpy_transcription():
  """Random q, k, v (GQA 4 over 2), blocks of 3, topk=2, rows of 23 packed as 13 + 10 tokens
  and one row with 3 leading padding tokens: gather_core and dense_core == numpy within 1e-5."""
  b, t, n, kh, h, block, topk = 2, 23, 4, 2, 8, 3, 2
  keys = jax.random.split(jax.random.key(5), 3)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k = jax.random.normal(keys[1], (b, t, kh, h))
  v = jax.random.normal(keys[2], (b, t, kh, h))
  seg = np.asarray([[1] * 13 + [2] * 10, [0] * 3 + [1] * 20], np.int32)
  pos = np.asarray([list(range(13)) + list(range(10)), [0] * 3 + list(range(20))], np.int32)
  want = _numpy_moba(*(np.asarray(a, np.float64) for a in (q, k, v)), pos, seg, block, topk, 0.3)
  shared = dict(block=block, topk=topk, scale=0.3)
  mean = moba.block_means(k, jnp.asarray(pos), jnp.asarray(seg), block)
  rows = jnp.broadcast_to(jnp.arange(t), (b, t))
  got_gather, = moba.gather_core(q, k, v, mean, rows, jnp.asarray(pos), jnp.asarray(seg), **shared)
  got_dense = moba.dense_core(q, k, v, *(jnp.asarray(a) for a in (pos, seg, pos, seg)), **shared)
  np.testing.assert_allclose(got_gather, want, atol=1e-5)
  np.testing.assert_allclose(got_dense, want, atol=1e-5)
  full = _numpy_moba(*(np.asarray(a, np.float64) for a in (q, k, v)), pos, seg, block, 99, 0.3)
  assert np.abs(full - want).max() > 1e-2, 'topk=2 should change the output'


def test_packed_documents_equal_each_alone(layer_setup):
  """Blocks restart with each document and never cross one: the second row's two documents
  (20 + 17 tokens, the boundary inside a block of rows) give each document's outputs alone."""
  cfg, variables, x_BTD, pos_BT, seg_BT = layer_setup
  apply = lambda x, p, s: _apply(cfg, variables, x, p, s)
  packed = apply(x_BTD[1:], pos_BT[1:], seg_BT[1:])
  first = apply(x_BTD[1:, :20], pos_BT[1:, :20], jnp.ones((1, 20), jnp.int32))
  second = apply(x_BTD[1:, 20:], pos_BT[1:, 20:], jnp.ones((1, 17), jnp.int32))
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-5)


def test_prefill_then_decode_equals_the_full_forward():
  """Two scanned `BF` blocks (blocks of 4, topk=2) over 19-token rows, left padding in one:
  a prefill of 10 tokens then one token a step == the full forward (<= 1e-4), each step
  selecting over the block means of the cache's running key sums, which equal the sums of
  the cached keys."""
  b, t = 2, 19
  cfg = _cfg(pattern='BF' * 2, scan_layers=True)
  model = models.build(cfg)
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(1), b, t, 260, num_segments=1)
  seg_BT = seg_BT.at[1, :3].set(0)
  pos_BT = pos_BT.at[1].set(jnp.maximum(pos_BT[1] - 3, 0))
  variables = nn.meta.unbox(model.init(jax.random.key(0), tokens_BT, positions_BT=pos_BT,
                                       segment_ids_BT=seg_BT))
  full_BTV = jax.jit(lambda v: model.apply(v, tokens_BT, positions_BT=pos_BT,
                                           segment_ids_BT=seg_BT)[0])(variables)
  apply = jax.jit(lambda x, p, s, c: model.apply(variables, x, positions_BT=p, segment_ids_BT=s,
                                                 cache=c))
  cache = lm.init_cache(model.cfg, b, t)
  assert cache['blocks']['0B']['k_BSKH'].shape == (2, b, t, cfg.num_kv_heads, 16)
  got_BTV, cache = prefill_then_decode(apply, cache, tokens_BT, pos_BT, seg_BT, 10)
  real = np.asarray(seg_BT)[..., None] > 0
  err = float(jnp.max(jnp.abs(jnp.where(real, got_BTV - full_BTV, 0))))
  assert err <= 1e-4, f'prefill + decode differs by {err:.2e}'
  # Row 0's 5 blocks start at rows 0, 4, .. 16 (slots 0 .. 4); row 1's 4, after 3 rows of
  # padding, at rows 3, 7, 11, 15 (slots 0 .. 3): the slots hold the sums of the cached keys.
  layer = jax.tree.map(lambda a: a[1], cache['blocks']['0B'])  # the second scanned layer
  by_row_BSKH = moba.block_means(layer['k_BSKH'], layer['pos_BS'], layer['seg_BS'], 4) * 4
  want_BAKH = jnp.stack([by_row_BSKH[0, 0::4], jnp.concatenate(
      [by_row_BSKH[1, 3::4], jnp.zeros_like(by_row_BSKH[1, :1])])])
  assert layer['ksum_BAKH'].shape == (b, 19 // 4 + 2, cfg.num_kv_heads, 16)
  assert float(jnp.max(jnp.abs(want_BAKH))) > 1
  np.testing.assert_allclose(layer['ksum_BAKH'][:, :5], want_BAKH, atol=1e-5, rtol=1e-5)
  assert not np.any(layer['ksum_BAKH'][:, 5:])


def test_flops_per_token_match_xla_in_one_query_block():
  """Analytic forward FLOPs of one `B` sublayer (gather path) within 15% of XLA's count on a
  row of one query block (128 rows, blocks of 16, topk=3: 64 keys a query)."""
  cfg = _cfg(**{'moba.block': 16, 'moba.topk': 3, 'moba.query_block': 128})
  layer = moba.BlockSparseAttention(cfg)
  t = 128
  x_BTD = jnp.ones((1, t, cfg.d_model))
  seg_BT = jnp.ones((1, t), jnp.int32)
  pos_BT = jnp.arange(t)[None]
  variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), x_BTD, positions_BT=pos_BT,
                                                segment_ids_BT=seg_BT))
  fn = jax.jit(lambda v, x: layer.apply(v, x, positions_BT=pos_BT, segment_ids_BT=seg_BT)[0])
  cost = fn.lower(variables, x_BTD).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ratio = moba.BlockSparseAttention.flops_per_token(cfg, t) * t / cost['flops']
  print(f'B flops: analytic / XLA = {ratio:.3f}')
  assert 0.85 <= ratio <= 1.15, ratio


@pytest.mark.parametrize('field,value,message', [
    ('attention.kind', 'mla', "'B' \\(MoBA\\) runs over MHA/GQA only"),
    ('moba.block', 0, 'model.moba.block=0 must be >= 1'),
    ('moba.topk', 0, 'model.moba.topk=0 must be >= 1'),
    ('moba.impl', 'flash', "model.moba.impl='flash' is not one of"),
    ('attention.sinks', True, "attention.sinks=True is not supported by 'B'"),
    ('bidirectional', True, "'B' \\(BlockSparseAttention\\), which is causal only"),
])
def test_bad_fields_are_one_line(field, value, message):
  with pytest.raises(errors.ConfigError, match=message):
    models.build(_cfg(**{field: value}))
