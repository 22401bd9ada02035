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
from models.hf import llama
from models.hf.family import Tensor


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  d, n = hf.get('hidden_size', 2048), hf.get('num_attention_heads', 32)
  layers = hf.get('num_hidden_layers', 24)
  act = hf.require('hidden_act', llama.ACTIVATIONS, 'silu')
  experts = hf.get('num_local_experts', hf.get('num_experts', 128))
  k = hf.get('num_experts_per_tok', 8)
  step = hf.get('decoder_sparse_step', 1)
  if not isinstance(step, int) or step < 1:
    hf.refuse('decoder_sparse_step', 'must be a positive integer')
  dense = set(hf.get('mlp_only_layers', []))
  sparse = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers)]
  if any(sparse) and not 1 <= k <= experts:
    hf.refuse('num_experts_per_tok', f'must be in [1, num_experts={experts}]')
  attention = 'A'
  fields = {}
  if hf.get('use_sliding_window', False):
    window = hf.get('sliding_window')
    if not isinstance(window, int) or window < 1:
      hf.refuse('sliding_window', 'must be a positive integer when use_sliding_window is true')
    attention, fields['attention.window'] = 'W', window  # every layer, as transformers 5
  fields.update({
      'pattern': ''.join(attention + ('E' if s else 'F') for s in sparse),
      'vocab_size': hf.get('vocab_size', 151936),
      'd_model': d,
      'num_heads': n,
      'num_kv_heads': hf.get('num_key_value_heads', 4),
      'head_dim': hf.get('head_dim', d // n),
      'mlp_dim': hf.get('intermediate_size', 6144),
      'mlp_activation': llama.ACTIVATIONS[act],
      'norm': 'rmsnorm',
      'norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
      'position': 'rope',
      'max_len': hf.get('max_position_embeddings', 32768),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
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


def layer_chars(cfg, attention: str, mlps: str) -> list[tuple[str, str]]:
  """(attention char, MLP char) per layer of `model.pattern`, or one line why it is not
  pairs of one of `attention` then one of `mlps`."""
  p = cfg.pattern
  pairs = [(p[i], p[i + 1]) for i in range(0, len(p) - 1, 2)]
  if len(p) % 2 or not pairs or any(a not in attention or f not in mlps for a, f in pairs):
    raise family_lib.UnsupportedError(f'model.pattern={p!r} is not layers of one of '
                                      f'{list(attention)} then one of {list(mlps)}')
  return pairs


def config_to_hf(cfg) -> dict:
  pairs = layer_chars(cfg, 'AW', 'EF')
  if len({a for a, _ in pairs}) > 1:
    raise family_lib.UnsupportedError(f'model.pattern={cfg.pattern!r} mixes A and W layers; '
                                      'qwen3_moe has sliding windows on all layers or none')
  m = cfg.moe
  windowed = pairs[0][0] == 'W'
  return {
      'model_type': 'qwen3_moe',
      'architectures': ['Qwen3MoeForCausalLM'],
      **llama.hf_fields(cfg, 'qwen3_moe', len(pairs)),
      'use_sliding_window': windowed,
      'sliding_window': cfg.attention.window if windowed else None,
      'num_experts': m.num_experts,
      'num_experts_per_tok': m.num_experts_per_tok,
      'moe_intermediate_size': m.expert_mlp_dim or cfg.mlp_dim,
      'norm_topk_prob': bool(m.norm_topk_prob),
      'router_aux_loss_coef': m.aux_loss_weight / m.num_experts_per_tok,
      'decoder_sparse_step': 1,
      'mlp_only_layers': [i for i, (_, f) in enumerate(pairs) if f == 'F'],
      **family_lib.rope_to_hf(cfg),
  }


def attention_rows(cfg, h: str, a: int) -> list[Tensor]:
  """Rows of attention sublayer `a` (HF layer prefix `h`): q/k/v/o, their biases and the
  QK-norm scales (per head or over the whole width: either reshapes to archlab's)."""
  rows = [Tensor(f'{h}.self_attn.{x}_proj.weight', ((a, 'op', x),), 'linear') for x in 'qkv']
  rows.append(Tensor(f'{h}.self_attn.o_proj.weight', ((a, 'op', 'o'),), 'linear', contract=2))
  if family_lib.qkv_bias(cfg):
    rows += [Tensor(f'{h}.self_attn.{x}_proj.bias', ((a, 'op', f'{x}_bias'),), contract=0)
             for x in 'qkv']
  if family_lib.o_bias(cfg):
    rows.append(Tensor(f'{h}.self_attn.o_proj.bias', ((a, 'op', 'o_bias'),), contract=0))
  if cfg.attention.qk_norm != 'none':
    rows += [Tensor(f'{h}.self_attn.{x}_norm.weight', ((a, 'op', f'{x}_norm', 'scale'),),
                    contract=0) for x in 'qk']
  return rows


def mlp_rows(h: str, f: int) -> list[Tensor]:
  """The dense gated MLP of sublayer `f` (no biases)."""
  return [Tensor(f'{h}.mlp.{x}_proj.weight', ((f, 'op', y),), 'linear')
          for x, y in (('gate', 'wi'), ('up', 'wu'), ('down', 'wo'))]


def tensors(cfg) -> list[Tensor]:
  """The mapping table: Qwen3MoeForCausalLM tensor <-> archlab parameter."""
  rows = family_lib.outer_rows(cfg)
  for i, (_, mlp) in enumerate(layer_chars(cfg, 'AW', 'EF')):
    h, a, f = f'model.layers.{i}', 2 * i, 2 * i + 1
    rows.append(Tensor(f'{h}.input_layernorm.weight', ((a, 'norm', 'scale'),), contract=0))
    rows += attention_rows(cfg, h, a)
    rows.append(Tensor(f'{h}.post_attention_layernorm.weight', ((f, 'norm', 'scale'),),
                       contract=0))
    if mlp == 'F':
      rows += mlp_rows(h, f)
      continue
    rows.append(Tensor(f'{h}.mlp.gate.weight', ((f, 'op', 'router'),), 'linear'))
    for e in range(cfg.moe.num_experts):
      rows += [Tensor(f'{h}.mlp.experts.{e}.{x}_proj.weight', ((f, 'op', y),), 'linear', index=e)
               for x, y in (('gate', 'wi'), ('up', 'wu'), ('down', 'wo'))]
  return rows


QWEN3_MOE = family_lib.register(family_lib.Family(
    model_type='qwen3_moe', architecture='Qwen3MoeForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=llama.LLAMA.ignored, read_as=family_lib.split_stacked_experts))
