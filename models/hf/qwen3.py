"""Qwen3 (`model_type='qwen3'`, Qwen3ForCausalLM): Llama's layout plus QK-norm.

Each head's query and key go through an RMSNorm over the head's features before RoPE
(`model.attention.qk_norm='head'`); `attention_bias` adds biases on q, k, v and o, and the
MLP has none. Sliding-window layers (`use_sliding_window`) are refused for now.
"""

from __future__ import annotations

from models.hf import family as family_lib
from models.hf import llama
from models.hf.family import Tensor


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  if hf.get('use_sliding_window', False):
    hf.refuse('use_sliding_window', 'is not supported by archlab\'s qwen3 import yet (only '
              'global attention layers)')
  layer_types = hf.get('layer_types', [])
  if any(t != 'full_attention' for t in layer_types):
    hf.refuse('layer_types', 'has sliding_attention layers; archlab\'s qwen3 import reads '
              'full_attention only')
  return {**llama.config_to_archlab(hf), 'attention.qk_norm': 'head'}


def config_to_hf(cfg) -> dict:
  hf_config = llama.config_to_hf(cfg)
  del hf_config['mlp_bias']  # Qwen3's MLP has no biases: a model with them does not round-trip
  hf_config.update(model_type='qwen3', architectures=['Qwen3ForCausalLM'],
                   use_sliding_window=False, sliding_window=None)
  return hf_config


def tensors(cfg) -> list[Tensor]:
  """Llama's table plus the per-head query and key norms."""
  rows = llama.tensors(cfg)
  for i in range(family_lib.units(cfg, 'AF')):
    rows += [Tensor(f'model.layers.{i}.self_attn.{x}_norm.weight', ((2 * i, 'op', f'{x}_norm',
                                                                     'scale'),), contract=0)
             for x in 'qk']
  return rows


QWEN3 = family_lib.register(family_lib.Family(
    model_type='qwen3', architecture='Qwen3ForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=llama.LLAMA.ignored))
