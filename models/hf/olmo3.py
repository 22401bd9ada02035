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
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor

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
  fields = rows.archlab_fields(hf, vocab_size=50304, rms_norm_eps=1e-5)
  layers = hf.get('num_hidden_layers', 32)
  types = hf.get('layer_types', pattern.sliding_except_every(4, layers))
  mixers = pattern.mixers(hf, types, layers)
  ropes = {t: layer_rope(hf, t) for t in sorted(set(types))}
  if len(ropes) > 1 and ropes['sliding_attention'] != ropes['full_attention']:
    hf.refuse('rope_parameters', f'gives sliding_attention layers {ropes["sliding_attention"]} '
              f'but full_attention layers {ropes["full_attention"]}; archlab has one RoPE for '
              'all layers')
  if 'sliding_attention' in types:
    window = hf.get('sliding_window', 4096)
    if not isinstance(window, int) or window < 1:
      hf.refuse('sliding_window', 'must be a positive integer when layer_types has '
                'sliding_attention layers')
    fields['attention.window'] = window
  fields.update({
      'pattern': pattern.join([(m, 'F') for m in mixers]),
      'norm_placement': 'post',
      'attention.qk_norm': 'full',
      **family_lib.bias_fields(hf, 'attention_bias', 'mlp_bias'),
      **next(iter(ropes.values())),
  })
  return fields


def config_to_hf(cfg) -> dict:
  layers = pattern.layers(cfg, 'AW', 'F')
  rope = family_lib.rope_to_hf(cfg)
  params = rope['rope_parameters']
  return {
      'model_type': 'olmo3',
      'architectures': ['Olmo3ForCausalLM'],
      **rows.hf_fields(cfg, 'olmo3', len(layers)),
      'layer_types': pattern.layer_types(layers),
      'sliding_window': cfg.attention.window or 4096,
      'rope_theta': rope['rope_theta'],
      'rope_scaling': rope['rope_scaling'],
      'rope_parameters': {t: dict(params) for t in pattern.LAYER_TYPES},
  }


def tensors(cfg) -> list[Tensor]:
  """The mapping table: Olmo3ForCausalLM tensor <-> archlab parameter."""
  table = rows.outer_rows(cfg)
  for i, _ in enumerate(pattern.layers(cfg, 'AW', 'F')):
    h, a, f = rows.layer(i)
    table += rows.attention_rows(cfg, h, a) + rows.mlp_rows(f'{h}.mlp', (f, 'op'))
    table += rows.norm_rows(h, a, f, 'post')
  return table


OLMO3 = family_lib.Family(
    model_type='olmo3', architecture='Olmo3ForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=rows.ROPE_BUFFERS + (r'(model\.)?rotary_emb\..*inv_freq',))
