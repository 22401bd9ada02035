"""Positional encodings: rotary (RoPE, rotate-half pairing) and learned absolute."""

from __future__ import annotations

import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float):
  """Inverse frequencies theta^(-2i/H) for i < H/2, float32."""
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {head_dim}')
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BTNH, positions_BT, theta: float):
  """Rotates pairs (x[i], x[i + H/2]) by angle position * freq_i (the Llama/HF layout)."""
  h = x_BTNH.shape[-1]
  inv_freq_h = rope_frequencies(h, theta)
  angle_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h  # float32 angles
  sin_BT1h = jnp.sin(angle_BTh)[:, :, None, :]
  cos_BT1h = jnp.cos(angle_BTh)[:, :, None, :]
  x32_BTNH = x_BTNH.astype(jnp.float32)
  x1, x2 = x32_BTNH[..., : h // 2], x32_BTNH[..., h // 2:]
  y_BTNH = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h], -1)
  return y_BTNH.astype(x_BTNH.dtype)
