"""Multi-head latent attention (MLA, DeepSeek V2/V3): `A` / `W` when `attention.kind='mla'`.

Queries come from x directly or through a low-rank bottleneck (`mla.q_rank`). Keys and values
share one normalised latent c = RMSNorm(x W_kv_a) of `mla.kv_rank` features, expanded per head
(k_nope = c W_k_b, v = c W_v_b), plus one RoPE key of `mla.rope_head_dim` features shared by
all heads (x W_k_rope, rotated). A query is [q_nope, rope(q_rope)], a key [k_nope, rope(k_rope)].

Two equal forms. Training rows use the expanded one: per-head keys and values, then the
attention every kind shares (`attention.attend`). Decoding caches only (c, rope(k_rope)) per
token and uses the absorbed form: q_nope W_k_b^T turns each query into the latent space, so
attention runs as MQA over [c, rope(k_rope)] keys and c values; the latent output is then
expanded by W_v_b. `R` is the key's latent rank (kv_rank, or q_rank for the query
bottleneck); in the absorbed form a query's and key's head dim `H` is kv_rank + rope_head_dim.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

import errors
from models.layers import attention
from models.layers import common
from models.layers import norms
from models.layers import positions as positions_lib


def dims(cfg) -> tuple[int, int, int, int, int]:
  """(q_rank, kv_rank, nope_head_dim, rope_head_dim, v_head_dim) from `attention.mla`."""
  m = cfg.attention.mla
  return m.q_rank, m.kv_rank, m.nope_head_dim, m.rope_head_dim, m.v_head_dim


def softmax_scale(cfg) -> float:
  """`attention.softmax_scale`, else 1/sqrt(nope + rope dims) times YaRN's mscale(all dims)^2.

  The YaRN factor is what transformers' DeepSeek V2/V3 apply when `rope_scaling.kind='yarn'`
  with `mscale_all_dim` set.
  """
  if cfg.attention.softmax_scale:
    return cfg.attention.softmax_scale
  _, _, nope, rope, _ = dims(cfg)
  scale = (nope + rope) ** -0.5
  s = cfg.rope_scaling
  if cfg.position == 'rope' and s.kind == 'yarn' and s.mscale_all_dim:
    scale *= positions_lib.yarn_mscale(s.factor, s.mscale_all_dim) ** 2
  return scale


class MLAttention(attention.AttentionBase):
  """MLA over the row (global); `SlidingMLAttention` is its windowed form."""
  IGNORES = ('attention.window',)
  BLOCK_DIFFUSION = True  # its training rows' mask comes from `attention.attend`

  @classmethod
  def validate(cls, cfg):
    q_rank, kv_rank, nope, rope, hv = dims(cfg)
    if cfg.num_heads <= 0:
      raise errors.ConfigError(f'model.num_heads={cfg.num_heads} must be positive')
    for name, value in (('kv_rank', kv_rank), ('nope_head_dim', nope), ('v_head_dim', hv)):
      if value <= 0:
        raise errors.ConfigError(f'model.attention.mla.{name}={value} must be positive')
    if q_rank < 0:
      raise errors.ConfigError(f'model.attention.mla.q_rank={q_rank} must be >= 0 (0: no query bottleneck)')
    if rope < 0 or rope % 2 or (cfg.position == 'rope' and rope == 0):
      raise errors.ConfigError(f'model.attention.mla.rope_head_dim={rope} must be even, and positive '
                       f'with model.position=rope')
    if cfg.attention.qk_norm != 'none':
      raise errors.ConfigError(f"model.attention.qk_norm={cfg.attention.qk_norm!r} does not apply to "
                       f"attention.kind='mla' (it normalises its latents); use 'none'")
    attention.validate_shared(cfg, cls, (nope + rope, hv, kv_rank + rope))
    if cfg.position == 'rope':
      if cfg.rope_fraction != 1:
        raise errors.ConfigError(f"model.rope_fraction={cfg.rope_fraction} does not apply to "
                         f"attention.kind='mla'; set attention.mla.rope_head_dim")
      positions_lib.validate(cfg, rope)

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Forward FLOPs per token of the expanded form (training): projections + scores.

    Scores count every key of the row, or min(row, `attention.window`) keys for `W`.
    """
    d, n = cfg.d_model, cfg.num_heads
    q_rank, kv_rank, nope, rope, hv = dims(cfg)
    q = 2 * (d * q_rank + q_rank * n * (nope + rope)) if q_rank else 2 * d * n * (nope + rope)
    kv = 2 * d * (kv_rank + rope) + 2 * kv_rank * n * (nope + hv)
    o = 2 * n * hv * d
    gate = {'none': 0, 'headwise': 2 * d * n, 'elementwise': 2 * d * n * hv}[cfg.attention.output_gate]
    s = attention.score_length(cls, cfg, seq_len)
    return float(q + kv + o + gate + 2 * s * n * (nope + rope) + 2 * s * n * hv)

  @classmethod
  def xla_counts_once(cls, cfg, seq_len: int) -> bool:
    _, _, nope, rope, hv = dims(cfg)
    return attention.counts_once(cfg, (nope + rope, hv), seq_len)

  @classmethod
  def init_cache(cls, cfg, batch: int, max_len: int):
    """The latent c and the rotated RoPE key per token (a ring for `W`): (kv_rank + rope)
    numbers a token, whatever the number of heads."""
    _, kv_rank, _, rope, _ = dims(cfg)
    s, dtype = attention.cache_length(cls, cfg, max_len), attention.cache_dtype(cfg)
    return {
        'c_BSR': jnp.zeros((batch, s, kv_rank), dtype),
        'k_rope_BSH': jnp.zeros((batch, s, rope), dtype),
        'pos_BS': jnp.zeros((batch, s), jnp.int32),
        'seg_BS': jnp.zeros((batch, s), jnp.int32),
        'index': jnp.zeros((), jnp.int32),
    }

  def project(self, x_BTD, positions_BT) -> dict:
    """The projections both forms share (a subclass, DSA's `S`, reuses them): the query's
    parts `q_nope_BTNH` and rotated `q_rope_BTNH`, the normalised latent `c_BTR`, the
    rotated shared key `k_rope_BTH`, the expansions `w_k_RNH`, `w_v_RNH`, the normalised
    query latent `q_res_BTR` (None without `mla.q_rank`) and `sinks_N` (or None)."""
    cfg = self.cfg
    d, n = cfg.d_model, cfg.num_heads
    q_rank, kv_rank, nope, rope, hv = dims(cfg)
    assert x_BTD.shape[-1] == d, f'model.d_model={d} but input width {x_BTD.shape[-1]}'
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    std = cfg.init_std
    with_bias = attention.qkv_bias(cfg)

    def dense(name, x, shape, axes, s=std, contract=1, bias=False):
      w = self.param(name, common.normal_init(s, axes), shape, pdtype).astype(dtype)
      y = common.project(x, w, contract)
      if bias:
        y += self.param(name + '_bias', common.zeros_init(axes[contract:]), shape[contract:],
                        pdtype).astype(dtype)
      return y

    def latent_norm(name):  # RMSNorm; its eps is `mla.norm_eps` (DeepSeek's is fixed at 1e-6)
      return norms.Norm(kind='rmsnorm', eps=cfg.attention.mla.get('norm_eps', 0.0) or cfg.norm_eps,
                        zero_centred=cfg.norm_zero_centred, axes=('latent',), dtype=dtype,
                        param_dtype=pdtype, name=name)

    q_BTR = None
    if q_rank:
      q_BTR = latent_norm('q_a_norm')(dense('q_a', x_BTD, (d, q_rank), ('embed', 'latent'),
                                            bias=with_bias))
      q_BTNH = dense('q_b', q_BTR, (q_rank, n, nope + rope), ('latent', 'heads', 'head_dim'))
    else:
      q_BTNH = dense('q', x_BTD, (d, n, nope + rope), ('embed', 'heads', 'head_dim'), bias=with_bias)
    c_BTR = latent_norm('kv_a_norm')(dense('kv_a', x_BTD, (d, kv_rank), ('embed', 'latent'),
                                           bias=with_bias))
    k_rope_BTH = dense('k_rope', x_BTD, (d, rope), ('embed', 'head_dim'), bias=with_bias)
    q_nope_BTNH, q_rope_BTNH = q_BTNH[..., :nope], q_BTNH[..., nope:]
    if cfg.position == 'rope':
      rotate = positions_lib.Rope(dim=rope, theta=cfg.rope_theta, interleaved=cfg.rope_interleaved,
                                  scaling=cfg.rope_scaling)
      q_rope_BTNH = rotate(q_rope_BTNH, positions_BT)
      k_rope_BTH = rotate(k_rope_BTH[:, :, None, :], positions_BT)[:, :, 0]
    w_k_RNH = self.param('k_b', common.normal_init(std, ('latent', 'heads', 'head_dim')),
                         (kv_rank, n, nope), pdtype).astype(dtype)
    w_v_RNH = self.param('v_b', common.normal_init(std, ('latent', 'heads', 'head_dim')),
                         (kv_rank, n, hv), pdtype).astype(dtype)
    sinks_N = None
    if cfg.attention.sinks:
      sinks_N = self.param('sinks', common.zeros_init(('heads',)), (n,), pdtype)
    return dict(q_nope_BTNH=q_nope_BTNH, q_rope_BTNH=q_rope_BTNH, c_BTR=c_BTR,
                k_rope_BTH=k_rope_BTH, w_k_RNH=w_k_RNH, w_v_RNH=w_v_RNH, q_res_BTR=q_BTR,
                sinks_N=sinks_N)

  def output(self, x_BTD, out_BTNH):
    """The output gate, projection and bias: y = gate(out) W_o (+ b)."""
    cfg = self.cfg
    d, n, hv = cfg.d_model, cfg.num_heads, dims(cfg)[4]
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    out_BTNH = attention.output_gate(self, cfg, x_BTD, out_BTNH)
    out_BTNH = common.constrain(out_BTNH, ('batch', 'length', 'heads', 'head_dim'))
    w_o = self.param('o', common.normal_init(cfg.init_std / len(cfg.pattern) ** 0.5,
                                             ('heads', 'head_dim', 'embed')), (n, hv, d),
                     pdtype).astype(dtype)
    y_BTD = common.project(out_BTNH, w_o, 2)
    if attention.o_bias(cfg):
      y_BTD += self.param('o_bias', common.zeros_init(('embed',)), (d,), pdtype).astype(dtype)
    return y_BTD

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    cfg = self.cfg
    rope = dims(cfg)[3]
    dtype = common.dtype_of(cfg.dtype)
    p = self.project(x_BTD, positions_BT)
    c_BTR, k_rope_BTH, w_k_RNH, w_v_RNH = p['c_BTR'], p['k_rope_BTH'], p['w_k_RNH'], p['w_v_RNH']
    q_nope_BTNH, q_rope_BTNH = p['q_nope_BTNH'], p['q_rope_BTNH']
    shared = dict(scale=softmax_scale(cfg), window=self.window(cfg), sinks_N=p['sinks_N'])

    if cache is None:  # expanded form: per-head keys and values
      k_nope_BTNH = common.project(c_BTR, w_k_RNH)
      k_BTNH = jnp.concatenate(
          [k_nope_BTNH, jnp.broadcast_to(k_rope_BTH[:, :, None], k_nope_BTNH.shape[:3] + (rope,))], -1)
      v_BTNH = common.project(c_BTR, w_v_RNH)
      q_BTNH = jnp.concatenate([q_nope_BTNH, q_rope_BTNH], -1)
      q_BTNH = common.constrain(q_BTNH, ('batch', 'length', 'heads', 'head_dim'))
      k_BTNH = common.constrain(k_BTNH, ('batch', 'length', 'heads', 'head_dim'))
      out_BTNH = attention.attend(cfg, q_BTNH, k_BTNH, v_BTNH, q_pos_BT=positions_BT,
                                  q_seg_BT=segment_ids_BT, k_pos_BS=positions_BT,
                                  k_seg_BS=segment_ids_BT, blocked=True, **shared)
    else:  # absorbed form over the latent cache: MQA with [c, k_rope] keys and c values
      new, cache = attention.cache_write(
          cache, {'c_BSR': c_BTR, 'k_rope_BSH': k_rope_BTH, 'pos_BS': positions_BT,
                  'seg_BS': segment_ids_BT}, self.window(cfg))
      new = dict(new, c_BSR=new['c_BSR'].astype(dtype), k_rope_BSH=new['k_rope_BSH'].astype(dtype))
      q_lat_BTNR = jnp.einsum('BTNH,RNH->BTNR', q_nope_BTNH, w_k_RNH)
      q_BTNH = jnp.concatenate([q_lat_BTNR, q_rope_BTNH.astype(q_lat_BTNR.dtype)], -1)
      k_BS1H = jnp.concatenate([new['c_BSR'], new['k_rope_BSH']], -1)[:, :, None]
      out_lat_BTNR = attention.attend(cfg, q_BTNH, k_BS1H, new['c_BSR'][:, :, None],
                                      q_pos_BT=positions_BT, q_seg_BT=segment_ids_BT,
                                      k_pos_BS=new['pos_BS'], k_seg_BS=new['seg_BS'], **shared)
      out_BTNH = jnp.einsum('BTNR,RNH->BTNH', out_lat_BTNR, w_v_RNH)
    return self.output(x_BTD, out_BTNH), {}, cache


class SlidingMLAttention(MLAttention):
  """MLA over the last `attention.window` positions (`W` with `attention.kind='mla'`)."""
  windowed: ClassVar[bool] = True
  IGNORES = ()
  BLOCK_DIFFUSION = False


attention.register_kind('mla', MLAttention, SlidingMLAttention)
