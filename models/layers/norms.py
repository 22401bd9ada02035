"""Normalisation layers: RMSNorm and LayerNorm, variance computed in float32.

`zero_centred` stores the scale as w and applies 1 + w (Gemma, Qwen3-Next), so weight decay
pulls it towards the identity. `num_axes` normalises over several trailing axes at once (a
QK-norm over the whole projection width, OLMo 2 style, normalises (heads, head_dim)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import errors
from models.layers import common

KINDS = ('rmsnorm', 'layernorm')


class Norm(nn.Module):
  """RMSNorm (`kind='rmsnorm'`) or LayerNorm (`kind='layernorm'`) over the last axes."""
  kind: str
  eps: float
  use_bias: bool = False
  zero_centred: bool = False
  num_axes: int = 1                       # normalise over the last `num_axes` axes
  axes: tuple[str, ...] = ('norm',)       # logical names of the scale's axes
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    shape = x_BTD.shape[x_BTD.ndim - self.num_axes:]
    assert len(self.axes) == self.num_axes, (self.axes, self.num_axes)
    reduce = tuple(range(x_BTD.ndim - self.num_axes, x_BTD.ndim))
    x32_BTD = x_BTD.astype(jnp.float32)  # norms' statistics are float32
    if self.kind == 'rmsnorm':
      var_BT1 = jnp.mean(jnp.square(x32_BTD), axis=reduce, keepdims=True)
      y_BTD = x32_BTD * jax.lax.rsqrt(var_BT1 + self.eps)
    elif self.kind == 'layernorm':
      mean_BT1 = jnp.mean(x32_BTD, axis=reduce, keepdims=True)
      var_BT1 = jnp.mean(jnp.square(x32_BTD - mean_BT1), axis=reduce, keepdims=True)
      y_BTD = (x32_BTD - mean_BT1) * jax.lax.rsqrt(var_BT1 + self.eps)
    else:
      raise errors.ConfigError(f'model.norm={self.kind!r} is not one of {KINDS}')
    init = common.zeros_init if self.zero_centred else common.ones_init
    scale_D = self.param('scale', init(self.axes), shape, self.param_dtype).astype(jnp.float32)
    y_BTD = y_BTD * (1.0 + scale_D if self.zero_centred else scale_D)
    if self.use_bias or self.kind == 'layernorm':
      bias_D = self.param('bias', common.zeros_init(self.axes), shape, self.param_dtype)
      y_BTD = y_BTD + bias_D.astype(jnp.float32)
    return y_BTD.astype(self.dtype)


def make_norm(cfg, name: str | None = None, *, kind: str | None = None, num_axes: int = 1,
              axes: tuple[str, ...] = ('norm',)) -> Norm:
  """The model's norm (`model.norm`, `norm_eps`, `norm_zero_centred`); `kind` overrides."""
  return Norm(kind=kind or cfg.norm, eps=cfg.norm_eps, zero_centred=cfg.norm_zero_centred,
              num_axes=num_axes, axes=axes, dtype=common.dtype_of(cfg.dtype),
              param_dtype=common.dtype_of(cfg.param_dtype), name=name)
