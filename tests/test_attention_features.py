"""Attention, position, norm and head options: a pairwise sweep and an oracle for each switch.

Oracles: numpy attention with windows and sinks; sinks at -inf and windows >= T against the
plain model; decode against the full forward; MLA against its expanded form written out in
numpy; RoPE layouts against each other and scaled frequencies against transformers' (or
hand-computed) values; norms, placements and soft-capping against their formulas.
"""

import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import lm
from models.layers import attention
from models.layers import mla
from models.layers import mlp
from models.layers import norms
from models.layers import positions
from tests.conftest import packed_batch, pairwise, tiny_model_config

VOCAB = 260
SMALL_MLA = {'attention.mla.kv_rank': 16, 'attention.mla.nope_head_dim': 8,
             'attention.mla.rope_head_dim': 8, 'attention.mla.v_head_dim': 12}


def build(config, tokens_BT, pos_BT, seg_BT, seed=0):
  """The model and its parameters (compiled: faster than op by op, even for one call)."""
  model = models.build(config)
  init = jax.jit(lambda r, x, p, s: model.init(r, x, positions_BT=p, segment_ids_BT=s))
  return model, nn.meta.unbox(init(jax.random.key(seed), tokens_BT, pos_BT, seg_BT)['params'])


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens_BT, pos_BT, seg_BT):
  """Logits, compiled once a model (models built from equal configs are equal) and shape."""
  return model.apply({'params': params}, tokens_BT, positions_BT=pos_BT, segment_ids_BT=seg_BT)[0]


def param_shapes(model, tokens_BT, pos_BT, seg_BT):
  """The initialiser's parameters as shapes, traced but not compiled or run."""
  return nn.meta.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), tokens_BT, positions_BT=pos_BT, segment_ids_BT=seg_BT))['params'])


FACTORS = {
    'kind': [{}, {'attention.kind': 'mla', 'attention.mla.q_rank': 16, **SMALL_MLA}],
    'qk_norm': [{}, {'attention.qk_norm': 'head'}, {'attention.qk_norm': 'full'}],
    'sinks': [{}, {'attention.sinks': True}],
    'gate': [{}, {'attention.output_gate': 'headwise'}, {'attention.output_gate': 'elementwise'}],
    'placement': [{}, {'norm_placement': 'post'}, {'norm_placement': 'sandwich'}],
    'rope': [{}, {'rope_interleaved': True, 'rope_fraction': 0.5, 'rope_scaling.kind': 'llama3',
                  'rope_scaling.factor': 8.0, 'rope_scaling.original_max_len': 16},
             {'rope_scaling.kind': 'yarn', 'rope_scaling.factor': 4.0, 'rope_scaling.original_max_len': 8}],
    'bias': [{}, {'attention.qkv_bias': True, 'attention.o_bias': True, 'mlp_bias': True}],
    'head': [{}, {'norm_zero_centred': True, 'logit_softcap': 3.0, 'embed_scale': 8.0,
                  'attention.impl': 'dot_product'}],
}


def sweep_overrides(row):
  overrides = {'pattern': 'AWF', 'attention.window': 5, 'attention.causal_block': 8}
  for level in row.values():
    overrides.update(level)
  if overrides.get('attention.kind') == 'mla':  # MLA normalises its latents; rotates its own dims
    overrides.pop('attention.qk_norm', None)
    overrides.pop('rope_fraction', None)
  if overrides.get('attention.sinks'):  # jax.nn.dot_product_attention has no sinks
    overrides['attention.impl'] = 'auto'
  return overrides


SWEEP = pairwise(FACTORS)


@pytest.mark.parametrize('row', SWEEP, ids=[f'row{i}' for i in range(len(SWEEP))])
def test_pairwise_sweep_shapes_finite_loss_and_gradients(row):
  config = tiny_model_config(**sweep_overrides(row))
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(1), 2, 16, VOCAB)
  model = models.build(config)
  # Random parameters of the initialiser's shapes, drawn in numpy (compiling `init` would
  # double the cost; drawing each leaf op by op compiles a program for each new shape).
  shapes = flax.traverse_util.flatten_dict(param_shapes(model, tokens_BT, pos_BT, seg_BT))
  rng = np.random.default_rng(0)
  params = flax.traverse_util.unflatten_dict({
      path: (0.1 * rng.standard_normal(leaf.shape) + (path[-1] == 'scale')).astype(leaf.dtype)
      for path, leaf in shapes.items()})

  def loss(p):
    logits_BTV = forward(model, p, tokens_BT, pos_BT, seg_BT)
    nll_BT = jax.nn.logsumexp(logits_BTV, -1) - jnp.take_along_axis(logits_BTV, tokens_BT[..., None], -1)[..., 0]
    return jnp.mean(nll_BT), logits_BTV

  (value, logits_BTV), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert logits_BTV.shape == (2, 16, VOCAB) and logits_BTV.dtype == jnp.float32
  assert np.isfinite(float(value))
  flat = flax.traverse_util.flatten_dict(grads, sep='/')
  grad_norms = {k: float(np.linalg.norm(g)) for k, g in flat.items()}
  assert all(np.isfinite(v) for v in grad_norms.values()), grad_norms
  assert all(v > 0 for v in grad_norms.values()), [k for k, v in grad_norms.items() if v == 0]


def test_sweep_covers_every_pair_of_levels():
  for a in FACTORS:
    for b in FACTORS:
      if a < b:
        seen = {(str(r[a]), str(r[b])) for r in SWEEP}
        assert len(seen) == len(FACTORS[a]) * len(FACTORS[b]), (a, b)


def naive_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, sinks_N=None):
  """Per-head loops in float64 with an optional sink logit in each softmax denominator."""
  q, k, v, mask = (np.asarray(a, np.float64) for a in (q_BTNH, k_BSKH, v_BSKH, mask_BTS))
  b, t, n, _ = q.shape
  group = n // k.shape[2]
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    for head in range(n):
      logits = q[bi, :, head] @ k[bi, :, head // group].T * scale
      logits = np.where(mask[bi] > 0, logits, -np.inf)
      top = logits.max(-1, keepdims=True)
      if sinks_N is not None:
        top = np.maximum(top, float(sinks_N[head]))
      weights = np.exp(logits - top)
      denominator = weights.sum(-1, keepdims=True)
      if sinks_N is not None:
        denominator += np.exp(float(sinks_N[head]) - top)
      out[bi, :, head] = weights / denominator @ v[bi, :, head // group]
  return out


def window_mask(pos_BT, seg_BT, window):
  """Causal, same-segment, fewer than `window` positions back: written with loops."""
  pos, seg = np.asarray(pos_BT), np.asarray(seg_BT)
  b, t = pos.shape
  mask = np.zeros((b, t, t), bool)
  for bi in range(b):
    for i in range(t):
      for j in range(t):
        mask[bi, i, j] = seg[bi, i] == seg[bi, j] and 0 <= pos[bi, i] - pos[bi, j] < (window or 10 ** 9)
  return mask


@pytest.mark.parametrize('impl,window,block,sinks', [
    ('xla', 3, 4, False), ('xla', 6, 4, True), ('xla', 16, 0, True), ('dot_product', 5, 4, False),
    ('xla', 0, 4, True), ('flash', 3, 4, False), ('flash', 6, 4, True), ('flash', 0, 5, True)])
def test_attend_with_window_and_sinks_matches_naive_reference(impl, window, block, sinks):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, 16, 4, 8))
  k = jax.random.normal(keys[1], (2, 16, 2, 8))
  v = jax.random.normal(keys[2], (2, 16, 2, 8))
  sinks_N = jax.random.normal(keys[3], (4,)) if sinks else None
  _, pos_BT, seg_BT = packed_batch(keys[0], 2, 16, 10, num_segments=2)
  cfg = tiny_model_config(**{'attention.impl': impl, 'attention.causal_block': block})
  attend = jax.jit(lambda q, k, v, p, s, sinks_N: attention.attend(
      cfg, q, k, v, q_pos_BT=p, q_seg_BT=s, k_pos_BS=p, k_seg_BS=s, scale=0.3, window=window,
      sinks_N=sinks_N, blocked=True))
  got = attend(q, k, v, pos_BT, seg_BT, sinks_N)
  want = naive_attention(q, k, v, window_mask(pos_BT, seg_BT, window), 0.3, sinks_N)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_sinks_at_minus_infinity_equal_no_sinks():
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(2), 2, 12, VOCAB)
  with_sinks = tiny_model_config(**{'attention.sinks': True})
  model, params = build(with_sinks, tokens_BT, pos_BT, seg_BT)
  flat = flax.traverse_util.flatten_dict(params)
  plain = {k: v for k, v in flat.items() if k[-1] != 'sinks'}
  assert len(plain) < len(flat)
  plain_model = models.build(tiny_model_config())
  want = forward(plain_model, flax.traverse_util.unflatten_dict(plain), tokens_BT, pos_BT, seg_BT)
  at = lambda value: flax.traverse_util.unflatten_dict(
      {k: np.full_like(v, value) if k[-1] == 'sinks' else v for k, v in flat.items()})
  np.testing.assert_allclose(forward(model, at(-jnp.inf), tokens_BT, pos_BT, seg_BT), want, atol=1e-5)
  assert not np.allclose(forward(model, at(2.0), tokens_BT, pos_BT, seg_BT), want, atol=1e-3)


def renamed(params, old, new):
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {tuple(p.replace(old, new) for p in k): v for k, v in flat.items()})


@pytest.mark.parametrize('kind', ['mha', 'mla'])
def test_window_at_least_row_length_equals_global_attention(kind):
  extra = SMALL_MLA if kind == 'mla' else {}
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(3), 2, 12, VOCAB)
  local = tiny_model_config(pattern='WF', **{'attention.window': 12, 'attention.kind': kind}, **extra)
  model, params = build(local, tokens_BT, pos_BT, seg_BT)
  global_model = models.build(tiny_model_config(pattern='AF', **{'attention.kind': kind}, **extra))
  want = forward(global_model, renamed(params, '0W', '0A'), tokens_BT, pos_BT, seg_BT)
  np.testing.assert_allclose(forward(model, params, tokens_BT, pos_BT, seg_BT), want, atol=1e-5)
  narrow = models.build(tiny_model_config(pattern='WF', **{'attention.window': 3, 'attention.kind': kind}, **extra))
  assert not np.allclose(forward(narrow, params, tokens_BT, pos_BT, seg_BT), want, atol=1e-3)


@pytest.mark.parametrize('overrides', [
    {'attention.sinks': True, 'attention.output_gate': 'elementwise', 'attention.qk_norm': 'head'},
    {'attention.kind': 'mla', 'attention.mla.q_rank': 16, 'attention.sinks': True, **SMALL_MLA},
], ids=['mha', 'mla'])
def test_windowed_prefill_plus_decode_equals_full_forward(overrides):
  config = tiny_model_config(pattern='WFAF', **{'attention.window': 4}, **overrides)
  b, t, prefill = 2, 12, 5
  tokens_BT = jax.random.randint(jax.random.key(3), (b, t), 0, VOCAB)
  pos_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg_BT = jnp.ones((b, t), jnp.int32)
  model, params = build(config, tokens_BT, pos_BT, seg_BT)
  full_BTV = forward(model, params, tokens_BT, pos_BT, seg_BT)
  apply = jax.jit(lambda c, x, p, s: model.apply({'params': params}, x, positions_BT=p,
                                                 segment_ids_BT=s, cache=c))
  cache = jax.jit(lambda: lm.init_cache(model.cfg, b, t))()
  out_BTV, _, cache = apply(cache, tokens_BT[:, :prefill], pos_BT[:, :prefill], seg_BT[:, :prefill])
  outs = [out_BTV]
  for i in range(prefill, t):
    out_BTV, _, cache = apply(cache, tokens_BT[:, i:i + 1], pos_BT[:, i:i + 1], seg_BT[:, i:i + 1])
    outs.append(out_BTV)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full_BTV, atol=1e-4, rtol=1e-4)


def rms(x, w, eps=1e-5):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(w)


def test_mla_equals_its_expanded_multi_head_form():
  """The module (expanded for rows, absorbed over a latent cache) against numpy MHA."""
  cfg = tiny_model_config(**{'attention.kind': 'mla', 'attention.mla.q_rank': 16, 'attention.sinks': True,
                             **SMALL_MLA})
  cfg = lm.build_lm(cfg).cfg
  b, t, d, n = 2, 10, cfg.d_model, cfg.num_heads
  x_BTD = jax.random.normal(jax.random.key(0), (b, t, d))
  pos_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg_BT = jnp.ones((b, t), jnp.int32)
  layer = mla.MLAttention(cfg)

  @jax.jit
  def init(x_BTD, pos_BT, seg_BT):
    params = nn.meta.unbox(layer.init(jax.random.key(1), x_BTD, positions_BT=pos_BT,
                                      segment_ids_BT=seg_BT)['params'])
    params['sinks'] = jax.random.normal(jax.random.key(2), (n,))
    return params

  params = init(x_BTD, pos_BT, seg_BT)
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(x_BTD, np.float64)
  q = np.einsum('btd,dr->btr', x, p['q_a'])
  q = np.einsum('btr,rnh->btnh', rms(q, p['q_a_norm']['scale']), p['q_b'])
  c = rms(x @ p['kv_a'], p['kv_a_norm']['scale'])
  k_nope = np.einsum('btr,rnh->btnh', c, p['k_b'])
  v = np.einsum('btr,rnh->btnh', c, p['v_b'])
  nope = cfg.attention.mla.nope_head_dim
  rope = jax.jit(lambda q, k: [positions.apply_rope(a, pos_BT, cfg.rope_theta) for a in (q, k)])
  q_rope, k_rope = rope(q[..., nope:].astype(np.float32), (x @ p['k_rope'])[:, :, None].astype(np.float32))
  q_full = np.concatenate([q[..., :nope], np.asarray(q_rope)], -1)
  k_full = np.concatenate([k_nope, np.broadcast_to(np.asarray(k_rope), k_nope.shape[:3] + (k_rope.shape[-1],))], -1)
  mask = window_mask(pos_BT, seg_BT, 0)
  out = naive_attention(q_full, k_full, v, mask, q_full.shape[-1] ** -0.5, p['sinks'])
  want = np.einsum('btnh,nhd->btd', out, p['o'])

  apply = jax.jit(lambda v, x, p, s, c: layer.apply(v, x, positions_BT=p, segment_ids_BT=s, cache=c))
  expanded_BTD, _, _ = apply({'params': params}, x_BTD, pos_BT, seg_BT, None)
  np.testing.assert_allclose(expanded_BTD, want, atol=1e-5)
  cache = jax.jit(lambda: mla.MLAttention.init_cache(cfg, b, t))()
  absorbed_BTD, _, cache = apply({'params': params}, x_BTD, pos_BT, seg_BT, cache)
  np.testing.assert_allclose(absorbed_BTD, want, atol=1e-5)
  assert cache['c_BSR'].shape == (b, t, cfg.attention.mla.kv_rank)


def deinterleave(x):
  return jnp.concatenate([x[..., 0::2], x[..., 1::2]], -1)


def test_interleaved_and_rotate_half_rope_are_permutations_of_each_other():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16))
  pos_BT = np.broadcast_to(np.arange(5) * 7, (2, 5))

  @jax.jit
  def ropes(x):
    half = positions.apply_rope(deinterleave(x), pos_BT, 100.0)
    inter = positions.apply_rope(x, pos_BT, 100.0, interleaved=True)
    return half, inter, deinterleave(inter), positions.apply_rope(x, pos_BT, 100.0)

  half, inter, inter_deinterleaved, plain = ropes(x)
  np.testing.assert_allclose(inter_deinterleaved, half, atol=1e-5)
  assert not np.allclose(inter, plain, atol=1e-3)


@pytest.mark.parametrize('interleaved', [False, True])
def test_partial_rotary_rotates_the_first_fraction_and_leaves_the_tail(interleaved):
  x = np.asarray(jax.random.normal(jax.random.key(1), (1, 6, 2, 16)))
  pos_BT = np.arange(6)[None] + 3
  rope = jax.jit(lambda x, fraction: positions.apply_rope(x, pos_BT, 1e4, fraction=fraction,
                                                          interleaved=interleaved), static_argnums=1)
  y = np.asarray(rope(x, 0.25))
  np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
  np.testing.assert_allclose(y[..., :4], rope(x[..., :4], 1.0), atol=1e-6)
  assert not np.allclose(y[..., :4], x[..., :4], atol=1e-3)
  # Norms of each rotated pair are preserved.
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def scaling(**fields):
  s = tiny_model_config().rope_scaling
  s.update(fields)
  return s


def test_llama3_frequencies_hand_computed():
  s = scaling(kind='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192)
  got, factor = positions.rope_frequencies(128, 500000.0, s)
  assert factor == 1.0
  for i, g in enumerate(got):
    base = 1 / 500000.0 ** (2 * i / 128)
    wavelen = 2 * math.pi / base
    if wavelen < 8192 / 4:
      want = base
    elif wavelen > 8192 / 1:
      want = base / 8
    else:
      smooth = (8192 / wavelen - 1) / (4 - 1)
      want = (1 - smooth) * base / 8 + smooth * base
    assert g == pytest.approx(want, rel=2e-6), i
  assert got[0] == pytest.approx(1.0) and got[-1] < (1 / 500000.0 ** (126 / 128)) / 7.9


def test_yarn_frequencies_and_attention_factor_hand_computed():
  dim, theta, f, orig = 64, 10000.0, 4.0, 4096
  s = scaling(kind='yarn', factor=f, original_max_len=orig)
  got, att = positions.rope_frequencies(dim, theta, s)
  assert att == pytest.approx(0.1 * math.log(4.0) + 1)
  corr = lambda r: dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(theta))
  low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
  for i, g in enumerate(got):
    base = 1 / theta ** (2 * i / dim)
    extrapolate = 1 - min(max((i - low) / (high - low), 0), 1)
    assert g == pytest.approx(base / f * (1 - extrapolate) + base * extrapolate, rel=2e-6), i
  assert got[0] == pytest.approx(1.0) and got[-1] == pytest.approx((1 / theta ** ((dim - 2) / dim)) / f, rel=1e-5)
  # DeepSeek V3's setting: mscale == mscale_all_dim gives a cos/sin factor of 1.
  _, att = positions.rope_frequencies(dim, theta, scaling(kind='yarn', factor=40.0, original_max_len=orig,
                                                          mscale=1.0, mscale_all_dim=1.0))
  assert att == 1.0


@pytest.mark.parametrize('rope_type,fields', [
    ('linear', dict(factor=4.0)),
    ('llama3', dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
    ('yarn', dict(factor=4.0, original_max_position_embeddings=64)),
    ('yarn', dict(factor=40.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.707,
                  beta_fast=16.0, beta_slow=2.0, truncate=False)),
])
def test_scaled_frequencies_equal_transformers(rope_type, fields):
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from transformers import modeling_rope_utils  # pylint: disable=g-import-not-at-top
  hf_config = transformers.LlamaConfig(
      hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=256,
      rope_parameters={'rope_type': rope_type, 'rope_theta': 5000.0, **fields})
  want, want_factor = modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type](hf_config, None)
  names = {'original_max_position_embeddings': 'original_max_len'}
  s = scaling(kind=rope_type, **{names.get(k, k): v for k, v in fields.items()})
  got, factor = positions.rope_frequencies(64, 5000.0, s)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
  assert factor == pytest.approx(want_factor, rel=1e-6)


def test_zero_centred_norm_applies_one_plus_w():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 8))) * 3
  plain = norms.Norm(kind='rmsnorm', eps=1e-5)
  centred = norms.Norm(kind='rmsnorm', eps=1e-5, zero_centred=True)
  p = nn.meta.unbox(jax.jit(centred.init)(jax.random.key(0), x))
  np.testing.assert_array_equal(p['params']['scale'], np.zeros(8))
  plain_apply = jax.jit(lambda w, x: plain.apply({'params': {'scale': w}}, x))
  centred_apply = jax.jit(lambda w, x: centred.apply({'params': {'scale': w}}, x))
  np.testing.assert_allclose(centred_apply(p['params']['scale'], x),
                             plain_apply(np.ones(8, np.float32), x), atol=1e-6)
  w = np.asarray(jax.random.normal(jax.random.key(1), (8,)))
  np.testing.assert_allclose(centred_apply(w, x), plain_apply(1 + w, x), atol=1e-6)
  np.testing.assert_allclose(plain_apply(w, x), rms(x, w), atol=1e-5)


@pytest.mark.parametrize('placement', ['pre', 'post', 'sandwich'])
def test_norm_placement(placement):
  cfg = lm.build_lm(tiny_model_config(norm_placement=placement)).cfg
  x_BTD = jax.random.normal(jax.random.key(0), (2, 4, cfg.d_model)) * 2
  pos_BT, seg_BT = jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32)
  residual = lm.Residual(cfg, 'F')

  @jax.jit
  def init(x_BTD, pos_BT, seg_BT):
    params = residual.init(jax.random.key(1), x_BTD, positions_BT=pos_BT, segment_ids_BT=seg_BT)['params']
    return jax.tree.map(lambda a: a + 0.3, nn.meta.unbox(params))  # non-trivial norm scales

  params = init(x_BTD, pos_BT, seg_BT)
  got, _, _ = jax.jit(lambda v, x, p, s: residual.apply(v, x, positions_BT=p, segment_ids_BT=s))(
      {'params': params}, x_BTD, pos_BT, seg_BT)
  op = jax.jit(lambda h: mlp.Mlp(cfg).apply({'params': params['op']}, h)[0])
  norm = lambda name, h: rms(h, params[name]['scale'])
  x = np.asarray(x_BTD)
  want = {'pre': lambda: x + op(norm('norm', x).astype(np.float32)),
          'post': lambda: x + norm('post_norm', op(x_BTD)),
          'sandwich': lambda: x + norm('post_norm', op(norm('norm', x).astype(np.float32)))}[placement]()
  assert set(params) == {'pre': {'norm', 'op'}, 'post': {'post_norm', 'op'},
                         'sandwich': {'norm', 'post_norm', 'op'}}[placement]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_logit_soft_cap_bounds_logits_and_embed_scale_scales_embeddings():
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(4), 2, 8, VOCAB)
  model, params = build(tiny_model_config(init_std=1.0, logit_softcap=2.5), tokens_BT, pos_BT, seg_BT)
  capped = forward(model, params, tokens_BT, pos_BT, seg_BT)
  raw = forward(models.build(tiny_model_config(init_std=1.0)), params, tokens_BT, pos_BT, seg_BT)
  assert np.max(np.abs(raw)) > 2.5 and np.max(np.abs(capped)) <= 2.5
  np.testing.assert_allclose(capped, 2.5 * np.tanh(np.asarray(raw) / 2.5), atol=1e-5)
  # Scaling the embeddings by s equals scaling the input table by s (the head is untied).
  scaled = forward(models.build(tiny_model_config(init_std=1.0, embed_scale=3.0)), params, tokens_BT, pos_BT, seg_BT)
  table = dict(params, embed=np.asarray(params['embed']) * 3.0, head=params['head'])
  np.testing.assert_allclose(scaled, forward(models.build(tiny_model_config(init_std=1.0)), table,
                                             tokens_BT, pos_BT, seg_BT), atol=1e-4, rtol=1e-4)


def test_qk_norm_full_normalises_the_whole_projection():
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(5), 1, 8, VOCAB)
  for kind, q_shape, k_shape in (('head', (16,), (16,)), ('full', (4, 16), (2, 16))):
    model = models.build(tiny_model_config(**{'attention.qk_norm': kind}))
    op = param_shapes(model, tokens_BT, pos_BT, seg_BT)['block_0']['0A']['op']
    assert op['q_norm']['scale'].shape == q_shape and op['k_norm']['scale'].shape == k_shape


def test_flops_count_window_keys():
  cfg = tiny_model_config(pattern='AFWF', **{'attention.window': 16})
  a = lm.sublayer_class(cfg, 'A').flops_per_token(cfg, 64)
  w = lm.sublayer_class(cfg, 'W').flops_per_token(cfg, 64)
  assert a - w == 4 * (64 - 16) * 4 * 16
  assert lm.sublayer_class(cfg, 'W').flops_per_token(cfg, 8) == lm.sublayer_class(cfg, 'A').flops_per_token(cfg, 8)
  gated = tiny_model_config(**{'attention.output_gate': 'headwise'})
  assert lm.sublayer_class(gated, 'A').flops_per_token(gated, 64) - a == 2 * 64 * 4
  m = tiny_model_config(**{'attention.kind': 'mla', **SMALL_MLA})
  assert lm.sublayer_class(m, 'A') is mla.MLAttention and lm.sublayer_class(m, 'W') is mla.SlidingMLAttention


@pytest.mark.parametrize('overrides,message', [
    ({'attention.impl': 'dot_product', 'attention.sinks': True}, "model.attention.impl='dot_product'"),
    ({'attention.impl': 'cudnn'}, "model.attention.impl='cudnn'"),
    ({'pattern': 'WF'}, 'model.attention.window=0'),
    ({'attention.qk_norm': 'layer'}, "model.attention.qk_norm='layer'"),
    ({'attention.output_gate': 'yes'}, "model.attention.output_gate='yes'"),
    ({'attention.kind': 'mqa'}, "model.attention.kind='mqa'"),
    ({'attention.kind': 'mla', 'attention.qk_norm': 'head'}, "model.attention.qk_norm='head'"),
    ({'attention.kind': 'mla', 'attention.mla.rope_head_dim': 5}, 'model.attention.mla.rope_head_dim=5'),
    ({'rope_fraction': 1.5}, 'model.rope_fraction=1.5'),
    ({'rope_fraction': 0.35}, 'model.rope_fraction=0.35 gives 5'),
    ({'rope_scaling.kind': 'ntk'}, "model.rope_scaling.kind='ntk'"),
    ({'rope_scaling.kind': 'yarn', 'rope_scaling.original_max_len': 0}, 'model.rope_scaling.original_max_len=0'),
    ({'norm_placement': 'middle'}, "model.norm_placement='middle'"),
    ({'norm': 'batchnorm'}, "model.norm='batchnorm'"),
    ({'logit_softcap': -1.0}, 'model.logit_softcap=-1.0'),
])
def test_bad_attention_config_is_one_clear_line(overrides, message):
  if 'cudnn' in str(overrides) and jax.default_backend() == 'gpu':
    pytest.skip('cuDNN may be available on a GPU')
  with pytest.raises(ValueError) as err:
    models.build(tiny_model_config(**overrides))
  assert message in str(err.value) and '\n' not in str(err.value), str(err.value)


def test_auto_impl_serves_sinks_with_the_reference():
  cfg = tiny_model_config(**{'attention.impl': 'auto', 'attention.sinks': True})
  models.build(cfg)
  assert attention.resolve_impl(cfg, (16,)) in ('xla', 'cudnn')
  if jax.default_backend() != 'gpu':
    assert attention.resolve_impl(cfg, (16,)) == 'xla'
