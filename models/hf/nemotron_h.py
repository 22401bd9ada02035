"""Nemotron-H (`model_type='nemotron_h'`, NemotronHForCausalLM): a hybrid of Mamba-2 mixers,
attention, MLPs and mixtures of experts, one sublayer per decoder layer.

`layers_block_type` (or the older `hybrid_override_pattern` string, 'M-M-M*-...') gives each
layer's kind, and every decoder layer, an RMSNorm and one mixer, is one archlab sublayer:
  'linear_attention' (M)  Mamba-2 `M` (models/hf/mamba2.py's rows; `mamba_num_heads` x
                          `mamba_head_dim` inner width, dt clipped below at `time_step_min`,
                          as NemotronHMamba2Mixer does: `mamba.dt_limit_min`)
  'full_attention' (*)    `A`: GQA without positions or biases (position='none')
  'mlp' (-)               `F`: up_proj, `mlp_hidden_act` (ReLU^2), down_proj, not gated
  'moe' (E)               `E`: DeepSeek V3's sigmoid router (correction bias, group-limited top
                          k, renormalised, scaled), non-gated experts and one shared expert
                          (`moe_shared_expert_intermediate_size`)
so 'M-M-M*-' is the pattern 'MFMFMAF'. Checkpoints name the backbone `backbone.` and store one
tensor per expert (`mixer.experts.{e}.up_proj.weight`); a state_dict of the model in memory
(`model.` and stacked `mixer.experts.up_proj`) imports as well. Multi-token-prediction layers
(`mtp.*`) are ignored, as transformers ignores them.
"""

from __future__ import annotations

import re

import numpy as np

from configs import transformer as transformer_config
from models.hf import family as family_lib
from models.hf import mamba2
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor

# layers_block_type (and the legacy names transformers remaps) -> archlab sublayer
LAYER_TYPES = {'linear_attention': 'M', 'mamba': 'M', 'full_attention': 'A', 'attention': 'A',
               'mlp': 'F', 'moe': 'E'}
_TYPE_OF = {'M': 'linear_attention', 'A': 'full_attention', 'F': 'mlp', 'E': 'moe'}
DEFAULT_TYPES = ['linear_attention', 'moe', 'full_attention', 'mlp']  # NemotronHConfig's
# config.json mlp_hidden_act -> model.mlp_activation (the MLP and the experts are not gated)
ACTIVATIONS = {'relu2': 'relu2', 'relu': 'relu', 'silu': 'silu', 'gelu_pytorch_tanh': 'gelu',
               'gelu': 'gelu_exact'}
_TO_HF_ACTIVATIONS = {v: k for k, v in ACTIVATIONS.items()}
MIXER_DEFAULTS = {'mamba_num_heads': 128, 'mamba_head_dim': 64, 'ssm_state_size': 128,
                  'mamba_hidden_act': 'silu'}


def layer_pattern(hf: family_lib.HfConfig) -> str:
  """`model.pattern` of `layers_block_type`, else `hybrid_override_pattern`, else the default."""
  types = hf.get('layers_block_type')
  if types is None and hf.get('hybrid_override_pattern') is not None:
    hybrid = hf.get('hybrid_override_pattern')
    if set(hybrid) - set(transformer_config.HYBRID_LAYERS):
      hf.refuse('hybrid_override_pattern', f'has characters other than '
                f'{sorted(transformer_config.HYBRID_LAYERS)}')
    return transformer_config.from_hybrid_pattern(hybrid)
  types = DEFAULT_TYPES if types is None else types
  if not types or any(t not in LAYER_TYPES for t in types):
    hf.refuse('layers_block_type', f'must list one of {sorted(set(_TYPE_OF.values()))} per layer')
  return ''.join(LAYER_TYPES[t] for t in types)


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  layers = layer_pattern(hf)
  d, n = hf.get('hidden_size', 4096), hf.get('num_attention_heads', 32)
  act = hf.require('mlp_hidden_act', ACTIVATIONS, 'relu2')
  if hf.get('sliding_window') is not None and 'A' in layers:
    hf.refuse('sliding_window', 'is not supported: archlab translates Nemotron-H\'s attention '
              'as global')
  mlp_bias = bool(hf.get('mlp_bias', False))
  if mlp_bias and 'E' in layers:
    hf.refuse('mlp_bias', 'with moe layers is not supported: archlab\'s biased experts have a '
              'router bias, Nemotron-H\'s router none')
  fields = {
      'pattern': layers,
      'vocab_size': hf.get('vocab_size', 131072),
      'd_model': d,
      'num_heads': n,
      'num_kv_heads': hf.get('num_key_value_heads', 8),
      'head_dim': hf.get('head_dim', d // n),
      'position': 'none',
      'max_len': hf.get('max_position_embeddings', 4096),
      'norm': 'rmsnorm',
      'norm_eps': float(hf.get('layer_norm_epsilon', 1e-5)),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
      'use_bias': False,
      'attention.qkv_bias': False,  # NemotronHAttention has none, whatever attention_bias says
      'attention.o_bias': False,
      'mlp_dim': hf.get('intermediate_size', 21504),
      'mlp_activation': ACTIVATIONS[act],
      'mlp_bias': mlp_bias,
      # NemotronHMamba2Mixer clips dt to (time_step_min, inf), not to time_step_limit.
      'mamba.dt_limit_min': float(hf.get('time_step_min', 0.001)),
      'mamba.dt_limit_max': float('inf'),
      **mamba2.mixer_fields(hf, heads='mamba_num_heads', head_dim='mamba_head_dim',
                            state='ssm_state_size', act='mamba_hidden_act',
                            defaults=MIXER_DEFAULTS),
  }
  if 'E' in layers:
    if hf.get('moe_latent_size') is not None:
      hf.refuse('moe_latent_size', 'is not supported (archlab\'s experts read the model width)')
    fields.update({
        'moe.num_experts': hf.get('n_routed_experts', 8),
        'moe.num_experts_per_tok': hf.get('num_experts_per_tok', 2),
        'moe.expert_mlp_dim': hf.get('moe_intermediate_size', 7688),
        'moe.router': 'sigmoid',
        'moe.norm_topk_prob': bool(hf.get('norm_topk_prob', True)),
        'moe.routed_scaling_factor': float(hf.get('routed_scaling_factor', 1.0)),
        # NemotronHMoE always has one shared MLP (n_shared_experts is not read)
        'moe.num_shared_experts': 1,
        'moe.shared_expert_mlp_dim': hf.get('moe_shared_expert_intermediate_size', 7688),
        'moe.n_group': hf.get('n_group', 1),
        'moe.topk_group': hf.get('topk_group', 1),
        'moe.correction_bias': True,
        'moe.aux_loss_weight': 0.0,
    })
  return fields


def config_to_hf(cfg) -> dict:
  chars = set(cfg.pattern)
  if chars - set(_TYPE_OF):
    pattern.refuse(cfg, f'has {sorted(chars - set(_TYPE_OF))}; Nemotron-H layers are one of '
                        f'{sorted(_TYPE_OF)}')
  if cfg.mlp_activation not in _TO_HF_ACTIVATIONS:
    raise family_lib.UnsupportedError(f'model.mlp_activation={cfg.mlp_activation!r} cannot be '
                                      f'written as Nemotron-H (supported: '
                                      f'{sorted(_TO_HF_ACTIVATIONS)})')
  m = cfg.mamba
  hf_config = {
      'model_type': 'nemotron_h',
      'architectures': ['NemotronHForCausalLM'],
      'layers_block_type': [_TYPE_OF[c] for c in cfg.pattern],
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.d_model,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim or cfg.d_model // cfg.num_heads,
      'max_position_embeddings': cfg.max_len,
      'attention_bias': False,
      'intermediate_size': cfg.mlp_dim,
      'mlp_hidden_act': _TO_HF_ACTIVATIONS[cfg.mlp_activation],
      'mlp_bias': bool(cfg.use_bias or cfg.mlp_bias),
      'tie_word_embeddings': cfg.tie_embeddings,
      'mamba_num_heads': m.num_heads or m.expand * cfg.d_model // m.head_dim,
      'mamba_head_dim': m.head_dim,
      'ssm_state_size': m.state_dim,
      'mamba_hidden_act': 'silu',
      **mamba2.mixer_to_hf(cfg, 'Nemotron-H'),
      # the mixer's lower dt clip (its upper one is inf); the dt initialisation reads it too
      'time_step_min': m.dt_limit_min,
      'residual_in_fp32': False,
      'num_nextn_predict_layers': 0,
  }
  if 'E' in chars:
    e = cfg.moe
    hf_config.update({
        'n_routed_experts': e.num_experts,
        'num_experts_per_tok': e.num_experts_per_tok,
        'moe_intermediate_size': e.expert_mlp_dim or cfg.mlp_dim,
        'moe_shared_expert_intermediate_size': e.shared_expert_mlp_dim or e.expert_mlp_dim
                                               or cfg.mlp_dim,
        'n_shared_experts': 1,
        'norm_topk_prob': bool(e.norm_topk_prob),
        'routed_scaling_factor': e.routed_scaling_factor,
        'n_group': e.n_group,
        'topk_group': e.topk_group,
    })
  return hf_config


def _linear(h: str, names: tuple, ours: tuple, bias: bool) -> list[Tensor]:
  """nn.Linear weights `{h}.{name}.weight` (and biases) <-> archlab's `ours + (param,)`."""
  table = []
  for name, param in names:
    table.append(Tensor(f'{h}.{name}.weight', (ours + (param,),), 'linear',
                        contract=2 if param == 'o' else 1))
    if bias:
      table.append(Tensor(f'{h}.{name}.bias', (ours + (f'{param}_bias',),), contract=0))
  return table


def tensors(cfg) -> list[Tensor]:
  """The mapping table: NemotronHForCausalLM tensor <-> archlab parameter."""
  table = [Tensor('backbone.embeddings.weight', (('embed',),)),
           *rows.norm('backbone.norm_f', ('final_norm',)), *rows.head_rows(cfg)]
  mlp = (('up_proj', 'wi'), ('down_proj', 'wo'))
  bias = bool(cfg.use_bias or cfg.mlp_bias)
  for i, char in enumerate(cfg.pattern):
    h = f'backbone.layers.{i}'
    table += rows.norm(f'{h}.norm', (i, 'norm'))
    x = f'{h}.mixer'
    if char == 'M':
      table += mamba2.mixer_rows(cfg, x, i)
    elif char == 'A':
      table += _linear(x, tuple((f'{p}_proj', p) for p in 'qkvo'), (i, 'op'), False)
    elif char == 'F':
      table += _linear(x, mlp, (i, 'op'), bias)
    else:
      table += [Tensor(f'{x}.gate.weight', ((i, 'op', 'router'),), 'linear'),
                Tensor(f'{x}.gate.e_score_correction_bias', ((i, 'op', 'correction_bias'),),
                       contract=0),
                *_linear(f'{x}.shared_experts', mlp, (i, 'op', 'shared'), False)]
      for e in range(cfg.moe.num_experts):
        table += [Tensor(f'{x}.experts.{e}.{name}.weight', ((i, 'op', param),), 'linear', index=e)
                  for name, param in mlp]
  return table


_STACKED = re.compile(r'(.*\.mixer\.experts)\.(up_proj|down_proj)')


def read_as(tensors: dict) -> dict:
  """The checkpoint's names: a state_dict's `model.` prefix is `backbone.`, and experts stored
  stacked ((E, out, in) `mixer.experts.up_proj`) are one tensor per expert."""
  out = {}
  for name, value in tensors.items():
    if name.startswith('model.'):
      name = 'backbone.' + name[len('model.'):]
    match = _STACKED.fullmatch(name)
    if match and np.ndim(value) == 3:
      for e, w in enumerate(value):
        out[f'{match.group(1)}.{e}.{match.group(2)}.weight'] = w
    else:
      out[name] = value
  return out


NEMOTRON_H = family_lib.Family(
    model_type='nemotron_h', architecture='NemotronHForCausalLM', prefix='backbone.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=(r'mtp\..*',), read_as=read_as)
