"""Gated short convolution `C`: Zoology's BaseConv, the token mixer its associative-recall
models put in front of every other mixer (HazyResearch/zoology, `zoology/mixers/base_conv.py`,
used through `zoology/mixers/hybrid.py`: layer i takes the i-th mixer of [BaseConv, mixer]).

  y = u + conv_K(u) * (W u + b)

where u is the sublayer's (normalised) input, conv_K the causal depthwise convolution of
K = `base_conv.taps` taps with a bias (models/layers/short_conv.py: each document alone, as
attention), W a D x D projection with a bias, and `*` elementwise. The `u +` is Zoology's:
BaseConv returns it inside the block's own residual, so the stream gains x + norm(x) + ... .
It is what lets a two-layer model solve multi-query recall quickly: the convolution writes
each key into its value's position, and the next layer's mixer only has to match the query
against it (no previous-token head to discover first).

Initialisation is PyTorch's default, as Zoology trains it (Conv1d and Linear: uniform with
variance 1/(3 fan_in), here normal of that variance; biases zero). Decoding keeps the last
K - 1 inputs (short_conv.init_cache): a few vectors per row at any length. The convolution
is causal, so `C` cannot serve a bidirectional (diffusion) backbone.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

import errors
import models
from models import sublayer
from models.layers import common
from models.layers import short_conv


@models.register_sublayer('C')
class BaseConv(sublayer.Sublayer):
  """y = u + conv_K(u) * (W u + b) (Zoology's BaseConv)."""
  DEFAULTS = {'base_conv': dict(taps=3)}  # Zoology's kernel_size
  BIDIRECTIONAL = False

  @classmethod
  def validate(cls, cfg):
    if cfg.base_conv.taps < 1:
      raise errors.ConfigError(f'model.base_conv.taps={cfg.base_conv.taps} must be >= 1')

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    del seq_len
    d = cfg.d_model
    return short_conv.flops_per_token(cfg.base_conv.taps, d) + 2.0 * d * d

  @classmethod
  def init_cache(cls, cfg, batch: int, max_len: int):
    del max_len
    return short_conv.init_cache(batch, cfg.base_conv.taps, cfg.d_model,
                                 common.dtype_of(cfg.dtype))

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    del positions_BT  # the convolution is its own position signal
    cfg = self.cfg
    d, taps = cfg.d_model, cfg.base_conv.taps
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    kernel_SD = self.param('kernel', common.normal_init((3 * taps) ** -0.5, (None, 'embed')),
                           (taps, d), pdtype)
    bias_D = self.param('bias', common.zeros_init(('embed',)), (d,), pdtype)
    w_DF = self.param('w', common.normal_init((3 * d) ** -0.5, ('embed', 'mlp')), (d, d),
                      pdtype)
    w_bias_F = self.param('w_bias', common.zeros_init(('mlp',)), (d,), pdtype)
    conv_BTD, cache = short_conv.causal_conv(x_BTD, kernel_SD, bias_D,
                                             segment_ids_BT=segment_ids_BT, cache=cache)
    gate_BTF = common.project(x_BTD, w_DF.astype(dtype)) + w_bias_F.astype(dtype)
    y_BTD = x_BTD + conv_BTD * gate_BTF
    return y_BTD.astype(dtype), {}, cache
