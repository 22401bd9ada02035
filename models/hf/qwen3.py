"""Qwen3 (`model_type='qwen3'`, Qwen3ForCausalLM): Llama's layout plus QK-norm.

Each head's query and key go through an RMSNorm over the head's features before RoPE
(`model.attention.qk_norm='head'`); `attention_bias` adds biases on q, k, v and o, and the
MLP has none. Sliding-window layers (`use_sliding_window`) are refused for now. Config
fields without a value take LlamaConfig's defaults, as Llama's do.
"""

from __future__ import annotations

from models.hf import family as family_lib
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  if hf.get('use_sliding_window', False):
    hf.refuse('use_sliding_window', 'is not supported by archlab\'s qwen3 import yet (only '
              'global attention layers)')
  layer_types = hf.get('layer_types', [])
  if any(t != 'full_attention' for t in layer_types):
    hf.refuse('layer_types', 'has sliding_attention layers; archlab\'s qwen3 import reads '
              'full_attention only')
  return {
      **rows.archlab_fields(hf),
      'pattern': pattern.join([('A', 'F')] * hf.get('num_hidden_layers', 32)),
      'attention.qk_norm': 'head',
      **family_lib.bias_fields(hf, 'attention_bias', 'mlp_bias'),
      **family_lib.rope_fields(hf),
  }


def config_to_hf(cfg) -> dict:
  # No mlp_bias: Qwen3's MLP has no biases, so a model with them does not round-trip.
  return {
      'model_type': 'qwen3',
      'architectures': ['Qwen3ForCausalLM'],
      **rows.hf_fields(cfg, 'Qwen3', len(pattern.layers(cfg, 'A', 'F'))),
      'use_sliding_window': False,
      'sliding_window': None,
      **family_lib.rope_to_hf(cfg),
  }


def tensors(cfg) -> list[Tensor]:
  """The mapping table: Qwen3ForCausalLM tensor <-> archlab parameter (Llama's, whose
  attention rows hold the per-head query and key norms)."""
  return rows.llama_table(cfg, pattern.layers(cfg, 'A', 'F'), mlp_bias=family_lib.mlp_bias(cfg))


QWEN3 = family_lib.Family(
    model_type='qwen3', architecture='Qwen3ForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=rows.ROPE_BUFFERS)
