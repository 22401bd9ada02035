"""Blocked attention with a running softmax and a hand-written backward, in plain JAX.

`attention.impl='flash'`. The score matrix is never materialised: for each block of
`block` queries the keys are visited `block` at a time, keeping the running row maximum,
denominator and output (FlashAttention's forward), and the backward recomputes each block's
probabilities from the saved log-partition instead of storing them (FlashAttention-2's
backward: key blocks outer, query blocks inner). Both passes are `fori_loop`s, so compile
time does not grow with the sequence length, and every block stays small enough to live in
cache, which is what makes it faster than the reference on a CPU at long rows.

The mask is the reference's (`attention.attention_mask`: same non-zero segment, causal by
position, window), built per block from positions and segment ids. With `skip=True`
(training rows: keys are the queries' own row, positions increase by at least one per row
within a segment) the loops also skip the key blocks that lie after a query block, or
`window` or more rows before it, which the mask would hide entirely.

Sinks (GPT-OSS) start each row's running maximum and denominator at the sink logit and
exp(0) = 1, so they cost nothing per block. A row with no visible key returns zeros, as the
reference does. Logits, probabilities and accumulators are float32; the matmul inputs keep
the model's dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = -1e30      # the running maximum's start: finite, so exp(start - max) is never nan
_EMPTY_LSE = 1e30  # log-partition of a row that sees no key: exp(s - this) = 0


def attention(q_BTNH, k_BSKH, v_BSKH, *, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, scale: float,
              causal: bool, window: int = 0, sinks_N=None, block: int = 128,
              skip: bool = False):
  """Softmax attention of queries (B, T, N, H) over keys and values (B, S, K, H / Hv).

  N must be a multiple of K (GQA); values may have another head dim (MLA). `block` is the
  number of query and key positions per block; rows that are not a multiple of it are
  padded with segment 0 (which nothing sees) and cut off again.
  """
  b, t, n, h = q_BTNH.shape
  s, k = k_BSKH.shape[1], k_BSKH.shape[2]
  if n % k:
    raise ValueError(f'flash attention: {n} query heads is not a multiple of {k} kv heads')
  if block <= 0:
    raise ValueError(f'flash attention: block={block} must be positive')
  if skip and s != t:
    raise ValueError(f'flash attention: skip=True needs the keys to be the queries\' row, '
                     f'got {t} queries and {s} keys')
  g = n // k
  tq = min(block, t)
  tk = min(block, s)
  t_pad, s_pad = -t % tq, -s % tk
  pad = lambda x, p: jnp.pad(x, [(0, 0), (0, p)] + [(0, 0)] * (x.ndim - 2)) if p else x
  q_BTNH, q_pos_BT, q_seg_BT = pad(q_BTNH, t_pad), pad(q_pos_BT, t_pad), pad(q_seg_BT, t_pad)
  k_BSKH, v_BSKH = pad(k_BSKH, s_pad), pad(v_BSKH, s_pad)
  k_pos_BS, k_seg_BS = pad(k_pos_BS, s_pad), pad(k_seg_BS, s_pad)
  # Rows of the score blocks are (query, group) pairs, so a query block is a contiguous slice.
  q_BKRH = q_BTNH.reshape(b, t + t_pad, k, g, h).transpose(0, 2, 1, 3, 4).reshape(b, k, -1, h)
  k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
  v_BKSV = v_BSKH.transpose(0, 2, 1, 3)
  sinks_KG = None if sinks_N is None else sinks_N.astype(jnp.float32).reshape(k, g)
  static = _Static(scale=float(scale), tq=tq, tk=tk, g=g, causal=causal, window=int(window),
                   skip=skip)
  out_BKRV = _flash(static, q_BKRH, k_BKSH, v_BKSV, q_pos_BT.astype(jnp.int32),
                    q_seg_BT.astype(jnp.int32), k_pos_BS.astype(jnp.int32),
                    k_seg_BS.astype(jnp.int32), sinks_KG)
  hv = v_BSKH.shape[-1]
  out_BTNV = out_BKRV.reshape(b, k, t + t_pad, g, hv).transpose(0, 2, 1, 3, 4)
  return out_BTNV.reshape(b, t + t_pad, n, hv)[:, :t]


class _Static(NamedTuple):
  """The static (hashable) arguments of `_flash`: scale, block sizes, GQA group, mask kind."""
  scale: float
  tq: int      # query positions per block
  tk: int      # key positions per block
  g: int       # query heads per kv head
  causal: bool
  window: int
  skip: bool   # visit only the key blocks the mask can leave visible (training rows)


def _key_range(st: _Static, i, num_k: int):
  """Key blocks [lo, hi) that query block `i` visits."""
  if not st.skip:
    return 0, num_k
  hi = num_k
  if st.causal:  # keys with an index below the block's end
    hi = jnp.minimum(num_k, ((i + 1) * st.tq + st.tk - 1) // st.tk)
  lo = 0
  if st.window:  # keys fewer than `window` rows before the block's first query
    lo = jnp.maximum(0, (i * st.tq - st.window + 1) // st.tk)
  return lo, hi


def _query_range(st: _Static, j, num_q: int):
  """Query blocks [lo, hi) that visit key block `j` (the inverse of `_key_range`)."""
  if not st.skip:
    return 0, num_q
  lo = 0
  if st.causal:
    lo = (j * st.tk) // st.tq
  hi = num_q
  if st.window:
    hi = jnp.minimum(num_q, ((j + 1) * st.tk + st.window - 1 + st.tq - 1) // st.tq)
  return lo, hi


def _block_mask(st: _Static, q_pos_Bt, q_seg_Bt, k_pos_Bs, k_seg_Bs):
  """(B, 1, tq, 1, tk): the reference mask of one block, broadcast over kv heads and groups."""
  mask = (q_seg_Bt[:, :, None] == k_seg_Bs[:, None, :]) & (k_seg_Bs[:, None, :] != 0)
  distance = q_pos_Bt[:, :, None] - k_pos_Bs[:, None, :]
  if st.causal:
    mask &= distance >= 0
  if st.window:
    mask &= (distance if st.causal else jnp.abs(distance)) < st.window
  return mask[:, None, :, None, :]


def _scores(st: _Static, q_BKrH, k_BKsH, mask):
  """Scaled, masked logits of one block, (B, K, tq, G, tk) float32; hidden ones are -inf."""
  b, kv = q_BKrH.shape[:2]
  s_BKrs = jnp.matmul(q_BKrH, jnp.swapaxes(k_BKsH, -1, -2), preferred_element_type=jnp.float32)
  s_BKtGs = s_BKrs.reshape(b, kv, st.tq, st.g, -1) * st.scale
  return jnp.where(mask, s_BKtGs, -jnp.inf)


def _slice(x, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _forward(st: _Static, q_BKRH, k_BKSH, v_BKSV, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS,
             sinks_KG):
  b, kv, r, _ = q_BKRH.shape
  hv = v_BKSV.shape[-1]
  num_q, num_k = r // (st.tq * st.g), k_BKSH.shape[2] // st.tk
  rows = st.tq * st.g

  def query_block(i, carry):
    out_BKRV, lse_BKtG1 = carry
    q_BKrH = _slice(q_BKRH, i * rows, rows, 2)
    q_pos, q_seg = _slice(q_pos_BT, i * st.tq, st.tq, 1), _slice(q_seg_BT, i * st.tq, st.tq, 1)

    def key_block(j, state):
      m_BKtG1, l_BKtG1, acc_BKrV = state
      k_BKsH, v_BKsV = _slice(k_BKSH, j * st.tk, st.tk, 2), _slice(v_BKSV, j * st.tk, st.tk, 2)
      mask = _block_mask(st, q_pos, q_seg, _slice(k_pos_BS, j * st.tk, st.tk, 1),
                         _slice(k_seg_BS, j * st.tk, st.tk, 1))
      s_BKtGs = _scores(st, q_BKrH, k_BKsH, mask)
      m_new = jnp.maximum(m_BKtG1, jnp.max(s_BKtGs, -1, keepdims=True))
      p_BKtGs = jnp.exp(s_BKtGs - m_new)
      correction = jnp.exp(m_BKtG1 - m_new)
      l_BKtG1 = l_BKtG1 * correction + jnp.sum(p_BKtGs, -1, keepdims=True)
      pv_BKrV = jnp.matmul(p_BKtGs.reshape(b, kv, rows, st.tk).astype(v_BKsV.dtype), v_BKsV,
                           preferred_element_type=jnp.float32)
      acc_BKrV = acc_BKrV * correction.reshape(b, kv, rows, 1) + pv_BKrV
      return m_new, l_BKtG1, acc_BKrV

    if sinks_KG is None:
      m0 = jnp.full((b, kv, st.tq, st.g, 1), _NEG, jnp.float32)
      l0 = jnp.zeros((b, kv, st.tq, st.g, 1), jnp.float32)
    else:  # the sink is one more logit with no value: start the row there
      m0 = jnp.broadcast_to(sinks_KG[None, :, None, :, None], (b, kv, st.tq, st.g, 1))
      l0 = jnp.ones((b, kv, st.tq, st.g, 1), jnp.float32)
    acc0 = jnp.zeros((b, kv, rows, hv), jnp.float32)
    lo, hi = _key_range(st, i, num_k)
    m, l, acc = jax.lax.fori_loop(lo, hi, key_block, (m0, l0, acc0))
    seen = l > 0
    inv_l = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    out = (acc * inv_l.reshape(b, kv, rows, 1)).astype(out_BKRV.dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _EMPTY_LSE)
    out_BKRV = jax.lax.dynamic_update_slice_in_dim(out_BKRV, out, i * rows, 2)
    lse_BKtG1 = jax.lax.dynamic_update_slice_in_dim(lse_BKtG1, lse, i * st.tq, 2)
    return out_BKRV, lse_BKtG1

  out0 = jnp.zeros((b, kv, r, hv), q_BKRH.dtype)
  lse0 = jnp.zeros((b, kv, r // st.g, st.g, 1), jnp.float32)
  return jax.lax.fori_loop(0, num_q, query_block, (out0, lse0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q_BKRH, k_BKSH, v_BKSV, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, sinks_KG):
  out_BKRV, _ = _forward(st, q_BKRH, k_BKSH, v_BKSV, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS,
                         sinks_KG)
  return out_BKRV


def _flash_fwd(st, q_BKRH, k_BKSH, v_BKSV, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, sinks_KG):
  out_BKRV, lse_BKTG1 = _forward(st, q_BKRH, k_BKSH, v_BKSV, q_pos_BT, q_seg_BT, k_pos_BS,
                                 k_seg_BS, sinks_KG)
  residuals = (q_BKRH, k_BKSH, v_BKSV, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, sinks_KG,
               out_BKRV, lse_BKTG1)
  return out_BKRV, residuals


def _flash_bwd(st, residuals, dout_BKRV):
  (q_BKRH, k_BKSH, v_BKSV, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, sinks_KG, out_BKRV,
   lse_BKTG1) = residuals
  b, kv, r, h = q_BKRH.shape
  hv = v_BKSV.shape[-1]
  num_q, num_k = r // (st.tq * st.g), k_BKSH.shape[2] // st.tk
  rows = st.tq * st.g
  # D = rowsum(dO * O): the softmax backward's per-row term.
  delta_BKTG1 = jnp.sum(dout_BKRV.astype(jnp.float32) * out_BKRV.astype(jnp.float32), -1)
  delta_BKTG1 = delta_BKTG1.reshape(b, kv, r // st.g, st.g, 1)

  def key_block(j, carry):
    dq_BKRH, dk_BKSH, dv_BKSV = carry
    k_BKsH, v_BKsV = _slice(k_BKSH, j * st.tk, st.tk, 2), _slice(v_BKSV, j * st.tk, st.tk, 2)
    k_pos, k_seg = _slice(k_pos_BS, j * st.tk, st.tk, 1), _slice(k_seg_BS, j * st.tk, st.tk, 1)

    def query_block(i, state):
      dq_BKRH, dk_BKsH, dv_BKsV = state
      q_BKrH = _slice(q_BKRH, i * rows, rows, 2)
      do_BKrV = _slice(dout_BKRV, i * rows, rows, 2)
      mask = _block_mask(st, _slice(q_pos_BT, i * st.tq, st.tq, 1),
                         _slice(q_seg_BT, i * st.tq, st.tq, 1), k_pos, k_seg)
      s_BKtGs = _scores(st, q_BKrH, k_BKsH, mask)
      p_BKtGs = jnp.exp(s_BKtGs - _slice(lse_BKTG1, i * st.tq, st.tq, 2))
      p_BKrs = p_BKtGs.reshape(b, kv, rows, st.tk)
      dv_BKsV += jnp.matmul(jnp.swapaxes(p_BKrs, -1, -2).astype(do_BKrV.dtype), do_BKrV,
                            preferred_element_type=jnp.float32)
      dp_BKrs = jnp.matmul(do_BKrV, jnp.swapaxes(v_BKsV, -1, -2), preferred_element_type=jnp.float32)
      delta = _slice(delta_BKTG1, i * st.tq, st.tq, 2)
      ds_BKtGs = p_BKtGs * (dp_BKrs.reshape(p_BKtGs.shape) - delta) * st.scale
      ds_BKrs = ds_BKtGs.reshape(b, kv, rows, st.tk).astype(q_BKrH.dtype)
      dq = jnp.matmul(ds_BKrs, k_BKsH, preferred_element_type=jnp.float32)
      dq_BKRH = jax.lax.dynamic_update_slice_in_dim(
          dq_BKRH, _slice(dq_BKRH, i * rows, rows, 2) + dq, i * rows, 2)
      dk_BKsH += jnp.matmul(jnp.swapaxes(ds_BKrs, -1, -2), q_BKrH,
                            preferred_element_type=jnp.float32)
      return dq_BKRH, dk_BKsH, dv_BKsV

    lo, hi = _query_range(st, j, num_q)
    zeros_k = jnp.zeros((b, kv, st.tk, h), jnp.float32)
    zeros_v = jnp.zeros((b, kv, st.tk, hv), jnp.float32)
    dq_BKRH, dk, dv = jax.lax.fori_loop(lo, hi, query_block, (dq_BKRH, zeros_k, zeros_v))
    dk_BKSH = jax.lax.dynamic_update_slice_in_dim(dk_BKSH, dk, j * st.tk, 2)
    dv_BKSV = jax.lax.dynamic_update_slice_in_dim(dv_BKSV, dv, j * st.tk, 2)
    return dq_BKRH, dk_BKSH, dv_BKSV

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv = jax.lax.fori_loop(0, num_k, key_block, (zeros(q_BKRH), zeros(k_BKSH), zeros(v_BKSV)))
  dsinks_KG = None
  if sinks_KG is not None:
    # d out / d sink = -p_sink * out, so d sink = -sum over rows of p_sink * D.
    p_sink = jnp.exp(sinks_KG[None, :, None, :, None] - lse_BKTG1)
    dsinks_KG = -jnp.sum(p_sink * delta_BKTG1, axis=(0, 2, 4))
  return (dq.astype(q_BKRH.dtype), dk.astype(k_BKSH.dtype), dv.astype(v_BKSV.dtype),
          None, None, None, None, dsinks_KG)


_flash.defvjp(_flash_fwd, _flash_bwd)
