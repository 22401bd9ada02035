"""The causal short convolution of the linear-time mixers (gated DeltaNet, Mamba-2): one
depthwise filter of K taps per channel over the last K positions of the same document.

  y[t, c] = bias[c] + sum_{k<K} kernel[k, c] * x[t - (K-1) + k, c] * same(t - (K-1) + k, t)

where same(s, t) = 1 when position s lies in t's document (segment_ids equal) and 0 before
the row or in another document. The taps are in PyTorch's `Conv1d(groups=C, padding=K-1)`
order, so kernel[k, c] = conv.weight[c, 0, k]. A packed row's documents never see each other,
as attention never crosses a boundary.

Decoding keeps the last K-1 inputs and their segment ids (`init_cache`): a few vectors per
row whatever the generated length. The history starts with segment id -1, which no position
has, so the first positions see zeros as in training.

The sum is formed in float32 and returned in x's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

NO_SEGMENT = -1  # the segment id of the empty history


def init_cache(batch: int, taps: int, channels: int, dtype) -> dict:
  """The decode cache of one convolution: the last `taps - 1` inputs and their segment ids."""
  return {'x_BSC': jnp.zeros((batch, taps - 1, channels), dtype),
          'segment_BS': jnp.full((batch, taps - 1), NO_SEGMENT, jnp.int32)}


def causal_conv(x_BTC, kernel_KC, bias_C, *, segment_ids_BT, cache=None):
  """(y_BTC, updated cache); the cache is None when none was given (training)."""
  b, t, c = x_BTC.shape
  taps = kernel_KC.shape[0]
  if cache is None:
    past_BSC = jnp.zeros((b, taps - 1, c), x_BTC.dtype)
    past_segment_BS = jnp.full((b, taps - 1), NO_SEGMENT, jnp.int32)
  else:
    past_BSC, past_segment_BS = cache['x_BSC'], cache['segment_BS']
  segment_ids_BT = segment_ids_BT.astype(jnp.int32)
  seen_BUC = jnp.concatenate([past_BSC.astype(x_BTC.dtype), x_BTC], axis=1)  # U = S + T
  seen_segment_BU = jnp.concatenate([past_segment_BS, segment_ids_BT], axis=1)
  y_BTC = jnp.zeros((b, t, c), jnp.float32)
  if bias_C is not None:
    y_BTC = y_BTC + bias_C.astype(jnp.float32)
  for k in range(taps):
    x_k_BTC = seen_BUC[:, k:k + t].astype(jnp.float32)
    same_BT = seen_segment_BU[:, k:k + t] == segment_ids_BT
    y_BTC = y_BTC + jnp.where(same_BT[..., None], x_k_BTC, 0.0) * kernel_KC[k].astype(
        jnp.float32)
  if cache is not None:
    cache = {'x_BSC': seen_BUC[:, t:].astype(cache['x_BSC'].dtype),
             'segment_BS': seen_segment_BU[:, t:]}
  return y_BTC.astype(x_BTC.dtype), cache


def flops_per_token(taps: int, channels: int) -> float:
  """Multiply-adds of one position: K taps per channel (the bias and mask are not counted)."""
  return 2.0 * taps * channels
