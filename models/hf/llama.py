"""Llama (`model_type='llama'`, LlamaForCausalLM): RoPE, RMSNorm, gated MLP, GQA.

Projections are torch `nn.Linear` weights (out, in). HF Llama checkpoints already use the
rotate-half RoPE pairing (x[i], x[i + H/2]) that archlab uses, so no permutation is needed.
The layout's pieces are in rows.py, which Llama's descendants share.
"""

from __future__ import annotations

from models.hf import family as family_lib
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  return {
      **rows.archlab_fields(hf),
      'pattern': pattern.join([('A', 'F')] * hf.get('num_hidden_layers', 32)),
      **family_lib.bias_fields(hf, 'attention_bias', 'mlp_bias'),
      **family_lib.rope_fields(hf),
  }


def config_to_hf(cfg) -> dict:
  return {
      'model_type': 'llama',
      'architectures': ['LlamaForCausalLM'],
      **rows.hf_fields(cfg, 'Llama', len(pattern.layers(cfg, 'A', 'F'))),
      'mlp_bias': family_lib.mlp_bias(cfg),
      **family_lib.rope_to_hf(cfg),
  }


def tensors(cfg) -> list[Tensor]:
  """The mapping table: LlamaForCausalLM tensor <-> archlab parameter."""
  return rows.llama_table(cfg, pattern.layers(cfg, 'A', 'F'), mlp_bias=family_lib.mlp_bias(cfg))


LLAMA = family_lib.Family(
    model_type='llama', architecture='LlamaForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=rows.ROPE_BUFFERS)
