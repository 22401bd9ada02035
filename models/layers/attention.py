"""Softmax attention sublayers: `A` (global) and `W` (sliding window), MHA / GQA / MQA.

One module serves training (a packed row; attention never crosses a segment), prefill and
step-by-step decoding (a cache of keys, values, their positions and segments). Options from
`config.model.attention`: QK-norm per head or over the whole projection, q/k/v and output
biases, a sigmoid output gate, learned per-head sinks, a softmax scale, a window (`W`), and
the implementation (`impl`). Logits, softmax, sinks and gates are float32.

`attend` is the part every attention kind shares (mask, window, sinks, implementation,
causal query blocks); MLA (`models/layers/mla.py`, `attention.kind='mla'`) uses it too.
Decoding caches keys and values per kv head (`cache_write`): the whole generation for `A`,
a ring of `window` slots for `W`, stored in `model.cache_dtype` (default: the compute dtype).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import errors
import models
from models import sublayer
from models.layers import common
from models.layers import flash
from models.layers import norms
from models.layers import positions as positions_lib

IMPLS = ('xla', 'flash', 'dot_product', 'cudnn', 'auto')
# The `attention` section of config.model, read by every attention kind (`A`, `W`, MLA).
DEFAULTS = dict(attention=dict(
    kind='mha',            # mha (MHA/GQA/MQA by num_kv_heads) | mla (DeepSeek, see mla below)
    impl='auto',           # auto | xla (reference) | flash (blocked) | dot_product (jax.nn) | cudnn (GPU)
    softmax_scale=0.0,     # 0: 1/sqrt(head_dim)
    causal_block=128,      # query block rows; skips fully masked key blocks (0: off)
    window=0,              # W sublayers: a query sees keys fewer than window positions back
    qk_norm='none',        # none | head (RMSNorm per head, Qwen3) | full (whole q/k width, OLMo 2/3)
    qkv_bias=False,        # biases on q, k, v (Qwen2)
    o_bias=False,          # bias on the output projection
    output_gate='none',    # none | headwise | elementwise: sigmoid(x W_gate) * attention (Qwen3-Next)
    sinks=False,           # a learned logit per head in the softmax denominator (GPT-OSS)
    mla=dict(              # kind='mla': multi-head latent attention (models/layers/mla.py)
        q_rank=0,          # query bottleneck rank (0: full-rank queries)
        kv_rank=64,        # shared key/value latent
        nope_head_dim=32,  # per-head key/query features without RoPE
        rope_head_dim=16,  # RoPE features (the key's shared by all heads)
        v_head_dim=32,
        norm_eps=0.0,      # eps of the latent RMSNorms (0: model.norm_eps; DeepSeek: 1e-6)
    ),
))
# How attention is computed, not what: a resumed run may change these.
RESUMABLE = ('attention.impl', 'attention.causal_block')
# What model.use_bias=True turns on in every attention kind.
BIAS_SWITCHES = ('attention.qkv_bias', 'attention.o_bias')
QK_NORMS = ('none', 'head', 'full')
OUTPUT_GATES = ('none', 'headwise', 'elementwise')
# attention.kind -> (global class, windowed class); filled by `register_kind`.
KINDS: dict[str, tuple[type, type]] = {}


def register_kind(kind: str, global_cls: type, window_cls: type) -> None:
  """Makes `A` and `W` use these classes when `model.attention.kind == kind`."""
  if kind in KINDS and KINDS[kind] != (global_cls, window_cls):
    raise errors.ConfigError(f'attention kind {kind!r} is already registered')
  KINDS[kind] = (global_cls, window_cls)


def attention_mask(q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, *, causal: bool, window: int = 0):
  """True where query t may attend key s: same non-zero segment and, if causal, s <= t.

  With `window` > 0 a key must also lie fewer than `window` positions from the query
  (t - s < window causal, |t - s| < window otherwise), the query itself included.
  """
  mask_BTS = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (k_seg_BS[:, None, :] != 0)
  distance_BTS = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  if causal:
    mask_BTS &= distance_BTS >= 0
  if window:
    mask_BTS &= (distance_BTS if causal else jnp.abs(distance_BTS)) < window
  return mask_BTS


def block_diffusion_mask(q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, *, block: int):
  """BD3-LM's mask over a training row [x_noisy, x] (two halves of T/2 tokens with the same
  positions and segments): a noisy token sees the noisy tokens of its own block
  (bidirectionally) and the clean tokens of earlier blocks; a clean token sees the clean
  tokens of its own and earlier blocks. Blocks are `block` positions of a segment. (A row of
  odd length, as shape inference passes, has one token fewer in its noisy half.)
  """
  t, s = q_pos_BT.shape[1], k_pos_BS.shape[1]
  assert t == s, f'block diffusion rows attend to themselves, got {t} queries and {s} keys'
  noisy_T = jnp.arange(t) < t // 2
  q_noisy_1T1, k_noisy_11S = noisy_T[None, :, None], noisy_T[None, None, :]
  ahead_BTS = q_pos_BT[:, :, None] // block - k_pos_BS[:, None, :] // block  # q block - k block
  mask_BTS = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (k_seg_BS[:, None, :] != 0)
  visible_BTS = jnp.where(q_noisy_1T1,
                          jnp.where(k_noisy_11S, ahead_BTS == 0, ahead_BTS > 0),
                          ~k_noisy_11S & (ahead_BTS >= 0))
  return mask_BTS & visible_BTS


def dot_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float, sinks_N=None):
  """Reference attention: GQA by grouping the query heads of each kv head.

  The products run as batched matmuls over (batch, kv head) with one free dimension each
  side ((group x query) rows against keys): XLA:CPU runs those about 1.5x faster than the
  equivalent einsum with two free dimensions, backward included. `sinks_N` adds one logit
  per head to the softmax denominator (GPT-OSS): probabilities then sum to less than one.
  Values may have another head dim than queries and keys (MLA).
  """
  b, t, n, h = q_BTNH.shape
  s, k, hv = k_BSKH.shape[1], k_BSKH.shape[2], v_BSKH.shape[-1]
  g = n // k
  q_BKGTH = q_BTNH.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)
  # Both products take the (group x query) rows as one dimension.
  logits_BKGTS = jnp.matmul(q_BKGTH.reshape(b, k, g * t, h), k_BSKH.transpose(0, 2, 3, 1),
                            preferred_element_type=jnp.float32).reshape(b, k, g, t, s)
  logits_BKGTS = logits_BKGTS.astype(jnp.float32) * scale
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, -1e30)
  if sinks_N is None:
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  else:
    sink_1KG11 = sinks_N.astype(jnp.float32).reshape(1, k, g, 1, 1)  # float32, like the logits
    max_BKGT1 = jnp.maximum(jnp.max(logits_BKGTS, -1, keepdims=True), sink_1KG11)
    max_BKGT1 = jax.lax.stop_gradient(max_BKGT1)
    exp_BKGTS = jnp.exp(logits_BKGTS - max_BKGT1)
    denominator_BKGT1 = jnp.sum(exp_BKGTS, -1, keepdims=True) + jnp.exp(sink_1KG11 - max_BKGT1)
    probs_BKGTS = exp_BKGTS / denominator_BKGT1
  # A query row with no visible key (padding) gets zeros, not a uniform average.
  probs_BKGTS = jnp.where(mask_BTS[:, None, None], probs_BKGTS, 0.0)
  out_BKGTH = jnp.matmul(probs_BKGTS.reshape(b, k, g * t, s).astype(v_BSKH.dtype),
                         v_BSKH.transpose(0, 2, 1, 3)).reshape(b, k, g, t, hv)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, hv)


def library_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float, sinks_N=None,
                      implementation=None):
  """`jax.nn.dot_product_attention` (`implementation='cudnn'` for cuDNN on GPU).

  It has no sink logits (validation refuses `attention.sinks` with it). It needs values of
  the keys' head dim, so the narrower side is zero-padded (which changes no logit).
  """
  if sinks_N is not None:
    raise errors.ConfigError('jax.nn.dot_product_attention has no sink logits; use attention.impl=xla')
  h, hv = k_BSKH.shape[-1], v_BSKH.shape[-1]
  pad = lambda x, to: jnp.pad(x, [(0, 0)] * 3 + [(0, to - x.shape[-1])])
  if hv < h:
    v_BSKH = pad(v_BSKH, h)
  elif hv > h:
    q_BTNH, k_BSKH = pad(q_BTNH, hv), pad(k_BSKH, hv)
  out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                          scale=scale, implementation=implementation)
  any_BT11 = jnp.any(mask_BTS, axis=-1)[..., None, None]
  return jnp.where(any_BT11, out_BTNH, 0.0)[..., :hv].astype(q_BTNH.dtype)


def causal_blocks(attend_fn, q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float, block: int,
                  window: int = 0, **kwargs):
  """`attend_fn` over query blocks of `block` rows, each against the keys it can see.

  Skips the key blocks a causal mask hides entirely (about half the work at long rows) and,
  with a `window`, the keys more than `window - 1` rows before a block's first query. It
  relies on what packed training rows guarantee: keys are the queries' own row and
  positions increase by at least one per row within each segment, so a key after a query's
  index, or `window` or more rows before it, is never visible to it.
  """
  t = q_BTNH.shape[1]
  if not block or t <= block or t % block or k_BSKH.shape[1] != t:
    return attend_fn(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, **kwargs)
  outs = []
  for start in range(0, t, block):
    end = start + block
    first = max(0, start - window + 1) if window else 0
    outs.append(attend_fn(q_BTNH[:, start:end], k_BSKH[:, first:end], v_BSKH[:, first:end],
                          mask_BTS[:, start:end, first:end], scale, **kwargs))
  return jnp.concatenate(outs, axis=1)


def impl_problem(cfg, impl: str, head_dims: tuple[int, ...]) -> str | None:
  """Why `impl` cannot serve this config on this backend, or None if it can."""
  if impl in ('dot_product', 'cudnn') and cfg.attention.sinks:
    return 'jax.nn.dot_product_attention has no sink logits (model.attention.sinks=True)'
  if impl == 'cudnn':
    backend = jax.default_backend()
    if backend != 'gpu':
      return f'cuDNN attention needs a GPU, the backend is {backend!r}'
    if cfg.dtype not in ('bfloat16', 'float16'):
      return f'cuDNN attention needs model.dtype bfloat16 or float16, not {cfg.dtype!r}'
    if any(h % 8 or h > 128 for h in head_dims):
      return f'cuDNN attention needs head dims that are multiples of 8 up to 128, got {head_dims}'
  return None


def resolve_impl(cfg, head_dims: tuple[int, ...], causal_rows: int = 0) -> str:
  """`attention.impl`, with `auto` resolved.

  cuDNN where it works; on a CPU, `flash` for causal training rows (`causal_rows`) longer
  than one `attention.causal_block`, with the block `flash_block` picks: it never holds a
  row's score matrix, and llama_small's training step ran 4% faster at 512 rows and 5%
  faster at 2048 (both systems timed in one process). At one block it only adds the
  backward's recomputation (5-15% slower). Else the xla reference: on other backends
  pure-JAX flash is unmeasured.
  """
  impl = cfg.attention.impl
  if impl == 'auto':
    block = cfg.attention.causal_block
    if impl_problem(cfg, 'cudnn', head_dims) is None:
      impl = 'cudnn'
    elif jax.default_backend() == 'cpu' and block and causal_rows > block:
      impl = 'flash'
    else:
      impl = 'xla'
  return impl


def flash_block(block: int, rows_x_heads: int, length: int, scores: int = 2 ** 20) -> int:
  """`block` doubled while a block of scores (batch x heads x block^2) stays within `scores`.

  `auto`'s flash block: llama_small's fastest blocks on a CPU both hold about 0.8M float32
  scores (128 at 8 rows x 6 heads, 256 at 2 x 6: 7% faster than 128 there).
  """
  while 2 * block <= length and rows_x_heads * (2 * block) ** 2 <= scores:
    block *= 2
  return block


def attend(cfg, q_BTNH, k_BSKH, v_BSKH, *, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, scale: float,
           window: int = 0, sinks_N=None, blocked: bool = False):
  """Masked softmax attention by the configured implementation; the part all kinds share.

  `blocked` (training rows, no cache) splits causal rows into `attention.causal_block`
  query blocks that skip hidden key blocks.
  """
  causal = not cfg.bidirectional
  if cfg.diffusion_block and blocked:  # block diffusion's training rows [x_noisy, x]
    impl = resolve_impl(cfg, (q_BTNH.shape[-1], v_BSKH.shape[-1]))
    if impl == 'flash':  # the noisy half marked by negated segment ids (flash's convention)
      noisy_1T = (jnp.arange(q_seg_BT.shape[1]) < q_seg_BT.shape[1] // 2)[None]
      signed_BT = jnp.where(noisy_1T, -q_seg_BT, q_seg_BT)
      block = cfg.attention.causal_block or q_BTNH.shape[1]
      return flash.attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT=q_pos_BT, q_seg_BT=signed_BT,
                             k_pos_BS=k_pos_BS, k_seg_BS=signed_BT, scale=scale, causal=False,
                             sinks_N=sinks_N, block=block, diffusion_block=cfg.diffusion_block)
    mask_BTS = block_diffusion_mask(q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS,
                                    block=cfg.diffusion_block)
    fn = dot_attention if impl == 'xla' else functools.partial(
        library_attention, implementation='cudnn' if impl == 'cudnn' else None)
    return fn(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, sinks_N=sinks_N)
  impl = resolve_impl(cfg, (q_BTNH.shape[-1], v_BSKH.shape[-1]),
                      causal_rows=q_BTNH.shape[1] if blocked and causal else 0)
  if impl == 'flash':
    block = cfg.attention.causal_block or max(q_BTNH.shape[1], k_BSKH.shape[1])
    if cfg.attention.impl == 'auto':
      block = flash_block(block, q_BTNH.shape[0] * q_BTNH.shape[2], q_BTNH.shape[1])
    return flash.attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT=q_pos_BT, q_seg_BT=q_seg_BT,
                           k_pos_BS=k_pos_BS, k_seg_BS=k_seg_BS, scale=scale, causal=causal,
                           window=window, sinks_N=sinks_N, block=block, skip=blocked and causal)
  mask_BTS = attention_mask(q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, causal=causal, window=window)
  if impl == 'xla':
    fn = dot_attention
  else:
    fn = functools.partial(library_attention, implementation='cudnn' if impl == 'cudnn' else None)
  if blocked and causal:
    return causal_blocks(fn, q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, cfg.attention.causal_block,
                         window=window, sinks_N=sinks_N)
  return fn(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, sinks_N=sinks_N)


def cache_write(cache: dict, new: dict, window: int = 0) -> tuple[dict, dict]:
  """(what the queries attend to, the updated cache) after writing `new[name]` (B, T, ...).

  A full cache (`window=0`, as long as the generation) takes the T entries at
  `cache['index']` along axis 1, and the queries attend to the whole cache. A window's cache
  is a ring of `window` slots (or fewer, when the generation is shorter): entry j of the
  sequence lives in slot j % window, so its memory does not grow with the generated length.
  The queries attend to the ring as it was followed by the T new entries (the mask keeps
  what each query may see: same segment, fewer than `window` positions back), and the ring
  keeps the last min(T, window) of them. `index` counts the entries written.
  """
  i = cache['index']
  t = next(iter(new.values())).shape[1]
  cast = {name: value.astype(cache[name].dtype) for name, value in new.items()}
  if not window:
    out = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], value, i, 1)
           for name, value in cast.items()}
    out['index'] = i + t
    return out, out
  slots = cache[next(iter(new))].shape[1]
  keep = min(t, slots)
  slot_S = (i + t - keep + jnp.arange(keep)) % slots  # distinct slots for the last `keep`
  seen = {name: jnp.concatenate([cache[name], value], axis=1) for name, value in cast.items()}
  out = {name: cache[name].at[:, slot_S].set(value[:, t - keep:]) for name, value in cast.items()}
  out['index'] = i + t
  return seen, out


def cache_length(cls, cfg, max_len: int) -> int:
  """Slots of a decode cache: the generation's length, or the window (a ring) for `W`."""
  return min(cfg.attention.window, max_len) if cls.windowed else max_len


def cache_dtype(cfg):
  """The decode cache's storage dtype: `model.cache_dtype`, else the compute dtype."""
  return common.dtype_of(cfg.get('cache_dtype') or cfg.dtype)


def output_gate(module, cfg, x_BTD, out_BTNH):
  """sigmoid(x W_gate) times the attention output, per head or per feature (Qwen3-Next).

  Parameter `gate` is (D, N) headwise or (D, N, H) elementwise; `gate_bias` comes with
  the q/k/v biases (Qwen3-Next's gate is part of its q projection).
  """
  kind = cfg.attention.output_gate
  if kind == 'none':
    return out_BTNH
  d, n, h = x_BTD.shape[-1], out_BTNH.shape[2], out_BTNH.shape[3]
  dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)

  def gate(shape, axes):
    """sigmoid(x W_gate + b) in float32, (B, T) + shape[1:]."""
    w = module.param('gate', common.normal_init(cfg.init_std, axes), shape, pdtype).astype(dtype)
    logits = common.project(x_BTD, w)
    if qkv_bias(cfg):
      logits += module.param('gate_bias', common.zeros_init(axes[1:]), shape[1:],
                             pdtype).astype(dtype)
    return jax.nn.sigmoid(logits.astype(jnp.float32))  # float32 gate

  if kind == 'headwise':  # one gate per head, broadcast over its features
    gate_BTN1 = gate((d, n), ('embed', 'heads'))[..., None]
    return (out_BTNH.astype(jnp.float32) * gate_BTN1).astype(out_BTNH.dtype)
  gate_BTNH = gate((d, n, h), ('embed', 'heads', 'head_dim'))
  return (out_BTNH.astype(jnp.float32) * gate_BTNH).astype(out_BTNH.dtype)


def qkv_bias(cfg) -> bool:
  return bool(cfg.use_bias or cfg.attention.qkv_bias)


def o_bias(cfg) -> bool:
  return bool(cfg.use_bias or cfg.attention.o_bias)


def validate_shared(cfg, cls, head_dims: tuple[int, ...]) -> None:
  """Checks the `attention` fields every kind reads; one-line ValueErrors naming the field."""
  a = cfg.attention
  if a.impl not in IMPLS:
    raise errors.ConfigError(f'model.attention.impl={a.impl!r} is not one of {IMPLS}')
  if a.impl != 'auto':
    problem = impl_problem(cfg, a.impl, head_dims)
    if problem:
      raise errors.ConfigError(f'model.attention.impl={a.impl!r} cannot serve this model: {problem}; '
                       f"use 'xla' or 'auto'")
  if a.causal_block < 0:
    raise errors.ConfigError(f'model.attention.causal_block={a.causal_block} must be >= 0')
  if a.window < 0 or (cls.windowed and a.window == 0):
    raise errors.ConfigError(f"model.attention.window={a.window} must be positive for 'W' sublayers")
  if a.output_gate not in OUTPUT_GATES:
    raise errors.ConfigError(f'model.attention.output_gate={a.output_gate!r} is not one of {OUTPUT_GATES}')
  if a.qk_norm not in QK_NORMS:
    raise errors.ConfigError(f'model.attention.qk_norm={a.qk_norm!r} is not one of {QK_NORMS}')


def score_length(cls, cfg, seq_len: int) -> int:
  """Keys per query counted in FLOPs: the row, or min(row, window) for windowed layers."""
  return min(seq_len, cfg.attention.window) if cls.windowed else seq_len


def counts_once(cfg, head_dims: tuple[int, ...], seq_len: int) -> bool:
  """Whether a training step's attention runs as flash's block loops, which XLA's cost
  analysis counts once (`Sublayer.xla_counts_once`)."""
  rows = 0 if cfg.bidirectional else seq_len
  return resolve_impl(cfg, head_dims, causal_rows=rows) == 'flash'


class AttentionBase(sublayer.Sublayer):
  """What every attention kind shares: its config section, the kind registry (`select`),
  the window and the protocol's declarations. `windowed` classes serve `W`."""
  windowed: ClassVar[bool] = False
  DEFAULTS = DEFAULTS
  RESUMABLE = RESUMABLE
  BIAS_SWITCHES = BIAS_SWITCHES

  @classmethod
  def select(cls, cfg) -> type:
    """The class that serves this pattern character for `model.attention.kind`."""
    kind = cfg.attention.kind
    if kind not in KINDS:
      raise errors.ConfigError(f'model.attention.kind={kind!r} is not one of {sorted(KINDS)}')
    return KINDS[kind][cls.windowed]

  @classmethod
  def variants(cls) -> tuple[type, ...]:
    return tuple(pair[cls.windowed] for pair in KINDS.values())

  @classmethod
  def window(cls, cfg) -> int:
    return cfg.attention.window if cls.windowed else 0


@models.register_sublayer('A')
class Attention(AttentionBase):
  """Global softmax attention over the row (causal unless the model is bidirectional)."""
  IGNORES = ('attention.window', 'attention.mla')
  BLOCK_DIFFUSION = True  # training rows' mask from `attend` (`block_diffusion_mask`)

  @classmethod
  def validate(cls, cfg):
    n, k = cfg.num_heads, cfg.num_kv_heads
    if n <= 0 or k <= 0 or n % k:
      raise errors.ConfigError(f'model.num_heads={n} must be a positive multiple of '
                       f'model.num_kv_heads={k}')
    validate_shared(cfg, cls, (head_dim(cfg),))
    if cfg.position == 'rope':
      if head_dim(cfg) % 2:
        raise errors.ConfigError(f'RoPE needs an even head dim, model.head_dim={head_dim(cfg)}')
      positions_lib.validate(cfg, head_dim(cfg))

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Forward FLOPs per token: projections (and output gate) + QK^T and PV.

    Scores count every key of the row (`A`) or min(row, `attention.window`) keys (`W`), with
    no causal halving, as in PaLM's MFU. `attention.causal_block` skips key blocks that the
    causal mask (or the window) hides, so the hardware executes less than this at long
    rows; halve the 4*S*N*H term of `A` for the 'useful' count. Norms, sinks and the
    sigmoid are not counted.
    """
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    projections = 2 * d * h * (2 * n + 2 * k)
    gate = {'none': 0, 'headwise': 2 * d * n, 'elementwise': 2 * d * n * h}[cfg.attention.output_gate]
    scores = 4 * score_length(cls, cfg, seq_len) * n * h
    return float(projections + gate + scores)

  @classmethod
  def xla_counts_once(cls, cfg, seq_len: int) -> bool:
    return counts_once(cfg, (head_dim(cfg),), seq_len)

  @classmethod
  def init_cache(cls, cfg, batch: int, max_len: int):
    """Keys and values of the kv heads, their positions and segments; a ring for `W`."""
    k, h, s = cfg.num_kv_heads, head_dim(cfg), cache_length(cls, cfg, max_len)
    dtype = cache_dtype(cfg)
    return {
        'k_BSKH': jnp.zeros((batch, s, k, h), dtype),
        'v_BSKH': jnp.zeros((batch, s, k, h), dtype),
        'pos_BS': jnp.zeros((batch, s), jnp.int32),
        'seg_BS': jnp.zeros((batch, s), jnp.int32),
        'index': jnp.zeros((), jnp.int32),
    }

  def project(self, x_BTD, positions_BT):
    """Queries, keys and values (biases, QK-norm, RoPE applied): (q_BTNH, k_BTKH, v_BTKH).
    A subclass (MoBA's block-sparse `B`) reuses them."""
    cfg = self.cfg
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    assert x_BTD.shape[-1] == d, f'model.d_model={d} but input width {x_BTD.shape[-1]}'
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    std = cfg.init_std

    def proj(name, shape, axes, s):
      w = self.param(name, common.normal_init(s, axes), shape, pdtype)
      return w.astype(dtype)

    def bias(name, shape, axes):
      return self.param(name, common.zeros_init(axes), shape, pdtype).astype(dtype)

    q_BTNH = common.project(x_BTD, proj('q', (d, n, h), ('embed', 'heads', 'head_dim'), std))
    k_BTKH = common.project(x_BTD, proj('k', (d, k, h), ('embed', 'kv_heads', 'head_dim'), std))
    v_BTKH = common.project(x_BTD, proj('v', (d, k, h), ('embed', 'kv_heads', 'head_dim'), std))
    if qkv_bias(cfg):
      q_BTNH += bias('q_bias', (n, h), ('heads', 'head_dim'))
      k_BTKH += bias('k_bias', (k, h), ('kv_heads', 'head_dim'))
      v_BTKH += bias('v_bias', (k, h), ('kv_heads', 'head_dim'))
    if cfg.attention.qk_norm == 'head':  # Qwen3: RMSNorm over each head's features
      q_BTNH = norms.make_norm(cfg, 'q_norm', kind='rmsnorm', axes=('head_dim',))(q_BTNH)
      k_BTKH = norms.make_norm(cfg, 'k_norm', kind='rmsnorm', axes=('head_dim',))(k_BTKH)
    elif cfg.attention.qk_norm == 'full':  # OLMo 2/3: RMSNorm over the whole projection
      q_BTNH = norms.make_norm(cfg, 'q_norm', kind='rmsnorm', num_axes=2,
                               axes=('heads', 'head_dim'))(q_BTNH)
      k_BTKH = norms.make_norm(cfg, 'k_norm', kind='rmsnorm', num_axes=2,
                               axes=('kv_heads', 'head_dim'))(k_BTKH)
    q_BTNH = common.constrain(q_BTNH, ('batch', 'length', 'heads', 'head_dim'))
    k_BTKH = common.constrain(k_BTKH, ('batch', 'length', 'kv_heads', 'head_dim'))
    v_BTKH = common.constrain(v_BTKH, ('batch', 'length', 'kv_heads', 'head_dim'))
    if cfg.position == 'rope':
      rope = positions_lib.rope_from_config(cfg, h)
      q_BTNH, k_BTKH = rope(q_BTNH, positions_BT), rope(k_BTKH, positions_BT)
    return q_BTNH, k_BTKH, v_BTKH

  def output(self, x_BTD, out_BTNH):
    """The output gate, projection and bias: y = gate(out) W_o (+ b)."""
    cfg = self.cfg
    d, n, h = cfg.d_model, cfg.num_heads, head_dim(cfg)
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    out_BTNH = output_gate(self, cfg, x_BTD, out_BTNH)
    out_BTNH = common.constrain(out_BTNH, ('batch', 'length', 'heads', 'head_dim'))
    w_o = self.param('o', common.normal_init(cfg.init_std / len(cfg.pattern) ** 0.5,
                                             ('heads', 'head_dim', 'embed')), (n, h, d), pdtype)
    y_BTD = common.project(out_BTNH, w_o.astype(dtype), 2)
    if o_bias(cfg):
      y_BTD += self.param('o_bias', common.zeros_init(('embed',)), (d,), pdtype).astype(dtype)
    return y_BTD

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    cfg = self.cfg
    n, h = cfg.num_heads, head_dim(cfg)
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    q_BTNH, k_BTKH, v_BTKH = self.project(x_BTD, positions_BT)

    if cache is None:
      k_BSKH, v_BSKH, k_pos_BS, k_seg_BS = k_BTKH, v_BTKH, positions_BT, segment_ids_BT
    else:
      seen, cache = cache_write(cache, {'k_BSKH': k_BTKH, 'v_BSKH': v_BTKH,
                                        'pos_BS': positions_BT, 'seg_BS': segment_ids_BT},
                                self.window(cfg))
      k_BSKH, v_BSKH = seen['k_BSKH'].astype(dtype), seen['v_BSKH'].astype(dtype)
      k_pos_BS, k_seg_BS = seen['pos_BS'], seen['seg_BS']

    sinks_N = None
    if cfg.attention.sinks:
      sinks_N = self.param('sinks', common.zeros_init(('heads',)), (n,), pdtype)
    out_BTNH = attend(cfg, q_BTNH, k_BSKH, v_BSKH, q_pos_BT=positions_BT, q_seg_BT=segment_ids_BT,
                      k_pos_BS=k_pos_BS, k_seg_BS=k_seg_BS,
                      scale=cfg.attention.softmax_scale or h ** -0.5,
                      window=self.window(cfg), sinks_N=sinks_N, blocked=cache is None)
    return self.output(x_BTD, out_BTNH), {}, cache


@models.register_sublayer('W')
class SlidingAttention(Attention):
  """Sliding-window attention: each query sees the last `attention.window` positions."""
  windowed: ClassVar[bool] = True
  IGNORES = ('attention.mla',)
  BLOCK_DIFFUSION = False


register_kind('mha', Attention, SlidingAttention)


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.d_model // cfg.num_heads
