"""DeepSeek Sparse Attention (DSA, DeepSeek V3.2): `S`, MLA whose queries each attend to the
top-k keys a lightning indexer picks.

The indexer (H_I = `dsa.index_heads` heads of d_I = `dsa.index_head_dim` features) scores
query t against key s as

    I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s] / sqrt(d_I)),

with q_I = q_res W_Iq (from MLA's normalised query latent, or from x without `mla.q_rank`),
one key per token shared by all indexer heads, k_I = LayerNorm(x W_Ik) (eps 1e-6), the first
`dsa.index_rope_dim` features of both rotated in rotate-half (non-interleaved) form whatever
`model.rope_interleaved`, and per-token head weights w = x W_Iw / sqrt(H_I) (float32). Query t
keeps the min(k, visible) keys of highest I among those it may see (causal, same document):
selection never crosses a document. Scores, top-k and the KL below are float32.

Attention runs in MLA's absorbed ("MQA") form, as DeepSeek V3.2 trains and serves it: a query
q = [q_nope W_k_b^T, rope(q_rope)] of kv_rank + rope dims against the shared latent keys
[c, rope(k_rope)] and latent values c, the output expanded by W_v_b. Selection is per token,
shared by every head, so one gather of the selected latent keys serves all heads.

Two implementations of the same function (`dsa.impl`), both over blocks of `dsa.block` query
rows (`jax.checkpoint`ed, so the backward holds one block at a time):
  gather  the efficient path: gather the k selected latent keys and values of each query,
          then a softmax over k: O(T k) time and memory in the attention core;
  dense   the reference: the T x S masked softmax with the unselected keys masked out.
The indexer itself is O(T^2 H_I d_I) (every query scores every key), counted in
`flops_per_token`; its scores are held one block of queries at a time (block x S).

Two training stages (`dsa.stage`), DeepSeek V3.2's recipe:
  warmup  dense attention (selection does not change the output); the indexer learns from
          loss/indexer_kl = KL(p || softmax(I)) over all visible keys, where p is the main
          attention distribution summed over heads and L1-normalised (a constant for the
          indexer). The rest of the model is frozen by `optim.trainable=indexer`.
  sparse  top-k on; the KL is restricted to the selected keys.
In both the indexer's inputs are detached (`stop_gradient`), so the KL trains only the
indexer, and the discrete selection passes no LM-loss gradient to it. Statistics: `dsa/kl`,
and in the warm-up `dsa/attention_mass`, the share of p inside the top-k set (chance: k / t).

Decoding caches MLA's latent and rotated RoPE key plus the indexer key of every token
(kv_rank + rope + d_I numbers a token) and selects top-k over the whole cache each step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import errors
import models
from models.layers import attention
from models.layers import common
from models.layers import mla
from models.layers import norms
from models.layers import positions as positions_lib

STAGES = ('sparse', 'warmup')
IMPLS = ('gather', 'dense')
NEG_INF = -1e30

DEFAULTS = dict(dsa=dict(
    index_heads=4,        # H_I (DeepSeek V3.2: 64)
    index_head_dim=32,    # d_I (DeepSeek V3.2: 128)
    index_rope_dim=0,     # rotated indexer features, rotate-half (0: attention.mla.rope_head_dim)
    topk=64,              # keys per query (DeepSeek V3.2: 2048); min(topk, visible keys)
    stage='sparse',       # sparse (top-k attention) | warmup (dense attention, indexer KL over all keys)
    kl_weight=1.0,        # weight of loss/indexer_kl (0: the indexer does not train)
    impl='gather',        # gather (O(T k) core) | dense (masked T x S reference)
    block=128,            # query rows per block (the indexer holds block x S scores)
))


def index_scores(iq_BTIH, iw_BTI, ik_BSH):
  """I[t, s] = sum_j w[t, j] ReLU(q_I[t, j] . k_I[s] / sqrt(d_I)), float32 (B, T, S)."""
  scale = iq_BTIH.shape[-1] ** -0.5
  dots_BTIS = jnp.einsum('BTIH,BSH->BTIS', iq_BTIH.astype(jnp.float32), ik_BSH.astype(jnp.float32))
  return jnp.einsum('BTI,BTIS->BTS', iw_BTI.astype(jnp.float32), jax.nn.relu(dots_BTIS * scale))


def kl_to_indexer(p_BTS, scores_BTS, mask_BTS):
  """(sum over queries of KL(p_t || softmax(I_t over mask_t)), queries with a visible key).

  `p_BTS` is the target distribution (zero outside the mask, rows summing to one), a
  constant: only the indexer's scores get its gradient. float32."""
  p_BTS = jax.lax.stop_gradient(p_BTS.astype(jnp.float32))
  logq_BTS = jax.nn.log_softmax(jnp.where(mask_BTS, scores_BTS, NEG_INF), axis=-1)
  logp_BTS = jnp.log(jnp.where(p_BTS > 0, p_BTS, 1.0))
  kl_BT = jnp.sum(jnp.where(p_BTS > 0, p_BTS * (logp_BTS - logq_BTS), 0.0), -1)
  has_BT = jnp.any(mask_BTS, -1)
  return jnp.sum(jnp.where(has_BT, kl_BT, 0.0)), jnp.sum(has_BT.astype(jnp.float32))


def head_summed(probs_BTNS):
  """The main attention distribution summed over heads and L1-normalised (float32)."""
  p_BTS = jnp.sum(probs_BTNS.astype(jnp.float32), 2)
  return p_BTS / jnp.maximum(jnp.sum(p_BTS, -1, keepdims=True), 1e-30)


def softmax_masked(logits_BTNS, mask_BTS):
  """softmax over keys, float32; rows with no visible key are zeros."""
  logits_BTNS = jnp.where(mask_BTS[:, :, None], logits_BTNS.astype(jnp.float32), NEG_INF)
  probs_BTNS = jax.nn.softmax(logits_BTNS, axis=-1)
  return jnp.where(mask_BTS[:, :, None], probs_BTNS, 0.0)


def select(scores_BTS, mask_BTS, topk: int):
  """(indices_BTX, valid_BTX) of each query's min(topk, S) highest visible scores; a query
  with fewer than topk visible keys gets invalid fillers (`valid` False)."""
  x = min(topk, scores_BTS.shape[-1])
  masked_BTS = jnp.where(mask_BTS, jax.lax.stop_gradient(scores_BTS), -jnp.inf)
  _, idx_BTX = jax.lax.top_k(masked_BTS, x)
  return idx_BTX, jnp.take_along_axis(mask_BTS, idx_BTX, axis=-1)


def gather_keys(k_BSH, idx_BTX):
  """k_BSH[b, idx[b, t, x]] -> (B, T, X, H)."""
  return jax.vmap(lambda k_SH, i_TX: k_SH[i_TX])(k_BSH, idx_BTX)


def core(q_BTNH, k_BSKH, v_BSKH, iq_BTIH, iw_BTI, ik_BSH, mask_BTS, *, scale: float, topk: int,
         stage: str, impl: str):
  """One block of queries: (out_BTNH, kl_sum, kl_count, mass_sum) of attention over the
  selected keys (`stage='sparse'`) or all visible keys (`'warmup'`), by `impl`.

  q_BTNH: the queries, N = K G heads, head n reading kv head n // G; k_BSKH, v_BSKH: the keys
  and values of the K kv heads (MLA's absorbed form: K = 1, the latent keys [c, rope(k_rope)]
  and values c every head shares; GQA: its kv heads); iq/iw/ik: the indexer's queries, head
  weights, keys. Selection is per query, shared by every head.
  """
  b, t, n, _ = q_BTNH.shape
  kv = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, -1)
  per_head = lambda x_BTKG_: x_BTKG_.reshape((b, t, n) + x_BTKG_.shape[4:])
  per_group = lambda x_BTN_: x_BTN_.reshape((b, t, kv, n // kv) + x_BTN_.shape[3:])
  scores_BTS = index_scores(iq_BTIH, iw_BTI, ik_BSH)
  idx_BTX, valid_BTX = select(scores_BTS, mask_BTS, topk)
  zero = jnp.zeros((), jnp.float32)
  if stage == 'sparse' and impl == 'gather':
    k_BTXKH, v_BTXKH = gather_keys(k_BSKH, idx_BTX), gather_keys(v_BSKH, idx_BTX)
    logits_BTNX = per_head(jnp.einsum('BTKGH,BTXKH->BTKGX', q_BTKGH, k_BTXKH,
                                      preferred_element_type=jnp.float32)) * scale
    probs_BTNX = softmax_masked(logits_BTNX, valid_BTX)
    out_BTNH = per_head(jnp.einsum('BTKGX,BTXKH->BTKGH',
                                   per_group(probs_BTNX).astype(v_BTXKH.dtype), v_BTXKH))
    kl, count = kl_to_indexer(head_summed(probs_BTNX),
                              jnp.take_along_axis(scores_BTS, idx_BTX, axis=-1), valid_BTX)
    return out_BTNH, kl, count, zero
  logits_BTNS = per_head(jnp.einsum('BTKGH,BSKH->BTKGS', q_BTKGH, k_BSKH,
                                    preferred_element_type=jnp.float32)) * scale
  chosen_BTS = jnp.zeros_like(mask_BTS).at[
      jnp.arange(mask_BTS.shape[0])[:, None, None], jnp.arange(mask_BTS.shape[1])[None, :, None],
      idx_BTX].set(valid_BTX)
  if stage == 'sparse':  # the reference: the dense softmax with unselected keys masked
    probs_BTNS = softmax_masked(logits_BTNS, chosen_BTS)
    kl, count = kl_to_indexer(head_summed(probs_BTNS), scores_BTS, chosen_BTS)
    mass = zero
  else:
    probs_BTNS = softmax_masked(logits_BTNS, mask_BTS)
    p_BTS = head_summed(probs_BTNS)
    kl, count = kl_to_indexer(p_BTS, scores_BTS, mask_BTS)
    mass = jnp.sum(jnp.where(chosen_BTS, p_BTS, 0.0))
  out_BTNH = per_head(jnp.einsum('BTKGS,BSKH->BTKGH', per_group(probs_BTNS).astype(v_BSKH.dtype),
                                 v_BSKH))
  return out_BTNH, kl, count, mass


def attend(cfg, q_BTNH, keys: dict, iq_BTIH, iw_BTI, positions_BT, segment_ids_BT, *,
           scale: float, training: bool):
  """(out_BTNH, aux): `core` over query blocks of `dsa.block` rows against `keys`
  (k_BSKH, v_BSKH, k_index_BSH, pos_BS, seg_BS: the row, or what the cache holds), and the
  indexer's KL and statistics when `training`."""
  s = cfg.dsa

  def block_fn(q_BTNH, iq_BTIH, iw_BTI, q_pos_BT, q_seg_BT):
    mask_BTS = attention.attention_mask(q_pos_BT, q_seg_BT, keys['pos_BS'], keys['seg_BS'],
                                        causal=True)
    return core(q_BTNH, keys['k_BSKH'], keys['v_BSKH'], iq_BTIH, iw_BTI, keys['k_index_BSH'],
                mask_BTS, scale=scale, topk=s.topk, stage=s.stage, impl=s.impl)

  out_BTNH, kl, count, mass = blockwise(block_fn, s.block, (q_BTNH, iq_BTIH, iw_BTI),
                                        positions_BT, segment_ids_BT)
  aux = {}
  if training:
    kl = kl / jnp.maximum(count, 1.0)
    aux = {'loss/indexer_kl': s.kl_weight * kl, 'dsa/kl': kl}
    if s.stage == 'warmup':
      aux['dsa/attention_mass'] = mass / jnp.maximum(count, 1.0)
  return out_BTNH, aux


def blockwise(fn, block: int, queries: tuple, q_pos_BT, q_seg_BT):
  """`fn(*queries_block, q_pos, q_seg) -> (out_BTNH, *sums)` over blocks of `block` query rows
  (padded with segment 0, which sees no key), each block rematerialised in the backward."""
  t = q_pos_BT.shape[1]
  if t <= block:
    return fn(*queries, q_pos_BT, q_seg_BT)
  a = -(-t // block)
  pad = a * block - t

  def split(x_BT):  # (B, T, ...) -> (A, B, C, ...)
    x_BT = jnp.pad(x_BT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BT.ndim - 2))
    return jnp.moveaxis(x_BT.reshape((x_BT.shape[0], a, block) + x_BT.shape[2:]), 1, 0)

  step = jax.checkpoint(lambda args: fn(*args))
  out_ABCNH, *sums = jax.lax.map(step, tuple(split(x) for x in queries + (q_pos_BT, q_seg_BT)))
  out_BTNH = jnp.moveaxis(out_ABCNH, 0, 1).reshape((q_pos_BT.shape[0], a * block)
                                                   + out_ABCNH.shape[3:])[:, :t]
  return (out_BTNH, *(jnp.sum(s) for s in sums))


class Indexer(nn.Module):
  """The lightning indexer's projections: (q_I (B, T, H_I, d_I), w (B, T, H_I) float32,
  k_I (B, T, d_I)), RoPE'd (rotate-half) on their first `index_rope_dim` features."""
  cfg: object

  @nn.compact
  def __call__(self, x_BTD, q_res_BTR, positions_BT):
    cfg = self.cfg
    heads, dim, rope = cfg.dsa.index_heads, cfg.dsa.index_head_dim, index_rope_dim(cfg)
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    std = cfg.init_std

    def weight(name, shape, axes):
      return self.param(name, common.normal_init(std, axes), shape, pdtype)

    src_BTR = x_BTD if q_res_BTR is None else q_res_BTR
    src_axis = 'embed' if q_res_BTR is None else 'latent'
    iq_BTIH = common.project(src_BTR, weight('q', (src_BTR.shape[-1], heads, dim),
                                             (src_axis, 'heads', 'head_dim')).astype(dtype))
    ik_BTH = common.project(x_BTD, weight('k', (cfg.d_model, dim), ('embed', 'head_dim')).astype(dtype))
    ik_BTH = norms.Norm(kind='layernorm', eps=1e-6, axes=('head_dim',), dtype=dtype,
                        param_dtype=pdtype, name='k_norm')(ik_BTH)
    # Head weights in float32 (DeepSeek keeps weights_proj in float32).
    iw_BTI = common.project(x_BTD.astype(jnp.float32),
                            weight('w', (cfg.d_model, heads), ('embed', 'heads')).astype(jnp.float32))
    iw_BTI = iw_BTI * heads ** -0.5
    if cfg.position == 'rope' and rope:
      rotate = positions_lib.Rope(dim=rope, theta=cfg.rope_theta, interleaved=False,
                                  scaling=cfg.rope_scaling)
      iq_BTIH = rotate(iq_BTIH, positions_BT)
      ik_BTH = rotate(ik_BTH[:, :, None], positions_BT)[:, :, 0]
    return iq_BTIH, iw_BTI, ik_BTH


def index_rope_dim(cfg) -> int:
  """Rotated indexer features: `dsa.index_rope_dim`, or 0 for MLA's rope_head_dim (over MLA)
  or half of `dsa.index_head_dim` (over GQA)."""
  if cfg.dsa.index_rope_dim:
    return cfg.dsa.index_rope_dim
  return cfg.attention.mla.rope_head_dim if cfg.attention.kind == 'mla' else cfg.dsa.index_head_dim // 2


def validate_dsa(cfg, name: str) -> None:
  """The `dsa` fields both kinds read; one-line errors naming the field."""
  s = cfg.dsa
  if cfg.attention.sinks:
    raise errors.ConfigError(f"model.attention.sinks=True is not supported by 'S' ({name})")
  for field in ('index_heads', 'index_head_dim', 'topk', 'block'):
    if s[field] < 1:
      raise errors.ConfigError(f'model.dsa.{field}={s[field]} must be >= 1')
  rope = index_rope_dim(cfg)
  if rope % 2 or rope > s.index_head_dim or s.index_rope_dim < 0:
    raise errors.ConfigError(f'model.dsa.index_rope_dim={s.index_rope_dim} gives {rope} rotated '
                             f'features: it must be even and at most model.dsa.index_head_dim='
                             f'{s.index_head_dim}')
  if s.stage not in STAGES:
    raise errors.ConfigError(f'model.dsa.stage={s.stage!r} is not one of {STAGES}')
  if s.impl not in IMPLS:
    raise errors.ConfigError(f'model.dsa.impl={s.impl!r} is not one of {IMPLS}')
  if s.kl_weight < 0:
    raise errors.ConfigError(f'model.dsa.kl_weight={s.kl_weight} must be >= 0')


def indexer_flops_per_token(cfg, seq_len: int, q_src: int) -> float:
  """The lightning indexer's forward FLOPs per token, its queries from `q_src` features:
  projections 2 (q_src H_I d_I + D d_I + D H_I) and scores 2 S H_I d_I + 2 S H_I over every
  key of the row (S = the row, no causal halving): O(T^2 H_I d_I) a row."""
  d, s = cfg.d_model, cfg.dsa
  heads, dim = s.index_heads, s.index_head_dim
  return float(2 * (q_src * heads * dim + d * dim + d * heads)
               + 2 * seq_len * heads * dim + 2 * seq_len * heads)


class IndexedCache:
  """What `S` over MLA and over GQA share beyond the module functions: their query blocks are
  a `lax.map` loop, and their decode cache is the attention's plus each token's indexer key."""

  @classmethod
  def xla_counts_once(cls, cfg, seq_len: int) -> bool:
    return seq_len > cfg.dsa.block  # the query blocks are a lax.map loop

  @classmethod
  def init_cache(cls, cfg, batch: int, max_len: int):
    """The attention's cache (MLA's latent, or `A`'s keys and values) plus the indexer key
    of every token."""
    cache = super().init_cache(cfg, batch, max_len)
    cache['k_index_BSH'] = jnp.zeros((batch, max_len, cfg.dsa.index_head_dim),
                                     attention.cache_dtype(cfg))
    return cache


@models.register_sublayer('S')
class DSAttention(IndexedCache, mla.MLAttention):
  """DSA: MLA over the top-k keys of the lightning indexer (module docstring)."""
  DEFAULTS = {**attention.DEFAULTS, **DEFAULTS}
  IGNORES = ('attention.window',)
  RESUMABLE = attention.RESUMABLE + ('dsa.impl', 'dsa.block', 'dsa.stage')
  TRAINING_ONLY = ('dsa.stage', 'dsa.kl_weight', 'dsa.impl', 'dsa.block')
  BIDIRECTIONAL = False

  @classmethod
  def select(cls, cfg) -> type:
    """Over MLA (`attention.kind='mla'`, DeepSeek V3.2) or GQA (`'mha'`: `DSAGQAttention`)."""
    kind = cfg.attention.kind
    if kind == 'mla':
      return DSAttention
    if kind == 'mha':
      return DSAGQAttention
    raise errors.ConfigError(f"model.attention.kind={kind!r}: 'S' (DSA) runs over 'mla' or 'mha'")

  @classmethod
  def variants(cls) -> tuple[type, ...]:
    return (DSAGQAttention,)

  @classmethod
  def validate(cls, cfg):
    super().validate(cfg)
    validate_dsa(cfg, 'DSA')

  @classmethod
  def canonical(cls, fields: dict) -> dict:
    """`dsa.index_rope_dim=0` is `attention.mla.rope_head_dim`."""
    if not fields.get('dsa.index_rope_dim') and 'attention.mla.rope_head_dim' in fields:
      fields = dict(fields, **{'dsa.index_rope_dim': fields['attention.mla.rope_head_dim']})
    return fields

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Forward FLOPs per token: MLA's projections, the absorbed-form core over
    min(topk, row) keys (the whole row in the warm-up), and the indexer.

    Core per token: query absorption 2 N nope R, scores 2 X N (R + rope), values 2 X N R,
    output expansion 2 N R hv. The indexer: projections 2 (q_src H_I d_I + D d_I + D H_I)
    and its scores 2 S H_I d_I + 2 S H_I over every key of the row (S = the row, no causal
    halving, as attention's count): O(T^2 H_I d_I) a row, which dominates at long rows.
    """
    d, n = cfg.d_model, cfg.num_heads
    q_rank, kv_rank, nope, rope, hv = mla.dims(cfg)
    s = cfg.dsa
    q = 2 * (d * q_rank + q_rank * n * (nope + rope)) if q_rank else 2 * d * n * (nope + rope)
    kv = 2 * d * (kv_rank + rope)
    o = 2 * n * hv * d
    gate = {'none': 0, 'headwise': 2 * d * n, 'elementwise': 2 * d * n * hv}[cfg.attention.output_gate]
    keys = seq_len if s.stage == 'warmup' else min(s.topk, seq_len)
    core_flops = 2 * n * nope * kv_rank + 2 * keys * n * (2 * kv_rank + rope) + 2 * n * kv_rank * hv
    return float(q + kv + o + gate + core_flops + cls.indexer_flops_per_token(cfg, seq_len))

  @classmethod
  def indexer_flops_per_token(cls, cfg, seq_len: int) -> float:
    """The lightning indexer's share of `flops_per_token` (queries from the q latent)."""
    return indexer_flops_per_token(cfg, seq_len, cfg.attention.mla.q_rank or cfg.d_model)

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    cfg = self.cfg
    dtype = common.dtype_of(cfg.dtype)
    p = self.project(x_BTD, positions_BT)
    # The indexer's inputs are detached: its KL trains it alone, nothing else trains it.
    q_res_BTR = None if p['q_res_BTR'] is None else jax.lax.stop_gradient(p['q_res_BTR'])
    iq_BTIH, iw_BTI, ik_BTH = Indexer(cfg, name='indexer')(jax.lax.stop_gradient(x_BTD),
                                                           q_res_BTR, positions_BT)
    keys = {'c_BSR': p['c_BTR'], 'k_rope_BSH': p['k_rope_BTH'], 'k_index_BSH': ik_BTH,
            'pos_BS': positions_BT, 'seg_BS': segment_ids_BT}
    if cache is not None:
      keys, cache = attention.cache_write(cache, keys)
      keys = {k: v.astype(dtype) if k.startswith(('c_', 'k_')) else v for k, v in keys.items()}
    # Absorbed (MQA) form: latent queries against the shared latent keys and values.
    q_lat_BTNR = jnp.einsum('BTNH,RNH->BTNR', p['q_nope_BTNH'], p['w_k_RNH'])
    q_BTNH = jnp.concatenate([q_lat_BTNR, p['q_rope_BTNH'].astype(q_lat_BTNR.dtype)], -1)
    keys['k_BSKH'] = jnp.concatenate([keys['c_BSR'], keys['k_rope_BSH']], -1)[:, :, None]
    keys['v_BSKH'] = keys['c_BSR'][:, :, None]
    out_lat_BTNR, aux = attend(cfg, q_BTNH, keys, iq_BTIH, iw_BTI, positions_BT, segment_ids_BT,
                               scale=mla.softmax_scale(cfg), training=cache is None)
    out_BTNH = jnp.einsum('BTNR,RNH->BTNH', out_lat_BTNR.astype(dtype), p['w_v_RNH'])
    return self.output(x_BTD, out_BTNH), aux, cache


class DSAGQAttention(IndexedCache, attention.Attention):
  """DSA over GQA (`attention.kind='mha'`): `A`'s projections, QK-norm, RoPE and output gate,
  each query attending to the top-k keys of the lightning indexer (queries from x), every
  head the same keys; the indexer, stages, impls and cache as `DSAttention`'s."""
  DEFAULTS = {**attention.DEFAULTS, **DEFAULTS}
  IGNORES = ('attention.window', 'attention.mla', 'attention.impl', 'attention.causal_block')
  RESUMABLE = DSAttention.RESUMABLE
  TRAINING_ONLY = DSAttention.TRAINING_ONLY
  BIDIRECTIONAL = False
  BLOCK_DIFFUSION = False

  @classmethod
  def select(cls, cfg) -> type:
    return DSAttention.select(cfg)

  @classmethod
  def variants(cls) -> tuple[type, ...]:
    return ()

  @classmethod
  def validate(cls, cfg):
    super().validate(cfg)
    validate_dsa(cfg, 'DSA over GQA')

  @classmethod
  def canonical(cls, fields: dict) -> dict:
    """`dsa.index_rope_dim=0` is half of `dsa.index_head_dim`."""
    if not fields.get('dsa.index_rope_dim') and 'dsa.index_head_dim' in fields:
      fields = dict(fields, **{'dsa.index_rope_dim': fields['dsa.index_head_dim'] // 2})
    return fields

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Forward FLOPs per token: `A`'s count over min(topk, row) keys (the whole row in the
    warm-up), plus the indexer."""
    keys = seq_len if cfg.dsa.stage == 'warmup' else min(cfg.dsa.topk, seq_len)
    return super().flops_per_token(cfg, keys) + cls.indexer_flops_per_token(cfg, seq_len)

  @classmethod
  def indexer_flops_per_token(cls, cfg, seq_len: int) -> float:
    """The lightning indexer's share of `flops_per_token` (queries from x)."""
    return indexer_flops_per_token(cfg, seq_len, cfg.d_model)

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    cfg = self.cfg
    dtype = common.dtype_of(cfg.dtype)
    q_BTNH, k_BTKH, v_BTKH = self.project(x_BTD, positions_BT)
    iq_BTIH, iw_BTI, ik_BTH = Indexer(cfg, name='indexer')(jax.lax.stop_gradient(x_BTD), None,
                                                           positions_BT)
    keys = {'k_BSKH': k_BTKH, 'v_BSKH': v_BTKH, 'k_index_BSH': ik_BTH, 'pos_BS': positions_BT,
            'seg_BS': segment_ids_BT}
    if cache is not None:
      keys, cache = attention.cache_write(cache, keys)
      keys = {k: v.astype(dtype) if k.startswith(('k_', 'v_')) else v for k, v in keys.items()}
    scale = cfg.attention.softmax_scale or attention.head_dim(cfg) ** -0.5
    out_BTNH, aux = attend(cfg, q_BTNH, keys, iq_BTIH, iw_BTI, positions_BT, segment_ids_BT,
                           scale=scale, training=cache is None)
    return self.output(x_BTD, out_BTNH.astype(dtype)), aux, cache
