"""GPT-2 (`model_type='gpt2'`, GPT2LMHeadModel): learned positions, LayerNorm, GELU, biases.

HF stores GPT-2's projections as Conv1D, (in, out) like archlab, and fuses q, k and v into
one `c_attn` of (D, 3D) whose columns are [q | k | v], each head-major (N, H).
"""

from __future__ import annotations

from models.hf import family as family_lib
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor

# config.json activation_function -> model.mlp_activation (gelu_new is the tanh approximation)
ACTIVATIONS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'gelu': 'gelu_exact',
               'relu': 'relu', 'silu': 'silu', 'swish': 'silu'}
TO_HF_ACTIVATIONS = {'gelu': 'gelu_new', 'gelu_exact': 'gelu', 'relu': 'relu', 'silu': 'silu'}


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  d, n = hf.get('n_embd', 768), hf.get('n_head', 12)
  if d % n:
    hf.refuse('n_head', f'does not divide n_embd={d}')
  if hf.get('scale_attn_by_inverse_layer_idx', False):
    hf.refuse('scale_attn_by_inverse_layer_idx', 'is not supported by archlab (one softmax '
              'scale for all layers)')
  if hf.get('add_cross_attention', False):
    hf.refuse('add_cross_attention', 'is not supported by archlab (decoder-only models)')
  act = hf.require('activation_function', ACTIVATIONS, 'gelu_new')
  # reorder_and_upcast_attn only changes where fp32 starts; archlab's softmax is fp32 anyway.
  return {
      'pattern': pattern.join([('A', 'F')] * hf.get('n_layer', 12)),
      'vocab_size': hf.get('vocab_size', 50257),
      'd_model': d,
      'num_heads': n,
      'num_kv_heads': n,
      'head_dim': d // n,
      'mlp_dim': hf.get('n_inner', 4 * d),
      'mlp_activation': ACTIVATIONS[act],
      'norm': 'layernorm',
      'norm_eps': float(hf.get('layer_norm_epsilon', 1e-5)),
      'position': 'learned',
      'max_len': hf.get('n_positions', 1024),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', True)),
      'use_bias': True,
      'attention.softmax_scale': 0.0 if hf.get('scale_attn_weights', True) else 1.0,
  }


def config_to_hf(cfg) -> dict:
  layers = len(pattern.layers(cfg, 'A', 'F'))
  if cfg.mlp_activation not in TO_HF_ACTIVATIONS:
    raise family_lib.UnsupportedError(f'model.mlp_activation={cfg.mlp_activation!r} cannot be '
                                      f'written as GPT-2 (supported: {list(TO_HF_ACTIVATIONS)})')
  if cfg.attention.softmax_scale not in (0.0, 1.0):
    raise family_lib.UnsupportedError(f'model.attention.softmax_scale='
                                      f'{cfg.attention.softmax_scale} cannot be written as GPT-2 '
                                      '(1/sqrt(head_dim) or 1 only)')
  return {
      'model_type': 'gpt2',
      'architectures': ['GPT2LMHeadModel'],
      'vocab_size': cfg.vocab_size,
      'n_positions': cfg.max_len,
      'n_embd': cfg.d_model,
      'n_layer': layers,
      'n_head': cfg.num_heads,
      'n_inner': cfg.mlp_dim,
      'activation_function': TO_HF_ACTIVATIONS[cfg.mlp_activation],
      'layer_norm_epsilon': cfg.norm_eps,
      'tie_word_embeddings': cfg.tie_embeddings,
      'scale_attn_weights': cfg.attention.softmax_scale == 0.0,
      # archlab trains without dropout; so does the exported config.
      'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0,
  }


def tensors(cfg) -> list[Tensor]:
  """The mapping table: GPT2LMHeadModel tensor <-> archlab parameter."""
  table = [
      Tensor('transformer.wte.weight', (('embed',),)),
      Tensor('transformer.wpe.weight', (('pos_embed',),)),
      *rows.norm('transformer.ln_f', ('final_norm',), bias=True),
      *rows.head_rows(cfg),
  ]
  for i, _ in enumerate(pattern.layers(cfg, 'A', 'F')):
    h, a, f = rows.layer(i, 'transformer.h')
    table += [
        *rows.norm(f'{h}.ln_1', (a, 'norm'), bias=True),
        Tensor(f'{h}.attn.c_attn.weight', ((a, 'op', 'q'), (a, 'op', 'k'), (a, 'op', 'v')),
               'fused'),
        Tensor(f'{h}.attn.c_attn.bias',
               ((a, 'op', 'q_bias'), (a, 'op', 'k_bias'), (a, 'op', 'v_bias')), 'fused', 0),
        Tensor(f'{h}.attn.c_proj.weight', ((a, 'op', 'o'),), contract=2),
        Tensor(f'{h}.attn.c_proj.bias', ((a, 'op', 'o_bias'),), contract=0),
        *rows.norm(f'{h}.ln_2', (f, 'norm'), bias=True),
        Tensor(f'{h}.mlp.c_fc.weight', ((f, 'op', 'wi'),)),
        Tensor(f'{h}.mlp.c_fc.bias', ((f, 'op', 'wi_bias'),), contract=0),
        Tensor(f'{h}.mlp.c_proj.weight', ((f, 'op', 'wo'),)),
        Tensor(f'{h}.mlp.c_proj.bias', ((f, 'op', 'wo_bias'),), contract=0),
    ]
  return table


GPT2 = family_lib.Family(
    model_type='gpt2', architecture='GPT2LMHeadModel', prefix='transformer.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    # The causal-mask buffers older transformers saved with each attention layer.
    ignored=(r'(transformer\.)?h\.\d+\.attn\.(masked_)?bias',))
