"""Qwen3-MoE (`model_type='qwen3_moe'`, Qwen3MoeForCausalLM): Qwen3 with routed experts.

Each layer is attention (per-head QK-norm, `A`; `W` for every layer when
`use_sliding_window`) then an MLP that is either the dense gated MLP (`F`) or a sparse MoE
block (`E`): a softmax router over all `num_experts`, top `num_experts_per_tok`, the k
weights renormalised when `norm_topk_prob`, and no shared experts. Layer i is sparse when
i is not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0.

Experts are stored one tensor per expert and projection (`mlp.experts.{e}.gate_proj.weight`,
as on the Hub and as transformers 5 writes them; in memory it fuses them into
`experts.gate_up_proj`), so the table has a row per expert (`Tensor.index`); a checkpoint
with the stacked in-memory tensors is split per expert on reading
(`family.split_stacked_experts`). The router's
load-balancing loss does not change the logits: HF's `router_aux_loss_coef` times k is
archlab's `moe.aux_loss_weight` (HF's loss is k times archlab's).
"""

from __future__ import annotations

from models.hf import family as family_lib
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  fields = rows.archlab_fields(hf, vocab_size=151936, hidden_size=2048, num_key_value_heads=4,
                               intermediate_size=6144, max_position_embeddings=32768)
  layers = hf.get('num_hidden_layers', 24)
  experts = hf.get('num_local_experts', hf.get('num_experts', 128))
  k = hf.get('num_experts_per_tok', 8)
  sparse = pattern.sparse_layers(hf, layers, experts, k)
  attention = 'A'
  if hf.get('use_sliding_window', False):
    window = hf.get('sliding_window')
    if not isinstance(window, int) or window < 1:
      hf.refuse('sliding_window', 'must be a positive integer when use_sliding_window is true')
    attention, fields['attention.window'] = 'W', window  # every layer, as transformers 5
  fields.update({
      'pattern': pattern.join([(attention, 'E' if s else 'F') for s in sparse]),
      'attention.qk_norm': 'head',
      **family_lib.bias_fields(hf, 'attention_bias', 'mlp_bias'),
      **family_lib.rope_fields(hf),
  })
  if any(sparse):
    fields.update({
        'moe.num_experts': experts,
        'moe.num_experts_per_tok': k,
        'moe.expert_mlp_dim': hf.get('moe_intermediate_size', 768),
        'moe.router': 'softmax',
        'moe.norm_topk_prob': bool(hf.get('norm_topk_prob', False)),
        'moe.routed_scaling_factor': 1.0,
        'moe.num_shared_experts': 0,
        'moe.n_group': 1,
        'moe.topk_group': 1,
        'moe.bias_update_rate': 0.0,
        'moe.aux_loss_weight': float(hf.get('router_aux_loss_coef', 0.001)) * k,
    })
  return fields


def config_to_hf(cfg) -> dict:
  layers = pattern.layers(cfg, 'AW', 'EF')
  if len({a for a, _ in layers}) > 1:
    pattern.refuse(cfg, 'mixes A and W layers; qwen3_moe has sliding windows on all layers or '
                   'none')
  m = cfg.moe
  windowed = layers[0][0] == 'W'
  return {
      'model_type': 'qwen3_moe',
      'architectures': ['Qwen3MoeForCausalLM'],
      **rows.hf_fields(cfg, 'qwen3_moe', len(layers)),
      'use_sliding_window': windowed,
      'sliding_window': cfg.attention.window if windowed else None,
      'num_experts': m.num_experts,
      'num_experts_per_tok': m.num_experts_per_tok,
      'moe_intermediate_size': m.expert_mlp_dim or cfg.mlp_dim,
      'norm_topk_prob': bool(m.norm_topk_prob),
      'router_aux_loss_coef': m.aux_loss_weight / m.num_experts_per_tok,
      'decoder_sparse_step': 1,
      'mlp_only_layers': [i for i, (_, f) in enumerate(layers) if f == 'F'],
      **family_lib.rope_to_hf(cfg),
  }


def tensors(cfg) -> list[Tensor]:
  """The mapping table: Qwen3MoeForCausalLM tensor <-> archlab parameter."""
  return rows.llama_table(cfg, pattern.layers(cfg, 'AW', 'EF'))


QWEN3_MOE = family_lib.Family(
    model_type='qwen3_moe', architecture='Qwen3MoeForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=rows.ROPE_BUFFERS, read_as=family_lib.split_stacked_experts)
