"""Dense MLP sublayer `F`: gated (SwiGLU, GeGLU, clamped SwiGLU) or plain (GELU, ReLU, ReLU^2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import errors
import models
from models import sublayer
from models.layers import common

ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's tanh approximation
    'gelu_exact': lambda x: jax.nn.gelu(x, approximate=False),
    'relu': jax.nn.relu,
    'relu2': lambda x: jnp.square(jax.nn.relu(x)),
    'silu': jax.nn.silu,
}
# Gated activations: act(gate) * up, except swiglu_clamped (see `glu`).
GATED = {'swiglu': 'silu', 'geglu': 'gelu', 'swiglu_clamped': 'silu'}


def glu(cfg, gate, up):
  """The gated product of `model.mlp_activation` (a name in GATED).

  swiglu_clamped is GPT-OSS's: the gate clipped above at `swiglu_limit`, the up projection to
  [-limit, limit], then (up + 1) * gate * sigmoid(swiglu_alpha * gate).
  """
  if cfg.mlp_activation == 'swiglu_clamped':
    limit = cfg.swiglu_limit
    gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(cfg.swiglu_alpha * gate))
  return ACTIVATIONS[GATED[cfg.mlp_activation]](gate) * up


def activation(cfg):
  """`(gated, fn)`: fn(h, up) for gated activations, fn(h) for plain ones."""
  if cfg.mlp_activation in GATED:
    return True, lambda h, up: glu(cfg, h, up)
  return False, ACTIVATIONS[cfg.mlp_activation]


@models.register_sublayer('F')
class Mlp(sublayer.Sublayer):
  """y = W_out act(W_in x) or, gated, y = W_out (act(W_gate x) * W_up x)."""
  BLOCK_DIFFUSION = True  # position-wise
  # Its fields of config.model (the MoE sublayer reads them too).
  DEFAULTS = dict(
      mlp_dim=512,
      mlp_activation='swiglu',   # swiglu | geglu | swiglu_clamped | gelu | gelu_exact | relu | relu2 | silu
      swiglu_limit=7.0,          # swiglu_clamped (GPT-OSS): gate <= limit, |up| <= limit,
      swiglu_alpha=1.702,        #   out = (up + 1) * gate * sigmoid(alpha * gate)
      mlp_bias=False,            # biases on the MLP's projections
  )
  BIAS_SWITCHES = ('mlp_bias',)

  @classmethod
  def validate(cls, cfg):
    if cfg.mlp_activation not in ACTIVATIONS and cfg.mlp_activation not in GATED:
      raise errors.ConfigError(f'model.mlp_activation={cfg.mlp_activation!r} is not one of '
                       f'{sorted(ACTIVATIONS) + sorted(GATED)}')
    if cfg.mlp_dim <= 0:
      raise errors.ConfigError(f'model.mlp_dim={cfg.mlp_dim} must be positive')
    if cfg.mlp_activation == 'swiglu_clamped' and cfg.swiglu_limit <= 0:
      raise errors.ConfigError(f'model.swiglu_limit={cfg.swiglu_limit} must be positive')

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    del seq_len
    matrices = 3 if cfg.mlp_activation in GATED else 2
    return float(2 * matrices * cfg.d_model * cfg.mlp_dim)

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None):
    del positions_BT, segment_ids_BT
    cfg = self.cfg
    d, f = cfg.d_model, cfg.mlp_dim
    assert x_BTD.shape[-1] == d, f'model.d_model={d} but input width {x_BTD.shape[-1]}'
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    out_std = cfg.init_std / len(cfg.pattern) ** 0.5

    def dense(name, x, shape, axes, std):
      w = self.param(name, common.normal_init(std, axes), shape, pdtype).astype(dtype)
      y = common.project(x, w)
      if cfg.use_bias or cfg.mlp_bias:
        y += self.param(name + '_bias', common.zeros_init(axes[-1:]), shape[-1:], pdtype).astype(dtype)
      return y

    gated, act = activation(cfg)
    h_BTF = dense('wi', x_BTD, (d, f), ('embed', 'mlp'), cfg.init_std)
    if gated:
      up_BTF = dense('wu', x_BTD, (d, f), ('embed', 'mlp'), cfg.init_std)
      h_BTF = act(h_BTF, up_BTF)
    else:
      h_BTF = act(h_BTF)
    h_BTF = common.constrain(h_BTF, ('batch', 'length', 'mlp'))
    y_BTD = dense('wo', h_BTF, (f, d), ('mlp', 'embed'), out_std)
    return y_BTD, {}, cache
