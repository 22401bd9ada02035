"""Mamba-2 sublayer `M`: the selective state space model of SSD (Dao & Gu 2024), as mamba_ssm's
Mamba2 and transformers' Mamba2Mixer / NemotronHMamba2Mixer compute it.

  z, x, b, c, dt = x_BTD W_in                      (one projection, split; `mamba.proj_bias`)
  x, b, c        = silu(causal_conv(x | b | c))    (depthwise, `conv_taps` taps, `conv_bias`)
  dt             = clip(softplus(dt + dt_bias), dt_limit_min, dt_limit_max)     per head
  a              = -exp(A_log)                                                  per head
  h_t            = exp(dt_t a) h_{t-1} + dt_t x_t b_t^T      state (head_dim x state_dim) per head
  y_t            = h_t c_t + D x_t
  y              = gated_rmsnorm(y, z) W_out       norm(y * silu(z)) (transformers, Nemotron-H)
                                                   or norm(y) * silu(z) (`norm_before_gate`)

Heads come in `groups`: the heads of a group share b and c (as the query heads of a kv head
share its keys), and the gated RMSNorm normalises each group's inner channels separately.
The inner width is `num_heads x head_dim` (`num_heads=0`: expand x d_model / head_dim).

Two forms of the scan over the row, with one signature, `(y, final state)` from an initial
state: `ssd_chunked` (training and prefill) and `ssd_recurrent` (the token-by-token reference,
a `lax.scan`; decoding steps use it). Both run in float32 whatever the compute dtype.
The chunked form splits the row into chunks of `mamba.chunk`: within a chunk the output is a
masked attention-like product whose decays are formed as differences of cumulative sums of
dt * a before exponentiation, exp(where(s <= t, cum_t - cum_s, -inf)), so no term exceeds 1;
a `lax.scan` over the chunks carries the state from chunk to chunk.

Packed rows. The state and the convolution reset at document boundaries (segment ids, each
document contiguous in its row, as packing makes them). The carried state remembers the
segment of the position that wrote it; it reaches only positions of that segment, pairs
within a chunk in different segments are masked, and a chunk's end state keeps only its last
position's segment. The row is padded to a multiple of the chunk with dt = 0 (no decay, no
input) and the last segment id, so the final state is the last real token's.

Decoding keeps the convolution's last `conv_taps - 1` inputs (models/layers/short_conv.py),
the float32 state (batch x heads x head_dim x state_dim) and its segment id: a size that does
not depend on the generated length. A prefill (several tokens with a cache) runs the chunked
form from the cache's state; one-token steps run the recurrence.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import errors
import models
from models import sublayer
from models.layers import common
from models.layers import short_conv

PRECISIONS = ('default', 'high', 'highest')

DEFAULTS = dict(mamba=dict(
    num_heads=0,             # 0: expand * d_model // head_dim
    expand=2,                # inner width / d_model when num_heads=0
    head_dim=64,
    state_dim=128,           # d_state
    groups=1,                # n_groups: heads per group share b and c; the gated norm's groups
    conv_taps=4,             # d_conv
    conv_bias=True,
    proj_bias=False,         # biases on the input and output projections
    norm_before_gate=False,  # False: norm(y * silu(z)) (transformers, Nemotron-H);
                             # True: norm(y) * silu(z)
    chunk=64,                # SSD chunk length (training and prefill)
    precision='highest',     # matmul precision of the SSD core: default | high | highest
    dt_min=0.001,            # initial dt ~ log-uniform in [dt_min, dt_max], at least dt_init_floor
    dt_max=0.1,
    dt_init_floor=1e-4,
    dt_limit_min=0.0,        # dt is clipped to [dt_limit_min, dt_limit_max]
    dt_limit_max=float('inf'),
))
# How the scan is computed, not what: a resumed run may change them.
RESUMABLE = ('mamba.chunk', 'mamba.precision')
# Initialisation only (Hugging Face interop neither translates nor compares them).
TRAINING_ONLY = ('mamba.dt_min', 'mamba.dt_max', 'mamba.dt_init_floor')
A_INIT_RANGE = (1.0, 16.0)  # A = -exp(A_log) starts uniform in -[1, 16] (mamba_ssm)


def num_heads(cfg) -> int:
  m = cfg.mamba
  return m.num_heads or m.expand * cfg.d_model // m.head_dim


def in_bias_name(projection: str) -> str:
  """The bias parameter of one piece of the input projection (`dt_bias` is the softplus's)."""
  return 'dt_in_bias' if projection == 'dt' else f'{projection}_bias'


def conv_channels(cfg) -> int:
  """Channels of the convolution: x (inner width), then b and c (groups x state_dim each)."""
  m = cfg.mamba
  return num_heads(cfg) * m.head_dim + 2 * m.groups * m.state_dim


# ---------------------------------------------------------------------------------------------
# The scan over the row: chunked (SSD) and token by token.


def init_state(batch: int, heads: int, head_dim: int, state_dim: int) -> dict:
  """The zero state, in no segment (`short_conv.NO_SEGMENT`)."""
  return {'ssm_BNHP': jnp.zeros((batch, heads, head_dim, state_dim), jnp.float32),
          'segment_B': jnp.full((batch,), short_conv.NO_SEGMENT, jnp.int32)}


def _inputs(x_BTNH, dt_BTN, a_N, b_BTKP, c_BTKP, segment_ids_BT, state):
  """The scan's inputs in float32 (segments int32) and the initial state."""
  f32 = lambda v: v.astype(jnp.float32)
  b, _, n, h = x_BTNH.shape
  k, p = b_BTKP.shape[2:]
  assert n % k == 0, f'{n} heads do not divide into {k} groups (model.mamba.groups)'
  if state is None:
    state = init_state(b, n, h, p)
  return (f32(x_BTNH), f32(dt_BTN), f32(a_N), f32(b_BTKP), f32(c_BTKP),
          segment_ids_BT.astype(jnp.int32), state)


def ssd_recurrent(x_BTNH, dt_BTN, a_N, b_BTKP, c_BTKP, segment_ids_BT, *, state=None,
                  chunk: int = 0, precision: str = 'highest'):
  """The reference: one position at a time (`lax.scan`), h = exp(dt a) h + dt x b^T, y = h c.

  Returns (y_BTNH float32, final state {'ssm_BNHP', 'segment_B'}). The state resets where
  the segment id changes. `chunk` is accepted for the chunked form's signature and unused.
  """
  del chunk
  x_BTNH, dt_BTN, a_N, b_BTKP, c_BTKP, seg_BT, state = _inputs(
      x_BTNH, dt_BTN, a_N, b_BTKP, c_BTKP, segment_ids_BT, state)
  g = x_BTNH.shape[2] // b_BTKP.shape[2]

  def step(carry, inputs):
    ssm_BNHP, segment_B = carry
    x_BNH, dt_BN, b_BKP, c_BKP, seg_B = inputs
    keep_B1 = (segment_B == seg_B)[:, None]
    decay_BN = jnp.where(keep_B1, jnp.exp(dt_BN * a_N), 0.0)
    b_BNP, c_BNP = jnp.repeat(b_BKP, g, axis=1), jnp.repeat(c_BKP, g, axis=1)
    ssm_BNHP = (decay_BN[..., None, None] * ssm_BNHP
                + (dt_BN[..., None] * x_BNH)[..., None] * b_BNP[:, :, None, :])
    y_BNH = jnp.einsum('BNHP,BNP->BNH', ssm_BNHP, c_BNP, precision=precision)
    return (ssm_BNHP, seg_B), y_BNH

  time_major = lambda v: jnp.moveaxis(v, 1, 0)
  (ssm_BNHP, segment_B), y_TBNH = jax.lax.scan(
      step, (state['ssm_BNHP'].astype(jnp.float32), state['segment_B']),
      tuple(map(time_major, (x_BTNH, dt_BTN, b_BTKP, c_BTKP, seg_BT))))
  return jnp.moveaxis(y_TBNH, 0, 1), {'ssm_BNHP': ssm_BNHP, 'segment_B': segment_B}


def ssd_chunked(x_BTNH, dt_BTN, a_N, b_BTKP, c_BTKP, segment_ids_BT, *, state=None,
                chunk: int = 64, precision: str = 'highest'):
  """SSD: the same function as `ssd_recurrent`, a chunk of `chunk` positions at a time.

  Within a chunk (query positions T, key positions S of the same chunk):
    y_t  = sum_{s <= t, same segment} exp(cum_t - cum_s) (c_t . b_s) dt_s x_s      (diagonal)
         + exp(cum_t) h_in c_t  where t is in the carried state's segment          (off-diagonal)
  with cum_t = sum_{u <= t} dt_u a over the chunk; each chunk's end state (its own inputs
  decayed to its end, plus the carried state decayed by the whole chunk when its segment
  lasts to the end) is carried by a `lax.scan` over the A chunks. Every exponent is <= 0.
  """
  x_BTNH, dt_BTN, a_N, b_BTKP, c_BTKP, seg_BT, state = _inputs(
      x_BTNH, dt_BTN, a_N, b_BTKP, c_BTKP, segment_ids_BT, state)
  bsz, t, n, h = x_BTNH.shape
  k, p = b_BTKP.shape[2:]
  g = n // k
  c = max(1, min(chunk, t))
  pad = -t % c
  if pad:  # dt = 0: no decay and no input; the last segment goes on
    zeros = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    x_BTNH, dt_BTN, b_BTKP, c_BTKP = map(zeros, (x_BTNH, dt_BTN, b_BTKP, c_BTKP))
    seg_BT = jnp.pad(seg_BT, [(0, 0), (0, pad)], mode='edge')
  a = (t + pad) // c
  x_BASKGH = x_BTNH.reshape(bsz, a, c, k, g, h)
  dt_BASN = dt_BTN.reshape(bsz, a, c, n)
  b_BASKP = b_BTKP.reshape(bsz, a, c, k, p)
  c_BATKP = c_BTKP.reshape(bsz, a, c, k, p)
  seg_BAT = seg_BT.reshape(bsz, a, c)

  # Cumulative decays within each chunk, float32, all <= 0.
  cum_BANT = jnp.cumsum(jnp.moveaxis(dt_BASN * a_N, 2, 3), axis=-1)
  causal_TS = jnp.tril(jnp.ones((c, c), jnp.bool_))
  same_BATS = (seg_BAT[..., :, None] == seg_BAT[..., None, :]) & causal_TS
  diff_BANTS = cum_BANT[..., :, None] - cum_BANT[..., None, :]
  decay_BANTS = jnp.exp(jnp.where(same_BATS[:, :, None], diff_BANTS, -jnp.inf))

  # Diagonal blocks: attention-like, scores c . b per group.
  scores_BAKTS = jnp.einsum('BATKP,BASKP->BAKTS', c_BATKP, b_BASKP, precision=precision)
  dt_BAKG1S = jnp.moveaxis(dt_BASN, 2, 3).reshape(bsz, a, k, g, 1, c)
  weights_BAKGTS = (scores_BAKTS[:, :, :, None] * decay_BANTS.reshape(bsz, a, k, g, c, c)
                    * dt_BAKG1S)
  y_BATKGH = jnp.einsum('BAKGTS,BASKGH->BATKGH', weights_BAKGTS, x_BASKGH, precision=precision)

  # Each chunk's own inputs, decayed to its end, in its last position's segment.
  end_BA = seg_BAT[..., -1]
  to_end_BANS = jnp.exp(jnp.where((seg_BAT == end_BA[..., None])[:, :, None],
                                  cum_BANT[..., -1:] - cum_BANT, -jnp.inf))
  weight_BASKG = jnp.moveaxis(to_end_BANS * jnp.moveaxis(dt_BASN, 2, 3), 3, 2).reshape(
      bsz, a, c, k, g)
  inputs_BAKGHP = jnp.einsum('BASKG,BASKGH,BASKP->BAKGHP', weight_BASKG, x_BASKGH, b_BASKP,
                             precision=precision)

  # Chunk to chunk: the state entering each chunk and its segment (a scan over A).
  total_BAN = jnp.exp(cum_BANT[..., -1])

  def carry_on(carry, inputs):
    ssm_BNHP, segment_B = carry
    total_BN, inputs_BNHP, end_B = inputs
    keep_BN = jnp.where((segment_B == end_B)[:, None], total_BN, 0.0)
    new = keep_BN[..., None, None] * ssm_BNHP + inputs_BNHP
    return (new, end_B), (ssm_BNHP, segment_B)

  chunk_major = lambda v: jnp.moveaxis(v, 1, 0)
  (ssm_BNHP, segment_B), (in_ABNHP, in_segment_AB) = jax.lax.scan(
      carry_on, (state['ssm_BNHP'].astype(jnp.float32), state['segment_B']),
      (chunk_major(total_BAN), chunk_major(inputs_BAKGHP.reshape(bsz, a, n, h, p)),
       chunk_major(end_BA)))
  in_BAKGHP = jnp.moveaxis(in_ABNHP, 0, 1).reshape(bsz, a, k, g, h, p)
  in_segment_BA = jnp.moveaxis(in_segment_AB, 0, 1)

  # Off-diagonal: the entering state read by the chunk's positions of its segment.
  from_start_BANT = jnp.exp(jnp.where((seg_BAT == in_segment_BA[..., None])[:, :, None],
                                      cum_BANT, -jnp.inf))
  from_start_BATKG1 = jnp.moveaxis(from_start_BANT, 2, 3).reshape(bsz, a, c, k, g, 1)
  y_BATKGH += from_start_BATKG1 * jnp.einsum('BATKP,BAKGHP->BATKGH', c_BATKP, in_BAKGHP,
                                             precision=precision)
  y_BTNH = y_BATKGH.reshape(bsz, a * c, n, h)[:, :t]
  return y_BTNH, {'ssm_BNHP': ssm_BNHP, 'segment_B': segment_B}


# ---------------------------------------------------------------------------------------------
# The sublayer.


def _uniform(low: float, high: float):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, low, high)


def _dt_bias_init(m):
  """softplus^-1 of dt ~ log-uniform in [dt_min, dt_max], floored at dt_init_floor (mamba_ssm)."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(m.dt_max) - math.log(m.dt_min)) + math.log(m.dt_min))
    dt = jnp.maximum(dt, m.dt_init_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init


def _a_log_init(key, shape, dtype=jnp.float32):
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, *A_INIT_RANGE)).astype(dtype)


def gated_norm(y_BTNH, z_BTNH, scale_NH, *, groups: int, eps: float, norm_before_gate: bool):
  """RMSNorm over each group's inner channels, gated by silu(z), in float32 (the caller casts).

  norm_before_gate=False (transformers' MambaRMSNormGated): norm(y * silu(z)) * scale;
  True (mamba_ssm's default in Mamba2Simple): norm(y) * scale * silu(z).
  """
  b, t, n, h = y_BTNH.shape
  y_BTNH = y_BTNH.astype(jnp.float32)
  gate_BTNH = jax.nn.silu(z_BTNH.astype(jnp.float32))
  if not norm_before_gate:
    y_BTNH = y_BTNH * gate_BTNH
  y_BTKF = y_BTNH.reshape(b, t, groups, n // groups * h)
  var_BTK1 = jnp.mean(jnp.square(y_BTKF), axis=-1, keepdims=True)
  y_BTNH = (y_BTKF * jax.lax.rsqrt(var_BTK1 + eps)).reshape(b, t, n, h)
  y_BTNH = y_BTNH * scale_NH.astype(jnp.float32)
  return y_BTNH * gate_BTNH if norm_before_gate else y_BTNH


@models.register_sublayer('M')
class Mamba2(sublayer.Sublayer):
  """Mamba-2 (SSD) mixer; see the module docstring."""
  DEFAULTS = DEFAULTS
  RESUMABLE = RESUMABLE
  TRAINING_ONLY = TRAINING_ONLY
  BIAS_SWITCHES = ('mamba.proj_bias',)
  BIDIRECTIONAL = False

  @classmethod
  def validate(cls, cfg):
    m = cfg.mamba
    for field in ('head_dim', 'state_dim', 'groups', 'conv_taps', 'chunk'):
      if m[field] < 1:
        raise errors.ConfigError(f'model.mamba.{field}={m[field]} must be positive')
    if m.num_heads < 0:
      raise errors.ConfigError(f'model.mamba.num_heads={m.num_heads} must be >= 0 '
                               '(0: expand * d_model // head_dim)')
    if not m.num_heads and (m.expand < 1 or m.expand * cfg.d_model % m.head_dim):
      raise errors.ConfigError(f'model.mamba.expand={m.expand} x model.d_model={cfg.d_model} is '
                               f'not a positive multiple of model.mamba.head_dim={m.head_dim}; '
                               'set model.mamba.num_heads')
    if num_heads(cfg) % m.groups:
      raise errors.ConfigError(f'model.mamba.groups={m.groups} must divide the '
                               f'{num_heads(cfg)} heads (model.mamba.num_heads)')
    if m.precision not in PRECISIONS:
      raise errors.ConfigError(f'model.mamba.precision={m.precision!r} is not one of {PRECISIONS}')
    if not 0 <= m.dt_limit_min < m.dt_limit_max:
      raise errors.ConfigError(f'model.mamba.dt_limit_min={m.dt_limit_min} must be >= 0 and '
                               f'below model.mamba.dt_limit_max={m.dt_limit_max}')
    if not 0 < m.dt_min <= m.dt_max:
      raise errors.ConfigError(f'model.mamba.dt_min={m.dt_min} must be positive and at most '
                               f'model.mamba.dt_max={m.dt_max}')
    if m.dt_init_floor < 0:
      raise errors.ConfigError(f'model.mamba.dt_init_floor={m.dt_init_floor} must be >= 0')

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Forward FLOPs per token of the chunked form, C = min(chunk, seq_len):

      projections   2 D (2 N H + 2 K P + N)   in (z, x, b, c, dt)  +  2 N H D  out
      convolution   2 taps (N H + 2 K P)
      SSD, diagonal 2 C K P (scores c . b)  +  2 C N H (weighted sum of x)  +  3 C N
                    (decay, score and dt products per pair)
      SSD, states   2 N H P (a position's x b^T into its chunk's state)  +  2 N H P (c . the
                    entering state)  +  2 N H P / C (chunk-to-chunk decay and add)
    Every (query, key) pair of a chunk is counted, with no causal halving (as attention's
    count). Exponentials, masks, the norm and the activations are not counted.
    """
    m, d = cfg.mamba, cfg.d_model
    n, h, k, p = num_heads(cfg), m.head_dim, m.groups, m.state_dim
    c = max(1, min(m.chunk, seq_len))
    projections = 2 * d * (2 * n * h + 2 * k * p + n) + 2 * n * h * d
    conv = short_conv.flops_per_token(m.conv_taps, conv_channels(cfg))
    diagonal = 2 * c * k * p + 2 * c * n * h + 3 * c * n
    states = 4 * n * h * p + 2 * n * h * p / c
    return float(projections + conv + diagonal + states)

  @classmethod
  def xla_counts_once(cls, cfg, seq_len: int) -> bool:
    """The chunk-to-chunk scan runs more than once when the row holds several chunks (XLA's
    count then sees one iteration of its small body)."""
    return seq_len > cfg.mamba.chunk

  @classmethod
  def canonical(cls, fields: dict) -> dict:
    """`num_heads=0` is expand * d_model // head_dim; `expand` says nothing more."""
    fields = dict(fields)
    if not fields.get('mamba.num_heads') and fields.get('mamba.head_dim'):
      fields['mamba.num_heads'] = (fields.get('mamba.expand', 2) * fields['d_model']
                                   // fields['mamba.head_dim'])
    fields.pop('mamba.expand', None)
    return fields

  @classmethod
  def init_cache(cls, cfg, batch: int, max_len: int):
    """The convolution's last inputs and the float32 state: no dependence on `max_len`."""
    del max_len
    m = cfg.mamba
    dtype = common.dtype_of(cfg.get('cache_dtype') or cfg.dtype)
    return {'conv': short_conv.init_cache(batch, m.conv_taps, conv_channels(cfg), dtype),
            **init_state(batch, num_heads(cfg), m.head_dim, m.state_dim)}

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None):
    del positions_BT
    cfg, m = self.cfg, self.cfg.mamba
    d, n, h, k, p = cfg.d_model, num_heads(cfg), m.head_dim, m.groups, m.state_dim
    b, t, _ = x_BTD.shape
    assert x_BTD.shape[-1] == d, f'model.d_model={d} but input width {x_BTD.shape[-1]}'
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    std, out_std = cfg.init_std, cfg.init_std / len(cfg.pattern) ** 0.5
    bias = bool(cfg.use_bias or m.proj_bias)
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((b, t), jnp.int32)

    # The input projection: z, x, b, c, dt as one matmul.
    shapes = {'z': ((n, h), ('heads', 'head_dim')), 'x': ((n, h), ('heads', 'head_dim')),
              'b': ((k, p), (None, 'state')), 'c': ((k, p), (None, 'state')),
              'dt': ((n,), ('heads',))}
    w_DF = jnp.concatenate([
        self.param(name, common.normal_init(std, ('embed',) + axes), (d,) + shape,
                   pdtype).reshape(d, -1) for name, (shape, axes) in shapes.items()], axis=-1)
    proj_BTF = common.project(x_BTD, w_DF.astype(dtype))
    if bias:
      proj_BTF += jnp.concatenate([
          self.param(in_bias_name(name), common.zeros_init(axes), shape, pdtype).reshape(-1)
          for name, (shape, axes) in shapes.items()]).astype(dtype)
    inner = n * h
    z_BTNH = proj_BTF[..., :inner].reshape(b, t, n, h)
    xbc_BTF = proj_BTF[..., inner:inner + conv_channels(cfg)]
    dt_BTN = proj_BTF[..., inner + conv_channels(cfg):]

    taps = m.conv_taps
    kernel_SF = self.param('conv', nn.with_logical_partitioning(
        _uniform(-taps ** -0.5, taps ** -0.5), (None, None)), (taps, conv_channels(cfg)), pdtype)
    conv_bias_F = None
    if m.conv_bias:
      conv_bias_F = self.param('conv_bias', common.zeros_init((None,)), (conv_channels(cfg),),
                               pdtype)
    if conv_bias_F is not None:
      conv_bias_F = conv_bias_F.astype(dtype)
    xbc_BTF, conv_cache = short_conv.causal_conv(
        xbc_BTF, kernel_SF.astype(dtype), conv_bias_F, segment_ids_BT=segment_ids_BT,
        cache=None if cache is None else cache['conv'])
    xbc_BTF = jax.nn.silu(xbc_BTF)
    x_BTNH = common.constrain(xbc_BTF[..., :inner].reshape(b, t, n, h),
                              ('batch', 'length', 'heads', 'head_dim'))
    b_BTKP = xbc_BTF[..., inner:inner + k * p].reshape(b, t, k, p)
    c_BTKP = xbc_BTF[..., inner + k * p:].reshape(b, t, k, p)

    # Per-head step sizes and decay rates, float32.
    dt_bias_N = self.param('dt_bias', nn.with_logical_partitioning(_dt_bias_init(m), ('heads',)),
                           (n,), pdtype)
    a_log_N = self.param('A_log', nn.with_logical_partitioning(_a_log_init, ('heads',)), (n,),
                         pdtype)
    d_skip_N = self.param('D', common.ones_init(('heads',)), (n,), pdtype)
    dt_BTN = jax.nn.softplus(dt_BTN.astype(jnp.float32) + dt_bias_N.astype(jnp.float32))
    dt_BTN = jnp.clip(dt_BTN, m.dt_limit_min, m.dt_limit_max)
    a_N = -jnp.exp(a_log_N.astype(jnp.float32))

    state = None if cache is None else {'ssm_BNHP': cache['ssm_BNHP'],
                                        'segment_B': cache['segment_B']}
    scan = ssd_recurrent if cache is not None and t == 1 else ssd_chunked
    y_BTNH, state = scan(x_BTNH, dt_BTN, a_N, b_BTKP, c_BTKP, segment_ids_BT, state=state,
                         chunk=m.chunk, precision=m.precision)
    y_BTNH = y_BTNH + d_skip_N.astype(jnp.float32)[:, None] * x_BTNH.astype(jnp.float32)

    scale_NH = self.param('norm', common.ones_init(('heads', 'head_dim')), (n, h), pdtype)
    y_BTNH = gated_norm(y_BTNH, z_BTNH, scale_NH, groups=k, eps=cfg.norm_eps,
                        norm_before_gate=m.norm_before_gate).astype(dtype)
    y_BTNH = common.constrain(y_BTNH, ('batch', 'length', 'heads', 'head_dim'))
    w_o = self.param('o', common.normal_init(out_std, ('heads', 'head_dim', 'embed')), (n, h, d),
                     pdtype)
    y_BTD = common.project(y_BTNH, w_o.astype(dtype), 2)
    if bias:
      y_BTD += self.param('o_bias', common.zeros_init(('embed',)), (d,), pdtype).astype(dtype)
    if cache is not None:
      cache = {'conv': conv_cache, **state}
    return y_BTD, {}, cache
