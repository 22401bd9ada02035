"""DeepSeek V3 (`model_type='deepseek_v3'`, DeepseekV3ForCausalLM): MLA and group-limited MoE.

Attention is MLA (`attention.kind='mla'`): queries through a low-rank bottleneck
(`q_lora_rank`; None is full-rank `q_proj`), keys and values from one latent of
`kv_lora_rank` features plus a shared RoPE key (HF stores both in `kv_a_proj_with_mqa`,
latent first), the latent expanded per head by `kv_b_proj` ([k_nope | v] per head).
The latent RMSNorms use transformers' default eps 1e-6, not `rms_norm_eps`
(`attention.mla.norm_eps`). RoPE pairs are interleaved when `rope_interleave` (the layout
of the rotated features differs from archlab's, but q and k share it, so scores agree);
YaRN with `mscale_all_dim` also scales the softmax (models/layers/mla.py).

The first `first_k_dense_replace` layers have a dense MLP (`F`), the rest a MoE (`E`):
sigmoid scores, `e_score_correction_bias` added for selection only (archlab's
`moe.correction_bias` parameter), top `topk_group` of `n_group` groups, top k, weights
renormalised (`norm_topk_prob`) and times `routed_scaling_factor`, plus `n_shared_experts`
always-on experts as one MLP. Experts are stored one tensor per expert
(`mlp.experts.{e}.gate_proj.weight`). Multi-token-prediction layers (`model.layers.61` in
the released checkpoints) are ignored, as transformers ignores them.
"""

from __future__ import annotations

from models.hf import family as family_lib
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor

LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, used by q_a_layernorm and kv_a_layernorm


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  layers = hf.get('num_hidden_layers', 61)
  dense = hf.get('first_k_dense_replace', 3)
  if not 0 <= dense <= layers:
    hf.refuse('first_k_dense_replace', f'must be in [0, num_hidden_layers={layers}]')
  fields = rows.archlab_fields(hf, vocab_size=129280, hidden_size=7168, num_attention_heads=128,
                               intermediate_size=18432, max_position_embeddings=4096)
  del fields['head_dim']  # MLA's head dims are the qk_*/v_head_dim fields
  q_rank = hf.get('q_lora_rank', 0)
  bias = bool(hf.get('attention_bias', False))
  if bias and not q_rank:
    hf.refuse('attention_bias', 'with q_lora_rank=None is not supported: archlab\'s full-rank '
              'MLA query has a bias when the other projections do, transformers\' q_proj none')
  experts, shared = hf.get('n_routed_experts', 256), hf.get('n_shared_experts', 1)
  if dense < layers and shared < 1:
    hf.refuse('n_shared_experts', 'must be >= 1 (transformers always builds the shared MLP)')
  fields.update({
      'pattern': pattern.join([('A', 'F')] * dense + [('A', 'E')] * (layers - dense)),
      # MLA expands the latent into keys and values for every head
      'num_kv_heads': fields['num_heads'],
      'rope_interleaved': bool(hf.get('rope_interleave', True)),
      'use_bias': False,
      'attention.qkv_bias': bias,
      'attention.o_bias': bias,
      'attention.kind': 'mla',
      'attention.mla.q_rank': q_rank,
      'attention.mla.kv_rank': hf.get('kv_lora_rank', 512),
      'attention.mla.nope_head_dim': hf.get('qk_nope_head_dim', 128),
      'attention.mla.rope_head_dim': hf.get('qk_rope_head_dim', 64),
      'attention.mla.v_head_dim': hf.get('v_head_dim', 128),
      'attention.mla.norm_eps': LATENT_NORM_EPS,
      **family_lib.rope_fields(hf),
  })
  if dense < layers:
    fields.update({
        'moe.num_experts': experts,
        'moe.num_experts_per_tok': hf.get('num_experts_per_tok', 8),
        'moe.expert_mlp_dim': hf.get('moe_intermediate_size', 2048),
        'moe.router': 'sigmoid',
        'moe.norm_topk_prob': bool(hf.get('norm_topk_prob', True)),
        'moe.routed_scaling_factor': float(hf.get('routed_scaling_factor', 2.5)),
        'moe.num_shared_experts': shared,
        'moe.shared_expert_mlp_dim': 0,
        'moe.n_group': hf.get('n_group', 1),
        'moe.topk_group': hf.get('topk_group', 1),
        'moe.correction_bias': True,
        'moe.aux_loss_weight': 0.0,  # auxiliary-loss-free balancing
    })
  return fields


def layers(cfg) -> list[pattern.Layer]:
  """The layers of `model.pattern`, refused unless it is 'AF' * k + 'AE' * m."""
  pairs = pattern.layers(cfg, 'A', 'FE')
  dense = [f for _, f in pairs].count('F')
  if pairs != [('A', 'F')] * dense + [('A', 'E')] * (len(pairs) - dense):
    pattern.refuse(cfg, 'is not \'AF\' * k + \'AE\' * m, as DeepSeek V3')
  return pairs


def config_to_hf(cfg) -> dict:
  mlps = [f for _, f in layers(cfg)]
  dense, sparse = mlps.count('F'), mlps.count('E')
  if cfg.attention.kind != 'mla':
    raise family_lib.UnsupportedError(f'model.attention.kind={cfg.attention.kind!r} cannot be '
                                      "written as DeepSeek V3 (mla only)")
  m, mla = cfg.moe, cfg.attention.mla
  hf_config = {
      'model_type': 'deepseek_v3',
      'architectures': ['DeepseekV3ForCausalLM'],
      **{k: v for k, v in rows.hf_fields(cfg, 'DeepSeek V3', dense + sparse).items()
         if k != 'head_dim'},  # MLA's head dims are the qk_*/v_head_dim fields
      'first_k_dense_replace': dense,
      'num_key_value_heads': cfg.num_heads,
      'q_lora_rank': mla.q_rank or None,
      'kv_lora_rank': mla.kv_rank,
      'qk_nope_head_dim': mla.nope_head_dim,
      'qk_rope_head_dim': mla.rope_head_dim,
      'v_head_dim': mla.v_head_dim,
      'rope_interleave': bool(cfg.rope_interleaved),
      'num_nextn_predict_layers': 0,
      **family_lib.rope_to_hf(cfg),
  }
  if sparse:
    hf_config.update({
        'n_routed_experts': m.num_experts,
        'num_experts_per_tok': m.num_experts_per_tok,
        'moe_intermediate_size': m.expert_mlp_dim or cfg.mlp_dim,
        'n_shared_experts': m.num_shared_experts,
        'norm_topk_prob': bool(m.norm_topk_prob),
        'routed_scaling_factor': m.routed_scaling_factor,
        'n_group': m.n_group,
        'topk_group': m.topk_group,
    })
  return hf_config


def tensors(cfg) -> list[Tensor]:
  """The mapping table: DeepseekV3ForCausalLM tensor <-> archlab parameter."""
  table = rows.outer_rows(cfg)
  bias = family_lib.qkv_bias(cfg)
  for i, (_, mlp) in enumerate(layers(cfg)):
    h, a, f = rows.layer(i)
    s = f'{h}.self_attn'
    table += rows.norm_rows(h, a, f) + [
        Tensor(f'{s}.kv_a_proj_with_mqa.weight', ((a, 'op', 'kv_a'), (a, 'op', 'k_rope')),
               'fused_linear'),
        *rows.norm(f'{s}.kv_a_layernorm', (a, 'op', 'kv_a_norm')),
        # [k_nope | v] per head
        Tensor(f'{s}.kv_b_proj.weight', ((a, 'op', 'k_b'), (a, 'op', 'v_b')), 'fused_linear',
               groups=cfg.num_heads),
        Tensor(f'{s}.o_proj.weight', ((a, 'op', 'o'),), 'linear', contract=2),
    ]
    if cfg.attention.mla.q_rank:
      table += [
          Tensor(f'{s}.q_a_proj.weight', ((a, 'op', 'q_a'),), 'linear'),
          *rows.norm(f'{s}.q_a_layernorm', (a, 'op', 'q_a_norm')),
          Tensor(f'{s}.q_b_proj.weight', ((a, 'op', 'q_b'),), 'linear'),
      ]
      if bias:
        table.append(Tensor(f'{s}.q_a_proj.bias', ((a, 'op', 'q_a_bias'),), contract=0))
    else:
      table.append(Tensor(f'{s}.q_proj.weight', ((a, 'op', 'q'),), 'linear'))
    if bias:
      table.append(Tensor(f'{s}.kv_a_proj_with_mqa.bias',
                          ((a, 'op', 'kv_a_bias'), (a, 'op', 'k_rope_bias')), 'fused', 0))
    if family_lib.o_bias(cfg):
      table.append(Tensor(f'{s}.o_proj.bias', ((a, 'op', 'o_bias'),), contract=0))
    if mlp == 'F':
      table += rows.mlp_rows(f'{h}.mlp', (f, 'op'))
      continue
    table += rows.moe_rows(cfg, h, f) + [
        Tensor(f'{h}.mlp.gate.e_score_correction_bias', ((f, 'op', 'correction_bias'),),
               contract=0),
        *rows.mlp_rows(f'{h}.mlp.shared_experts', (f, 'op', 'shared')),
    ]
  return table


DEEPSEEK_V3 = family_lib.Family(
    model_type='deepseek_v3', architecture='DeepseekV3ForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    # The multi-token-prediction layer of the released checkpoints (transformers skips it).
    ignored=(r'(model\.)?layers\.61\..*',), read_as=family_lib.split_stacked_experts)
