"""Normalisation layers: RMSNorm and LayerNorm, variance computed in float32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import common


class Norm(nn.Module):
  """RMSNorm (`kind='rmsnorm'`) or LayerNorm (`kind='layernorm'`) over the last axis."""
  kind: str
  eps: float
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    d = x_BTD.shape[-1]
    x32_BTD = x_BTD.astype(jnp.float32)  # norms' statistics are float32
    if self.kind == 'rmsnorm':
      var_BT1 = jnp.mean(jnp.square(x32_BTD), axis=-1, keepdims=True)
      y_BTD = x32_BTD * jax.lax.rsqrt(var_BT1 + self.eps)
    elif self.kind == 'layernorm':
      mean_BT1 = jnp.mean(x32_BTD, axis=-1, keepdims=True)
      var_BT1 = jnp.mean(jnp.square(x32_BTD - mean_BT1), axis=-1, keepdims=True)
      y_BTD = (x32_BTD - mean_BT1) * jax.lax.rsqrt(var_BT1 + self.eps)
    else:
      raise ValueError(f"model.norm={self.kind!r} is not 'rmsnorm' or 'layernorm'")
    scale_D = self.param('scale', common.ones_init(('norm',)), (d,), self.param_dtype)
    y_BTD = y_BTD * scale_D.astype(jnp.float32)
    if self.use_bias or self.kind == 'layernorm':
      bias_D = self.param('bias', common.zeros_init(('norm',)), (d,), self.param_dtype)
      y_BTD = y_BTD + bias_D.astype(jnp.float32)
    return y_BTD.astype(self.dtype)


def make_norm(cfg, name: str | None = None) -> Norm:
  return Norm(kind=cfg.norm, eps=cfg.norm_eps, dtype=common.dtype_of(cfg.dtype),
              param_dtype=common.dtype_of(cfg.param_dtype), name=name)
