"""The causal short convolution of the linear-time mixers (gated DeltaNet, Mamba-2): one
depthwise filter of K taps per channel over the last K positions of the same document.

  y[t, f] = bias[f] + sum_{k<K} kernel[k, f] * x[t - (K-1) + k, f] * same(t - (K-1) + k, t)

where same(s, t) = 1 when position s lies in t's document (segment_ids equal) and 0 before
the row or in another document. The taps are in PyTorch's `Conv1d(groups=C, padding=K-1)`
order, so kernel_SF[k, f] = conv.weight[f, 0, k]. A packed row's documents never see each other,
as attention never crosses a boundary.

Decoding keeps the last K-1 inputs and their segment ids (`init_cache`): a few vectors per
row whatever the generated length. The history starts with segment id -1, which no position
has, so the first positions see zeros as in training.

Names: the taps and the positions a call sees are `S` (a window of keys, in the dimension
key's terms), the channels `F` (a mixer's projected width). The sum is formed in float32
and returned in x's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

NO_SEGMENT = -1  # the segment id of the empty history


def init_cache(batch: int, taps: int, channels: int, dtype) -> dict:
  """The decode cache of one convolution: the last `taps - 1` inputs and their segment ids."""
  return {'x_BSF': jnp.zeros((batch, taps - 1, channels), dtype),
          'segment_BS': jnp.full((batch, taps - 1), NO_SEGMENT, jnp.int32)}


def causal_conv(x_BTF, kernel_SF, bias_F, *, segment_ids_BT, cache=None):
  """(y_BTF, updated cache); the cache is None when none was given (training)."""
  b, t, f = x_BTF.shape
  taps = kernel_SF.shape[0]
  if cache is None:
    past_BSF = jnp.zeros((b, taps - 1, f), x_BTF.dtype)
    past_segment_BS = jnp.full((b, taps - 1), NO_SEGMENT, jnp.int32)
  else:
    past_BSF, past_segment_BS = cache['x_BSF'], cache['segment_BS']
  segment_ids_BT = segment_ids_BT.astype(jnp.int32)
  seen_BSF = jnp.concatenate([past_BSF.astype(x_BTF.dtype), x_BTF], axis=1)  # history, call
  seen_segment_BS = jnp.concatenate([past_segment_BS, segment_ids_BT], axis=1)
  y_BTF = jnp.zeros((b, t, f), jnp.float32)
  if bias_F is not None:
    y_BTF = y_BTF + bias_F.astype(jnp.float32)
  for k in range(taps):
    x_k_BTF = seen_BSF[:, k:k + t].astype(jnp.float32)
    same_BT = seen_segment_BS[:, k:k + t] == segment_ids_BT
    y_BTF = y_BTF + jnp.where(same_BT[..., None], x_k_BTF, 0.0) * kernel_SF[k].astype(
        jnp.float32)
  if cache is not None:
    cache = {'x_BSF': seen_BSF[:, t:].astype(cache['x_BSF'].dtype),
             'segment_BS': seen_segment_BS[:, t:]}
  return y_BTF.astype(x_BTF.dtype), cache


def flops_per_token(taps: int, channels: int) -> float:
  """Multiply-adds of one position: K taps per channel (the bias and mask are not counted)."""
  return 2.0 * taps * channels
