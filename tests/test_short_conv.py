"""The causal short convolution against PyTorch's depthwise Conv1d run on each document
alone, and chunked decoding through its cache against the whole row at once."""

import jax.numpy as jnp
import numpy as np
import torch

from models.layers import short_conv


def torch_conv(x_TF, kernel_SF, bias_F):
  """PyTorch's Conv1d(groups=C, padding=K-1), cut to the causal T outputs."""
  t, c = x_TF.shape
  conv = torch.nn.Conv1d(c, c, kernel_SF.shape[0], groups=c, padding=kernel_SF.shape[0] - 1)
  with torch.no_grad():
    conv.weight.copy_(torch.tensor(kernel_SF.T[:, None, :]))
    conv.bias.copy_(torch.tensor(bias_F))
    return conv(torch.tensor(x_TF.T[None]))[0, :, :t].numpy().T


def test_packed_rows_equal_each_document_alone_and_chunks_equal_the_whole():
  rng = np.random.default_rng(0)
  b, t, c, k = 2, 11, 5, 4
  x = rng.normal(size=(b, t, c)).astype(np.float32)
  kernel = rng.normal(size=(k, c)).astype(np.float32)
  bias = rng.normal(size=(c,)).astype(np.float32)
  # row 0: documents of 3, 6 and 2 tokens; row 1: 2 padding tokens (segment 0), then one of 9
  segments = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3], [0, 0] + [1] * 9], np.int32)
  y, none = short_conv.causal_conv(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias),
                                   segment_ids_BT=jnp.asarray(segments))
  assert none is None
  for row in range(b):
    for segment in np.unique(segments[row]):
      (where,) = np.nonzero(segments[row] == segment)
      np.testing.assert_allclose(np.asarray(y)[row, where],
                                 torch_conv(x[row, where], kernel, bias), atol=1e-5)

  # chunks of 4, 1, 1, 5 through the cache equal the whole row
  cache = short_conv.init_cache(b, k, c, jnp.float32)
  assert cache['x_BSF'].shape == (b, k - 1, c)
  outs, start = [], 0
  for size in (4, 1, 1, 5):
    y_chunk, cache = short_conv.causal_conv(
        jnp.asarray(x[:, start:start + size]), jnp.asarray(kernel), jnp.asarray(bias),
        segment_ids_BT=jnp.asarray(segments[:, start:start + size]), cache=cache)
    assert cache['x_BSF'].shape == (b, k - 1, c)  # constant size
    outs.append(np.asarray(y_chunk))
    start += size
  np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(y), atol=1e-6)
