"""Mapping-table rows and config.json fields that several families share.

Every family but GPT-2 keeps Llama's layout: `model.embed_tokens`, decoder layers
`model.layers.{i}` of an attention sublayer (archlab's pattern position 2i) and an MLP
sublayer (2i + 1), `model.norm`, and `lm_head` unless it is tied. The builders here give
the rows of those pieces (`family.Tensor`) and the config.json fields Llama's descendants
spell alike; a family module puts them together and adds what is its own.
"""

from __future__ import annotations

from models.hf import family as family_lib
from models.hf.family import Tensor

# config.json hidden_act -> model.mlp_activation (Llama's MLP is gated: act(gate) * up)
ACTIVATIONS = {'silu': 'swiglu', 'swish': 'swiglu', 'gelu_pytorch_tanh': 'geglu',
               'gelu_new': 'geglu'}
TO_HF_ACTIVATIONS = {'swiglu': 'silu', 'geglu': 'gelu_pytorch_tanh'}

# The rotary buffers older transformers saved with each attention layer (not weights).
ROPE_BUFFERS = (r'(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq',)

# ---------------------------------------------------------------------------------------------
# config.json fields of Llama's layout.


def archlab_fields(hf: family_lib.HfConfig, *, vocab_size=32000, hidden_size=4096,
                   num_attention_heads=32, num_key_value_heads=None, intermediate_size=11008,
                   rms_norm_eps=1e-6, max_position_embeddings=2048) -> dict:
  """The model fields of the config.json fields Llama's descendants share (no pattern,
  bias, RoPE or MoE fields; the inverse of `hf_fields`); refuses a `hidden_act` that is not
  a gated MLP's. The keywords are the defaults of those fields, LlamaConfig's unless a
  family passes its own; `num_key_value_heads=None` defaults to `num_attention_heads`."""
  act = hf.require('hidden_act', ACTIVATIONS, 'silu')
  d = hf.get('hidden_size', hidden_size)
  n = hf.get('num_attention_heads', num_attention_heads)
  return {
      'vocab_size': hf.get('vocab_size', vocab_size),
      'd_model': d,
      'num_heads': n,
      'num_kv_heads': hf.get('num_key_value_heads', num_key_value_heads or n),
      'head_dim': hf.get('head_dim', d // n),
      'mlp_dim': hf.get('intermediate_size', intermediate_size),
      'mlp_activation': ACTIVATIONS[act],
      'norm': 'rmsnorm',
      'norm_eps': float(hf.get('rms_norm_eps', rms_norm_eps)),
      'position': 'rope',
      'max_len': hf.get('max_position_embeddings', max_position_embeddings),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
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


# ---------------------------------------------------------------------------------------------
# Rows.

# A decoder layer's norms by model.norm_placement: the HF names of the attention and the MLP
# sublayer's norm, and the archlab name of both.
NORMS = {'pre': (('input_layernorm', 'post_attention_layernorm'), 'norm'),
         'post': (('post_attention_layernorm', 'post_feedforward_layernorm'), 'post_norm')}


def layer(i: int, prefix: str = 'model.layers') -> tuple[str, int, int]:
  """(HF prefix, attention sublayer, MLP sublayer) of decoder layer `i`."""
  return f'{prefix}.{i}', 2 * i, 2 * i + 1


def norm(name: str, ours: tuple, bias: bool = False) -> list[Tensor]:
  """A norm's `{name}.weight` (and `.bias`) <-> archlab's `ours + ('scale',)` (and 'bias')."""
  rows = [Tensor(f'{name}.weight', (ours + ('scale',),), contract=0)]
  if bias:
    rows.append(Tensor(f'{name}.bias', (ours + ('bias',),), contract=0))
  return rows


def head_rows(cfg) -> list[Tensor]:
  """The output head `lm_head`, unless it is tied to the embedding."""
  return [] if cfg.tie_embeddings else [Tensor('lm_head.weight', (('head',),), 'linear')]


def outer_rows(cfg) -> list[Tensor]:
  """The rows outside the layers: token embedding, final norm and the untied head."""
  return [Tensor('model.embed_tokens.weight', (('embed',),)),
          *norm('model.norm', ('final_norm',)), *head_rows(cfg)]


def norm_rows(h: str, a: int, f: int, placement: str = 'pre') -> list[Tensor]:
  """The two norms of decoder layer `h` (attention sublayer `a`, MLP sublayer `f`)."""
  names, ours = NORMS[placement]
  return [row for name, s in zip(names, (a, f)) for row in norm(f'{h}.{name}', (s, ours))]


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
    rows += [row for x in 'qk' for row in norm(f'{h}.self_attn.{x}_norm', (a, 'op', f'{x}_norm'))]
  return rows


def mlp_rows(prefix: str, ours: tuple, index: int | None = None,
             bias: bool = False) -> list[Tensor]:
  """A gated MLP's gate/up/down nn.Linear weights (and biases) under HF's `prefix` <->
  archlab's wi/wu/wo under `ours`; `index` for one expert of stacked weights."""
  names = (('gate', 'wi'), ('up', 'wu'), ('down', 'wo'))
  rows = [Tensor(f'{prefix}.{x}_proj.weight', (ours + (y,),), 'linear', index=index)
          for x, y in names]
  if bias:
    rows += [Tensor(f'{prefix}.{x}_proj.bias', (ours + (f'{y}_bias',),), contract=0)
             for x, y in names]
  return rows


def moe_rows(cfg, h: str, f: int) -> list[Tensor]:
  """MoE sublayer `f`: the router `mlp.gate` and every expert, one tensor per expert and
  projection (`mlp.experts.{e}.gate_proj.weight`, ...: a slice of archlab's (E, ...))."""
  rows = [Tensor(f'{h}.mlp.gate.weight', ((f, 'op', 'router'),), 'linear')]
  for e in range(cfg.moe.num_experts):
    rows += mlp_rows(f'{h}.mlp.experts.{e}', (f, 'op'), index=e)
  return rows


def llama_table(cfg, pairs: list, mlp_bias: bool = False) -> list[Tensor]:
  """The mapping table of Llama's layout for the layers `pairs` (`pattern.layers`): pre-norms,
  attention (biases and QK-norm as `cfg` has them), and a dense gated MLP (`F`, with biases
  when `mlp_bias`) or routed experts (`E`)."""
  rows = outer_rows(cfg)
  for i, (_, mlp) in enumerate(pairs):
    h, a, f = layer(i)
    rows += norm_rows(h, a, f) + attention_rows(cfg, h, a)
    rows += mlp_rows(f'{h}.mlp', (f, 'op'), bias=mlp_bias) if mlp == 'F' else moe_rows(cfg, h, f)
  return rows
