"""`C`, Zoology's BaseConv: against a PyTorch module written as zoology/mixers/base_conv.py
writes it (Conv1d(groups=D, padding=K-1) cut to the causal outputs, Linear, `u + conv * proj`)
on each document of a packed row alone; prefill + one token a step through a 'CA' model's
caches equals its full forward; the analytic FLOPs; the one-line errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import models
from models import lm
from tests.conftest import tiny_model_config


class TorchBaseConv(torch.nn.Module):
  """Zoology's BaseConv (kernel_size K, no activation), the reference."""

  def __init__(self, d, taps):
    super().__init__()
    self.taps = taps
    self.conv = torch.nn.Conv1d(d, d, taps, groups=d, padding=taps - 1)
    self.projection = torch.nn.Linear(d, d)

  def forward(self, u_TD):
    t = u_TD.shape[0]
    u_conv = self.conv(u_TD.T[None])[0, :, :t].T
    return u_conv * self.projection(u_TD) + u_TD


def config(**overrides):
  return tiny_model_config('llama_tiny', **{
      'pattern': 'CACA', 'position': 'none', 'num_heads': 1, 'num_kv_heads': 1,
      'head_dim': 0, 'd_model': 32, 'scan_layers': False, **overrides})


def test_equals_zoology_base_conv_on_each_document_alone():
  cfg = config(**{'base_conv.taps': 3})
  module = models.SUBLAYERS['C'](cfg)
  rng = np.random.default_rng(0)
  b, t, d = 2, 11, cfg.d_model
  x_BTD = rng.normal(size=(b, t, d)).astype(np.float32)
  segments = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3], [0, 0] + [1] * 9], np.int32)
  variables = module.init(jax.random.key(0), x_BTD, positions_BT=segments,
                          segment_ids_BT=segments)
  variables = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32),
                           nn.meta.unbox(variables))
  y_BTD, aux, cache = module.apply(variables, x_BTD, positions_BT=segments,
                                   segment_ids_BT=segments)
  assert aux == {} and cache is None
  p = variables['params']
  reference = TorchBaseConv(d, 3)
  with torch.no_grad():
    reference.conv.weight.copy_(torch.tensor(np.asarray(p['kernel']).T[:, None, :]))
    reference.conv.bias.copy_(torch.tensor(np.asarray(p['bias'])))
    reference.projection.weight.copy_(torch.tensor(np.asarray(p['w']).T))
    reference.projection.bias.copy_(torch.tensor(np.asarray(p['w_bias'])))
    for row in range(b):
      for segment in np.unique(segments[row]):
        (where,) = np.nonzero(segments[row] == segment)
        want = reference(torch.tensor(x_BTD[row, where])).numpy()
        np.testing.assert_allclose(np.asarray(y_BTD)[row, where], want, atol=1e-4, rtol=1e-5)


def test_prefill_then_decode_equals_the_full_forward():
  """Two rows of 12 tokens (row 1: 3 padding tokens, segment 0, then a document), prefill of
  5, then one token a step: logits within 1e-4 of the full forward (float32)."""
  cfg = config()
  model = models.build(cfg)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))
  seg = np.array([[1] * 12, [0] * 3 + [1] * 9])
  pos = np.array([list(range(12)), [0] * 3 + list(range(9))])
  variables = jax.jit(lambda: model.init(jax.random.key(2), tokens, positions_BT=pos,
                                         segment_ids_BT=seg))()
  step = jax.jit(lambda v, x, p, s, c: model.apply(v, x, positions_BT=p, segment_ids_BT=s,
                                                   cache=c)[::2])
  full_BTV = step(variables, tokens, pos, seg, None)[0]
  cache = lm.init_cache(cfg, 2, 12)
  logits_BTV, cache = step(variables, tokens[:, :5], pos[:, :5], seg[:, :5], cache)
  outs = [logits_BTV]
  for i in range(5, 12):
    logits_BTV, cache = step(variables, tokens[:, i:i + 1], pos[:, i:i + 1], seg[:, i:i + 1],
                             cache)
    outs.append(logits_BTV)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full_BTV, atol=1e-4)
  assert cache['block_0']['0C']['x_BSF'].shape == (2, 2, cfg.d_model)  # K - 1 = 2 inputs


def test_analytic_flops_count_the_convolution_and_the_projection():
  cfg = config()
  d = cfg.d_model
  assert models.SUBLAYERS['C'].flops_per_token(cfg, 64) == 2 * 3 * d + 2 * d * d


@pytest.mark.parametrize('field,value,match', [
    ('base_conv.taps', 0, r'model.base_conv.taps=0 must be >= 1'),
    ('bidirectional', True, r"has 'C' \(BaseConv\), which is causal only"),
])
def test_bad_fields_are_one_line(field, value, match):
  with pytest.raises(ValueError, match=match) as e:
    models.build(config(**{field: value}))
  assert '\n' not in str(e.value)
