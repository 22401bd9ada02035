"""DeepSeek V3.2 (`model_type='deepseek_v32'`, DeepseekV32ForCausalLM): DeepSeek V3 with a
lightning indexer in every attention layer, archlab's DSA `S` (models/layers/dsa.py).

Everything but the indexer is DeepSeek V3's (models/hf/deepseek_v3.py), with two
differences of transformers' V3.2: the main attention always uses interleaved RoPE (its
config has no `rope_interleave`) and always has the query bottleneck (`q_lora_rank`), whose
normalised latent feeds the indexer's queries. The indexer (`self_attn.indexer`): `wq_b`
(q_lora_rank -> index_n_heads x index_head_dim), `wk` and its LayerNorm `k_norm` (eps 1e-6,
with bias), `weights_proj` (hidden -> index_n_heads, float32); RoPE in rotate-half form on the
first `qk_rope_head_dim` features of its queries and keys; each query keeps its `index_topk`
highest-scoring visible keys. Its scores' ties (the ReLU's zeros) may be broken differently
by torch and XLA: parity holds where the top-k boundary is not a tie.
"""

from __future__ import annotations

import ml_collections

from models.hf import deepseek_v3
from models.hf import family as family_lib
from models.hf import pattern
from models.hf import rows
from models.hf.family import Tensor


def config_to_archlab(hf: family_lib.HfConfig) -> dict:
  if not hf.get('q_lora_rank'):
    hf.refuse('q_lora_rank', "must be set: DeepSeek V3.2's indexer reads the query latent")
  layers = hf.get('num_hidden_layers', 61)
  dense = hf.get('first_k_dense_replace', 3)
  mlp_types = hf.get('mlp_layer_types')
  if mlp_types is not None and list(mlp_types) != ['dense'] * dense + ['sparse'] * (layers - dense):
    hf.refuse('mlp_layer_types', f"must be 'dense' x first_k_dense_replace={dense} then 'sparse'")
  types = hf.get('layer_types')
  if types is not None and set(types) != {'indexed_attention'}:
    hf.refuse('layer_types', "must be 'indexed_attention' for every layer")
  fields = deepseek_v3.config_to_archlab(hf)
  fields.update({
      'pattern': fields['pattern'].replace('A', 'S'),
      'rope_interleaved': True,  # transformers' V3.2 main attention always interleaves
      'dsa.index_heads': hf.get('index_n_heads', 64),
      'dsa.index_head_dim': hf.get('index_head_dim', 128),
      'dsa.index_rope_dim': 0,  # qk_rope_head_dim, as the main attention's
      'dsa.topk': hf.get('index_topk', 2048),
  })
  return fields


def as_v3(cfg):
  """`cfg` with its `S` sublayers spelled `A`: the same parameters but the indexer's, whose
  DeepSeek V3 table and config fields `deepseek_v3` gives."""
  pattern.layers(cfg, 'S', 'FE')
  v3 = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg))
  v3.pattern = cfg.pattern.replace('S', 'A')
  return ml_collections.FrozenConfigDict(v3)


def config_to_hf(cfg) -> dict:
  if not cfg.attention.mla.q_rank:
    raise family_lib.UnsupportedError('model.attention.mla.q_rank=0 cannot be written as DeepSeek '
                                      "V3.2 (its indexer reads the query latent)")
  if not cfg.rope_interleaved:
    raise family_lib.UnsupportedError('model.rope_interleaved=False cannot be written as DeepSeek '
                                      'V3.2 (its main attention interleaves RoPE)')
  rope = cfg.attention.mla.rope_head_dim
  if cfg.dsa.index_rope_dim not in (0, rope):
    raise family_lib.UnsupportedError(f'model.dsa.index_rope_dim={cfg.dsa.index_rope_dim} cannot '
                                      f'be written as DeepSeek V3.2 (it rotates qk_rope_head_dim='
                                      f'{rope} indexer features)')
  hf_config = deepseek_v3.config_to_hf(as_v3(cfg))
  for field in ('rope_interleave', 'num_nextn_predict_layers'):
    hf_config.pop(field, None)
  hf_config.update({
      'model_type': 'deepseek_v32',
      'architectures': ['DeepseekV32ForCausalLM'],
      'index_n_heads': cfg.dsa.index_heads,
      'index_head_dim': cfg.dsa.index_head_dim,
      'index_topk': cfg.dsa.topk,
  })
  return hf_config


def tensors(cfg) -> list[Tensor]:
  """DeepSeek V3's table plus each layer's indexer."""
  table = deepseek_v3.tensors(as_v3(cfg))
  for i in range(len(cfg.pattern) // 2):
    h, a, _ = rows.layer(i)
    s = f'{h}.self_attn.indexer'
    table += [
        Tensor(f'{s}.wq_b.weight', ((a, 'op', 'indexer', 'q'),), 'linear'),
        Tensor(f'{s}.wk.weight', ((a, 'op', 'indexer', 'k'),), 'linear'),
        *rows.norm(f'{s}.k_norm', (a, 'op', 'indexer', 'k_norm'), bias=True),
        Tensor(f'{s}.weights_proj.weight', ((a, 'op', 'indexer', 'w'),), 'linear'),
    ]
  return table


DEEPSEEK_V32 = family_lib.Family(
    model_type='deepseek_v32', architecture='DeepseekV32ForCausalLM', prefix='model.',
    config_to_archlab=config_to_archlab, config_to_hf=config_to_hf, tensors=tensors,
    ignored=deepseek_v3.DEEPSEEK_V3.ignored, read_as=family_lib.split_stacked_experts)
