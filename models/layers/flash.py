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

Block diffusion (`diffusion_block` = C > 0, rows [x_noisy, x]): the caller marks the noisy
half by negating its segment ids, and each block's mask is BD3-LM's
(`attention.block_diffusion_mask`) from positions // C and those signs; every key block is
visited (skipping the hidden ones of this mask is not done yet).

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
              skip: bool = False, diffusion_block: int = 0):
  """Softmax attention of queries (B, T, N, H) over keys and values (B, S, K, H).

  N must be a multiple of K (GQA); values may have another head dim H than queries and keys
  (MLA). `block` is the number of query and key positions per block; rows that are not a
  multiple of it are padded with segment 0 (which nothing sees) and cut off again.
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
  # Queries (T) outside their groups (G), merged: (B, K, T x G, H) `rows`, so the rows of a
  # query block are one contiguous slice (see `_rows_of_block`).
  q_rows = q_BTNH.reshape(b, t + t_pad, k, g, h).transpose(0, 2, 1, 3, 4).reshape(b, k, -1, h)
  k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.transpose(0, 2, 1, 3)
  sinks_KG = None if sinks_N is None else sinks_N.astype(jnp.float32).reshape(k, g)
  if diffusion_block and (causal or window or skip):
    raise ValueError('flash attention: diffusion_block needs causal=False, window=0, skip=False')
  static = _Static(scale=float(scale), tq=tq, tk=tk, g=g, causal=causal, window=int(window),
                   skip=skip, diffusion_block=int(diffusion_block))
  out_rows = _flash(static, q_rows, k_BKSH, v_BKSH, q_pos_BT.astype(jnp.int32),
                    q_seg_BT.astype(jnp.int32), k_pos_BS.astype(jnp.int32),
                    k_seg_BS.astype(jnp.int32), sinks_KG)
  hv = v_BSKH.shape[-1]
  out_BTNH = out_rows.reshape(b, k, t + t_pad, g, hv).transpose(0, 2, 1, 3, 4)
  return out_BTNH.reshape(b, t + t_pad, n, hv)[:, :t]


class _Static(NamedTuple):
  """The static (hashable) arguments of `_flash`: scale, block sizes, GQA group, mask kind."""
  scale: float
  tq: int      # query positions per block (a block's T)
  tk: int      # key positions per block (a block's S)
  g: int       # query heads per kv head
  causal: bool
  window: int
  skip: bool   # visit only the key blocks the mask can leave visible (training rows)
  diffusion_block: int = 0  # BD3-LM's mask with blocks of this many positions (segments < 0: noisy)


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


def _block_mask(st: _Static, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS):
  """The reference mask of one block (T = st.tq queries, S = st.tk keys), broadcast over kv
  heads and groups."""
  if st.diffusion_block:
    c = st.diffusion_block
    q_noisy_BT1, k_noisy_B1S = (q_seg_BT < 0)[:, :, None], (k_seg_BS < 0)[:, None, :]
    ahead_BTS = q_pos_BT[:, :, None] // c - k_pos_BS[:, None, :] // c
    same_BTS = (jnp.abs(q_seg_BT)[:, :, None] == jnp.abs(k_seg_BS)[:, None, :]) & (
        k_seg_BS[:, None, :] != 0)
    visible_BTS = jnp.where(q_noisy_BT1, jnp.where(k_noisy_B1S, ahead_BTS == 0, ahead_BTS > 0),
                            ~k_noisy_B1S & (ahead_BTS >= 0))
    return (same_BTS & visible_BTS)[:, None, :, None, :]
  mask_BTS = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (k_seg_BS[:, None, :] != 0)
  distance_BTS = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  if st.causal:
    mask_BTS &= distance_BTS >= 0
  if st.window:
    mask_BTS &= (distance_BTS if st.causal else jnp.abs(distance_BTS)) < st.window
  return mask_BTS[:, None, :, None, :]


def _scores(st: _Static, q_BKTGH, k_BKSH, mask_B1T1S):
  """Scaled, masked logits of one block, float32; hidden ones are -inf."""
  b, kv, t, g, h = q_BKTGH.shape
  logits_BKTGS = jnp.matmul(q_BKTGH.reshape(b, kv, t * g, h), jnp.swapaxes(k_BKSH, -1, -2),
                            preferred_element_type=jnp.float32).reshape(b, kv, t, g, -1) * st.scale
  return jnp.where(mask_B1T1S, logits_BKTGS, -jnp.inf)


def _slice(x, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


# A name ending in `rows` holds (B, K, T x G, ...): a kv head's query rows, each query's G
# heads adjacent, so query block i is the contiguous slice [i T G, (i + 1) T G) of a row's.
# No key letter names the merged T x G, so these names carry no suffix. The matmuls take the
# rows as one dimension, and the full-row arrays (queries, output, its gradients) stay merged:
# carried 5-D through the loops, XLA:CPU copied the queries once more and summed D in another
# order, moving the gradients by an ulp. In the loops, names with `i` are query block i's
# (`qi_BKTGH`: its T = st.tq queries) and names with `j` key block j's (`kj_BKSH`: its
# S = st.tk keys), as in FlashAttention's Q_i and K_j; the others span the whole row.


def _rows_of_block(st: _Static, x_rows, i):
  """Query block i's rows of a `rows` array, as (B, K, T, G, ...) with T = st.tq."""
  b, kv, _, last = x_rows.shape
  block_rows = st.tq * st.g
  return _slice(x_rows, i * block_rows, block_rows, 2).reshape(b, kv, st.tq, st.g, last)


def _forward(st: _Static, q_rows, k_BKSH, v_BKSH, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS,
             sinks_KG):
  b, kv, num_rows, _ = q_rows.shape
  hv = v_BKSH.shape[-1]
  block_rows = st.tq * st.g
  num_q, num_k = num_rows // block_rows, k_BKSH.shape[2] // st.tk

  def query_block(i, carry):
    out_rows, lse_BKTG1 = carry
    qi_BKTGH = _rows_of_block(st, q_rows, i)
    qi_pos_BT = _slice(q_pos_BT, i * st.tq, st.tq, 1)
    qi_seg_BT = _slice(q_seg_BT, i * st.tq, st.tq, 1)

    def key_block(j, state):
      m_BKTG1, l_BKTG1, acc_BKTGH = state
      kj_BKSH, vj_BKSH = _slice(k_BKSH, j * st.tk, st.tk, 2), _slice(v_BKSH, j * st.tk, st.tk, 2)
      mask_B1T1S = _block_mask(st, qi_pos_BT, qi_seg_BT, _slice(k_pos_BS, j * st.tk, st.tk, 1),
                               _slice(k_seg_BS, j * st.tk, st.tk, 1))
      logits_BKTGS = _scores(st, qi_BKTGH, kj_BKSH, mask_B1T1S)
      m_new_BKTG1 = jnp.maximum(m_BKTG1, jnp.max(logits_BKTGS, -1, keepdims=True))
      p_BKTGS = jnp.exp(logits_BKTGS - m_new_BKTG1)
      correction_BKTG1 = jnp.exp(m_BKTG1 - m_new_BKTG1)
      l_BKTG1 = l_BKTG1 * correction_BKTG1 + jnp.sum(p_BKTGS, -1, keepdims=True)
      p_rows = p_BKTGS.reshape(b, kv, block_rows, st.tk).astype(vj_BKSH.dtype)
      pv_BKTGH = jnp.matmul(p_rows, vj_BKSH, preferred_element_type=jnp.float32).reshape(
          b, kv, st.tq, st.g, hv)
      acc_BKTGH = acc_BKTGH * correction_BKTG1 + pv_BKTGH
      return m_new_BKTG1, l_BKTG1, acc_BKTGH

    if sinks_KG is None:
      m0_BKTG1 = jnp.full((b, kv, st.tq, st.g, 1), _NEG, jnp.float32)
      l0_BKTG1 = jnp.zeros((b, kv, st.tq, st.g, 1), jnp.float32)
    else:  # the sink is one more logit with no value: start the row there
      m0_BKTG1 = jnp.broadcast_to(sinks_KG[None, :, None, :, None], (b, kv, st.tq, st.g, 1))
      l0_BKTG1 = jnp.ones((b, kv, st.tq, st.g, 1), jnp.float32)
    acc0_BKTGH = jnp.zeros((b, kv, st.tq, st.g, hv), jnp.float32)
    lo, hi = _key_range(st, i, num_k)
    m_BKTG1, l_BKTG1, acc_BKTGH = jax.lax.fori_loop(lo, hi, key_block,
                                                    (m0_BKTG1, l0_BKTG1, acc0_BKTGH))
    seen_BKTG1 = l_BKTG1 > 0
    inv_l_BKTG1 = jnp.where(seen_BKTG1, 1.0 / jnp.where(seen_BKTG1, l_BKTG1, 1.0), 0.0)
    outi_BKTGH = (acc_BKTGH * inv_l_BKTG1).astype(out_rows.dtype)
    lsei_BKTG1 = jnp.where(seen_BKTG1, m_BKTG1 + jnp.log(jnp.where(seen_BKTG1, l_BKTG1, 1.0)),
                           _EMPTY_LSE)
    out_rows = jax.lax.dynamic_update_slice_in_dim(
        out_rows, outi_BKTGH.reshape(b, kv, block_rows, hv), i * block_rows, 2)
    lse_BKTG1 = jax.lax.dynamic_update_slice_in_dim(lse_BKTG1, lsei_BKTG1, i * st.tq, 2)
    return out_rows, lse_BKTG1

  out0_rows = jnp.zeros((b, kv, num_rows, hv), q_rows.dtype)
  lse0_BKTG1 = jnp.zeros((b, kv, num_rows // st.g, st.g, 1), jnp.float32)
  return jax.lax.fori_loop(0, num_q, query_block, (out0_rows, lse0_BKTG1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q_rows, k_BKSH, v_BKSH, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, sinks_KG):
  out_rows, _ = _forward(st, q_rows, k_BKSH, v_BKSH, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS,
                         sinks_KG)
  return out_rows


def _flash_fwd(st, q_rows, k_BKSH, v_BKSH, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, sinks_KG):
  out_rows, lse_BKTG1 = _forward(st, q_rows, k_BKSH, v_BKSH, q_pos_BT, q_seg_BT, k_pos_BS,
                                 k_seg_BS, sinks_KG)
  residuals = (q_rows, k_BKSH, v_BKSH, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, sinks_KG,
               out_rows, lse_BKTG1)
  return out_rows, residuals


def _flash_bwd(st, residuals, dout_rows):
  (q_rows, k_BKSH, v_BKSH, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, sinks_KG, out_rows,
   lse_BKTG1) = residuals
  b, kv, num_rows, h = q_rows.shape
  hv = v_BKSH.shape[-1]
  block_rows = st.tq * st.g
  num_q, num_k = num_rows // block_rows, k_BKSH.shape[2] // st.tk
  # D = rowsum(dO * O): the softmax backward's per-row term.
  delta_rows = jnp.sum(dout_rows.astype(jnp.float32) * out_rows.astype(jnp.float32), -1)
  delta_BKTG1 = delta_rows.reshape(b, kv, num_rows // st.g, st.g, 1)

  def key_block(j, carry):
    dq_rows, dk_BKSH, dv_BKSH = carry
    kj_BKSH, vj_BKSH = _slice(k_BKSH, j * st.tk, st.tk, 2), _slice(v_BKSH, j * st.tk, st.tk, 2)
    kj_pos_BS = _slice(k_pos_BS, j * st.tk, st.tk, 1)
    kj_seg_BS = _slice(k_seg_BS, j * st.tk, st.tk, 1)

    def query_block(i, state):
      dq_rows, dkj_BKSH, dvj_BKSH = state
      qi_BKTGH = _rows_of_block(st, q_rows, i)
      doi_rows = _slice(dout_rows, i * block_rows, block_rows, 2)
      mask_B1T1S = _block_mask(st, _slice(q_pos_BT, i * st.tq, st.tq, 1),
                               _slice(q_seg_BT, i * st.tq, st.tq, 1), kj_pos_BS, kj_seg_BS)
      logits_BKTGS = _scores(st, qi_BKTGH, kj_BKSH, mask_B1T1S)
      p_BKTGS = jnp.exp(logits_BKTGS - _slice(lse_BKTG1, i * st.tq, st.tq, 2))
      # Each product takes the block's (T x G) rows as one dimension.
      p_rows = p_BKTGS.reshape(b, kv, block_rows, st.tk)
      dvj_BKSH += jnp.matmul(jnp.swapaxes(p_rows, -1, -2).astype(doi_rows.dtype), doi_rows,
                             preferred_element_type=jnp.float32)
      dp_BKTGS = jnp.matmul(doi_rows, jnp.swapaxes(vj_BKSH, -1, -2),
                            preferred_element_type=jnp.float32).reshape(p_BKTGS.shape)
      delta_i_BKTG1 = _slice(delta_BKTG1, i * st.tq, st.tq, 2)
      ds_BKTGS = p_BKTGS * (dp_BKTGS - delta_i_BKTG1) * st.scale
      ds_rows = ds_BKTGS.reshape(b, kv, block_rows, st.tk).astype(qi_BKTGH.dtype)
      dqi_rows = jnp.matmul(ds_rows, kj_BKSH, preferred_element_type=jnp.float32)
      dq_rows = jax.lax.dynamic_update_slice_in_dim(
          dq_rows, _slice(dq_rows, i * block_rows, block_rows, 2) + dqi_rows, i * block_rows, 2)
      dkj_BKSH += jnp.matmul(jnp.swapaxes(ds_rows, -1, -2), qi_BKTGH.reshape(b, kv, block_rows, h),
                             preferred_element_type=jnp.float32)
      return dq_rows, dkj_BKSH, dvj_BKSH

    lo, hi = _query_range(st, j, num_q)
    dkj0_BKSH = jnp.zeros((b, kv, st.tk, h), jnp.float32)
    dvj0_BKSH = jnp.zeros((b, kv, st.tk, hv), jnp.float32)
    dq_rows, dkj_BKSH, dvj_BKSH = jax.lax.fori_loop(lo, hi, query_block,
                                                    (dq_rows, dkj0_BKSH, dvj0_BKSH))
    dk_BKSH = jax.lax.dynamic_update_slice_in_dim(dk_BKSH, dkj_BKSH, j * st.tk, 2)
    dv_BKSH = jax.lax.dynamic_update_slice_in_dim(dv_BKSH, dvj_BKSH, j * st.tk, 2)
    return dq_rows, dk_BKSH, dv_BKSH

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq_rows, dk_BKSH, dv_BKSH = jax.lax.fori_loop(0, num_k, key_block,
                                                (zeros(q_rows), zeros(k_BKSH), zeros(v_BKSH)))
  dsinks_KG = None
  if sinks_KG is not None:
    # d out / d sink = -p_sink * out, so d sink = -sum over rows of p_sink * D.
    p_sink_BKTG1 = jnp.exp(sinks_KG[None, :, None, :, None] - lse_BKTG1)
    dsinks_KG = -jnp.sum(p_sink_BKTG1 * delta_BKTG1, axis=(0, 2, 4))
  return (dq_rows.astype(q_rows.dtype), dk_BKSH.astype(k_BKSH.dtype),
          dv_BKSH.astype(v_BKSH.dtype), None, None, None, None, dsinks_KG)


_flash.defvjp(_flash_fwd, _flash_bwd)
