"""Llama (`model_type='llama'`, LlamaForCausalLM): RoPE, RMSNorm, gated MLP, GQA.

Projections are torch `nn.Linear` weights (out, in). HF Llama checkpoints already use the
rotate-half RoPE pairing (x[i], x[i + H/2]) that archlab uses, so no permutation is needed.
"""

from __future__ import annotations

from models.hf import family as family_lib
from models.hf.family import Tensor

# config.json hidden_act -> model.mlp_activation (Llama's MLP is gated: act(gate) * up)
ACTIVATIONS = {'silu': 'swiglu', 'swish': 'swiglu', 'gelu_pytorch_tanh': 'geglu',
               'gelu_new': 'geglu'}
TO_HF_ACTIVATIONS = {'swiglu': 'silu', 'geglu': 'gelu_pytorch_tanh'}


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  d, n = hf.get('hidden_size', 4096), hf.get('num_attention_heads', 32)
  act = hf.require('hidden_act', ACTIVATIONS, 'silu')
  return {
      'pattern': 'AF' * hf.get('num_hidden_layers', 32),
      'vocab_size': hf.get('vocab_size', 32000),
      'd_model': d,
      'num_heads': n,
      'num_kv_heads': hf.get('num_key_value_heads', n),
      'head_dim': hf.get('head_dim', d // n),
      'mlp_dim': hf.get('intermediate_size', 11008),
      'mlp_activation': ACTIVATIONS[act],
      'norm': 'rmsnorm',
      'norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
      'position': 'rope',
      'max_len': hf.get('max_position_embeddings', 2048),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
      **family_lib.bias_fields(hf, 'attention_bias', 'mlp_bias'),
      **family_lib.rope_fields(hf),
  }


def hf_fields(cfg, family: str, num_layers: int) -> dict:
  """The config.json fields Llama's descendants share (no model_type, RoPE or MoE fields);
  refuses an MLP activation transformers' `hidden_act` cannot name."""
  if cfg.mlp_activation not in TO_HF_ACTIVATIONS:
    raise family_lib.UnsupportedError(f'model.mlp_activation={cfg.mlp_activation!r} cannot be '
                                      f'written as {family} (supported: '
                                      f'{list(TO_HF_ACTIVATIONS)})')
  return {
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.d_model,
      'intermediate_size': cfg.mlp_dim,
      'num_hidden_layers': num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim or cfg.d_model // cfg.num_heads,
      'hidden_act': TO_HF_ACTIVATIONS[cfg.mlp_activation],
      'max_position_embeddings': cfg.max_len,
      'rms_norm_eps': cfg.norm_eps,
      'tie_word_embeddings': cfg.tie_embeddings,
      'attention_bias': family_lib.qkv_bias(cfg),
      'attention_dropout': 0.0,
  }


def config_to_hf(cfg) -> dict:
  return {
      'model_type': 'llama',
      'architectures': ['LlamaForCausalLM'],
      **hf_fields(cfg, 'Llama', family_lib.units(cfg, 'AF')),
      'mlp_bias': family_lib.mlp_bias(cfg),
      **family_lib.rope_to_hf(cfg),
  }


def tensors(cfg) -> list[Tensor]:
  """The mapping table: LlamaForCausalLM tensor <-> archlab parameter."""
  rows = family_lib.outer_rows(cfg)
  for i in range(family_lib.units(cfg, 'AF')):
    h, a, f = f'model.layers.{i}', 2 * i, 2 * i + 1
    rows += [
        Tensor(f'{h}.input_layernorm.weight', ((a, 'norm', 'scale'),), contract=0),
        Tensor(f'{h}.self_attn.q_proj.weight', ((a, 'op', 'q'),), 'linear'),
        Tensor(f'{h}.self_attn.k_proj.weight', ((a, 'op', 'k'),), 'linear'),
        Tensor(f'{h}.self_attn.v_proj.weight', ((a, 'op', 'v'),), 'linear'),
        Tensor(f'{h}.self_attn.o_proj.weight', ((a, 'op', 'o'),), 'linear', contract=2),
        Tensor(f'{h}.post_attention_layernorm.weight', ((f, 'norm', 'scale'),), contract=0),
        Tensor(f'{h}.mlp.gate_proj.weight', ((f, 'op', 'wi'),), 'linear'),
        Tensor(f'{h}.mlp.up_proj.weight', ((f, 'op', 'wu'),), 'linear'),
        Tensor(f'{h}.mlp.down_proj.weight', ((f, 'op', 'wo'),), 'linear'),
    ]
    if family_lib.qkv_bias(cfg):
      rows += [Tensor(f'{h}.self_attn.{x}_proj.bias', ((a, 'op', f'{x}_bias'),), contract=0)
               for x in 'qkv']
    if family_lib.o_bias(cfg):
      rows.append(Tensor(f'{h}.self_attn.o_proj.bias', ((a, 'op', 'o_bias'),), contract=0))
    if family_lib.mlp_bias(cfg):
      rows += [Tensor(f'{h}.mlp.{x}_proj.bias', ((f, 'op', f'{y}_bias'),), contract=0)
               for x, y in (('gate', 'wi'), ('up', 'wu'), ('down', 'wo'))]
  return rows


LLAMA = family_lib.register(family_lib.Family(
    model_type='llama', architecture='LlamaForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=(r'(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq',)))
