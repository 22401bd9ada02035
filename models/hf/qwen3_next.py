"""Qwen3-Next (`model_type='qwen3_next'`, Qwen3NextForCausalLM): gated DeltaNet and gated
attention, 3:1, each followed by a MoE with a gated shared expert.

Layer i's mixer is `layer_types[i]`: 'linear_attention' is gated DeltaNet (`G`,
models/layers/deltanet.py), 'full_attention' softmax attention (`A`) with per-head QK-norm,
partial RoPE (`partial_rotary_factor`, 0.25 by default) and an elementwise sigmoid output
gate. Every RMSNorm but the DeltaNet's gated one is zero-centred (scale 1 + w). The MLP is a
sparse MoE block (`E`: softmax router, top k, renormalised when `norm_topk_prob`, plus one
shared expert gated by sigmoid(x w)) where i is not in `mlp_only_layers` and
(i + 1) % `decoder_sparse_step` == 0, else the dense gated MLP (`F`).

Two tensors interleave several archlab parameters per head: `q_proj` holds each head's query
then its gate, and `in_proj_qkvz` each key head's q, k, then its group's v and z
(`in_proj_ba` likewise b then a): `family.Tensor` kind 'fused_linear'. The convolution over
q, k, v is one depthwise Conv1d, archlab's three kernels concatenated.
"""

from __future__ import annotations

from models.hf import family as family_lib
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor
from models.layers import deltanet

MIXERS = {'linear_attention': 'G', 'full_attention': 'A'}
_TYPE_OF = {char: name for name, char in MIXERS.items()}
PARTIAL_ROTARY_FACTOR = 0.25  # Qwen3NextConfig's default


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  fields = rows.archlab_fields(hf, vocab_size=151936, hidden_size=2048, num_attention_heads=16,
                               num_key_value_heads=2, intermediate_size=5632,
                               max_position_embeddings=32768)
  fields['head_dim'] = hf.get('head_dim', 256)
  layers = hf.get('num_hidden_layers', 48)
  types = hf.get('layer_types') or [
      'full_attention' if (i + 1) % hf.get('full_attention_interval', 4) == 0
      else 'linear_attention' for i in range(layers)]
  if len(types) != layers or any(t not in MIXERS for t in types):
    hf.refuse('layer_types', f'must give one of {list(MIXERS)} for each of the '
              f'num_hidden_layers={layers} layers')
  experts = hf.get('num_experts', 512)
  k = hf.get('num_experts_per_tok', 10)
  sparse = pattern.sparse_layers(hf, layers, experts, k)
  fields.update({
      'pattern': ''.join(MIXERS[t] + ('E' if s else 'F') for t, s in zip(types, sparse)),
      'norm_zero_centred': True,
      'attention.qk_norm': 'head',
      'attention.output_gate': 'elementwise',
      **family_lib.bias_fields(hf, 'attention_bias', 'mlp_bias'),
      **family_lib.rope_fields(hf),
      'deltanet.key_heads': hf.get('linear_num_key_heads', 16),
      'deltanet.value_heads': hf.get('linear_num_value_heads', 32),
      'deltanet.key_head_dim': hf.get('linear_key_head_dim', 128),
      'deltanet.value_head_dim': hf.get('linear_value_head_dim', 128),
      'deltanet.conv_taps': hf.get('linear_conv_kernel_dim', 4),
      'deltanet.gate_norm': 'norm_then_gate',
      'deltanet.negative_eigenvalues': False,
  })
  params = hf.get('rope_parameters') or {}
  if 'partial_rotary_factor' not in params and hf.get('partial_rotary_factor') is None:
    fields['rope_fraction'] = PARTIAL_ROTARY_FACTOR
  if any(sparse):
    fields.update({
        'moe.num_experts': experts,
        'moe.num_experts_per_tok': k,
        'moe.expert_mlp_dim': hf.get('moe_intermediate_size', 512),
        'moe.router': 'softmax',
        'moe.norm_topk_prob': bool(hf.get('norm_topk_prob', True)),
        'moe.routed_scaling_factor': 1.0,
        'moe.num_shared_experts': 1,
        'moe.shared_expert_mlp_dim': hf.get('shared_expert_intermediate_size', 512),
        'moe.shared_expert_gate': True,
        'moe.n_group': 1,
        'moe.topk_group': 1,
        'moe.bias_update_rate': 0.0,
        'moe.aux_loss_weight': float(hf.get('router_aux_loss_coef', 0.001)) * k,
    })
  return fields


def layers(cfg) -> list[tuple[str, str]]:
  """(mixer, MLP) of each decoder layer: `G` or `A`, then `E` or `F`."""
  return pattern.layers(cfg, 'GA', 'EF')


def config_to_hf(cfg) -> dict:
  pairs = layers(cfg)
  k, y, p, h = deltanet.dims(cfg)
  m = cfg.moe
  sparse = [f == 'E' for _, f in pairs]
  out = {
      'model_type': 'qwen3_next',
      'architectures': ['Qwen3NextForCausalLM'],
      **rows.hf_fields(cfg, 'qwen3_next', len(pairs)),
      'layer_types': [_TYPE_OF[a] for a, _ in pairs],
      'linear_num_key_heads': k,
      'linear_num_value_heads': y,
      'linear_key_head_dim': p,
      'linear_value_head_dim': h,
      'linear_conv_kernel_dim': cfg.deltanet.conv_taps,
      'decoder_sparse_step': 1,
      'mlp_only_layers': [i for i, s in enumerate(sparse) if not s],
      **family_lib.rope_to_hf(cfg),
  }
  if any(sparse):
    out.update({
        'num_experts': m.num_experts,
        'num_experts_per_tok': m.num_experts_per_tok,
        'moe_intermediate_size': m.expert_mlp_dim or cfg.mlp_dim,
        'shared_expert_intermediate_size': m.shared_expert_mlp_dim or m.expert_mlp_dim or cfg.mlp_dim,
        'norm_topk_prob': bool(m.norm_topk_prob),
        'router_aux_loss_coef': m.aux_loss_weight / m.num_experts_per_tok,
    })
  else:
    out['num_experts'] = 0
  # transformers reads partial_rotary_factor from rope_parameters, defaulting to 0.25.
  out['rope_parameters'].setdefault('partial_rotary_factor', 1.0)
  return out


def attention_rows(cfg, h: str, a: int) -> list[Tensor]:
  """Gated attention: q_proj holds each head's query then its gate (and so does its bias)."""
  s = f'{h}.self_attn'
  out = []
  for row in rows.attention_rows(cfg, h, a):
    if row.hf == f'{s}.q_proj.weight':
      row = Tensor(row.hf, ((a, 'op', 'q'), (a, 'op', 'gate')), 'fused_linear',
                   groups=cfg.num_heads)
    elif row.hf == f'{s}.q_proj.bias':
      row = Tensor(row.hf, ((a, 'op', 'q_bias'), (a, 'op', 'gate_bias')), 'fused_linear',
                   contract=0, groups=cfg.num_heads)
    out.append(row)
  return out


def deltanet_rows(cfg, h: str, g: int) -> list[Tensor]:
  """Gated DeltaNet `g` under `{h}.linear_attn`."""
  s, op = f'{h}.linear_attn', (g, 'op')
  k = deltanet.dims(cfg)[0]
  return [
      Tensor(f'{s}.in_proj_qkvz.weight', tuple(op + (x,) for x in 'qkvz'), 'fused_linear',
             groups=k),
      Tensor(f'{s}.in_proj_ba.weight', (op + ('b',), op + ('a',)), 'fused_linear', groups=k),
      Tensor(f'{s}.conv1d.weight', tuple(op + (f'conv_{x}',) for x in 'qkv'), 'conv'),
      Tensor(f'{s}.dt_bias', (op + ('dt_bias',),), contract=0),
      Tensor(f'{s}.A_log', (op + ('a_log',),), contract=0),
      Tensor(f'{s}.norm.weight', (op + ('norm_scale',),), contract=0),
      Tensor(f'{s}.out_proj.weight', (op + ('o',),), 'linear', contract=2),
  ]


def tensors(cfg) -> list[Tensor]:
  """The mapping table: Qwen3NextForCausalLM tensor <-> archlab parameter."""
  table = rows.outer_rows(cfg)
  for i, (mixer, mlp) in enumerate(layers(cfg)):
    h, a, f = rows.layer(i)
    table += rows.norm_rows(h, a, f)
    table += attention_rows(cfg, h, a) if mixer == 'A' else deltanet_rows(cfg, h, a)
    if mlp == 'F':
      table += rows.mlp_rows(f'{h}.mlp', (f, 'op'))
    else:
      table += rows.moe_rows(cfg, h, f) + [
          *rows.mlp_rows(f'{h}.mlp.shared_expert', (f, 'op', 'shared')),
          Tensor(f'{h}.mlp.shared_expert_gate.weight', ((f, 'op', 'shared_gate'),), 'linear'),
      ]
  return table


QWEN3_NEXT = family_lib.Family(
    model_type='qwen3_next', architecture='Qwen3NextForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=rows.ROPE_BUFFERS, read_as=family_lib.split_stacked_experts)
