"""archlab models: Flax linen modules, nothing about devices or files.

Dimension key. Every array name ends with its dimensions and every einsum uses the same
letters. A letter means one thing everywhere, and no other letters are used (a `1` marks a
broadcast axis of size one). Block-local arrays use the same letters as the whole: a flash
block's queries are `T`, its keys `S`.

  Every array:
    B batch
    T query length (tokens of the call)
    S key/value length (the keys a query may see: its row, a cache, a window, a block or a
      selected set)
    D model width
    V vocabulary
    L stacked layers (scan)
  Attention:
    N query heads (the output heads)
    K kv heads
    G query groups per kv head (N / K)
    H head dim (of queries and keys, or of values where they differ, as in MLA)
    R latent rank (MLA's kv_rank and q_rank)
  MLP and MoE:
    F MLP hidden (also a mixer's projected channels, as its short convolution sees them)
    E experts
    X routed choices per token (top-k)
    Z routed slots (X x tokens)
    Q capacity slots per expert
    W capacity groups
    M tokens per capacity group
    U expert groups (group-limited routing)
    J experts per group
  Reserved for the sublayers to come:
    C chunk length (mixer chunks, attention and sparse blocks, diffusion blocks)
    A chunks or blocks per row (T / C)
    P state dim (SSM state, DeltaNet key dim)
    Y value heads (gated DeltaNet)
    I indexer heads (DSA)
    O diffusion steps

tests/test_dimension_key.py reads this key and checks every name and einsum under models/.

A decoder is a pattern string of residual sublayers (DESIGN.md). Each sublayer class
registers itself under its pattern character with `register_sublayer`; a model family
registers a builder with `register_model`. `build(config.model)` returns the module.
"""

from __future__ import annotations

from typing import Callable

import errors

SUBLAYERS: dict[str, type] = {}
MODELS: dict[str, Callable] = {}


def register_sublayer(char: str):
  """Registers a `models.sublayer.Sublayer` class under one pattern character.

  A character already taken by another class, a class that is no Sublayer, or one without
  its own `flops_per_token` is refused.
  """
  if len(char) != 1:
    raise errors.ConfigError(f'a sublayer registers under one character, got {char!r}')

  def wrap(cls):
    from models import sublayer  # pylint: disable=g-import-not-at-top
    if char in SUBLAYERS and SUBLAYERS[char] is not cls:
      raise errors.ConfigError(f'pattern character {char!r} is already taken by '
                               f'{SUBLAYERS[char].__name__}; pick another for {cls.__name__}')
    if not (isinstance(cls, type) and issubclass(cls, sublayer.Sublayer)):
      raise errors.ConfigError(f'{getattr(cls, "__name__", cls)} registers as sublayer {char!r} '
                               'but does not derive from models.sublayer.Sublayer')
    if cls.flops_per_token.__func__ is sublayer.Sublayer.flops_per_token.__func__:
      raise errors.ConfigError(f'sublayer {char!r} ({cls.__name__}) must define '
                               'flops_per_token(cfg, seq_len)')
    SUBLAYERS[char] = cls
    return cls

  return wrap


def register_model(name: str):
  """Registers a model builder `fn(model_config) -> nn.Module`; duplicates are refused."""

  def wrap(fn):
    if name in MODELS and MODELS[name] is not fn:
      raise errors.ConfigError(f'model name {name!r} is already registered')
    MODELS[name] = fn
    return fn

  return wrap


def build(model_config):
  """Builds the module named by `model_config.name` (after validating the config)."""
  name = model_config.name
  if name not in MODELS:
    raise errors.ConfigError(f'model.name={name!r} is not a registered model; '
                     f'known: {sorted(MODELS)}')
  return MODELS[name](model_config)


# Importing the modules registers them.
from models import lm  # noqa: E402,F401  pylint: disable=g-import-not-at-top
