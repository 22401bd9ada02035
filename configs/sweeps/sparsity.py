"""What does sparse attention cost in quality? `python -m experiments.sweep --sweep=THIS_FILE:PRESET`.

Dense, DSA, block-sparse and sliding-window stacks at equal compute, each a scaling ladder as
in configs/sweeps/arch_compare.py (same widths, depth rule, heads, SwiGLU MLP and learning-rate
rule), so `experiments.report` fits each one's frontier and gives its compute multiplier
against dense attention. Every sparse layer lets a query see about the same number of keys,
`sweep.keys_per_query` (a quarter of the row in `quick` and `cpu`, DeepSeek V3.2's 2048 in
`pod`):

  dense      `AF` * depth, GQA softmax attention (llama_tiny): the baseline
  window     `WF`, a causal window of keys_per_query positions
  moba       `BF`, MoBA blocks of keys_per_query / 4 positions, each query its own block and
             the top 3 earlier ones (models/layers/moba.py)
  mla        `AF` with attention.kind='mla': the dense reference of DSA (its latent ranks
             follow the width: q rank d, kv rank d / 2, head dims of the ladder)
  dsa        `SF`, the same MLA with DeepSeek V3.2's lightning indexer choosing keys_per_query
             keys per query (models/layers/dsa.py), trained from scratch in the sparse stage
             (the indexer learns from its KL term; the two-stage recipe of README starts from a
             dense checkpoint instead)

Sparse attention saves compute only where attention's share of it is large, i.e. at long rows:
at `quick`'s 128 tokens the indexer costs more than the attention it saves, so the sweep
measures the quality side; `pod` (8192 tokens) is the regime of the published savings. The
trainer counts each sublayer's own analytic FLOPs (the indexer's O(T^2 H_I d_I) included), so
"equal compute" charges every architecture what it really spends.

Presets:
  quick  budgets 3e10 and 1e11, 3 sizes, 128-token rows: 30 runs, a smoke-sized answer.
  cpu    budgets 1e12, 2.5e12, 6e12, 5 sizes, 256-token rows, 80 tokens per parameter (as
         arch_compare's cpu_small): 75 runs, hours on 2 cores.
  pod    budgets 1e18 to 1e20, 7 sizes, 8192-token rows: for `--print_commands` and a scheduler.
"""

from __future__ import annotations

import ml_collections

import errors
from configs import common
from configs.sweeps import arch_compare

# name -> the config it starts from, the pattern's repeating unit and the fixed overrides.
ARCHITECTURES = {
    'dense': dict(config='configs/transformer.py', arg='preset=llama_tiny', unit='AF'),
    'window': dict(config='configs/transformer.py', arg='preset=llama_tiny', unit='WF'),
    'moba': dict(config='configs/transformer.py', arg='preset=moba_tiny', unit='BF'),
    'mla': dict(config='configs/transformer.py', arg='preset=llama_tiny', unit='AF', mla=True),
    'dsa': dict(config='configs/transformer.py', arg='preset=llama_tiny', unit='SF', mla=True),
}
MOBA_TOPK = 3  # earlier blocks per query beside its own: 4 blocks of keys_per_query / 4


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, preset='quick')
  widths = arch_compare.WIDTHS
  presets = {
      'quick': dict(budgets=[3e10, 1e11], sizes=3, seq_len=128, batch_size=8, seeds=[0],
                    eval_batches=4, tokens_per_param=20.0, widths=list(widths[1:10]),
                    keys_per_query=32),
      'cpu': dict(budgets=[1e12, 2.5e12, 6e12], sizes=5, seq_len=256, batch_size=16, seeds=[0],
                  eval_batches=16, tokens_per_param=80.0, widths=list(widths[:10]),
                  keys_per_query=64),
      'pod': dict(budgets=[1e18, 1e19, 1e20], sizes=7, seq_len=8192, batch_size=64, seeds=[0],
                  eval_batches=64, tokens_per_param=20.0, widths=list(widths[1:]),
                  keys_per_query=2048),
  }
  if args.preset not in presets:
    raise errors.ConfigError(f'preset={args.preset!r} is not one of {sorted(presets)} '
                             '(configs/sweeps/sparsity.py)')
  sweep = ml_collections.ConfigDict(presets[args.preset])
  sweep.name = f'sparsity_{args.preset}'
  sweep.architectures = list(ARCHITECTURES)
  sweep.baseline = 'dense'
  sweep.max_layers = 48 if args.preset == 'pod' else 12
  sweep.lr_rule = '3e-3 * sqrt(128 / d)'
  if sweep.keys_per_query % 4 or sweep.keys_per_query >= sweep.seq_len:
    raise errors.ConfigError(f'keys_per_query={sweep.keys_per_query} must be a multiple of 4 '
                             f'below seq_len={sweep.seq_len} (configs/sweeps/sparsity.py)')
  return sweep


def size_overrides(architecture: str, d: int, sweep: ml_collections.ConfigDict) -> dict:
  """arch_compare's llama fields of width `d` with this architecture's mixer and sparsity."""
  arch = ARCHITECTURES[architecture]
  fields = arch_compare.size_overrides('llama', d, sweep)
  depth = len(fields['model.pattern']) // 2
  fields['model.pattern'] = arch['unit'] * depth
  keys = sweep.keys_per_query
  if architecture == 'window':
    fields['model.attention.window'] = keys
  if architecture == 'moba':
    fields.update({'model.moba.block': keys // (MOBA_TOPK + 1), 'model.moba.topk': MOBA_TOPK})
  if arch.get('mla'):
    head_dim = d // fields['model.num_heads']
    fields.update({
        'model.attention.kind': 'mla',
        'model.num_kv_heads': fields['model.num_heads'],  # every MLA head has its own keys
        'model.attention.mla.q_rank': d,
        'model.attention.mla.kv_rank': max(16, d // 2),
        'model.attention.mla.nope_head_dim': head_dim,
        'model.attention.mla.rope_head_dim': max(8, head_dim // 2),
        'model.attention.mla.v_head_dim': head_dim,
    })
  if architecture == 'dsa':
    fields.update({'model.dsa.topk': keys, 'model.dsa.index_heads': 4,
                   'model.dsa.index_head_dim': max(16, head_dim),
                   'model.dsa.block': min(128, sweep.seq_len)})
  return fields
