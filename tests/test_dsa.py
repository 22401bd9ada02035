"""DSA `S` (models/layers/dsa.py): the lightning indexer and top-k attention against their
references.

Tier 3 (a sparse attention against dense attention): with topk >= the row, `S` equals MLA
`A` on the same parameters; the O(T k) gather path equals the masked dense reference in values
and gradients (KL included) while selection matters; the indexer's scores and selection equal
a numpy transcription of the definition. Tier 4: prefill + one token a step equals the full
forward; a packed row equals each document alone. Hugging Face parity (deepseek_v32) is in
tests/test_hf_deepseek_v32.py.
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
from models.layers import dsa
from tests.conftest import packed_batch
from tests.conftest import prefill_then_decode
from tests.conftest import tiny_model_config

T = 37


def _cfg(**fields):
  return tiny_model_config('deepseek_v3_tiny', **{'pattern': 'SF', 'dsa.topk': 5, 'dsa.block': 16, 'dsa.index_heads': 4,
                              'dsa.index_head_dim': 16, 'moe.dispatch': 'dense', **fields})


@pytest.fixture(scope='module')
def layer_setup():
  """One `S` sublayer's variables (indexer weights scaled up so selection is far from
  ties) and a packed input: 2 rows of 37 tokens, the second row two documents."""
  cfg = _cfg()
  layer = dsa.DSAttention(cfg)
  x_BTD = jax.random.normal(jax.random.key(0), (2, T, cfg.d_model))
  seg_BT = jnp.asarray([[1] * T, [1] * 20 + [2] * 17], jnp.int32)
  pos_BT = jnp.asarray([list(range(T)), list(range(20)) + list(range(17))], jnp.int32)
  variables = jax.jit(lambda x: nn.meta.unbox(layer.init(
      jax.random.key(1), x, positions_BT=pos_BT, segment_ids_BT=seg_BT)))(x_BTD)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 30 if 'indexer' in jax.tree_util.keystr(path) and v.ndim > 1 else v,
      variables)
  return cfg, variables, x_BTD, pos_BT, seg_BT


def _apply(cfg, variables, x_BTD, pos_BT, seg_BT):
  return dsa.DSAttention(cfg).apply(variables, x_BTD, positions_BT=pos_BT, segment_ids_BT=seg_BT)


def test_gather_equals_the_dense_reference_in_values_and_gradients(layer_setup):
  """impl=gather (O(T k): blocks of 16 rows, the last one padded) == impl=dense (the T x S
  masked softmax), outputs, indexer KL and gradients of every parameter within 1e-5, with
  topk=5 < the row, where selection changes the output."""
  cfg, variables, x_BTD, pos_BT, seg_BT = layer_setup
  r_BTD = jax.random.normal(jax.random.key(3), x_BTD.shape)

  def loss(v, impl, topk=5):
    c = _cfg(**{'dsa.impl': impl, 'dsa.topk': topk})
    y_BTD, aux, _ = _apply(c, v, x_BTD, pos_BT, seg_BT)
    return jnp.sum(y_BTD * r_BTD) + 10 * aux['loss/indexer_kl'], (y_BTD, aux)

  (l_g, (y_g, aux_g)), g_g = jax.jit(jax.value_and_grad(lambda v: loss(v, 'gather'), has_aux=True))(variables)
  (l_d, (y_d, aux_d)), g_d = jax.jit(jax.value_and_grad(lambda v: loss(v, 'dense'), has_aux=True))(variables)
  np.testing.assert_allclose(y_g, y_d, atol=1e-5)
  np.testing.assert_allclose(aux_g['dsa/kl'], aux_d['dsa/kl'], rtol=1e-5, atol=1e-7)
  assert float(aux_g['dsa/kl']) > 1e-3  # the KL is live
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_g), jax.tree.leaves(g_d)):
    scale = float(jnp.abs(b).max()) + 1e-6
    np.testing.assert_allclose(a / scale, b / scale, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  indexer_grads = [g for p, g in jax.tree_util.tree_leaves_with_path(g_g)
                   if 'indexer' in jax.tree_util.keystr(p)]
  assert indexer_grads and all(float(jnp.abs(g).max()) > 0 for g in indexer_grads)
  y_all = jax.jit(lambda v: loss(v, 'gather', topk=T)[1][0])(variables)
  assert float(jnp.abs(y_all - y_g).max()) > 1e-3, 'topk=5 should change the output'


def test_the_lm_loss_does_not_train_the_indexer(layer_setup):
  """The indexer's inputs are detached and selection is discrete: with kl_weight=0 its
  gradients are zero, and the KL's gradient reaches no parameter outside the indexer."""
  cfg, variables, x_BTD, pos_BT, seg_BT = layer_setup

  def grads(part):
    def f(v):
      y_BTD, aux, _ = _apply(cfg, v, x_BTD, pos_BT, seg_BT)
      return jnp.sum(y_BTD ** 2) if part == 'lm' else aux['loss/indexer_kl']
    return jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(f))(variables))

  for part, inside in (('lm', False), ('kl', True)):
    for path, g in grads(part):
      live = float(jnp.abs(g).max()) > 0
      if ('indexer' in jax.tree_util.keystr(path)) != inside:
        assert not live, (part, jax.tree_util.keystr(path))


def test_indexer_scores_and_selection_follow_the_definition(layer_setup):
  """I[t,s] = sum_j w[t,j] ReLU(q_I[t,j].k_I[s] / sqrt(d_I)), w = x W_w / sqrt(H_I),
  k_I = LayerNorm(x W_k), rotate-half RoPE on the first rope dims, recomputed in numpy from
  the parameters; the top-k per query (causal, same document, min(k, t+1)) holds numpy's top-k scores
  (ties, the ReLU's zeros, may go either way)."""
  cfg, variables, x_BTD, pos_BT, seg_BT = layer_setup
  ps = jax.tree.map(np.asarray, variables['params'])
  x, pos = np.asarray(x_BTD, np.float64), np.asarray(pos_BT)
  q_res = x @ ps['q_a']
  q_res = q_res / np.sqrt(np.mean(q_res ** 2, -1, keepdims=True) + 1e-6) * ps['q_a_norm']['scale']
  iq, iw, ik = dsa.Indexer(cfg).apply({'params': variables['params']['indexer']}, x_BTD,
                                      jnp.asarray(q_res, jnp.float32), pos_BT)
  ps = ps['indexer']
  q = np.einsum('btr,rih->btih', q_res, ps['q'])
  k = x @ ps['k']
  k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6)
  k = k * ps['k_norm']['scale'] + ps['k_norm']['bias']
  rope = dsa.index_rope_dim(cfg)
  inv = 1.0 / cfg.rope_theta ** (np.arange(0, rope, 2) / rope)
  ang = pos[..., None] * inv  # (B, T, rope/2)

  def rot(v, ang):
    a, b = v[..., :rope // 2], v[..., rope // 2:rope]
    c, s = np.cos(ang), np.sin(ang)
    return np.concatenate([a * c - b * s, b * c + a * s, v[..., rope:]], -1)

  q, k = rot(q, ang[:, :, None]), rot(k, ang)
  w = x @ ps['w'] / np.sqrt(cfg.dsa.index_heads)
  dots = np.einsum('btih,bsh->btis', q, k) / np.sqrt(cfg.dsa.index_head_dim)
  scores = np.einsum('bti,btis->bts', w, np.maximum(dots, 0))
  ours = dsa.index_scores(iq, iw, ik)
  np.testing.assert_allclose(ours, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
  seg = np.asarray(seg_BT)
  mask = (seg[:, :, None] == seg[:, None, :]) & (pos[:, :, None] >= pos[:, None, :])
  idx, valid = dsa.select(ours, jnp.asarray(mask), cfg.dsa.topk)
  for b in range(2):
    for t in range(T):
      visible = np.flatnonzero(mask[b, t])
      got = np.asarray(idx[b, t])[np.asarray(valid[b, t])]
      want = np.sort(scores[b, t, visible])[::-1][:cfg.dsa.topk]  # ties (ReLU zeros) either way
      assert set(got) <= set(visible), (b, t)
      np.testing.assert_allclose(np.sort(scores[b, t, got])[::-1], want, rtol=1e-4,
                                 atol=1e-4 * np.abs(scores).max(), err_msg=f'query {b}, {t}')
      assert len(got) == min(cfg.dsa.topk, len(visible))


def test_topk_covering_the_row_equals_mla_attention():
  """topk >= the row: `S` (absorbed form, selection of every visible key) == MLA `A`
  (expanded form) on the same parameters, logits of a packed 2-document row within 1e-5."""
  cfg_s = _cfg(pattern='SF', **{'dsa.topk': 64})
  cfg_a = _cfg(pattern='AF')
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(2), 2, 40, 260)
  model_s = models.build(cfg_s)
  variables = jax.jit(lambda t: nn.meta.unbox(model_s.init(
      jax.random.key(0), t, positions_BT=pos_BT, segment_ids_BT=seg_BT)))(tokens_BT)

  def as_mla(tree):  # the same parameters without the indexer, sublayer '0S' named '0A'
    if not isinstance(tree, dict):
      return tree
    return {k[:-1] + 'A' if k[:-1].isdigit() and k[-1] == 'S' else k: as_mla(v)
            for k, v in tree.items() if k != 'indexer'}

  variables_a = as_mla(variables)
  out_s = jax.jit(lambda v: model_s.apply(v, tokens_BT, positions_BT=pos_BT,
                                          segment_ids_BT=seg_BT)[0])(variables)
  model_a = models.build(cfg_a)
  out_a = jax.jit(lambda v: model_a.apply(v, tokens_BT, positions_BT=pos_BT,
                                          segment_ids_BT=seg_BT)[0])(variables_a)
  np.testing.assert_allclose(out_s, out_a, atol=1e-5)


def test_packed_documents_equal_each_alone(layer_setup):
  """Selection never crosses a document: the second row's two documents (20 + 17 tokens,
  topk=5) give each document's outputs alone."""
  cfg, variables, x_BTD, pos_BT, seg_BT = layer_setup
  apply = jax.jit(lambda x, p, s: _apply(cfg, variables, x, p, s)[0])
  packed = apply(x_BTD[1:], pos_BT[1:], seg_BT[1:])
  first = apply(x_BTD[1:, :20], pos_BT[1:, :20], jnp.ones((1, 20), jnp.int32))
  second = apply(x_BTD[1:, 20:], pos_BT[1:, 20:], jnp.ones((1, 17), jnp.int32))
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-5)


def _decode_matches_full_forward(cfg):
  """Prefill of 11 tokens then one a step over 2 rows of 19 (one left-padded) == the full
  forward (<= 1e-4); returns the cache it started from."""
  b, t = 2, 19
  model = models.build(cfg)
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(1), b, t, 260, num_segments=1)
  seg_BT = seg_BT.at[1, :4].set(0)
  pos_BT = pos_BT.at[1].set(jnp.maximum(pos_BT[1] - 4, 0))
  variables = jax.jit(lambda t: nn.meta.unbox(model.init(
      jax.random.key(0), t, positions_BT=pos_BT, segment_ids_BT=seg_BT)))(tokens_BT)
  full_BTV = jax.jit(lambda v: model.apply(v, tokens_BT, positions_BT=pos_BT,
                                           segment_ids_BT=seg_BT)[0])(variables)
  apply = jax.jit(lambda x, p, s, c: model.apply(variables, x, positions_BT=p, segment_ids_BT=s,
                                                 cache=c))
  cache = lm.init_cache(model.cfg, b, t)
  got_BTV, _ = prefill_then_decode(apply, cache, tokens_BT, pos_BT, seg_BT, 11)
  real = np.asarray(seg_BT)[..., None] > 0
  err = float(jnp.max(jnp.abs(jnp.where(real, got_BTV - full_BTV, 0))))
  assert err <= 1e-4, f'prefill + decode differs by {err:.2e}'
  return cache


def test_prefill_then_decode_equals_the_full_forward():
  """Two scanned `SF` blocks, topk=6 over 19-token rows (left padding in one): a prefill of
  11 tokens then one token a step == the full forward (<= 1e-4), each step selecting top-k
  over the cached indexer keys."""
  cfg = _cfg(pattern='SF' * 2, scan_layers=True, **{'dsa.topk': 6})
  cache = _decode_matches_full_forward(cfg)
  assert cache['blocks']['0S']['k_index_BSH'].shape == (2, 2, 19, cfg.dsa.index_head_dim)


@pytest.mark.parametrize('field,value,message', [
    ('attention.kind', 'linear', "'S' \\(DSA\\) runs over 'mla' or 'mha'"),
    ('dsa.topk', 0, 'model.dsa.topk=0 must be >= 1'),
    ('dsa.index_rope_dim', 5, 'model.dsa.index_rope_dim=5 gives 5 rotated features'),
    ('dsa.index_rope_dim', 40, 'at most model.dsa.index_head_dim=16'),
    ('dsa.stage', 'dense', "model.dsa.stage='dense' is not one of"),
    ('dsa.impl', 'flash', "model.dsa.impl='flash' is not one of"),
    ('attention.sinks', True, "attention.sinks=True is not supported by 'S'"),
    ('bidirectional', True, "'S' \\(DSAttention\\), which is causal only"),
])
def test_bad_fields_are_one_line(field, value, message):
  with pytest.raises(errors.ConfigError, match=message):
    models.build(_cfg(**{field: value}))


def _gqa_cfg(**fields):
  """`S` over GQA: llama_tiny's attention (4 query heads on 2 kv heads, QK-norm off)."""
  return tiny_model_config('llama_tiny', **{
      'pattern': 'SF', 'attention.kind': 'mha', 'dsa.topk': 5, 'dsa.block': 16,
      'dsa.index_heads': 4, 'dsa.index_head_dim': 16, **fields})


def test_over_gqa_topk_covering_the_row_equals_attention():
  """`attention.kind='mha'`: with topk >= the row `S` is `A` on `A`'s parameters (logits of a
  packed 2-document row within 1e-5), and a topk of 5 changes them."""
  cfg_s = _gqa_cfg(**{'dsa.topk': 64})
  assert lm.sublayer_class(cfg_s, 'S') is dsa.DSAGQAttention
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(2), 2, 40, 260)
  model_s = models.build(cfg_s)
  variables = jax.jit(lambda t: nn.meta.unbox(model_s.init(
      jax.random.key(0), t, positions_BT=pos_BT, segment_ids_BT=seg_BT)))(tokens_BT)

  def as_attention(tree):  # without the indexer, sublayer '0S' named '0A'
    if not isinstance(tree, dict):
      return tree
    return {k[:-1] + 'A' if k[:-1].isdigit() and k[-1] == 'S' else k: as_attention(v)
            for k, v in tree.items() if k != 'indexer'}

  logits = lambda cfg, v: jax.jit(lambda v: models.build(cfg).apply(
      v, tokens_BT, positions_BT=pos_BT, segment_ids_BT=seg_BT)[0])(v)
  out_s = logits(cfg_s, variables)
  np.testing.assert_allclose(out_s, logits(_gqa_cfg(pattern='AF'), as_attention(variables)),
                             atol=1e-5)
  assert float(jnp.abs(logits(_gqa_cfg(), variables) - out_s).max()) > 1e-3


def test_over_gqa_gather_equals_dense_and_prefill_then_decode_equals_the_full_forward():
  """GQA's gather (blocks of 16 rows) == dense, outputs, KL and gradients within 1e-5 at
  topk=5 on 37 tokens; two `SF` blocks decode (prefill of 11, then a token a step, one row
  left-padded) to the full forward's logits within 1e-4."""
  cfg = _gqa_cfg()
  layer = dsa.DSAGQAttention(cfg)
  x_BTD = jax.random.normal(jax.random.key(0), (2, T, cfg.d_model))
  seg_BT = jnp.asarray([[1] * T, [1] * 20 + [2] * 17], jnp.int32)
  pos_BT = jnp.asarray([list(range(T)), list(range(20)) + list(range(17))], jnp.int32)
  variables = jax.jit(lambda x: nn.meta.unbox(layer.init(
      jax.random.key(1), x, positions_BT=pos_BT, segment_ids_BT=seg_BT)))(x_BTD)
  variables = jax.tree_util.tree_map_with_path(  # selection far from ties, as layer_setup's
      lambda path, v: v * 30 if 'indexer' in jax.tree_util.keystr(path) and v.ndim > 1 else v,
      variables)
  r_BTD = jax.random.normal(jax.random.key(3), x_BTD.shape)

  def loss(v, impl):
    y_BTD, aux, _ = dsa.DSAGQAttention(_gqa_cfg(**{'dsa.impl': impl})).apply(
        v, x_BTD, positions_BT=pos_BT, segment_ids_BT=seg_BT)
    return jnp.sum(y_BTD * r_BTD) + 10 * aux['loss/indexer_kl'], (y_BTD, aux)

  (_, (y_g, aux_g)), g_g = jax.jit(jax.value_and_grad(lambda v: loss(v, 'gather'), has_aux=True))(variables)
  (_, (y_d, aux_d)), g_d = jax.jit(jax.value_and_grad(lambda v: loss(v, 'dense'), has_aux=True))(variables)
  np.testing.assert_allclose(y_g, y_d, atol=1e-5)
  np.testing.assert_allclose(aux_g['dsa/kl'], aux_d['dsa/kl'], rtol=1e-5, atol=1e-7)
  assert float(aux_g['dsa/kl']) > 1e-3
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_g), jax.tree.leaves(g_d)):
    scale = float(jnp.abs(b).max()) + 1e-6
    np.testing.assert_allclose(a / scale, b / scale, atol=1e-5, err_msg=jax.tree_util.keystr(path))

  cfg = _gqa_cfg(pattern='SF' * 2, scan_layers=True, **{'dsa.topk': 6})
  cache = _decode_matches_full_forward(cfg)
  h = attention.head_dim(cfg)
  assert cache['blocks']['0S']['k_index_BSH'].shape == (2, 2, 19, cfg.dsa.index_head_dim)
  assert cache['blocks']['0S']['k_BSKH'].shape == (2, 2, 19, cfg.num_kv_heads, h)
  # Its FLOPs: A's with min(topk, row) keys, plus the indexer.
  a_cfg = _gqa_cfg(pattern='AF')
  flops = dsa.DSAGQAttention.flops_per_token(cfg, 64)
  dense = models.SUBLAYERS['A'].select(a_cfg).flops_per_token(a_cfg, 64)
  assert flops == pytest.approx(dense - 4 * (64 - 6) * cfg.num_heads * h
                                + dsa.DSAGQAttention.indexer_flops_per_token(cfg, 64))


def test_flops_per_token_match_xla_in_one_block():
  """Analytic forward FLOPs of one `S` sublayer (indexer included) within 15% of XLA's count
  on a row of one query block; the indexer's share is its own term."""
  cfg = _cfg(d_model=128, **{'dsa.block': 128, 'dsa.topk': 16})
  layer = dsa.DSAttention(cfg)
  t = 128
  x_BTD = jnp.ones((1, t, cfg.d_model))
  seg_BT = jnp.ones((1, t), jnp.int32)
  variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), x_BTD, positions_BT=seg_BT,
                                                segment_ids_BT=seg_BT))
  fn = jax.jit(lambda v, x: layer.apply(v, x, positions_BT=seg_BT, segment_ids_BT=seg_BT)[0])
  cost = fn.lower(variables, x_BTD).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = dsa.DSAttention.flops_per_token(cfg, t) * t
  ratio = analytic / cost['flops']
  print(f'S flops: analytic / XLA = {ratio:.3f}')
  assert 0.85 <= ratio <= 1.15, ratio
  indexer = dsa.DSAttention.indexer_flops_per_token(cfg, t)
  assert 0 < indexer < dsa.DSAttention.flops_per_token(cfg, t)
