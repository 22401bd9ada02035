"""The decoder: embeddings, a pattern of residual sublayers, final norm and output head.

`config.model.pattern` is one character a sublayer (DESIGN.md); each character is a
`models.sublayer.Sublayer` class from the registry. The pattern's smallest repeating unit is
one `Block`; with `scan_layers` the block is scanned (`nn.scan`) so compile time does not grow
with depth, otherwise the repeats are unrolled. Sublayers return `(y, aux, cache)`; `aux`
entries named `loss/...` are side losses summed over layers, others are statistics averaged
over layers. The decoder returns `(logits_BTV, aux, cache)` the same way: `cache` is the
updated decode cache when one was passed (`init_cache`), else None.

`DEFAULTS` are the decoder's own fields of config.model; each sublayer declares its own beside
its module, and models/schema.py assembles them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import errors
import models
from models.layers import attention  # noqa: F401  (registers A, W)
from models.layers import autoencoder
from models.layers import base_conv  # noqa: F401  (registers C)
from models.layers import common
from models.layers import deltanet  # noqa: F401  (registers G)
from models.layers import dsa  # noqa: F401  (registers S)
from models.layers import moba  # noqa: F401  (registers B)
from models.layers import mamba2  # noqa: F401  (registers M)
from models.layers import mla  # noqa: F401  (attention.kind='mla')
from models.layers import mlp  # noqa: F401  (registers F)
from models.layers import moe  # noqa: F401  (registers E)
from models.layers import norms
from models.layers import positions as positions_lib

# The decoder's fields of config.model (the sublayers' are declared beside their modules).
DEFAULTS = dict(
    name='lm',
    pattern='AF' * 4,          # one character per residual sublayer (DESIGN.md)
    vocab_size=0,              # 0: taken from the tokenizer
    d_model=128,
    num_heads=4,               # heads of attention and of the mixers that have heads
    num_kv_heads=4,
    head_dim=0,                # 0: d_model // num_heads
    norm='rmsnorm',            # rmsnorm | layernorm
    norm_eps=1e-5,
    norm_zero_centred=False,   # scale stored as w, applied as 1 + w (Gemma, Qwen3-Next)
    norm_placement='pre',      # pre: x + op(norm(x)) | post: x + norm(op(x)) (OLMo 2/3) | sandwich (Gemma 2/3)
    **positions_lib.DEFAULTS,  # position, rope_theta, rope_fraction, rope_interleaved, rope_scaling
    max_len=2048,              # rows of the learned position table
    tie_embeddings=False,
    use_bias=False,            # every bias (attention, MLP); the sublayers' switches add them separately
    embed_scale=1.0,           # multiplies token embeddings (Gemma: sqrt(d_model))
    logit_softcap=0.0,         # cap * tanh(logits / cap) on the output logits (0: off)
    bidirectional=False,       # True for diffusion objectives (objectives check it)
    diffusion_block=0,         # block diffusion (BD3-LM): training rows are [x_noisy, x] halves
                               # and attention uses the block-diffusion mask with blocks of
                               # this many tokens (models/diffusion.py); 0: off
    autoencoder=False,         # MAD's autoencoder head: the last token's vector decoded at
                               # every position (models/layers/autoencoder.py; compression)
    init_std=0.02,
    scan_layers=True,          # nn.scan over the pattern's repeating unit
    remat='none',              # none | full | save_dots | save_dots_no_batch
    dtype='float32',           # compute dtype
    param_dtype='float32',
    cache_dtype='',            # decode caches' storage (e.g. bfloat16); '': the compute dtype
)
# Decoder fields a resumed run may change: how a step computes, not what the parameters are.
RESUMABLE = ('remat', 'dtype', 'cache_dtype')
# Decoder fields that only shape training or storage, which Hugging Face interop ignores.
TRAINING_ONLY = ('name', 'scan_layers', 'param_dtype', 'init_std')

POSITIONS = ('rope', 'learned', 'none')
NORM_PLACEMENTS = ('pre', 'post', 'sandwich')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.checkpoint_dots,
    'save_dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def split_pattern(pattern: str) -> tuple[str, int]:
  """Returns the smallest unit u and count r with u * r == pattern."""
  for size in range(1, len(pattern) + 1):
    if len(pattern) % size == 0 and pattern[:size] * (len(pattern) // size) == pattern:
      return pattern[:size], len(pattern) // size
  raise errors.ConfigError('model.pattern is empty')


def sublayer_class(cfg, char: str) -> type:
  """The class serving pattern character `char` under this config (`A` is MLA when
  `attention.kind='mla'`): the registered class, or what its `select(cfg)` names."""
  return models.SUBLAYERS[char].select(cfg)


def validate(cfg) -> None:
  """Checks a model config; raises ConfigError with one line naming the field."""
  if not cfg.pattern:
    raise errors.ConfigError('model.pattern is empty; give one character per sublayer, e.g. "AF"*4')
  unknown = sorted(set(cfg.pattern) - set(models.SUBLAYERS))
  if unknown:
    raise errors.ConfigError(f'model.pattern={cfg.pattern!r} has unknown sublayer(s) {unknown}; '
                             f'known: {sorted(models.SUBLAYERS)}')
  if cfg.vocab_size <= 0:
    raise errors.ConfigError(f'model.vocab_size={cfg.vocab_size} must be positive')
  if cfg.position not in POSITIONS:
    raise errors.ConfigError(f'model.position={cfg.position!r} is not one of {POSITIONS}')
  if cfg.norm not in norms.KINDS:
    raise errors.ConfigError(f'model.norm={cfg.norm!r} is not one of {norms.KINDS}')
  if cfg.norm_placement not in NORM_PLACEMENTS:
    raise errors.ConfigError(f'model.norm_placement={cfg.norm_placement!r} is not one of '
                             f'{NORM_PLACEMENTS}')
  if cfg.logit_softcap < 0:
    raise errors.ConfigError(f'model.logit_softcap={cfg.logit_softcap} must be >= 0 (0: off)')
  if cfg.diffusion_block < 0 or (cfg.diffusion_block and not cfg.bidirectional):
    raise errors.ConfigError(f'model.diffusion_block={cfg.diffusion_block} must be 0 (off), or '
                             'positive with model.bidirectional=True')
  if cfg.remat not in REMAT_POLICIES:
    raise errors.ConfigError(f'model.remat={cfg.remat!r} is not one of {sorted(REMAT_POLICIES)}')
  if not cfg.head_dim and cfg.d_model % cfg.num_heads:
    raise errors.ConfigError(f'model.d_model={cfg.d_model} is not divisible by '
                             f'model.num_heads={cfg.num_heads}; set model.head_dim')
  for field in ('dtype', 'param_dtype', 'cache_dtype'):
    value = cfg.get(field, '')
    if (value or field != 'cache_dtype') and value not in common.DTYPES:
      raise errors.ConfigError(f'model.{field}={value!r} is not one of {sorted(common.DTYPES)}'
                               + (" (or '': the compute dtype)" if field == 'cache_dtype' else ''))
  for char in sorted(set(cfg.pattern)):
    cls = sublayer_class(cfg, char)
    if cfg.bidirectional and not cls.BIDIRECTIONAL:
      raise errors.ConfigError(f'model.pattern={cfg.pattern!r} has {char!r} ({cls.__name__}), '
                               'which is causal only: it cannot run with model.bidirectional=True')
    if cfg.diffusion_block and not cls.BLOCK_DIFFUSION:
      raise errors.ConfigError(f'model.pattern={cfg.pattern!r} has {char!r} ({cls.__name__}), '
                               'which has no block-diffusion mask: it cannot run with '
                               f'model.diffusion_block={cfg.diffusion_block}')
    cls.validate(cfg)


def merge_aux(auxes: list[dict]) -> dict:
  """Sums `loss/...` entries and averages the others."""
  merged: dict = {}
  for aux in auxes:
    for key, value in aux.items():
      merged.setdefault(key, []).append(value)
  return {k: sum(v) if k.startswith('loss/') else sum(v) / len(v) for k, v in merged.items()}


class Residual(nn.Module):
  """One pattern character by `model.norm_placement`: x + op(norm(x)) ('pre', Llama),
  x + post_norm(op(x)) ('post', OLMo 2/3) or x + post_norm(op(norm(x))) ('sandwich', Gemma 2/3)."""
  cfg: object
  char: str

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    placement = self.cfg.norm_placement
    h_BTD = x_BTD if placement == 'post' else norms.make_norm(self.cfg, 'norm')(x_BTD)
    op = sublayer_class(self.cfg, self.char)(self.cfg, name='op')
    y_BTD, aux, cache = op(h_BTD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                           cache=cache)
    if placement != 'pre':
      y_BTD = norms.make_norm(self.cfg, 'post_norm')(y_BTD)
    x_BTD = x_BTD + y_BTD.astype(x_BTD.dtype)
    return common.constrain(x_BTD, ('batch', 'length', 'embed')), aux, cache


class Block(nn.Module):
  """One repeating unit of the pattern; scan-compatible signature (carry, *xs)."""
  cfg: object
  unit: str

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache):
    auxes, new_cache = [], {}
    for i, char in enumerate(self.unit):
      name = f'{i}{char}'
      x_BTD, aux, new_cache[name] = Residual(self.cfg, char, name=name)(
          x_BTD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
          cache=None if cache is None else cache[name])
      auxes.append(aux)
    return x_BTD, (merge_aux(auxes), new_cache if cache is not None else None)


class Decoder(nn.Module):
  """A language model over a pattern of sublayers; returns (logits_BTV float32, aux, cache)."""
  cfg: object

  def setup(self):
    cfg = self.cfg
    unit, repeats = split_pattern(cfg.pattern)
    block = Block
    policy = REMAT_POLICIES[cfg.remat]
    scan = cfg.scan_layers and repeats > 1
    if cfg.remat != 'none':  # CSE could undo the remat outside a scan (jax.checkpoint docs)
      block = nn.remat(Block, policy=policy, prevent_cse=not scan)
    if scan:
      # Every variable collection is per layer: parameters and the sublayers' own (the MoE
      # routing biases).
      scanned = nn.scan(block, variable_axes={True: 0},
                        split_rngs={'params': True},
                        in_axes=(nn.broadcast, nn.broadcast, 0), length=repeats,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      self.blocks = scanned(cfg, unit, name='blocks')
    else:
      self.blocks = [block(cfg, unit, name=f'block_{r}') for r in range(repeats)]
    pdtype = common.dtype_of(cfg.param_dtype)
    self.embed_VD = self.param('embed', common.normal_init(cfg.init_std, ('vocab', 'embed')),
                               (cfg.vocab_size, cfg.d_model), pdtype)
    if cfg.position == 'learned':
      self.pos_embed = self.param('pos_embed', common.normal_init(cfg.init_std, ('position', 'embed')),
                                  (cfg.max_len, cfg.d_model), pdtype)
    if not cfg.tie_embeddings:
      self.head_DV = self.param('head', common.normal_init(cfg.init_std, ('embed', 'vocab')),
                                (cfg.d_model, cfg.vocab_size), pdtype)
    self.final_norm = norms.make_norm(cfg, 'final_norm')
    if cfg.autoencoder:
      self.autoencoder_head = autoencoder.AutoencoderHead(cfg, name='autoencoder')

  def __call__(self, inputs_BT, *, positions_BT, segment_ids_BT, cache=None):
    cfg = self.cfg
    dtype = common.dtype_of(cfg.dtype)
    x_BTD = jnp.take(self.embed_VD, inputs_BT, axis=0).astype(dtype)
    if cfg.embed_scale != 1.0:  # e.g. sqrt(d_model) (Gemma), rounded to the compute dtype
      x_BTD = x_BTD * jnp.asarray(cfg.embed_scale, dtype)
    if cfg.position == 'learned':
      x_BTD += jnp.take(self.pos_embed, positions_BT, axis=0).astype(dtype)
    x_BTD = common.constrain(x_BTD, ('batch', 'length', 'embed'))
    if isinstance(self.blocks, (list, tuple)):
      auxes, new_cache = [], {}
      for r, block in enumerate(self.blocks):
        x_BTD, (aux, block_cache) = block(x_BTD, positions_BT, segment_ids_BT,
                                          None if cache is None else cache[f'block_{r}'])
        auxes.append(aux)
        new_cache[f'block_{r}'] = block_cache
      aux = merge_aux(auxes)
    else:
      x_BTD, (aux_L, block_cache) = self.blocks(
          x_BTD, positions_BT, segment_ids_BT, None if cache is None else cache['blocks'])
      aux = {k: jnp.sum(v, 0) if k.startswith('loss/') else jnp.mean(v, 0) for k, v in aux_L.items()}
      new_cache = {'blocks': block_cache}
    if cfg.autoencoder:
      if cache is not None:
        raise errors.ConfigError('model.autoencoder=True decodes every position from the whole '
                                 'row at once and keeps no cache; it cannot generate')
      x_BTD = self.autoencoder_head(x_BTD, positions_BT=positions_BT,
                                    segment_ids_BT=segment_ids_BT)
    x_BTD = self.final_norm(x_BTD)
    if cfg.tie_embeddings:
      logits_BTV = common.project(x_BTD, self.embed_VD.T.astype(dtype), out_dtype=jnp.float32)
    else:
      logits_BTV = common.project(x_BTD, self.head_DV.astype(dtype), out_dtype=jnp.float32)
    logits_BTV = logits_BTV.astype(jnp.float32)
    if cfg.logit_softcap:  # cap * tanh(logits / cap) (Gemma 2), float32
      logits_BTV = cfg.logit_softcap * jnp.tanh(logits_BTV / cfg.logit_softcap)
    logits_BTV = common.constrain(logits_BTV, ('batch', 'length', 'vocab'))
    return logits_BTV, aux, new_cache if cache is not None else None


def init_cache(model_config, batch: int, max_len: int):
  """A decode cache for every sublayer, laid out like the decoder's blocks."""
  cfg = model_config
  unit, repeats = split_pattern(cfg.pattern)
  one = {f'{i}{c}': sublayer_class(cfg, c).init_cache(cfg, batch, max_len) for i, c in enumerate(unit)}
  if cfg.scan_layers and repeats > 1:
    return {'blocks': jax.tree.map(lambda a: jnp.broadcast_to(a, (repeats,) + a.shape), one)}
  return {f'block_{r}': one for r in range(repeats)}


def unrolled(model_config, variables):
  """(config, variables) of the same function with its layers unrolled (`scan_layers=False`):
  a scanned stack's variables (leading layer axis under `blocks`) split into `block_<r>`.

  Decoding uses it: XLA's CPU loop over scanned layers copies each layer's slice of the
  stacked weights and cache every step, which halves decode speed at llama_small's size.
  """
  _, repeats = split_pattern(model_config.pattern)
  if not (model_config.scan_layers and repeats > 1):
    return model_config, variables
  cfg = ml_collections.ConfigDict(model_config.to_dict())
  cfg.scan_layers = False

  def split(collection):
    collection = dict(collection)
    stacked = collection.pop('blocks', None)
    for r in range(repeats if stacked is not None else 0):
      collection[f'block_{r}'] = jax.tree.map(lambda x, r=r: x[r], stacked)
    return collection

  return cfg, {name: split(collection) for name, collection in nn.meta.unbox(variables).items()}


def flops_per_token(model_config, seq_len: int) -> float:
  """Analytic forward FLOPs per token: every sublayer plus the output head (2*D*V)."""
  cfg = model_config
  total = sum(sublayer_class(cfg, c).flops_per_token(cfg, seq_len) for c in cfg.pattern)
  if cfg.get('autoencoder'):
    total += autoencoder.flops_per_token(cfg)
  return float(total + 2 * cfg.d_model * cfg.vocab_size)


def xla_counts_loops_once(model_config, seq_len: int) -> bool:
  """Whether XLA's cost analysis of a training step counts some loop's body once, so its
  FLOP count is low: scanned layers, or a sublayer whose `xla_counts_once` says so."""
  cfg = model_config
  unit, repeats = split_pattern(cfg.pattern)
  return bool(cfg.scan_layers and repeats > 1) or any(
      sublayer_class(cfg, c).xla_counts_once(cfg, seq_len) for c in set(cfg.pattern))


@models.register_model('lm')
def build_lm(model_config):
  cfg = ml_collections.FrozenConfigDict(model_config)
  validate(cfg)
  return Decoder(cfg)
