"""MAD's autoencoder head (athms/mad-lab, `mad/model/auto_encoder.py`), the backbone MAD's
compression task trains: `model.autoencoder=True` turns the decoder into

  e     = h[last]                               the stack's output at the row's last real
                                                token (MAD's global_pool='last'), before the
                                                final norm: causal layers have seen it all
  z_t   = e + sincos(t)                         one query per position t (fairseq's sinusoids,
                                                MAD's posemb_sincos_1d)
  z_t   = GELU(W2 norm(GELU(W1 norm(z_t) + b1)) + b2)     MAD's non-expanding MLP decoder
  logit = head(final_norm(z_t))                 the decoder's own unembedding

so every position's logits reconstruct the row's token t from one D-vector: the target of
position t is its own input (input_pipeline/tasks/mad.py's `compression`). MAD's unembedding
has a bias and is never tied; here it is the decoder's head (tied or not by
`model.tie_embeddings`), without a bias. There is nothing to decode token by token, so it keeps
no cache.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import common
from models.layers import norms


def sincos(positions_BT, dim: int):
  """fairseq's sinusoidal embedding (MAD's posemb_sincos_1d): [sin(t w_i), cos(t w_i)] with
  w_i = 10000^(-i / (dim/2 - 1)), zero-padded to an odd dim; float32 [B, T, dim]."""
  half = dim // 2
  freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000) / (half - 1)))
  angle_BTD = positions_BT.astype(jnp.float32)[..., None] * freq
  out_BTD = jnp.concatenate([jnp.sin(angle_BTD), jnp.cos(angle_BTD)], axis=-1)
  if dim % 2:
    out_BTD = jnp.pad(out_BTD, ((0, 0), (0, 0), (0, 1)))
  return out_BTD


def last_real(x_BTD, segment_ids_BT):
  """Each row's vector at its last position with a nonzero segment id (rows are right-padded
  with segment 0); position T-1 for a row without padding."""
  t = x_BTD.shape[1]
  last_B = jnp.max(jnp.where(segment_ids_BT > 0, jnp.arange(t), 0), axis=1)
  return jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]


class AutoencoderHead(nn.Module):
  """e = h[last]; z_t = MLP(e + sincos(t)): what the decoder's final norm and head read."""
  cfg: object

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT):
    cfg = self.cfg
    d = cfg.d_model
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    e_BD = last_real(x_BTD, segment_ids_BT)
    z_BTD = (e_BD[:, None].astype(jnp.float32) + sincos(positions_BT, d)).astype(dtype)
    for i in (1, 2):
      w_DD = self.param(f'w{i}', common.normal_init(cfg.init_std, ('embed', 'mlp')), (d, d),
                        pdtype)
      b_D = self.param(f'b{i}', common.zeros_init(('mlp',)), (d,), pdtype)
      h_BTD = norms.make_norm(cfg, f'norm{i}')(z_BTD)
      z_BTD = jax.nn.gelu(common.project(h_BTD, w_DD.astype(dtype)) + b_D.astype(dtype),
                          approximate=False)
    return z_BTD


def flops_per_token(cfg) -> float:
  """The decoder MLP's two D x D matrices at every position."""
  return 4.0 * cfg.d_model * cfg.d_model
