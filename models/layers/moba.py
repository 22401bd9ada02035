"""MoBA block-sparse attention (Mixture of Block Attention, Moonshot AI): `B`, GQA softmax
attention whose queries each attend to their own block of keys plus the top-k earlier ones.

Keys are grouped in blocks of C = `moba.block` positions of their document: block j of a
document holds its positions jC .. jC + C - 1, so blocks restart with every document of a
packed row, as MoBA's varlen kernels chunk each sequence from its own start. Query t of
document d, in block J = pos_t // C, attends to

  * its own block J, causally (positions JC .. pos_t), and
  * the `moba.topk` earlier blocks j < J of d with the highest affinity q_t . mean(k of block j),
    per query head (against its kv head's keys); min(topk, J) of them.

Future blocks and other documents' blocks are never selected. MoBA's own `moba_topk` counts
the query's block among its top-k: it is `moba.topk + 1` here. With topk * C >= the row every
earlier block is selected and `B` is plain causal attention (the tests hold them equal).
Selection is discrete: the affinities pass no gradient (as in MoBA). Affinities, logits and
the softmax are float32. Projections, QK-norm, RoPE, biases and the output gate are `A`'s
(`attention.Attention.project`, `.output`); learned sinks are not supported.

Two implementations of the same function (`moba.impl`):
  gather  the efficient path: each query gathers the C keys and values of each of its
          topk + 1 blocks, then one softmax over (topk + 1) C keys: O(T k C) time and memory
          in the core, over blocks of `moba.query_block` query rows (`jax.checkpoint`ed, so
          the backward holds one block of queries at a time). The affinities cost
          O(T (T / C) N H) against block means made once per call (a segment sum, O(T K H)).
  dense   the reference: the T x S masked softmax, block means as sums of q . k over the
          block's keys (q . mean(k) = mean(q . k)).
`gather` relies on what packed training rows and the decode cache guarantee: a document's
tokens occupy consecutive rows with positions 0, 1, 2, ... (restarting at the row's start),
so block j of the document of the query in row r at position p starts at row r - p + jC.

Decoding caches keys and values as `A` does (the whole generation) and, beside them, the
float32 sum of each block's keys (`ksum_BAKH`: ceil(S / C) + 1 slots, block j of a row whose
document starts at row r0 in slot (r0 + jC) // C): a call adds its new keys to their blocks'
sums, so a step reads the means and (topk + 1) C keys instead of summing every cached key.
Slots are unique for one document per cache row after its padding, as `decode.Generator`
lays prompts out (two documents in one cache row could share a slot). The prefill and each
step select over the cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import errors
import models
from models.layers import attention
from models.layers import common
from models.layers import dsa

IMPLS = ('gather', 'dense')
NEG_INF = -1e30

DEFAULTS = dict(moba=dict(
    block=64,          # C: key positions per block (MoBA: 512 to 4096)
    topk=3,            # earlier blocks per query beside its own (MoBA's moba_topk - 1)
    impl='gather',     # gather (O(T k C) core) | dense (masked T x S reference)
    query_block=128,   # query rows per step of `gather` (each holds rows x N x (topk+1) x C keys)
))


def block_means(k_BSKH, pos_BS, seg_BS, block: int):
  """mean_BSKH[b, r]: the float32 mean key of the block whose first key sits in row r (only
  full blocks are ever read: a query's earlier blocks are complete). Padding (segment 0) is
  summed into a discarded slot."""
  b, s = pos_BS.shape
  start_BS = jnp.arange(s)[None] - pos_BS + (pos_BS // block) * block  # each key's block's row
  ids_BS = jnp.where(seg_BS != 0, start_BS, s)
  sums_BSKH = jax.vmap(lambda k_SKH, i_S: jax.ops.segment_sum(k_SKH, i_S, num_segments=s + 1))(
      k_BSKH.astype(jnp.float32), ids_BS)
  return sums_BSKH[:, :s] / block


def add_to_block_sums(sums_BAKH, k_BTKH, row_BT, pos_BT, seg_BT, block: int):
  """The decode cache's block sums after new keys k_BTKH at cache rows row_BT: each key is
  added in the slot of its block, its first row // C (module docstring); padding (segment 0)
  is dropped."""
  start_BT = row_BT - pos_BT + (pos_BT // block) * block
  ids_BT = jnp.where(seg_BT != 0, start_BT // block, sums_BAKH.shape[1])
  return jax.vmap(lambda m_AKH, i_T, k_TKH: m_AKH.at[i_T].add(k_TKH, mode='drop'))(
      sums_BAKH, ids_BT, k_BTKH.astype(jnp.float32))


def grouped(q_BTNH, k: int):
  """(B, T, N, H) -> (B, T, K, G, H): the query heads of each kv head."""
  b, t, n, h = q_BTNH.shape
  return q_BTNH.reshape(b, t, k, n // k, h)


def select_blocks(affinity_BTKGA, eligible_BTA, topk: int):
  """(idx_BTKGX, valid_BTKGX): each query head's min(topk, A) highest eligible blocks; fillers
  where fewer are eligible are not `valid`."""
  x = min(topk, affinity_BTKGA.shape[-1])
  eligible_BTKGA = jnp.broadcast_to(eligible_BTA[:, :, None, None], affinity_BTKGA.shape)
  masked_BTKGA = jnp.where(eligible_BTKGA, jax.lax.stop_gradient(affinity_BTKGA), -jnp.inf)
  _, idx_BTKGX = jax.lax.top_k(masked_BTKGA, x)
  return idx_BTKGX, jnp.take_along_axis(eligible_BTKGA, idx_BTKGX, axis=-1)


def masked_softmax(logits, mask):
  """float32 softmax over the last axis; rows with no visible key are zeros."""
  probs = jax.nn.softmax(jnp.where(mask, logits.astype(jnp.float32), NEG_INF), axis=-1)
  return jnp.where(mask, probs, 0.0)


def gather_core(q_BTNH, k_BSKH, v_BSKH, mean_BSKH, q_row_BT, q_pos_BT, q_seg_BT, *, block: int,
                topk: int, scale: float, means_by_slot: bool = False):
  """One block of queries by gathering: out_BTNH over each query's own block (causal) and its
  top-k earlier blocks (module docstring). `q_row_BT` is each query's row in the keys; the
  block means are `block_means`'s (by first row) or, `means_by_slot`, the decode cache's
  (by first row // C)."""
  b, t, n, h = q_BTNH.shape
  s, k = k_BSKH.shape[1], k_BSKH.shape[2]
  c, a = block, -(-s // block)
  start_BT = q_row_BT - q_pos_BT                     # the document's first row
  own_BT = q_pos_BT // c
  real_BT = q_seg_BT != 0
  q_BTKGH = grouped(q_BTNH, k)
  # Affinities against the means of the document's blocks 0 .. A-1 (only earlier ones eligible).
  first_BTA = jnp.clip(start_BT[..., None] + jnp.arange(a) * c, 0, s - 1)
  if means_by_slot:
    first_BTA //= c
  mean_BTAKH = jax.vmap(lambda m_SKH, r_TA: m_SKH[r_TA])(mean_BSKH, first_BTA)
  affinity_BTKGA = jnp.einsum('BTKGH,BTAKH->BTKGA', q_BTKGH.astype(jnp.float32), mean_BTAKH)
  eligible_BTA = (jnp.arange(a) < own_BT[..., None]) & real_BT[..., None]
  idx_BTKGX, valid_BTKGX = select_blocks(affinity_BTKGA, eligible_BTA, topk)
  # The own block joins the selected ones: X + 1 blocks of C keys per query head.
  shape = idx_BTKGX.shape[:-1] + (1,)
  per_head = lambda x_BT: jnp.broadcast_to(x_BT[:, :, None, None, None], shape)
  idx_BTKGX = jnp.concatenate([idx_BTKGX, per_head(own_BT)], -1)
  valid_BTKGX = jnp.concatenate([valid_BTKGX, per_head(real_BT)], -1)
  offset_BTKGXC = idx_BTKGX[..., None] * c + jnp.arange(c)  # key positions in the document
  pos_BT11111 = q_pos_BT[:, :, None, None, None, None]
  visible_BTKGXC = valid_BTKGX[..., None] & (offset_BTKGXC <= pos_BT11111)
  rows_BTKGXC = jnp.clip(start_BT[:, :, None, None, None, None] + offset_BTKGXC, 0, s - 1)
  batch_B11111 = jnp.arange(b).reshape(b, 1, 1, 1, 1, 1)
  head_11K111 = jnp.arange(k).reshape(1, 1, k, 1, 1, 1)
  k_BTKGXCH = k_BSKH[batch_B11111, rows_BTKGXC, head_11K111]
  v_BTKGXCH = v_BSKH[batch_B11111, rows_BTKGXC, head_11K111]
  logits_BTKGXC = jnp.einsum('BTKGH,BTKGXCH->BTKGXC', q_BTKGH, k_BTKGXCH,
                             preferred_element_type=jnp.float32) * scale
  lead = logits_BTKGXC.shape[:4]
  probs_BTKGS = masked_softmax(logits_BTKGXC.reshape(lead + (-1,)),
                               visible_BTKGXC.reshape(lead + (-1,)))
  out_BTKGH = jnp.einsum('BTKGS,BTKGSH->BTKGH', probs_BTKGS.astype(v_BTKGXCH.dtype),
                         v_BTKGXCH.reshape(lead + (-1, v_BTKGXCH.shape[-1])))
  return (out_BTKGH.reshape(b, t, n, -1),)


def dense_core(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, *, block: int,
               topk: int, scale: float):
  """The reference: the same selection as `gather_core` over the dense T x S scores."""
  b, t, n, h = q_BTNH.shape
  s, k = k_BSKH.shape[1], k_BSKH.shape[2]
  c, a = block, -(-s // block)
  mask_BTS = attention.attention_mask(q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, causal=True)
  dots_BTKGS = jnp.einsum('BTKGH,BSKH->BTKGS', grouped(q_BTNH, k), k_BSKH,
                          preferred_element_type=jnp.float32)
  key_block_BS = k_pos_BS // c
  member_BSA = (key_block_BS[..., None] == jnp.arange(a)).astype(jnp.float32)
  visible_dots_BTKGS = jnp.where(mask_BTS[:, :, None, None], dots_BTKGS, 0.0)
  affinity_BTKGA = jnp.einsum('BTKGS,BSA->BTKGA', visible_dots_BTKGS, member_BSA) / c
  own_BT = q_pos_BT // c
  eligible_BTA = (jnp.arange(a) < own_BT[..., None]) & (q_seg_BT[..., None] != 0)
  idx_BTKGX, valid_BTKGX = select_blocks(affinity_BTKGA, eligible_BTA, topk)
  chosen_BTKGA = jnp.any((idx_BTKGX[..., None] == jnp.arange(a)) & valid_BTKGX[..., None], -2)
  chosen_BTKGA |= (jnp.arange(a) == own_BT[..., None])[:, :, None, None]
  key_chosen_BTKGS = jnp.take_along_axis(
      chosen_BTKGA, jnp.broadcast_to(key_block_BS[:, None, None, None], dots_BTKGS.shape), axis=-1)
  allowed_BTKGS = key_chosen_BTKGS & mask_BTS[:, :, None, None]
  probs_BTKGS = masked_softmax(dots_BTKGS * scale, allowed_BTKGS)
  out_BTKGH = jnp.einsum('BTKGS,BSKH->BTKGH', probs_BTKGS.astype(v_BSKH.dtype), v_BSKH)
  return out_BTKGH.reshape(b, t, n, -1)


@models.register_sublayer('B')
class BlockSparseAttention(attention.Attention):
  """MoBA: GQA attention over each query's own block and its top-k earlier blocks."""
  DEFAULTS = {**attention.DEFAULTS, **DEFAULTS}
  IGNORES = ('attention.window', 'attention.mla', 'attention.impl', 'attention.causal_block')
  RESUMABLE = attention.RESUMABLE + ('moba.impl', 'moba.query_block')
  TRAINING_ONLY = ('moba.impl', 'moba.query_block')
  BIDIRECTIONAL = False

  @classmethod
  def select(cls, cfg) -> type:
    del cfg
    return cls

  @classmethod
  def variants(cls) -> tuple[type, ...]:
    return ()

  @classmethod
  def validate(cls, cfg):
    if cfg.attention.kind != 'mha':
      raise errors.ConfigError(f"model.attention.kind={cfg.attention.kind!r}: 'B' (MoBA) runs over "
                               "MHA/GQA only (MLA is not implemented); set model.attention.kind='mha'")
    if cfg.attention.sinks:
      raise errors.ConfigError("model.attention.sinks=True is not supported by 'B' (MoBA)")
    super().validate(cfg)
    m = cfg.moba
    for name in ('block', 'topk', 'query_block'):
      if m[name] < 1:
        raise errors.ConfigError(f'model.moba.{name}={m[name]} must be >= 1')
    if m.impl not in IMPLS:
      raise errors.ConfigError(f'model.moba.impl={m.impl!r} is not one of {IMPLS}')

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Forward FLOPs per token of the gather path: `A`'s projections (and output gate), the
    affinities against every block mean of the row 2 N H ceil(S / C), and QK^T and PV over
    min((topk + 1) C, S) keys (no causal halving, as `A`). The block means (K H additions a
    key) are not counted."""
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, attention.head_dim(cfg)
    m = cfg.moba
    projections = 2 * d * h * (2 * n + 2 * k)
    gate = {'none': 0, 'headwise': 2 * d * n, 'elementwise': 2 * d * n * h}[cfg.attention.output_gate]
    affinity = 2 * n * h * -(-seq_len // m.block)
    keys = min((m.topk + 1) * m.block, seq_len)
    return float(projections + gate + affinity + 4 * keys * n * h)

  @classmethod
  def xla_counts_once(cls, cfg, seq_len: int) -> bool:
    return cfg.moba.impl == 'gather' and seq_len > cfg.moba.query_block  # a lax.map loop

  @classmethod
  def init_cache(cls, cfg, batch: int, max_len: int):
    """`A`'s cache and the float32 key sums of each block (module docstring)."""
    cache = super().init_cache(cfg, batch, max_len)
    b, s, k, h = cache['k_BSKH'].shape
    cache['ksum_BAKH'] = jnp.zeros((b, -(-s // cfg.moba.block) + 1, k, h), jnp.float32)
    return cache

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    cfg = self.cfg
    m = cfg.moba
    dtype = common.dtype_of(cfg.dtype)
    q_BTNH, k_BTKH, v_BTKH = self.project(x_BTD, positions_BT)
    t = x_BTD.shape[1]
    if cache is None:
      k_BSKH, v_BSKH, k_pos_BS, k_seg_BS = k_BTKH, v_BTKH, positions_BT, segment_ids_BT
      q_row_BT = jnp.broadcast_to(jnp.arange(t), positions_BT.shape)
    else:
      q_row_BT = jnp.broadcast_to(cache['index'] + jnp.arange(t), positions_BT.shape)
      sums_BAKH = add_to_block_sums(cache['ksum_BAKH'], jax.lax.stop_gradient(k_BTKH), q_row_BT,
                                    positions_BT, segment_ids_BT, m.block)
      seen, cache = attention.cache_write(cache, {'k_BSKH': k_BTKH, 'v_BSKH': v_BTKH,
                                                  'pos_BS': positions_BT, 'seg_BS': segment_ids_BT})
      cache = {**cache, 'ksum_BAKH': sums_BAKH}
      k_BSKH, v_BSKH = seen['k_BSKH'].astype(dtype), seen['v_BSKH'].astype(dtype)
      k_pos_BS, k_seg_BS = seen['pos_BS'], seen['seg_BS']
    scale = cfg.attention.softmax_scale or attention.head_dim(cfg) ** -0.5
    shared = dict(block=m.block, topk=m.topk, scale=scale)
    if m.impl == 'dense':
      out_BTNH = dense_core(q_BTNH, k_BSKH, v_BSKH, positions_BT, segment_ids_BT, k_pos_BS,
                            k_seg_BS, **shared)
    else:
      mean_BSKH = (block_means(jax.lax.stop_gradient(k_BSKH), k_pos_BS, k_seg_BS, m.block)
                   if cache is None else cache['ksum_BAKH'] / m.block)

      def block_fn(q_BTNH, q_row_BT, q_pos_BT, q_seg_BT):
        return gather_core(q_BTNH, k_BSKH, v_BSKH, mean_BSKH, q_row_BT, q_pos_BT, q_seg_BT,
                           means_by_slot=cache is not None, **shared)

      out_BTNH, = dsa.blockwise(block_fn, m.query_block, (q_BTNH, q_row_BT), positions_BT,
                                segment_ids_BT)
    return self.output(x_BTD, out_BTNH.astype(dtype)), {}, cache
