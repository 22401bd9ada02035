"""The sublayer protocol: what a pattern character's module is and what it tells the rest.

A decoder (models/lm.py) is a pattern of residual sublayers, x = x + op(norm(x)); `op` is an
instance of a `Sublayer` subclass registered under its character (`models.register_sublayer`).
The class declares everything the trainer, the config schema, checkpoints and Hugging Face
interop need to know about it, so no other file tests for pattern characters:

  DEFAULTS       its fields of config.model with their defaults: a section (`{'moe': {...}}`)
                 or top-level fields; the schema (models/schema.py) is the union over the
                 registry, so a sublayer's fields live beside its module
  IGNORES        fields of DEFAULTS this class does not read although it declares them (a
                 section shared with a sibling: `A` does not read `attention.window`)
  RESUMABLE      fields of DEFAULTS that change how a step computes, not the parameters or the
                 function they compute: a checkpoint written with other values resumes
  TRAINING_ONLY  fields of DEFAULTS that only shape training (side-loss weights, token
                 dispatch): Hugging Face interop neither translates nor compares them
  BIAS_SWITCHES  what `model.use_bias=True` turns on in this sublayer, as the switches that
                 turn on the same biases alone (None: use_bias means more than switches can)
  BIDIRECTIONAL  whether it can run without a causal mask (diffusion backbones)
  BLOCK_DIFFUSION  whether it runs training rows of block diffusion (`model.diffusion_block`:
                 [x_noisy, x] halves under BD3-LM's mask): position-wise sublayers and
                 attention that builds its mask in `attention.attend`

  select(cfg)                      the class serving the character under cfg (`A` -> MLA),
                                   one of itself and `variants()`
  validate(cfg)                    one-line `errors.ConfigError`s naming the field
  flops_per_token(cfg, seq_len)    analytic forward FLOPs per token (required)
  xla_counts_once(cfg, seq_len)    True when XLA's cost analysis counts a loop of it once
  canonical(fields)                equal spellings of its fields made equal (HF, resume)
  init_cache(cfg, batch, max_len)  its decode cache; `{}` when it keeps none

  __call__(x_BTD, *, positions_BT, segment_ids_BT, cache=None) -> (y_BTD, aux, cache)

Passing a cache means decoding, and the sublayer returns its updated cache (a sublayer that
keeps none returns what it was given: `{}` while decoding, None in training). `aux` is a dict
of side losses, `loss/<name>` already weighted by the sublayer's own field and summed over
layers, and statistics, averaged over layers. Mutable state that is not a parameter (the MoE
routing bias) lives in a flax collection and comes back from `apply`, never through `aux`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn


class Sublayer(nn.Module):
  """Base of every sublayer: the defaults are what most sublayers are (no cache, no side
  loss, no fields of their own, causal or bidirectional alike)."""
  cfg: Any  # FrozenConfigDict of config.model

  DEFAULTS: ClassVar[dict] = {}
  IGNORES: ClassVar[tuple[str, ...]] = ()
  RESUMABLE: ClassVar[tuple[str, ...]] = ()
  TRAINING_ONLY: ClassVar[tuple[str, ...]] = ()
  BIAS_SWITCHES: ClassVar[tuple[str, ...] | None] = ()
  BIDIRECTIONAL: ClassVar[bool] = True
  BLOCK_DIFFUSION: ClassVar[bool] = False

  @classmethod
  def select(cls, cfg) -> type:
    del cfg
    return cls

  @classmethod
  def variants(cls) -> tuple[type, ...]:
    """The other classes `select` may return (their fields join the schema too)."""
    return ()

  @classmethod
  def validate(cls, cfg) -> None:
    del cfg

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    raise NotImplementedError(f'{cls.__name__} must define flops_per_token(cfg, seq_len)')

  @classmethod
  def xla_counts_once(cls, cfg, seq_len: int) -> bool:
    """Whether XLA's cost analysis sees only one iteration of a loop this sublayer runs in
    a training step (flash attention's blocks, a chunked scan): its FLOP count is then low."""
    del cfg, seq_len
    return False

  @classmethod
  def canonical(cls, fields: dict) -> dict:
    """`fields` ({dotted model field: value}) with equal spellings of this sublayer's fields
    made equal (`moe.expert_mlp_dim=0` is `mlp_dim`)."""
    return fields

  @classmethod
  def init_cache(cls, cfg, batch: int, max_len: int):
    del cfg, batch, max_len
    return {}

  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    raise NotImplementedError(f'{type(self).__name__} must define __call__')


def fields_of(defaults: dict, prefix: str = '') -> dict[str, Any]:
  """{'a.b': default} for every leaf of a DEFAULTS dict."""
  out = {}
  for key, value in defaults.items():
    if isinstance(value, dict):
      out.update(fields_of(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def covers(prefixes, field: str) -> bool:
  """Whether dotted `field` is one of `prefixes` or lies under one of them."""
  return any(field == p or field.startswith(p + '.') for p in prefixes)
