"""Softmax attention sublayer `A`: MHA / GQA / MQA with RoPE or no positions, and a KV cache.

One module serves training (a packed row; attention never crosses a segment), prefill and
step-by-step decoding (a cache of keys, values, their positions and segments). Logits and
softmax are float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import models
from models.layers import common
from models.layers import positions as positions_lib

IMPLS = ('xla', 'dot_product', 'auto')


def attention_mask(q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, *, causal: bool):
  """True where query t may attend key s: same non-zero segment and, if causal, s <= t."""
  mask_BTS = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (k_seg_BS[:, None, :] != 0)
  if causal:
    mask_BTS &= q_pos_BT[:, :, None] >= k_pos_BS[:, None, :]
  return mask_BTS


def dot_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float):
  """Reference attention: GQA by grouping the query heads of each kv head.

  The products run as batched matmuls over (batch, kv head) with one free dimension each
  side ((group x query) rows against keys): XLA:CPU runs those about 1.5x faster than the
  equivalent einsum with two free dimensions, backward included.
  """
  b, t, n, h = q_BTNH.shape
  s, k = k_BSKH.shape[1], k_BSKH.shape[2]
  g = n // k
  q_BKRH = q_BTNH.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  logits_BKRS = jnp.matmul(q_BKRH, k_BSKH.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)
  logits_BKGTS = logits_BKRS.reshape(b, k, g, t, s) * scale
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, -1e30)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  # A query row with no visible key (padding) gets zeros, not a uniform average.
  probs_BKGTS = jnp.where(mask_BTS[:, None, None], probs_BKGTS, 0.0)
  out_BKRH = jnp.matmul(probs_BKGTS.reshape(b, k, g * t, s).astype(v_BSKH.dtype),
                        v_BSKH.transpose(0, 2, 1, 3))
  return out_BKRH.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def library_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float):
  """`jax.nn.dot_product_attention` (cuDNN on GPU where its constraints hold)."""
  out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                          scale=scale)
  any_T = jnp.any(mask_BTS, axis=-1)[..., None, None]
  return jnp.where(any_T, out_BTNH, 0.0).astype(q_BTNH.dtype)


def causal_blocks(attend, q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float, block: int):
  """`attend` over query blocks of `block` rows, each against the keys up to its last row.

  Skips the key blocks a causal mask hides entirely (about half the work at long rows). It
  relies on what packed training rows guarantee: keys are the queries' own row and a key
  after a query's index is never visible to it (positions increase within each segment).
  """
  t = q_BTNH.shape[1]
  if not block or t <= block or t % block or k_BSKH.shape[1] != t:
    return attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
  outs = []
  for start in range(0, t, block):
    end = start + block
    outs.append(attend(q_BTNH[:, start:end], k_BSKH[:, :end], v_BSKH[:, :end],
                       mask_BTS[:, start:end, :end], scale))
  return jnp.concatenate(outs, axis=1)


@models.register_sublayer('A')
class Attention(nn.Module):
  """Global softmax attention over the row (causal unless the model is bidirectional)."""
  cfg: object  # FrozenConfigDict of config.model

  @classmethod
  def validate(cls, cfg):
    n, k = cfg.num_heads, cfg.num_kv_heads
    if n <= 0 or k <= 0 or n % k:
      raise ValueError(f'model.num_heads={n} must be a positive multiple of '
                       f'model.num_kv_heads={k}')
    if cfg.attention.impl not in IMPLS:
      raise ValueError(f'model.attention.impl={cfg.attention.impl!r} is not one of {IMPLS}')
    if cfg.attention.causal_block < 0:
      raise ValueError(f'model.attention.causal_block={cfg.attention.causal_block} must be >= 0')
    if cfg.position == 'rope' and head_dim(cfg) % 2:
      raise ValueError(f'RoPE needs an even head dim, model.head_dim={head_dim(cfg)}')

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Forward FLOPs per token: projections + QK^T and PV over the full row.

    No causal halving, as in PaLM's MFU: the full T x T scores. `attention.causal_block`
    skips key blocks that the causal mask hides, so the hardware executes less than this
    at long rows; halve the 4*T*N*H term for the 'useful' count.
    """
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    projections = 2 * d * h * (2 * n + 2 * k)
    scores = 4 * seq_len * n * h
    return float(projections + scores)

  @classmethod
  def init_cache(cls, cfg, batch: int, max_len: int):
    k, h = cfg.num_kv_heads, head_dim(cfg)
    dtype = common.dtype_of(cfg.dtype)
    return {
        'k_BSKH': jnp.zeros((batch, max_len, k, h), dtype),
        'v_BSKH': jnp.zeros((batch, max_len, k, h), dtype),
        'pos_BS': jnp.zeros((batch, max_len), jnp.int32),
        'seg_BS': jnp.zeros((batch, max_len), jnp.int32),
        'index': jnp.zeros((), jnp.int32),
    }

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    cfg = self.cfg
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    assert x_BTD.shape[-1] == d, f'model.d_model={d} but input width {x_BTD.shape[-1]}'
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    std, out_std = cfg.init_std, cfg.init_std / len(cfg.pattern) ** 0.5

    def proj(name, shape, axes, s):
      w = self.param(name, common.normal_init(s, axes), shape, pdtype)
      return w.astype(dtype)

    def bias(name, shape, axes):
      return self.param(name, common.zeros_init(axes), shape, pdtype).astype(dtype)

    q_BTNH = common.project(x_BTD, proj('q', (d, n, h), ('embed', 'heads', 'head_dim'), std))
    k_BTKH = common.project(x_BTD, proj('k', (d, k, h), ('embed', 'kv_heads', 'head_dim'), std))
    v_BTKH = common.project(x_BTD, proj('v', (d, k, h), ('embed', 'kv_heads', 'head_dim'), std))
    if cfg.use_bias:
      q_BTNH += bias('q_bias', (n, h), ('heads', 'head_dim'))
      k_BTKH += bias('k_bias', (k, h), ('kv_heads', 'head_dim'))
      v_BTKH += bias('v_bias', (k, h), ('kv_heads', 'head_dim'))
    q_BTNH = common.constrain(q_BTNH, ('batch', 'length', 'heads', 'head_dim'))
    k_BTKH = common.constrain(k_BTKH, ('batch', 'length', 'kv_heads', 'head_dim'))
    v_BTKH = common.constrain(v_BTKH, ('batch', 'length', 'kv_heads', 'head_dim'))
    if cfg.position == 'rope':
      q_BTNH = positions_lib.apply_rope(q_BTNH, positions_BT, cfg.rope_theta)
      k_BTKH = positions_lib.apply_rope(k_BTKH, positions_BT, cfg.rope_theta)

    aux = {}
    if cache is None:
      k_BSKH, v_BSKH, k_pos_BS, k_seg_BS = k_BTKH, v_BTKH, positions_BT, segment_ids_BT
    else:
      i = cache['index']
      write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, 1)
      k_BSKH, v_BSKH = write(cache['k_BSKH'], k_BTKH), write(cache['v_BSKH'], v_BTKH)
      k_pos_BS = write(cache['pos_BS'], positions_BT)
      k_seg_BS = write(cache['seg_BS'], segment_ids_BT)
      aux['cache'] = {'k_BSKH': k_BSKH, 'v_BSKH': v_BSKH, 'pos_BS': k_pos_BS,
                      'seg_BS': k_seg_BS, 'index': i + x_BTD.shape[1]}

    mask_BTS = attention_mask(positions_BT, segment_ids_BT, k_pos_BS, k_seg_BS,
                              causal=not cfg.bidirectional)
    scale = cfg.attention.softmax_scale or h ** -0.5
    impl = cfg.attention.impl
    if impl == 'auto':
      impl = 'dot_product'
    attend = dot_attention if impl == 'xla' else library_attention
    if cache is None and not cfg.bidirectional:
      out_BTNH = causal_blocks(attend, q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale,
                               cfg.attention.causal_block)
    else:
      out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
    out_BTNH = common.constrain(out_BTNH, ('batch', 'length', 'heads', 'head_dim'))
    y_BTD = common.project(out_BTNH, proj('o', (n, h, d), ('heads', 'head_dim', 'embed'), out_std), 2)
    if cfg.use_bias:
      y_BTD += bias('o_bias', (d,), ('embed',))
    return y_BTD, aux


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.d_model // cfg.num_heads
