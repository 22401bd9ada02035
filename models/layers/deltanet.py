"""Gated DeltaNet `G` (Qwen3-Next's linear attention): a fixed-size state per head, written
by the gated delta rule.

Per value head, with a state S of (P key features x H value features), token t does

  S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T     a_t = exp(g_t)
  o_t = S_t^T q_t / sqrt(P)

where q, k are L2-normalised, g_t = -exp(A_log) softplus(x w_a + dt_bias) <= 0 is the
log-decay and beta_t = sigmoid(x w_b) (2 sigmoid with `negative_eigenvalues`: the
transition I - beta k k^T may then reflect). The output goes through a per-head gated
RMSNorm, rmsnorm(o) w silu(z) (`gate_norm='norm_then_gate'`, Qwen3-Next) or
rmsnorm(o silu(z)) w ('gate_then_norm'), then the output projection. q, k and v first go
through a causal depthwise convolution of `conv_taps` taps and SiLU (short_conv.py). There
are more value heads Y than key heads K (grouped value attention): value head y reads key
head y // (Y / K), as GQA's query heads read kv heads.

Training and prefill run the chunked form (`chunked`), decoding one token the recurrence
(`recurrent`, also the reference the tests hold the chunked form to). Within a chunk of C
tokens, with G_t the cumulative log-decay from the chunk's start and S0 the state before it,

  L_ts  = beta_t (k_t . k_s) exp(G_t - G_s)            s < t, else 0
  U     = (I + L)^-1                                  the UT transform (unit lower)
  u     = U (beta v),   w = U (beta exp(G) k)          per token
  v'    = u - w S0                                    the new values the state has not seen
  o_t   = exp(G_t) q_t S0 + sum_{s<=t} (q_t . k_s) exp(G_t - G_s) v'_s
  S_end = exp(G_C) S0 + sum_s exp(G_C - G_s) k_s v'_s^T

Every decay is exp of a masked difference (-inf where masked, so <= 1 and never overflowing);
(I + L)^-1 is blockwise forward substitution (`unit_lower_inverse`), never a series in
powers of L. The core is float32 whatever `model.dtype`, its matmuls at
`deltanet.precision`.

Packed rows: a document boundary resets the state, as attention never crosses one. Pairs of
positions in different segments are masked inside a chunk; the carried state reaches only
the positions of its own segment (the segment of the last token it saw, carried with it); a
chunk keeps the old state only when its last token is still in that segment. Segments are
contiguous runs, as packing and decoding lay them out. The decode cache holds the state
(float32), its segment, and the three convolutions' windows: a size that does not grow with
the generated length.
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import errors
import models
from models import sublayer
from models.layers import common
from models.layers import short_conv

GATE_NORMS = ('norm_then_gate', 'gate_then_norm')
PRECISIONS = ('default', 'high', 'highest')
L2_EPS = 1e-6          # q, k <- x / sqrt(sum x^2 + eps), as fla and transformers
INVERSE_BLOCK = 16     # rows of the diagonal blocks of the UT transform's inverse


def l2_normalise(x, eps: float = L2_EPS):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def substitute(l_XTS, precision=None):
  """(I + L)^-1 for strictly lower triangular L by forward substitution, one row at a time
  (a loop, so compile time does not grow with the rows): row t of the inverse is
  e_t - L[t] X, where the rows of X from t on are still the identity's and L[t, t:] = 0."""
  c = l_XTS.shape[-1]
  eye_TS = jnp.eye(c, dtype=l_XTS.dtype)

  def row(t, x_XTS):
    l_XS = jax.lax.dynamic_index_in_dim(l_XTS, t, axis=-2, keepdims=False)
    new_XS = eye_TS[t] - jnp.matmul(l_XS[..., None, :], x_XTS, precision=precision)[..., 0, :]
    return jax.lax.dynamic_update_index_in_dim(x_XTS, new_XS, t, axis=-2)

  return jax.lax.fori_loop(1, c, row, jnp.broadcast_to(eye_TS, l_XTS.shape))


def unit_lower_inverse(l_XTS, block: int = INVERSE_BLOCK, precision=None):
  """(I + L)^-1 for strictly lower triangular L (..., C, C), by blocks of `block` rows.

  Each diagonal block is inverted by forward substitution (`substitute`), then block row i
  is  X_ij = -X_ii sum_{j<=m<i} L_im X_mj : matmuls of bounded entries, with no power of L
  formed (powers grow like the chunk's length; fla saw them overflow past 64). XLA:CPU's
  own triangular solve is not used: its backward pass deadlocked at batches of about 56
  chunks and more (jax 0.10.2).
  """
  c = l_XTS.shape[-1]
  if c <= block or c % block:
    return substitute(l_XTS, precision)
  n = c // block
  rows = []  # rows[i][j]: block (i, j) of the inverse
  for i in range(n):
    r = slice(i * block, (i + 1) * block)
    diag_XTS = substitute(l_XTS[..., r, r], precision)
    row = []
    for j in range(i):
      acc_XTS = sum(jnp.matmul(l_XTS[..., r, m * block:(m + 1) * block], rows[m][j],
                               precision=precision) for m in range(j, i))
      row.append(-jnp.matmul(diag_XTS, acc_XTS, precision=precision))
    row.append(diag_XTS)
    rows.append(row)
  zeros_XTS = jnp.zeros(l_XTS.shape[:-2] + (block, block), l_XTS.dtype)
  return jnp.concatenate([jnp.concatenate(row + [zeros_XTS] * (n - len(row)), axis=-1)
                          for row in rows], axis=-2)


def _exp_where(mask, x):
  """exp(x) where `mask`, else 0: the difference is masked before exponentiation."""
  return jnp.exp(jnp.where(mask, x, -jnp.inf))


def recurrent(q_BTYP, k_BTYP, v_BTYH, g_BTY, beta_BTY, *, segment_ids_BT, state_BYPH,
              state_segment_B, precision='highest'):
  """The gated delta rule token by token: (o_BTYH, state_BYPH, state_segment_B), float32.

  q and k are normalised already; q is scaled here. A token of another segment than the
  state's starts from a zero state.
  """
  del precision  # elementwise products and sums only
  f32 = lambda x: x.astype(jnp.float32)
  scale = q_BTYP.shape[-1] ** -0.5

  def step(carry, xs):
    state_BYPH, seg_B = carry
    q_BYP, k_BYP, v_BYH, g_BY, beta_BY, token_seg_B = xs
    state_BYPH = jnp.where((token_seg_B == seg_B)[:, None, None, None], state_BYPH, 0.0)
    state_BYPH = state_BYPH * jnp.exp(g_BY)[..., None, None]
    remembered_BYH = jnp.sum(state_BYPH * k_BYP[..., None], axis=-2)
    delta_BYH = (v_BYH - remembered_BYH) * beta_BY[..., None]
    state_BYPH = state_BYPH + k_BYP[..., None] * delta_BYH[..., None, :]
    o_BYH = jnp.sum(state_BYPH * (q_BYP * scale)[..., None], axis=-2)
    return (state_BYPH, token_seg_B), o_BYH

  xs = tuple(jnp.moveaxis(f32(x), 1, 0) for x in (q_BTYP, k_BTYP, v_BTYH, g_BTY, beta_BTY))
  xs += (jnp.moveaxis(segment_ids_BT.astype(jnp.int32), 1, 0),)
  (state_BYPH, seg_B), o_TBYH = jax.lax.scan(
      step, (f32(state_BYPH), state_segment_B.astype(jnp.int32)), xs)
  return jnp.moveaxis(o_TBYH, 0, 1), state_BYPH, seg_B


def chunked(q_BTYP, k_BTYP, v_BTYH, g_BTY, beta_BTY, *, segment_ids_BT, state_BYPH,
            state_segment_B, chunk: int, precision='highest'):
  """The chunked (UT transform) form of `recurrent`, with the same arguments and results.

  The row is padded to a multiple of the chunk with tokens that neither decay nor write
  (g = 0, beta = 0, k = 0) in the last token's segment, so the final state is the last real
  token's. Chunks run in a `lax.scan` carrying the state.
  """
  b, t, y, p = q_BTYP.shape
  h = v_BTYH.shape[-1]
  c = min(chunk, t)
  pad = -t % c
  f32 = lambda x: x.astype(jnp.float32)
  seg_BT = segment_ids_BT.astype(jnp.int32)
  if pad:
    zeros = lambda x: jnp.pad(f32(x), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q_BTYP, k_BTYP, v_BTYH, g_BTY, beta_BTY = map(zeros, (q_BTYP, k_BTYP, v_BTYH, g_BTY, beta_BTY))
    seg_BT = jnp.pad(seg_BT, [(0, 0), (0, pad)], mode='edge')
  a = (t + pad) // c
  dot = lambda spec, x, w: jnp.einsum(spec, x, w, precision=precision)

  def chunks(x):  # (B, A*C, Y, ...) -> (B, Y, A, C, ...)
    x = f32(x).reshape((b, a, c) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)

  q_BYATP = chunks(q_BTYP) * p ** -0.5
  k_BYATP, v_BYATH = chunks(k_BTYP), chunks(v_BTYH)
  g_BYAT, beta_BYAT = chunks(g_BTY), chunks(beta_BTY)
  seg_BAT = seg_BT.reshape(b, a, c)
  # The segment of the state entering each chunk: the previous chunk's last token's.
  prev_BA = jnp.concatenate([state_segment_B.astype(jnp.int32)[:, None], seg_BAT[:, :-1, -1]], 1)
  reads_BYAT = jnp.broadcast_to((seg_BAT == prev_BA[..., None])[:, None], g_BYAT.shape)
  keeps_BYA = jnp.broadcast_to((seg_BAT[..., -1] == prev_BA)[:, None], g_BYAT.shape[:3])
  cum_BYAT = jnp.cumsum(g_BYAT, axis=-1)
  same_BATS = seg_BAT[..., :, None] == seg_BAT[..., None, :]
  causal_TS = np.tril(np.ones((c, c), bool))
  diff_BYATS = cum_BYAT[..., :, None] - cum_BYAT[..., None, :]
  decay_BYATS = _exp_where(same_BATS[:, None] & causal_TS, diff_BYATS)
  strict_TS = np.tril(np.ones((c, c), bool), -1)
  kbeta_BYATP = k_BYATP * beta_BYAT[..., None]
  l_BYATS = dot('byatp,byasp->byats', kbeta_BYATP, k_BYATP) * decay_BYATS * strict_TS
  inverse_BYATS = unit_lower_inverse(l_BYATS, precision=precision)
  u_BYATH = dot('byats,byash->byath', inverse_BYATS, v_BYATH * beta_BYAT[..., None])
  w_BYATP = dot('byats,byasp->byatp', inverse_BYATS, kbeta_BYATP * jnp.exp(cum_BYAT)[..., None])
  w_BYATP = jnp.where(reads_BYAT[..., None], w_BYATP, 0.0)
  qread_BYATP = jnp.where(reads_BYAT[..., None], q_BYATP * jnp.exp(cum_BYAT)[..., None], 0.0)
  scores_BYATS = dot('byatp,byasp->byats', q_BYATP, k_BYATP) * decay_BYATS
  last_BAT = seg_BAT == seg_BAT[..., -1:]
  kwrite_BYATP = k_BYATP * _exp_where(last_BAT[:, None], cum_BYAT[..., -1:] - cum_BYAT)[..., None]
  keep_BYA = jnp.where(keeps_BYA, jnp.exp(cum_BYAT[..., -1]), 0.0)

  def step(state_BYPH, xs):
    u_BYTH, w_BYTP, qread_BYTP, scores_BYTS, kwrite_BYTP, keep_BY = xs
    fresh_BYTH = u_BYTH - dot('bytp,byph->byth', w_BYTP, state_BYPH)
    o_BYTH = (dot('bytp,byph->byth', qread_BYTP, state_BYPH)
              + dot('byts,bysh->byth', scores_BYTS, fresh_BYTH))
    state_BYPH = (state_BYPH * keep_BY[..., None, None]
                  + dot('bytp,byth->byph', kwrite_BYTP, fresh_BYTH))
    return state_BYPH, o_BYTH

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u_BYATH, w_BYATP, qread_BYATP, scores_BYATS,
                                             kwrite_BYATP, keep_BYA))
  state_BYPH, o_ABYTH = jax.lax.scan(step, f32(state_BYPH), xs)
  o_BTYH = jnp.transpose(o_ABYTH, (1, 0, 3, 2, 4)).reshape(b, a * c, y, h)[:, :t]
  return o_BTYH, state_BYPH, seg_BT[:, -1]


def dims(cfg) -> tuple[int, int, int, int]:
  """(key heads K, value heads Y, key head dim P, value head dim H) with the 0 defaults
  resolved: model.num_heads heads, model's head dim, as many value heads as key heads."""
  d = cfg.deltanet
  k = d.key_heads or cfg.num_heads
  p = d.key_head_dim or cfg.head_dim or cfg.d_model // cfg.num_heads
  return k, d.value_heads or k, p, d.value_head_dim or p


def inverse_softplus(x):
  return x + jnp.log(-jnp.expm1(-x))


@models.register_sublayer('G')
class GatedDeltaNet(sublayer.Sublayer):
  """Gated DeltaNet (Qwen3-Next's `linear_attention` layers); see the module docstring."""

  DEFAULTS: ClassVar[dict] = dict(deltanet=dict(
      key_heads=0,                  # 0: model.num_heads
      value_heads=0,                # 0: key_heads; a multiple of key_heads (grouped values)
      key_head_dim=0,               # 0: model.head_dim (or d_model // num_heads)
      value_head_dim=0,             # 0: key_head_dim
      conv_taps=4,                  # causal depthwise convolution over q, k, v
      chunk=64,                     # tokens per chunk of the chunked form
      negative_eigenvalues=False,   # beta = 2 sigmoid(b) instead of sigmoid(b)
      gate_norm='norm_then_gate',   # norm_then_gate: rmsnorm(o) w silu(z) | gate_then_norm
      precision='highest',          # matmul precision of the core (default | high | highest)
  ))
  RESUMABLE: ClassVar[tuple[str, ...]] = ('deltanet.chunk', 'deltanet.precision')
  BIDIRECTIONAL: ClassVar[bool] = False

  @classmethod
  def validate(cls, cfg):
    d = cfg.deltanet
    for field in ('key_heads', 'value_heads', 'key_head_dim', 'value_head_dim'):
      if d[field] < 0:
        raise errors.ConfigError(f'model.deltanet.{field}={d[field]} must be >= 0 (0: the default)')
    k, y, _, _ = dims(cfg)
    if y % k:
      raise errors.ConfigError(f'model.deltanet.value_heads={y} is not a multiple of '
                               f'model.deltanet.key_heads={k}')
    if d.conv_taps < 1:
      raise errors.ConfigError(f'model.deltanet.conv_taps={d.conv_taps} must be >= 1')
    if d.chunk < 1:
      raise errors.ConfigError(f'model.deltanet.chunk={d.chunk} must be >= 1')
    if d.gate_norm not in GATE_NORMS:
      raise errors.ConfigError(f'model.deltanet.gate_norm={d.gate_norm!r} is not one of {GATE_NORMS}')
    if d.precision not in PRECISIONS:
      raise errors.ConfigError(f'model.deltanet.precision={d.precision!r} is not one of {PRECISIONS}')

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Forward FLOPs per token: projections, the convolution, and the chunked core.

    Per value head and token with chunk C = min(chunk, seq_len): four C x P products
    (k k^T, U k, q k^T; counted as full C x C matrices as computed) are 6CP, two C x H ones
    (U v, the intra-chunk output) 4CH, the state's read, write and output 6PH, and the
    blockwise inverse about 2C^2/3.
    """
    k, y, p, h = dims(cfg)
    d = cfg.d_model
    c = min(cfg.deltanet.chunk, seq_len)
    projections = 2 * d * (2 * k * p + 2 * y * h + 2 * y) + 2 * y * h * d
    conv = short_conv.flops_per_token(cfg.deltanet.conv_taps, 2 * k * p + y * h)
    core = y * (6 * c * p + 4 * c * h + 6 * p * h + 2 * c * c / 3)
    return float(projections + conv + core)

  @classmethod
  def xla_counts_once(cls, cfg, seq_len: int) -> bool:
    return seq_len > cfg.deltanet.chunk  # the chunk scan runs more than once

  @classmethod
  def init_cache(cls, cfg, batch: int, max_len: int):
    del max_len  # the state's size does not depend on it
    k, y, p, h = dims(cfg)
    taps = cfg.deltanet.conv_taps
    dtype = common.dtype_of(cfg.cache_dtype or cfg.dtype)
    return {'q': short_conv.init_cache(batch, taps, k * p, dtype),
            'k': short_conv.init_cache(batch, taps, k * p, dtype),
            'v': short_conv.init_cache(batch, taps, y * h, dtype),
            'state_BYPH': jnp.zeros((batch, y, p, h), jnp.float32),
            'segment_B': jnp.full((batch,), short_conv.NO_SEGMENT, jnp.int32)}

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    del positions_BT  # the recurrence is its own position signal
    cfg = self.cfg
    dn = cfg.deltanet
    k, y, p, h = dims(cfg)
    b, t, d = x_BTD.shape
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)

    def proj(name, shape, axes, std=cfg.init_std):
      w = self.param(name, common.normal_init(std, axes), shape, pdtype)
      return common.project(x_BTD, w.astype(dtype))

    q_BTKP = proj('q', (d, k, p), ('embed', 'kv_heads', 'head_dim'))
    k_BTKP = proj('k', (d, k, p), ('embed', 'kv_heads', 'head_dim'))
    v_BTYH = proj('v', (d, y, h), ('embed', 'heads', 'head_dim'))
    z_BTYH = proj('z', (d, y, h), ('embed', 'heads', 'head_dim'))
    b_BTY = proj('b', (d, y), ('embed', 'heads'))
    a_BTY = proj('a', (d, y), ('embed', 'heads'))

    # Causal convolutions and SiLU; PyTorch's default Conv1d init (uniform, 1/sqrt(taps)).
    taps = dn.conv_taps
    new_cache = {} if cache is not None else None

    def conv(name, x_BTF, heads_axis):
      kernel_SF = self.param(f'conv_{name}', common.normal_init((3 * taps) ** -0.5, (
          None, heads_axis, 'head_dim')), (taps,) + x_BTF.shape[2:], pdtype)
      out_BTF, c = short_conv.causal_conv(
          x_BTF.reshape(b, t, -1), kernel_SF.reshape(taps, -1), None,
          segment_ids_BT=segment_ids_BT, cache=None if cache is None else cache[name])
      if cache is not None:
        new_cache[name] = c
      return jax.nn.silu(out_BTF.astype(jnp.float32)).reshape(x_BTF.shape)

    q_BTKP = conv('q', q_BTKP, 'kv_heads')
    k_BTKP = conv('k', k_BTKP, 'kv_heads')
    v_BTYH = conv('v', v_BTYH, 'heads')

    # A in [1, 16] and dt in [1e-3, 1e-1] log-uniformly, as fla initialises them.
    a_log_Y = self.param('a_log', nn.with_logical_partitioning(
        lambda rng, shape, dt: jnp.log(jax.random.uniform(rng, shape, dt, 1.0, 16.0)),
        ('heads',)), (y,), pdtype)
    dt_bias_Y = self.param('dt_bias', nn.with_logical_partitioning(
        lambda rng, shape, dt: inverse_softplus(jnp.exp(jax.random.uniform(
            rng, shape, dt, math.log(1e-3), math.log(1e-1)))), ('heads',)), (y,), pdtype)
    g_BTY = -jnp.exp(a_log_Y.astype(jnp.float32)) * jax.nn.softplus(
        a_BTY.astype(jnp.float32) + dt_bias_Y.astype(jnp.float32))
    beta_BTY = jax.nn.sigmoid(b_BTY.astype(jnp.float32))
    if dn.negative_eigenvalues:
      beta_BTY = 2.0 * beta_BTY

    group = y // k  # value head y reads key head y // group
    q_BTYP = jnp.repeat(l2_normalise(q_BTKP), group, axis=2)
    k_BTYP = jnp.repeat(l2_normalise(k_BTKP), group, axis=2)
    if cache is None:
      state_BYPH = jnp.zeros((b, y, p, h), jnp.float32)
      state_segment_B = jnp.full((b,), short_conv.NO_SEGMENT, jnp.int32)
    else:
      state_BYPH, state_segment_B = cache['state_BYPH'], cache['segment_B']
    core = dict(segment_ids_BT=segment_ids_BT, state_BYPH=state_BYPH,
                state_segment_B=state_segment_B, precision=dn.precision)
    if t == 1 and cache is not None:
      o_BTYH, state_BYPH, state_segment_B = recurrent(q_BTYP, k_BTYP, v_BTYH, g_BTY, beta_BTY,
                                                      **core)
    else:
      o_BTYH, state_BYPH, state_segment_B = chunked(q_BTYP, k_BTYP, v_BTYH, g_BTY, beta_BTY,
                                                    chunk=dn.chunk, **core)
    if cache is not None:
      new_cache.update(state_BYPH=state_BYPH, segment_B=state_segment_B)

    # Per-head gated RMSNorm (float32 statistics); its scale starts at one.
    scale_H = self.param('norm_scale', common.ones_init(('head_dim',)), (h,), pdtype)
    gate_BTYH = jax.nn.silu(z_BTYH.astype(jnp.float32))
    rms = lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
    if dn.gate_norm == 'norm_then_gate':
      o_BTYH = rms(o_BTYH) * scale_H.astype(jnp.float32) * gate_BTYH
    else:
      o_BTYH = rms(o_BTYH * gate_BTYH) * scale_H.astype(jnp.float32)
    wo_YHD = self.param('o', common.normal_init(cfg.init_std, ('heads', 'head_dim', 'embed')),
                        (y, h, d), pdtype)
    y_BTD = common.project(o_BTYH.astype(dtype), wo_YHD.astype(dtype), contract=2)
    return y_BTD, {}, new_cache
