"""Mamba-2 (`model_type='mamba2'`, Mamba2ForCausalLM): a pure stack of Mamba-2 mixers.

Each decoder layer is an RMSNorm and a mixer, with no MLP: one archlab sublayer `M` per
layer, so the pattern is 'M' * num_hidden_layers, with no positions. The mixer's `in_proj`
holds z, then x, B, C, then dt (a `fused_linear` row of one group), `conv1d` the depthwise
convolution over x, B, C (`conv`), and `norm` the grouped gated RMSNorm, gate then norm
(transformers' MambaRMSNormGated: `mamba.norm_before_gate=False`). `time_step_limit` is
`mamba.dt_limit_min` / `dt_limit_max`; the dt initialisation fields and `chunk_size` change
no function and are not compared. `mixer_fields` and `mixer_rows` serve Nemotron-H too.
"""

from __future__ import annotations

import math

from models.hf import family as family_lib
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor
from models.layers import mamba2 as mamba2_layer

_FLOAT_TAG = '__float__'  # transformers writes inf in config.json as {'__float__': 'Infinity'}


def read_float(value) -> float:
  """A config.json float, `{'__float__': 'Infinity'}` (transformers' spelling of inf) included."""
  if isinstance(value, dict) and set(value) == {_FLOAT_TAG}:
    return float(value[_FLOAT_TAG])
  return float(value)


def write_float(value: float):
  """A float as transformers writes it in config.json (inf as `{'__float__': 'Infinity'}`)."""
  if math.isinf(value):
    return {_FLOAT_TAG: 'Infinity' if value > 0 else '-Infinity'}
  return float(value)


def mixer_fields(hf: family_lib.HfConfig, *, heads: str, head_dim: str, state: str, act: str,
                 defaults: dict) -> dict:
  """The `mamba.*` fields of a mixer whose config.json names its heads, head dim, state size
  and activation by the given keys (`defaults` holds those keys' defaults)."""
  hf.require(act, ('silu',), defaults[act])
  return {
      'mamba.num_heads': hf.get(heads, defaults[heads]),
      'mamba.head_dim': hf.get(head_dim, defaults[head_dim]),
      'mamba.state_dim': hf.get(state, defaults[state]),
      'mamba.groups': hf.get('n_groups', 8),
      'mamba.conv_taps': hf.get('conv_kernel', 4),
      'mamba.conv_bias': bool(hf.get('use_conv_bias', True)),
      'mamba.proj_bias': bool(hf.get('use_bias', False)),
      'mamba.norm_before_gate': False,
  }


def mixer_to_hf(cfg, family: str) -> dict:
  """config.json fields of the mixer both families spell alike; refuses what they cannot hold."""
  m = cfg.mamba
  if m.norm_before_gate:
    raise family_lib.UnsupportedError(f'model.mamba.norm_before_gate=True cannot be written as '
                                      f'{family} (its gated norm gates before normalising)')
  return {
      'n_groups': m.groups,
      'conv_kernel': m.conv_taps,
      'use_conv_bias': bool(m.conv_bias),
      'use_bias': bool(cfg.use_bias or m.proj_bias),
      'time_step_min': m.dt_min,
      'time_step_max': m.dt_max,
      'time_step_floor': m.dt_init_floor,
      'chunk_size': m.chunk,
      'layer_norm_epsilon': cfg.norm_eps,
  }


def mixer_rows(cfg, h: str, i: int) -> list[Tensor]:
  """Rows of `M` sublayer `i` whose mixer's tensors are under HF prefix `h`."""
  ours = lambda name: (i, 'op', name)
  table = [
      Tensor(f'{h}.in_proj.weight', tuple(ours(x) for x in ('z', 'x', 'b', 'c', 'dt')),
             'fused_linear'),
      Tensor(f'{h}.conv1d.weight', (ours('conv'),), 'conv'),
      Tensor(f'{h}.dt_bias', (ours('dt_bias'),), contract=0),
      Tensor(f'{h}.A_log', (ours('A_log'),), contract=0),
      Tensor(f'{h}.D', (ours('D'),), contract=0),
      Tensor(f'{h}.norm.weight', (ours('norm'),), contract=0),
      Tensor(f'{h}.out_proj.weight', (ours('o'),), 'linear', contract=2),
  ]
  if cfg.mamba.conv_bias:
    table.append(Tensor(f'{h}.conv1d.bias', (ours('conv_bias'),), contract=0))
  if cfg.use_bias or cfg.mamba.proj_bias:
    table += [Tensor(f'{h}.in_proj.bias',
                     tuple(ours(mamba2_layer.in_bias_name(x)) for x in ('z', 'x', 'b', 'c', 'dt')),
                     'fused_linear', contract=0),
              Tensor(f'{h}.out_proj.bias', (ours('o_bias'),), contract=0)]
  return table


DEFAULTS = {'num_heads': 128, 'head_dim': 64, 'state_size': 128, 'hidden_act': 'silu'}


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  d, layers = hf.get('hidden_size', 4096), hf.get('num_hidden_layers', 64)
  fields = mixer_fields(hf, heads='num_heads', head_dim='head_dim', state='state_size',
                        act='hidden_act', defaults=DEFAULTS)
  inner = fields['mamba.num_heads'] * fields['mamba.head_dim']
  if inner != int(hf.get('expand', 2) * d):
    hf.refuse('expand', f'x hidden_size={d} must equal num_heads x head_dim={inner}')
  low, high = hf.get('time_step_limit', (0.0, float('inf')))
  return {
      'pattern': 'M' * layers,
      'vocab_size': hf.get('vocab_size', 32768),
      'd_model': d,
      'position': 'none',
      'norm': 'rmsnorm',
      'norm_eps': float(hf.get('layer_norm_epsilon', 1e-5)),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
      'use_bias': False,
      'mamba.dt_limit_min': read_float(low),
      'mamba.dt_limit_max': read_float(high),
      **fields,
  }


def config_to_hf(cfg) -> dict:
  if set(cfg.pattern) != {'M'}:
    pattern.refuse(cfg, "is not 'M' * n, as Mamba-2 (a pure stack of mixers)")
  m, d = cfg.mamba, cfg.d_model
  heads = m.num_heads or m.expand * d // m.head_dim
  if heads * m.head_dim % d:
    raise family_lib.UnsupportedError(
        f'model.mamba.num_heads={heads} x head_dim={m.head_dim} is not a multiple of '
        f'model.d_model={d}: Mamba-2\'s expand is an integer')
  return {
      'model_type': 'mamba2',
      'architectures': ['Mamba2ForCausalLM'],
      'vocab_size': cfg.vocab_size,
      'hidden_size': d,
      'num_hidden_layers': len(cfg.pattern),
      'expand': heads * m.head_dim // d,
      'num_heads': heads,
      'head_dim': m.head_dim,
      'state_size': m.state_dim,
      'hidden_act': 'silu',
      'time_step_limit': [write_float(m.dt_limit_min), write_float(m.dt_limit_max)],
      'tie_word_embeddings': cfg.tie_embeddings,
      'residual_in_fp32': True,
      'rescale_prenorm_residual': False,
      **mixer_to_hf(cfg, 'Mamba-2'),
  }


def tensors(cfg) -> list[Tensor]:
  """The mapping table: Mamba2ForCausalLM tensor <-> archlab parameter."""
  table = [Tensor('backbone.embeddings.weight', (('embed',),)),
           *rows.norm('backbone.norm_f', ('final_norm',)), *rows.head_rows(cfg)]
  for i in range(len(cfg.pattern)):
    h = f'backbone.layers.{i}'
    table += rows.norm(f'{h}.norm', (i, 'norm')) + mixer_rows(cfg, f'{h}.mixer', i)
  return table


def read_as(tensors: dict) -> dict:
  """Checkpoints of the original mamba_ssm naming call the embedding `embedding`."""
  return {name.replace('embedding.weight', 'embeddings.weight'): value
          for name, value in tensors.items()}


MAMBA2 = family_lib.Family(
    model_type='mamba2', architecture='Mamba2ForCausalLM', prefix='backbone.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    read_as=read_as)
