"""Rotary positions (RoPE): theta, partial rotary fraction, rotate-half or interleaved pairing,
and frequency scaling (linear, Llama 3, YaRN) computed as Hugging Face transformers does.

Learned absolute positions are a table in `models/lm.py`; `position='none'` adds nothing.
Inverse frequencies depend only on the config, so they are computed once in numpy (float32
like transformers' buffers) and enter the graph as constants; angles are float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

import errors

SCALINGS = ('none', 'linear', 'llama3', 'yarn')

# The position fields of config.model (the decoder's DEFAULTS include them).
DEFAULTS = dict(
    position='rope',           # rope | learned | none
    rope_theta=10000.0,
    rope_fraction=1.0,         # partial rotary: rotate the first int(head_dim * fraction) dims
    rope_interleaved=False,    # pairs (2i, 2i+1) (GPT-J, DeepSeek) instead of rotate-half (i, i+dim/2)
    rope_scaling=dict(         # as transformers' rope_scaling / rope_parameters
        kind='none',           # none | linear | llama3 | yarn
        factor=1.0,            # context extension factor (linear, llama3, yarn)
        original_max_len=8192,  # llama3 and yarn: pre-training context (original_max_position_embeddings)
        low_freq_factor=1.0,   # llama3
        high_freq_factor=4.0,  # llama3
        beta_fast=32.0,        # yarn: ramp boundaries in rotations
        beta_slow=1.0,         # yarn
        mscale=0.0,            # yarn: with mscale_all_dim, attention factor mscale(m) / mscale(m_all)
        mscale_all_dim=0.0,    # yarn (MLA also multiplies its softmax scale by mscale(m_all)^2)
        attention_factor=0.0,  # yarn: cos/sin factor; 0: 0.1 ln(factor) + 1
        truncate=True,         # yarn: round the ramp boundaries to integers
    ),
)


def rotary_dim(head_dim: int, fraction: float) -> int:
  """Rotated dims: int(head_dim * fraction) as transformers computes it; must be even."""
  return int(head_dim * fraction)


def rope_frequencies(dim: int, theta: float, scaling=None) -> tuple[np.ndarray, float]:
  """Inverse frequencies theta^(-2i/dim) for i < dim/2, rescaled, and the cos/sin factor.

  `scaling` is `config.model.rope_scaling` (or None): `kind` none | linear | llama3 | yarn
  with transformers' parameters (`factor`, `low_freq_factor`, `high_freq_factor`,
  `original_max_len`, `beta_fast`, `beta_slow`, `mscale`, `mscale_all_dim`,
  `attention_factor`, `truncate`). Returns (inv_freq float32 of dim/2, attention factor);
  the attention factor multiplies cos and sin (YaRN's temperature; 1 otherwise).
  """
  if dim % 2:
    raise errors.ConfigError(f'RoPE needs an even number of rotated dims, got {dim}')
  # transformers: base ** (arange(0, dim, 2).float() / dim), all float32.
  exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = np.power(np.float32(theta), exponent, dtype=np.float32)
  inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
  kind = 'none' if scaling is None else scaling.kind
  if kind == 'none':
    return inv_freq, 1.0
  factor = float(scaling.factor)
  if kind == 'linear':
    return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
  if kind == 'llama3':
    return _llama3(inv_freq, factor, scaling), 1.0
  if kind == 'yarn':
    return _yarn(pos_freqs, dim, theta, factor, scaling)
  raise errors.ConfigError(f'model.rope_scaling.kind={kind!r} is not one of {SCALINGS}')


def _llama3(inv_freq, factor, s):
  """Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
  old_len = s.original_max_len
  low_wavelen = old_len / s.low_freq_factor
  high_wavelen = old_len / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(pos_freqs, dim, theta, factor, s):
  """YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, ramp between."""
  if s.attention_factor:
    attention_factor = float(s.attention_factor)
  elif s.mscale and s.mscale_all_dim:
    attention_factor = yarn_mscale(factor, s.mscale) / yarn_mscale(factor, s.mscale_all_dim)
  else:
    attention_factor = yarn_mscale(factor)

  def correction_dim(rotations):
    return dim * math.log(s.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as transformers: avoids a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = (1 - ramp).astype(np.float32)
  inv_extra = np.float32(1.0) / pos_freqs
  inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
  return inv_freq.astype(np.float32), attention_factor


@dataclasses.dataclass(frozen=True)
class Rope:
  """A rotary encoding over the first `dim` features of each head (the rest pass through)."""
  dim: int
  theta: float = 10000.0
  interleaved: bool = False      # pairs (2i, 2i+1) (GPT-J, DeepSeek) instead of (i, i + dim/2)
  scaling: object = None         # config.model.rope_scaling or None

  def __call__(self, x_BTNH, positions_BT):
    # Angles, sines and cosines span half the rotated features: a slice of the head dim (H),
    # as are the rotated features and the rest, which pass through.
    inv_freq_H, attention_factor = rope_frequencies(self.dim, self.theta, self.scaling)
    angle_BTH = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_H)
    sin_BT1H = (jnp.sin(angle_BTH) * attention_factor)[:, :, None, :]
    cos_BT1H = (jnp.cos(angle_BTH) * attention_factor)[:, :, None, :]
    x32_BTNH = x_BTNH.astype(jnp.float32)  # rotations are float32
    rotated_BTNH, rest_BTNH = x32_BTNH[..., :self.dim], x32_BTNH[..., self.dim:]
    if self.interleaved:
      x1_BTNH, x2_BTNH = rotated_BTNH[..., 0::2], rotated_BTNH[..., 1::2]
      y1_BTNH = x1_BTNH * cos_BT1H - x2_BTNH * sin_BT1H
      y2_BTNH = x2_BTNH * cos_BT1H + x1_BTNH * sin_BT1H
      rotated_BTNH = jnp.stack([y1_BTNH, y2_BTNH], axis=-1).reshape(rotated_BTNH.shape)
    else:
      x1_BTNH, x2_BTNH = rotated_BTNH[..., :self.dim // 2], rotated_BTNH[..., self.dim // 2:]
      rotated_BTNH = jnp.concatenate([x1_BTNH * cos_BT1H - x2_BTNH * sin_BT1H,
                                      x2_BTNH * cos_BT1H + x1_BTNH * sin_BT1H], -1)
    return jnp.concatenate([rotated_BTNH, rest_BTNH], -1).astype(x_BTNH.dtype)


def rope_from_config(cfg, head_dim: int) -> Rope:
  """The model's RoPE for heads of `head_dim` features (`rope_fraction` of them rotated)."""
  return Rope(dim=rotary_dim(head_dim, cfg.rope_fraction), theta=cfg.rope_theta,
              interleaved=cfg.rope_interleaved, scaling=cfg.rope_scaling)


def validate(cfg, head_dim: int) -> None:
  """Checks the RoPE fields; one-line ValueErrors naming the field."""
  if not 0 < cfg.rope_fraction <= 1:
    raise errors.ConfigError(f'model.rope_fraction={cfg.rope_fraction} must be in (0, 1]')
  dim = rotary_dim(head_dim, cfg.rope_fraction)
  if dim % 2 or dim == 0:
    raise errors.ConfigError(f'RoPE needs an even, non-zero number of rotated dims: model.head_dim='
                     f'{head_dim} x model.rope_fraction={cfg.rope_fraction} gives {dim}')
  s = cfg.rope_scaling
  if s.kind not in SCALINGS:
    raise errors.ConfigError(f'model.rope_scaling.kind={s.kind!r} is not one of {SCALINGS}')
  if s.kind != 'none' and s.factor <= 0:
    raise errors.ConfigError(f'model.rope_scaling.factor={s.factor} must be positive')
  if s.kind in ('llama3', 'yarn') and s.original_max_len <= 0:
    raise errors.ConfigError(f'model.rope_scaling.original_max_len={s.original_max_len} must be positive '
                     f'for kind={s.kind!r}')
  if s.kind == 'llama3' and s.high_freq_factor <= s.low_freq_factor:
    raise errors.ConfigError(f'model.rope_scaling.high_freq_factor={s.high_freq_factor} must exceed '
                     f'low_freq_factor={s.low_freq_factor}')


def apply_rope(x_BTNH, positions_BT, theta: float = 10000.0, *, fraction: float = 1.0,
               interleaved: bool = False, scaling=None):
  """Rotates each head's first `fraction` of features by angle position * freq_i.

  Default pairing is rotate-half (x[i], x[i + dim/2]) of the `dim` rotated features (the
  Llama / Hugging Face layout); `interleaved` pairs (x[2i], x[2i+1]) and keeps them in place
  (GPT-J).
  """
  dim = rotary_dim(x_BTNH.shape[-1], fraction)
  return Rope(dim=dim, theta=theta, interleaved=interleaved, scaling=scaling)(x_BTNH, positions_BT)
