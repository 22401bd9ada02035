"""GPT-OSS (`model_type='gpt_oss'`, GptOssForCausalLM): sinks, windows, YaRN, biased MoE.

Every layer is attention then a mixture of experts: `layer_types` picks sliding-window (`W`,
`sliding_window` keys: a query sees keys fewer than that many positions back, as archlab's
`attention.window`) or global (`A`) attention, so the pattern is e.g. ('WE' + 'AE') * 12.
Attention has q/k/v/o biases (`attention_bias`) and one learned sink logit per head. The
router is a biased linear layer; the top k of its logits are softmaxed, which equals
archlab's softmax router with renormalised top-k weights (exp(l_i) / sum over the k of
exp(l_j) either way). Experts have biases and GPT-OSS's
clamped SwiGLU (`model.mlp_activation='swiglu_clamped'`); their gate and up projections are
stored as one (E, D, 2F) tensor with gate and up interleaved column by column, (in, out)
like archlab's, not transposed like nn.Linear.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.hf import family as family_lib
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor


@dataclasses.dataclass(frozen=True)
class ExpertTensor(Tensor):
  """An expert tensor with the expert axis first, stored whole and (in, out).

  With two archlab parameters, HF's last axis interleaves them: columns 0, 2, 4, ... are
  the first (gate), 1, 3, 5, ... the second (up).
  """
  kind: str = 'fused'

  def hf_shape(self, shapes):
    return tuple(shapes[0][:-1]) + (sum(s[-1] for s in shapes),)

  def to_archlab(self, array, shapes):
    self.check_shape(array, shapes)
    n = len(shapes)
    return [array[..., i::n].reshape(s) for i, s in enumerate(shapes)]

  def to_hf(self, arrays):
    return np.stack(arrays, axis=-1).reshape(arrays[0].shape[:-1] + (-1,))


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  d, n = hf.get('hidden_size', 2880), hf.get('num_attention_heads', 64)
  layers = hf.get('num_hidden_layers', 36)
  # transformers' default: sliding on even layers (an empty list reads as absent)
  types = hf.get('layer_types') or pattern.sliding_except_every(2, layers)
  attention = pattern.mixers(hf, types, layers)
  k = hf.get('num_experts_per_tok', 4)
  window = hf.get('sliding_window', 0)
  if 'W' in attention and window <= 0:
    hf.refuse('sliding_window', 'must be a positive number of positions for sliding_attention '
              'layers')
  bias = bool(hf.get('attention_bias', True))
  intermediate = hf.get('intermediate_size', 2880)
  return {
      'pattern': pattern.join([(a, 'E') for a in attention]),
      'vocab_size': hf.get('vocab_size', 201088),
      'd_model': d,
      'num_heads': n,
      'num_kv_heads': hf.get('num_key_value_heads', n),
      'head_dim': hf.get('head_dim', d // n),
      'mlp_dim': intermediate,
      'mlp_activation': 'swiglu_clamped',
      'swiglu_limit': float(hf.get('swiglu_limit', 7.0)),
      'swiglu_alpha': float(hf.get('swiglu_alpha', 1.702)),
      'norm': 'rmsnorm',
      'norm_eps': float(hf.get('rms_norm_eps', 1e-5)),
      'position': 'rope',
      'max_len': hf.get('max_position_embeddings', 131072),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
      'use_bias': False,
      'mlp_bias': True,  # the router and every expert projection have biases
      'attention.qkv_bias': bias,
      'attention.o_bias': bias,
      'attention.sinks': True,
      'attention.window': window if 'W' in attention else 0,
      'moe.num_experts': hf.get('num_local_experts', 128),
      'moe.num_experts_per_tok': k,
      'moe.expert_mlp_dim': intermediate,
      'moe.router': 'softmax',      # softmax over the top k logits = renormalised top-k softmax
      'moe.norm_topk_prob': True,
      # HF's load-balancing loss is k times archlab's (models/layers/moe.py).
      'moe.aux_loss_weight': float(hf.get('router_aux_loss_coef', 0.001)) * k,
      **family_lib.rope_fields(hf),
  }


def config_to_hf(cfg) -> dict:
  layers = pattern.layers(cfg, 'WA', 'E')
  if cfg.mlp_activation != 'swiglu_clamped':
    raise family_lib.UnsupportedError(f'model.mlp_activation={cfg.mlp_activation!r} cannot be '
                                      "written as GPT-OSS (swiglu_clamped only)")
  return {
      'model_type': 'gpt_oss',
      'architectures': ['GptOssForCausalLM'],
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.d_model,
      'intermediate_size': cfg.moe.expert_mlp_dim or cfg.mlp_dim,
      'num_hidden_layers': len(layers),
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim or cfg.d_model // cfg.num_heads,
      'layer_types': pattern.layer_types(layers),
      'sliding_window': cfg.attention.window or None,
      'num_local_experts': cfg.moe.num_experts,
      'num_experts_per_tok': cfg.moe.num_experts_per_tok,
      'router_aux_loss_coef': cfg.moe.aux_loss_weight / cfg.moe.num_experts_per_tok,
      'swiglu_limit': cfg.swiglu_limit,
      'swiglu_alpha': cfg.swiglu_alpha,
      'hidden_act': 'silu',  # unused by GPT-OSS's experts (they apply the clamped SwiGLU)
      'max_position_embeddings': cfg.max_len,
      'rms_norm_eps': cfg.norm_eps,
      'tie_word_embeddings': cfg.tie_embeddings,
      'attention_bias': family_lib.qkv_bias(cfg),
      'attention_dropout': 0.0,
      **family_lib.rope_to_hf(cfg),
  }


def tensors(cfg) -> list[Tensor]:
  """The mapping table: GptOssForCausalLM tensor <-> archlab parameter."""
  table = rows.outer_rows(cfg)
  for i, _ in enumerate(pattern.layers(cfg, 'WA', 'E')):
    h, a, e = rows.layer(i)
    table += rows.norm_rows(h, a, e) + rows.attention_rows(cfg, h, a) + [
        Tensor(f'{h}.self_attn.sinks', ((a, 'op', 'sinks'),), contract=0),
        Tensor(f'{h}.mlp.router.weight', ((e, 'op', 'router'),), 'linear'),
        Tensor(f'{h}.mlp.router.bias', ((e, 'op', 'router_bias'),), contract=0),
        ExpertTensor(f'{h}.mlp.experts.gate_up_proj', ((e, 'op', 'wi'), (e, 'op', 'wu'))),
        ExpertTensor(f'{h}.mlp.experts.gate_up_proj_bias',
                     ((e, 'op', 'wi_bias'), (e, 'op', 'wu_bias'))),
        ExpertTensor(f'{h}.mlp.experts.down_proj', ((e, 'op', 'wo'),)),
        ExpertTensor(f'{h}.mlp.experts.down_proj_bias', ((e, 'op', 'wo_bias'),)),
    ]
  return table


GPT_OSS = family_lib.Family(
    model_type='gpt_oss', architecture='GptOssForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors)
