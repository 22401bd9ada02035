"""OLMo 3 (`model_type='olmo3'`, Olmo3ForCausalLM): post-norm, full-width QK-norm, windows.

Each layer is x + post_attention_layernorm(attention(x)), then x +
post_feedforward_layernorm(mlp(x)), with no norm before either sublayer
(`model.norm_placement='post'`). The query and key norms are RMSNorms over the whole
projection width, num_heads * head_dim (`attention.qk_norm='full'`). `layer_types` makes
each layer `sliding_attention` (`W`, `attention.window = sliding_window`: transformers lets
query q see key k when q - sliding_window < k <= q, archlab when q - k < window, the same
set) or `full_attention` (`A`); by default every fourth layer is global.

transformers 5 keeps RoPE parameters per layer type (`rope_parameters.full_attention`,
`.sliding_attention`); archlab has one RoPE for all layers, so the two must agree for the
layer types the model uses. Note that transformers 5 reads a transformers 4 config.json
(`rope_theta`, `rope_scaling`) as giving those only to full-attention layers and theta
500000 to sliding ones; such a checkpoint imports when the two agree and is refused otherwise.
"""

from __future__ import annotations

from models.hf import family as family_lib
from models.hf import llama
from models.hf import qwen3_moe
from models.hf.family import Tensor

LAYER_TYPES = {'sliding_attention': 'W', 'full_attention': 'A'}
DEFAULT_THETA = 500000.0  # Olmo3Config.default_theta


def layer_rope(hf: family_lib.HfConfig, layer_type: str) -> dict:
  """The RoPE parameters transformers 5.23 gives layers of `layer_type`, as archlab fields."""
  params = hf.get('rope_parameters', {})
  if not isinstance(params, dict):
    hf.refuse('rope_parameters', 'is not a dict')
  own = dict(params.get(layer_type) or {'rope_type': 'default'})
  if layer_type == 'full_attention':
    own.update(hf.get('rope_scaling', {}))
    own.setdefault('rope_theta', hf.get('rope_theta', DEFAULT_THETA))
  else:
    own.setdefault('rope_theta', DEFAULT_THETA)
  return family_lib.rope_fields(family_lib.HfConfig({'rope_parameters': own},
                                                    f'{hf.source} rope_parameters.{layer_type}'))


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  d, n = hf.get('hidden_size', 4096), hf.get('num_attention_heads', 32)
  layers = hf.get('num_hidden_layers', 32)
  act = hf.require('hidden_act', llama.ACTIVATIONS, 'silu')
  types = hf.get('layer_types', ['sliding_attention' if (i + 1) % 4 else 'full_attention'
                                 for i in range(layers)])
  if len(types) != layers or any(t not in LAYER_TYPES for t in types):
    hf.refuse('layer_types', f'must give one of {list(LAYER_TYPES)} for each of the '
              f'num_hidden_layers={layers} layers')
  ropes = {t: layer_rope(hf, t) for t in sorted(set(types))}
  if len(ropes) > 1 and ropes['sliding_attention'] != ropes['full_attention']:
    hf.refuse('rope_parameters', f'gives sliding_attention layers {ropes["sliding_attention"]} '
              f'but full_attention layers {ropes["full_attention"]}; archlab has one RoPE for '
              'all layers')
  fields = {}
  if 'sliding_attention' in types:
    window = hf.get('sliding_window', 4096)
    if not isinstance(window, int) or window < 1:
      hf.refuse('sliding_window', 'must be a positive integer when layer_types has '
                'sliding_attention layers')
    fields['attention.window'] = window
  fields.update({
      'pattern': ''.join(LAYER_TYPES[t] + 'F' for t in types),
      'vocab_size': hf.get('vocab_size', 50304),
      'd_model': d,
      'num_heads': n,
      'num_kv_heads': hf.get('num_key_value_heads', n),
      'head_dim': hf.get('head_dim', d // n),
      'mlp_dim': hf.get('intermediate_size', 11008),
      'mlp_activation': llama.ACTIVATIONS[act],
      'norm': 'rmsnorm',
      'norm_eps': float(hf.get('rms_norm_eps', 1e-5)),
      'norm_placement': 'post',
      'position': 'rope',
      'max_len': hf.get('max_position_embeddings', 2048),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
      'attention.qk_norm': 'full',
      **family_lib.bias_fields(hf, 'attention_bias', 'mlp_bias'),
      **next(iter(ropes.values())),
  })
  return fields


def config_to_hf(cfg) -> dict:
  pairs = qwen3_moe.layer_chars(cfg, 'AW', 'F')
  rope = family_lib.rope_to_hf(cfg)
  params = rope['rope_parameters']
  return {
      'model_type': 'olmo3',
      'architectures': ['Olmo3ForCausalLM'],
      **llama.hf_fields(cfg, 'olmo3', len(pairs)),
      'layer_types': [{'W': 'sliding_attention', 'A': 'full_attention'}[a] for a, _ in pairs],
      'sliding_window': cfg.attention.window or 4096,
      'rope_theta': rope['rope_theta'],
      'rope_scaling': rope['rope_scaling'],
      'rope_parameters': {t: dict(params) for t in LAYER_TYPES},
  }


def tensors(cfg) -> list[Tensor]:
  """The mapping table: Olmo3ForCausalLM tensor <-> archlab parameter."""
  rows = family_lib.outer_rows(cfg)
  for i in range(len(qwen3_moe.layer_chars(cfg, 'AW', 'F'))):
    h, a, f = f'model.layers.{i}', 2 * i, 2 * i + 1
    rows += qwen3_moe.attention_rows(cfg, h, a)
    rows.append(Tensor(f'{h}.post_attention_layernorm.weight', ((a, 'post_norm', 'scale'),),
                       contract=0))
    rows += qwen3_moe.mlp_rows(h, f)
    rows.append(Tensor(f'{h}.post_feedforward_layernorm.weight', ((f, 'post_norm', 'scale'),),
                       contract=0))
  return rows


OLMO3 = family_lib.register(family_lib.Family(
    model_type='olmo3', architecture='Olmo3ForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=(r'(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq',
             r'(model\.)?rotary_emb\..*inv_freq')))
