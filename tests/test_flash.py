"""`attention.impl='flash'` (models/layers/flash.py) against the materialised reference.

Oracles: `attention.dot_attention` on the reference mask (values and gradients of q, k, v
and sinks); whole models with impl 'xla' (logits and parameter gradients: llama, GPT-OSS
style windows and sinks, MLA); prefill + step-by-step decode against the full forward.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import lm
from models.layers import attention
from models.layers import flash
from tests.conftest import packed_batch, tiny_model_config

VOCAB = 260


def qkv_case(b, t, n, k, h, hv, seed=0):
  """Numpy arrays (jnp.asarray would compile a copy for each new shape)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  q, key, v = normal(b, t, n, h), normal(b, t, k, h), normal(b, t, k, hv)
  # Row 0: two documents; row 1: one document then 3 padding tokens (segment 0).
  seg = np.ones((b, t), np.int32)
  pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  seg[0, t // 3:], pos[0, t // 3:] = 2, pos[0, t // 3:] - t // 3
  seg[1, -3:], pos[1, -3:] = 0, 0
  return q, key, v, pos, seg, normal(b, t, n, hv), normal(n)


@pytest.mark.parametrize('kw', [
    dict(),
    dict(block=5),                        # 20 rows: the last block is padded
    dict(block=32),                       # one block
    dict(window=6),
    dict(window=6, block=4, sinks=True),
    dict(sinks=True),
    dict(causal=False),
    dict(causal=False, window=5),
    dict(hv=12),                          # MLA: values wider than keys
    dict(skip=False),
    dict(n=6, k=2, t=33, block=8, window=9, sinks=True),
    dict(n=3, k=3),
    dict(n=4, k=1),
], ids=str)
def test_flash_equals_reference_values_and_gradients(kw):
  kw = dict(dict(t=20, n=4, k=2, hv=8, block=8, causal=True, window=0, sinks=False, skip=True), **kw)
  q, k, v, pos, seg, w, sinks_N = qkv_case(2, kw['t'], kw['n'], kw['k'], 8, kw['hv'])

  def reference(q, k, v, sinks_N):
    mask = attention.attention_mask(pos, seg, pos, seg, causal=kw['causal'], window=kw['window'])
    return jnp.sum(attention.dot_attention(q, k, v, mask, 0.3, sinks_N=sinks_N) * w)

  def blocked(q, k, v, sinks_N):
    out = flash.attention(q, k, v, q_pos_BT=pos, q_seg_BT=seg, k_pos_BS=pos, k_seg_BS=seg,
                          scale=0.3, causal=kw['causal'], window=kw['window'], sinks_N=sinks_N,
                          block=kw['block'], skip=kw['skip'] and kw['causal'])
    return jnp.sum(out * w)

  args = (q, k, v, sinks_N if kw['sinks'] else None)
  argnums = (0, 1, 2, 3) if kw['sinks'] else (0, 1, 2)
  # One program for both (op by op, the two compile some hundred primitives).
  both = jax.jit(lambda *a: (jax.value_and_grad(reference, argnums)(*a),
                             jax.value_and_grad(blocked, argnums)(*a)))
  (want, want_grads), (got, got_grads) = both(*args)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for name, g, wg in zip('qkvs', got_grads, want_grads):
    assert np.max(np.abs(wg)) > 0, name
    np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-4, err_msg=f'gradient of {name}')


def test_padding_rows_are_zero_and_their_gradients_finite():
  q, k, v, pos, seg, _, _ = qkv_case(2, 12, 2, 2, 8, 8)
  fn = lambda q: flash.attention(q, k, v, q_pos_BT=pos, q_seg_BT=seg, k_pos_BS=pos,
                                 k_seg_BS=seg, scale=0.3, causal=True, block=4, skip=True)
  out, grad = jax.jit(lambda q: (fn(q), jax.grad(lambda q: jnp.sum(fn(q) ** 2))(q)))(q)
  out = np.asarray(out)
  assert np.all(out[1, -3:] == 0)
  assert np.all(np.abs(out[1, :-3]) > 0)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_visited_block_pairs_are_the_same_forward_and_backward():
  """The backward's query range per key block is the inverse of the forward's key range."""
  for tq, tk, window, nq, nk in [(4, 4, 0, 5, 5), (4, 8, 0, 6, 3), (8, 4, 0, 3, 6),
                                 (4, 4, 6, 5, 5), (4, 8, 9, 6, 3), (8, 4, 5, 3, 6)]:
    st = flash._Static(scale=1.0, tq=tq, tk=tk, g=1, causal=True, window=window, skip=True)
    forward = {(i, j) for i in range(nq) for j in range(*map(int, flash._key_range(st, i, nk)))}
    backward = {(i, j) for j in range(nk) for i in range(*map(int, flash._query_range(st, j, nq)))}
    assert forward == backward, (tq, tk, window)
    # Every pair with a visible (query, key) index pair is visited, and no fully hidden one.
    visible = {(qi // tq, ki // tk) for qi in range(nq * tq) for ki in range(nk * tk)
               if 0 <= qi - ki < (window or 10 ** 9)}
    assert forward == visible, (tq, tk, window)


def model_grads(config, params, tokens_BT, pos_BT, seg_BT):
  model = models.build(config)

  def loss(params):
    logits = model.apply({'params': params}, tokens_BT, positions_BT=pos_BT, segment_ids_BT=seg_BT)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


MODEL_CASES = {
    'llama': {},
    'windows_sinks': {'pattern': 'AWFAWF', 'attention.window': 5, 'attention.sinks': True},
    'mla': {'attention.kind': 'mla', 'attention.mla.q_rank': 16, 'attention.mla.kv_rank': 16,
            'attention.mla.nope_head_dim': 8, 'attention.mla.rope_head_dim': 8,
            'attention.mla.v_head_dim': 12},
}


def model_batch():
  return packed_batch(jax.random.key(1), 2, 24, VOCAB, num_segments=3)


def model_config(case, impl):
  return tiny_model_config(**{'attention.causal_block': 8, **MODEL_CASES[case],
                              'attention.impl': impl})


@functools.cache
def reference_model(case):
  """(params, logits, grads) of the impl='xla' model, computed once for both impls tested."""
  config, batch = model_config(case, 'xla'), model_batch()
  model = models.build(config)
  params = nn.meta.unbox(jax.jit(lambda r, x, p, s: model.init(
      r, x, positions_BT=p, segment_ids_BT=s))(jax.random.key(0), *batch)['params'])
  return (params, *model_grads(config, params, *batch))


@pytest.mark.parametrize('case', list(MODEL_CASES))
@pytest.mark.parametrize('impl', ['flash', 'auto'])  # auto: flash with a larger block on a CPU
def test_model_with_flash_equals_model_with_reference(case, impl):
  # The parameters are the reference model's: the impl changes no parameter.
  params, want_logits, want_grads = reference_model(case)
  got_logits, got_grads = model_grads(model_config(case, impl), params, *model_batch())
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)
  for (path, g), wg in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                           jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, wg, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_flash_prefill_plus_decode_equals_full_forward():
  config = tiny_model_config(**{'attention.impl': 'flash', 'attention.causal_block': 4,
                                'pattern': 'AWF', 'attention.window': 4, 'attention.sinks': True})
  b, t, prefill = 2, 12, 5
  tokens_BT = jax.random.randint(jax.random.key(3), (b, t), 0, VOCAB)
  pos_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg_BT = jnp.ones((b, t), jnp.int32)
  model = models.build(config)
  init = jax.jit(lambda r, x, p, s: model.init(r, x, positions_BT=p, segment_ids_BT=s))
  params = nn.meta.unbox(init(jax.random.key(0), tokens_BT, pos_BT, seg_BT)['params'])
  apply = jax.jit(lambda c, x, p, s: model.apply({'params': params}, x, positions_BT=p,
                                                 segment_ids_BT=s, cache=c))
  full_BTV, _, _ = apply(None, tokens_BT, pos_BT, seg_BT)
  cache = jax.jit(lambda: lm.init_cache(model.cfg, b, t))()
  out_BTV, _, cache = apply(cache, tokens_BT[:, :prefill], pos_BT[:, :prefill], seg_BT[:, :prefill])
  outs = [out_BTV]
  for i in range(prefill, t):
    out_BTV, _, cache = apply(cache, tokens_BT[:, i:i + 1], pos_BT[:, i:i + 1], seg_BT[:, i:i + 1])
    outs.append(out_BTV)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full_BTV, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_one_line():
  q, k, v, pos, seg, _, _ = qkv_case(2, 8, 3, 2, 8, 8)
  kwargs = dict(q_pos_BT=pos, q_seg_BT=seg, k_pos_BS=pos, k_seg_BS=seg, scale=1.0, causal=True)
  with pytest.raises(ValueError, match='3 query heads is not a multiple of 2 kv heads'):
    flash.attention(q, k, v, **kwargs)
  with pytest.raises(ValueError, match='block=0 must be positive'):
    flash.attention(q[:, :, :2], k, v, block=0, **kwargs)


def test_auto_takes_flash_on_cpu_only_for_rows_longer_than_one_block():
  cfg = tiny_model_config(**{'attention.impl': 'auto', 'attention.causal_block': 128})
  if jax.default_backend() != 'cpu':
    pytest.skip('the CPU rule of attention.impl=auto')
  assert attention.resolve_impl(cfg, (16,), causal_rows=256) == 'flash'
  assert attention.resolve_impl(cfg, (16,), causal_rows=128) == 'xla'
  assert attention.resolve_impl(cfg, (16,)) == 'xla'  # decoding, bidirectional rows
  off = tiny_model_config(**{'attention.impl': 'auto', 'attention.causal_block': 0})
  assert attention.resolve_impl(off, (16,), causal_rows=4096) == 'xla'


def test_auto_flash_block_grows_while_a_block_of_scores_fits():
  # llama_small: 8 rows x 6 heads at 512 keep 128; 2 x 6 at 2048 take 256.
  assert attention.flash_block(128, 48, 512) == 128
  assert attention.flash_block(128, 12, 2048) == 256
  assert attention.flash_block(8, 8, 24) == 16     # never past the row
  assert attention.flash_block(128, 1, 4096, scores=128 ** 2) == 128
