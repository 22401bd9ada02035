"""Gated DeltaNet `G`: the chunked algorithm against the token-by-token recurrence, packed
documents, gradients, long rows with the strongest decay, bfloat16, prefill + decode, and the
one-line refusals.

Tier 2 (an algorithm against its reference): `deltanet.recurrent` is the gated delta rule as
written (and as transformers' `torch_recurrent_gated_delta_rule` computes it); `chunked` must
reproduce it. Hugging Face parity is in tests/test_hf_mixers.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import errors
import models
from models import lm
from models.layers import deltanet
from tests.conftest import packed_batch
from tests.conftest import prefill_then_decode
from tests.conftest import tiny_model_config


def core_inputs(seed, b, t, y, p, h, decay=(0.0, 1.0)):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k = deltanet.l2_normalise(f(b, t, y, p)), deltanet.l2_normalise(f(b, t, y, p))
  g = -jnp.asarray(rng.uniform(*decay, size=(b, t, y)), jnp.float32)
  beta = jnp.asarray(rng.uniform(0, 1, size=(b, t, y)), jnp.float32)
  return q, k, f(b, t, y, h), g, beta


def test_chunked_equals_the_recurrence():
  """Outputs, final state and its segment (<= 1e-5) for chunks shorter than, not dividing,
  and longer than the row; a non-zero initial state; two documents and padding in a row."""
  b, t, y, p, h = 2, 37, 3, 8, 6
  q, k, v, g, beta = core_inputs(0, b, t, y, p, h)
  seg = np.ones((b, t), np.int32)
  seg[1, :3], seg[1, 20:] = 0, 2  # left padding, then two documents
  seg = jnp.asarray(seg)
  state = jax.random.normal(jax.random.key(1), (b, y, p, h))
  state_seg = seg[:, 0]  # the state continues the first document (padding's, in row 1)
  kw = dict(segment_ids_BT=seg, state_segment_B=state_seg)
  want_o, want_s, want_seg = jax.jit(lambda *a: deltanet.recurrent(*a, state_BYPH=state, **kw))(
      q, k, v, g, beta)
  assert float(jnp.abs(want_o).max()) > 0.1
  # The initial state is an argument, so the zero-state run below reuses chunk 16's compile.
  chunked = jax.jit(lambda *a, s, c: deltanet.chunked(*a, state_BYPH=s, chunk=c, **kw),
                    static_argnames='c')
  for chunk in (4, 16, 64):
    o, s, got_seg = chunked(q, k, v, g, beta, s=state, c=chunk)
    np.testing.assert_allclose(o, want_o, atol=1e-5, rtol=0, err_msg=f'chunk {chunk}')
    np.testing.assert_allclose(s, want_s, atol=1e-5, rtol=0, err_msg=f'chunk {chunk}')
    np.testing.assert_array_equal(got_seg, want_seg)
  # The initial state matters (and is only read by its own segment).
  o0, _, _ = chunked(q, k, v, g, beta, s=0 * state, c=16)
  assert float(jnp.abs(o0 - want_o)[:, :3].max()) > 1e-2
  np.testing.assert_allclose(o0[1, 20:], want_o[1, 20:], atol=1e-5)


def test_block_inverse_of_the_ut_transform():
  """(I + L)^-1 by blocks against float64 LAPACK, for L as the UT transform builds it
  (beta_t (k_t . k_s) exp(G_t - G_s) with unit keys, strictly lower)."""
  q, k, _, g, beta = core_inputs(5, 2, 64, 1, 16, 1, decay=(0.0, 0.05))
  k_TP, cum_T = k[:, :, 0], jnp.cumsum(g[:, :, 0], -1)
  decay_TS = jnp.exp(jnp.where(np.tril(np.ones((64, 64), bool), -1),
                               cum_T[:, :, None] - cum_T[:, None, :], -jnp.inf))
  l_XTS = beta[:, :, 0, None] * jnp.einsum('xtp,xsp->xts', k_TP, k_TP) * decay_TS
  got_XTS = deltanet.unit_lower_inverse(l_XTS)
  want_XTS = np.linalg.inv(np.eye(64) + np.asarray(l_XTS, np.float64))
  np.testing.assert_allclose(got_XTS, want_XTS, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.triu(got_XTS, 1), 0)
  assert np.abs(want_XTS - np.eye(64)).max() > 0.1


def test_gradients_equal_the_recurrences_and_finite_differences():
  b, t, y, p, h = 1, 11, 2, 4, 3
  args = core_inputs(2, b, t, y, p, h)
  seg = jnp.asarray([[1] * 6 + [2] * 5])
  kw = dict(segment_ids_BT=seg, state_BYPH=jnp.ones((b, y, p, h)) * 0.3,
            state_segment_B=jnp.ones((b,), jnp.int32))
  weights = jax.random.normal(jax.random.key(3), (b, t, y, h))
  loss = lambda fn: lambda *a: jnp.sum(fn(*a, **kw)[0] * weights) + jnp.sum(fn(*a, **kw)[1])
  # One compile of the chunked loss and its gradients, for the gradients and the differences.
  chunked = jax.jit(jax.value_and_grad(loss(lambda *a, **k: deltanet.chunked(*a, chunk=4, **k)),
                                       argnums=range(5)))
  want = jax.jit(jax.grad(loss(deltanet.recurrent), argnums=range(5)))(*args)
  _, got = chunked(*args)
  for name, w, g in zip('q k v g beta'.split(), want, got):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=name)
  # Finite differences along a random direction of every input at once.
  direction = [jax.random.normal(jax.random.key(10 + i), a.shape) for i, a in enumerate(args)]
  eps = 1e-2
  plus, _ = chunked(*[a + eps * d for a, d in zip(args, direction)])
  minus, _ = chunked(*[a - eps * d for a, d in zip(args, direction)])
  numeric = (plus - minus) / (2 * eps)
  analytic = sum(jnp.sum(g * d) for g, d in zip(got, direction))
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_strongest_decay_on_a_long_row_stays_finite():
  """8192 tokens whose decay sends every chunk's cumulative log-decay to about -1e5 (a naive
  exp(-G) overflows): outputs and gradients stay finite and equal the recurrence's outputs."""
  b, t, y, p, h = 1, 8192, 1, 4, 4
  q, k, v, _, beta = core_inputs(4, b, t, y, p, h)
  g = jnp.full((b, t, y), -1e3 * 1.7, jnp.float32)  # -exp(A_log) softplus(...) at its largest
  kw = dict(segment_ids_BT=jnp.ones((b, t), jnp.int32), state_BYPH=jnp.zeros((b, y, p, h)),
            state_segment_B=jnp.ones((b,), jnp.int32))

  def loss(g):  # outputs, state and the gradient in one compile
    o, s, _ = deltanet.chunked(q, k, v, g, beta, chunk=64, **kw)
    return jnp.sum(o), (o, s)

  (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(g)
  want_o, _, _ = jax.jit(lambda *a: deltanet.recurrent(*a, **kw))(q, k, v, g, beta)
  assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(s)))
  np.testing.assert_allclose(o, want_o, atol=1e-5)
  assert bool(jnp.all(jnp.isfinite(grads)))


def _sublayer(**fields):
  cfg = tiny_model_config('deltanet_tiny', **{'deltanet.key_heads': 2, 'deltanet.value_heads': 4,
                                              'deltanet.chunk': 8, **fields})
  return cfg, deltanet.GatedDeltaNet(cfg)


@pytest.mark.parametrize('gate_norm,negative', [('norm_then_gate', False),
                                                 ('gate_then_norm', True)])
def test_packed_documents_equal_each_alone_and_bfloat16_is_close(gate_norm, negative):
  """Two documents packed in one row give each document's outputs alone (state and
  convolution reset at the boundary); bfloat16 compute stays within 2e-2 of float32.

  One batch, one compile: row 0 packs documents of 13 and 8 tokens; row 1 is the first
  alone, row 2 the second alone, each at the start of its row before padding (segment 0;
  causal, so the padding after a document cannot change its outputs)."""
  fields = {'deltanet.gate_norm': gate_norm, 'deltanet.negative_eigenvalues': negative}
  cfg, layer = _sublayer(**fields)
  x_TD = jax.random.normal(jax.random.key(0), (1, 21, cfg.d_model))[0]
  pad = lambda x, n: jnp.pad(x, ((0, n), (0, 0)))
  x_BTD = jnp.stack([x_TD, pad(x_TD[:13], 8), pad(x_TD[13:], 13)])
  seg_BT = jnp.asarray([[1] * 13 + [2] * 8, [1] * 13 + [0] * 8, [1] * 8 + [0] * 13])
  # init_with_output: the variables and the float32 outputs of one jitted program.
  out, variables = jax.jit(lambda x, s: layer.init_with_output(
      jax.random.key(1), x, positions_BT=s, segment_ids_BT=s))(x_BTD, seg_BT)
  out_BTD = out[0]
  packed = out_BTD[0]
  np.testing.assert_allclose(packed, jnp.concatenate([out_BTD[1, :13], out_BTD[2, :8]]),
                             atol=1e-5)
  assert float(jnp.abs(packed).max()) > 1e-3
  _, bf16 = _sublayer(dtype='bfloat16', **fields)
  low = jax.jit(lambda x, s: bf16.apply(variables, x, positions_BT=s, segment_ids_BT=s)[0])(
      x_BTD[:1], seg_BT[:1])[0]
  err = float(jnp.abs(low.astype(jnp.float32) - packed).max() / jnp.abs(packed).max())
  assert err <= 2e-2, err


def _qwen3_next(dtype):
  return tiny_model_config('qwen3_next_tiny', dtype=dtype, scan_layers=True, pattern='GEAE' * 2,
                           **{'deltanet.chunk': 8, 'moe.dispatch': 'dense'})


@pytest.fixture(scope='module')
def qwen3_next_rows():
  """Two rows of 19 tokens (left padding in the second, as the Generator lays it), the
  float32 model's variables and its full-forward logits (one jitted init_with_output; the
  bfloat16 model has the same float32 parameters)."""
  b, t = 2, 19
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(1), b, t, 260, num_segments=1)
  seg_BT = seg_BT.at[1, :4].set(0)
  model = models.build(_qwen3_next('float32'))
  out, boxed = jax.jit(lambda: model.init_with_output(
      jax.random.key(0), tokens_BT, positions_BT=pos_BT, segment_ids_BT=seg_BT))()
  return (tokens_BT, pos_BT, seg_BT), nn.meta.unbox(boxed), out[0]


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_prefill_then_decode_equals_the_full_forward(qwen3_next_rows, dtype):
  """qwen3_next_tiny's layers (G, gated attention, MoE), two blocks scanned: a prefill of 11
  tokens (a chunk and a part) then one token a step == the full forward, <= 1e-4 in float32
  and within 0.2% (relative norm) in bfloat16. The cache is the same size whatever the
  length decoded."""
  (tokens_BT, pos_BT, seg_BT), variables, full_BTV = qwen3_next_rows
  b, t = tokens_BT.shape
  model = models.build(_qwen3_next(dtype))
  if dtype != 'float32':
    full_BTV = jax.jit(lambda v: model.apply(v, tokens_BT, positions_BT=pos_BT,
                                             segment_ids_BT=seg_BT)[0])(variables)
  apply = jax.jit(lambda x, p, s, c: model.apply(variables, x, positions_BT=p, segment_ids_BT=s,
                                                 cache=c))
  got_BTV, cache = prefill_then_decode(apply, lm.init_cache(model.cfg, b, t), tokens_BT, pos_BT,
                                       seg_BT, 11)
  real = np.asarray(seg_BT)[..., None] > 0
  diff_BTV = jnp.where(real, got_BTV - full_BTV, 0)
  if dtype == 'float32':
    err = float(jnp.max(jnp.abs(diff_BTV)))
    assert err <= 1e-4, f'prefill + decode differs by {err:.2e}'
  else:
    err = float(jnp.linalg.norm(diff_BTV) / jnp.linalg.norm(jnp.where(real, full_BTV, 0)))
    assert err <= 2e-3, f'bfloat16 prefill + decode differs by {100 * err:.2f}% (relative norm)'
  g_cache = [v for path, v in jax.tree_util.tree_leaves_with_path(cache)
             if '0G' in jax.tree_util.keystr(path)]
  longer = jax.eval_shape(lambda: lm.init_cache(model.cfg, b, 4 * t))  # shapes only
  g_longer = [v for path, v in jax.tree_util.tree_leaves_with_path(longer)
              if '0G' in jax.tree_util.keystr(path)]
  assert g_cache and [a.shape for a in g_cache] == [a.shape for a in g_longer]


@pytest.mark.parametrize('field,value,message', [
    ('deltanet.value_heads', 3, 'deltanet.value_heads=3 is not a multiple of model.deltanet.key_heads=2'),
    ('deltanet.chunk', 0, 'deltanet.chunk=0 must be >= 1'),
    ('deltanet.gate_norm', 'gate', "deltanet.gate_norm='gate' is not one of"),
    ('deltanet.precision', 'fp8', "deltanet.precision='fp8' is not one of"),
    ('bidirectional', True, "'G' (GatedDeltaNet), which is causal only"),
])
def test_bad_fields_are_one_line(field, value, message):
  cfg = tiny_model_config('deltanet_tiny', **{'deltanet.key_heads': 2, field: value})
  with pytest.raises(errors.ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    models.build(cfg)


def test_flops_per_token_match_xla_on_one_chunk():
  """Analytic forward FLOPs of one `G` sublayer within 15% of XLA's count, on a row of one
  chunk (the chunk scan runs once, so XLA counts all of it)."""
  cfg, layer = _sublayer(**{'deltanet.chunk': 64, 'd_model': 128})
  t = 64
  x_BTD = jnp.ones((1, t, cfg.d_model))
  seg_BT = jnp.ones((1, t), jnp.int32)
  variables = jax.eval_shape(lambda: layer.init(  # shapes are all the count needs
      jax.random.key(0), x_BTD, positions_BT=seg_BT, segment_ids_BT=seg_BT))
  fn = jax.jit(lambda v, x: layer.apply(v, x, positions_BT=seg_BT, segment_ids_BT=seg_BT)[0])
  cost = fn.lower(variables, x_BTD).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = deltanet.GatedDeltaNet.flops_per_token(cfg, t) * t
  ratio = analytic / cost['flops']
  print(f'G flops: analytic / XLA = {ratio:.3f}')
  assert 0.85 <= ratio <= 1.15, ratio
