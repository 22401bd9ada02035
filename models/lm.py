"""The decoder: embeddings, a pattern of residual sublayers, final norm and output head.

`config.model.pattern` is one character a sublayer (DESIGN.md). Its smallest repeating unit
is one `Block`; with `scan_layers` the block is scanned (`nn.scan`) so compile time does not
grow with depth, otherwise the repeats are unrolled. Sublayers return `(y, aux)`; `aux`
entries named `loss/...` are side losses summed over layers, others are statistics averaged
over layers, and `cache` is the sublayer's updated decode cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import errors
import models
from models.layers import attention  # noqa: F401  (registers A, W)
from models.layers import common
from models.layers import mla  # noqa: F401  (attention.kind='mla')
from models.layers import mlp  # noqa: F401  (registers F)
from models.layers import moe  # noqa: F401  (registers E)
from models.layers import norms

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
  cls = models.SUBLAYERS[char]
  select = getattr(cls, 'select', None)
  return select(cfg) if select else cls


def validate(cfg) -> None:
  """Checks a model config; raises ValueError with one line naming the field."""
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
    raise errors.ConfigError(f'model.norm_placement={cfg.norm_placement!r} is not one of {NORM_PLACEMENTS}')
  if cfg.logit_softcap < 0:
    raise errors.ConfigError(f'model.logit_softcap={cfg.logit_softcap} must be >= 0 (0: off)')
  if cfg.remat not in REMAT_POLICIES:
    raise errors.ConfigError(f'model.remat={cfg.remat!r} is not one of {sorted(REMAT_POLICIES)}')
  if not cfg.head_dim and cfg.d_model % cfg.num_heads:
    raise errors.ConfigError(f'model.d_model={cfg.d_model} is not divisible by '
                     f'model.num_heads={cfg.num_heads}; set model.head_dim')
  common.dtype_of(cfg.dtype)
  common.dtype_of(cfg.param_dtype)
  for char in sorted(set(cfg.pattern)):
    sublayer_class(cfg, char).validate(cfg)


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
    y_BTD, aux = op(h_BTD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, cache=cache)
    if placement != 'pre':
      y_BTD = norms.make_norm(self.cfg, 'post_norm')(y_BTD)
    x_BTD = x_BTD + y_BTD.astype(x_BTD.dtype)
    return common.constrain(x_BTD, ('batch', 'length', 'embed')), aux


class Block(nn.Module):
  """One repeating unit of the pattern; scan-compatible signature (carry, *xs)."""
  cfg: object
  unit: str

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache):
    auxes, new_cache = [], {}
    for i, char in enumerate(self.unit):
      name = f'{i}{char}'
      x_BTD, aux = Residual(self.cfg, char, name=name)(
          x_BTD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
          cache=None if cache is None else cache[name])
      if 'cache' in aux:
        new_cache[name] = aux.pop('cache')
      auxes.append(aux)
    return x_BTD, (merge_aux(auxes), new_cache if cache is not None else None)


class Decoder(nn.Module):
  """A language model over a pattern of sublayers; returns (logits_BTV float32, aux)."""
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
      # Every variable collection is per layer: parameters and the MoE routing biases.
      scanned = nn.scan(block, variable_axes={'params': 0, moe.BIAS_COLLECTION: 0},
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
    x_BTD = self.final_norm(x_BTD)
    if cfg.tie_embeddings:
      logits_BTV = common.project(x_BTD, self.embed_VD.T.astype(dtype), out_dtype=jnp.float32)
    else:
      logits_BTV = common.project(x_BTD, self.head_DV.astype(dtype), out_dtype=jnp.float32)
    logits_BTV = logits_BTV.astype(jnp.float32)
    if cfg.logit_softcap:  # cap * tanh(logits / cap) (Gemma 2), float32
      logits_BTV = cfg.logit_softcap * jnp.tanh(logits_BTV / cfg.logit_softcap)
    logits_BTV = common.constrain(logits_BTV, ('batch', 'length', 'vocab'))
    if cache is not None:
      aux['cache'] = new_cache
    return logits_BTV, aux


def init_cache(model_config, batch: int, max_len: int):
  """A decode cache for every sublayer, laid out like the decoder's blocks."""
  cfg = model_config
  unit, repeats = split_pattern(cfg.pattern)
  one = {f'{i}{c}': sublayer_class(cfg, c).init_cache(cfg, batch, max_len) for i, c in enumerate(unit)}
  if cfg.scan_layers and repeats > 1:
    return {'blocks': jax.tree.map(lambda a: jnp.broadcast_to(a, (repeats,) + a.shape), one)}
  return {f'block_{r}': one for r in range(repeats)}


def flops_per_token(model_config, seq_len: int) -> float:
  """Analytic forward FLOPs per token: every sublayer plus the output head (2*D*V)."""
  cfg = model_config
  total = sum(sublayer_class(cfg, c).flops_per_token(cfg, seq_len) for c in cfg.pattern)
  return float(total + 2 * cfg.d_model * cfg.vocab_size)


@models.register_model('lm')
def build_lm(model_config):
  cfg = ml_collections.FrozenConfigDict(model_config)
  validate(cfg)
  return Decoder(cfg)
