"""IsoFLOP sweeps comparing architectures: `python -m experiments.sweep --sweep=THIS_FILE:PRESET`.

Presets:
  quick      CI smoke test: llama and gpt2, budgets 3e10 and 1e11 FLOPs, 3 sizes each.
  cpu_small  every architecture that exists, budgets 1e12, 2.5e12 and 6e12 FLOPs, 5 sizes each
             centred on 80 tokens per parameter (the report in experiments/results/ comes from
             this preset; a first run centred on 20 found the optimum at 60-90 tokens per
             parameter for these byte-level models, at the low end of that ladder).
  pod        a pod-scale plan (budgets 1e18 to 1e20, widths to 2048): meant for
             `--print_commands` and a cluster scheduler, not for this machine.

The ladder (one rule for every architecture): width d from WIDTHS, head dim 16 below d=256
and 64 from there (d/16 or d/64 heads; half as many kv heads where the family uses GQA),
depth round(d / 24) clipped to [2, 12] (48 beyond d=1024 in the pod preset), MLP 4d (GELU)
or 8d/3 rounded to 16 (gated); the hybrids make round(0.25 x depth) of their mixer layers
attention (none at 2 layers, 1 of 4 at d=96) and give Mamba-2 heads of the same head dim,
expand 2. For each budget C the sizes are the `sizes` widths centred on
the one whose parameter count is closest to sqrt(C / (6 r)), r the preset's tokens per
parameter (Chinchilla's 20 for `pod` and `quick`, 80 for `cpu_small`; C = 6 N D); each run
trains on C / (training FLOPs per token) tokens (the trainer's `train.flops` budget).
Learning rate: 3e-3 * sqrt(128 / d), warmup 5% of the steps, cosine to 10%.

The interface every sweep file provides (experiments/sweep.py reads nothing else about the
models; write your own sweep file to the same shape and pass it as `--sweep=PATH:ARGS`):

  get_config(arg) -> ConfigDict   the sweep: architectures (keys of ARCHITECTURES), budgets
                                  (FLOPs), widths (the ladder), sizes (runs per budget), seeds,
                                  tokens_per_param, seq_len, batch_size, eval_batches; anything
                                  else is the file's own (a report reads `baseline`).
  ARCHITECTURES                   name -> dict with `config` (a config file, relative to the
                                  repository root) and `arg` (its argument), the config each run
                                  starts from, plus whatever the size rule reads.
  size_overrides(architecture, width, sweep) -> {dotted field: value}
                                  the fields that make `architecture` the ladder size `width`;
                                  any field of the config (`model.moe.num_experts`,
                                  `model.attention.window`, `optim.lr`, ...). A field the config
                                  does not have is refused before anything runs.
"""

from __future__ import annotations

import ml_collections

import errors
from configs import common

WIDTHS = (24, 32, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024, 1536, 2048)

# Architectures join as they land: the config file and argument they start from, the
# pattern's repeating unit (repeated `depth` times), whether the MLP is gated and whether
# attention uses GQA (half the heads as kv heads), and any other fixed overrides.
ARCHITECTURES = {
    'llama': dict(config='configs/transformer.py', arg='preset=llama_tiny', unit='AF',
                  gated=True, gqa=True, overrides={}),
    'gpt2': dict(config='configs/transformer.py', arg='preset=gpt2_tiny', unit='AF',
                 gated=False, gqa=False, overrides={}),
    # Hybrids: `depth` (mixer, MLP) layers, round(attention_fraction x depth) of whose mixers
    # are attention, spread evenly (configs.common.hybrid_pattern); Qwen3-Next's 1 in 4.
    # configs/sweeps/attention_ratio.py varies the fraction.
    'deltanet_hybrid': dict(config='configs/transformer.py', arg='preset=deltanet_hybrid_tiny',
                            unit='GF', mixer='G', attention_fraction=0.25, gated=True, gqa=True,
                            overrides={}),
    'mamba2_hybrid': dict(config='configs/transformer.py', arg='preset=mamba2_hybrid_tiny',
                          unit='MF', mixer='M', attention_fraction=0.25, gated=True, gqa=True,
                          overrides={}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, preset='quick')
  presets = {
      'quick': dict(architectures=['llama', 'gpt2'], budgets=[3e10, 1e11], sizes=3, seq_len=64,
                    batch_size=8, seeds=[0], eval_batches=4, tokens_per_param=20.0,
                    widths=list(WIDTHS[1:10])),
      'cpu_small': dict(architectures=list(ARCHITECTURES), budgets=[1e12, 2.5e12, 6e12], sizes=5,
                        seq_len=128, batch_size=16, seeds=[0], eval_batches=16,
                        tokens_per_param=80.0, widths=list(WIDTHS[:10])),
      'pod': dict(architectures=list(ARCHITECTURES), budgets=[1e18, 1e19, 1e20], sizes=7,
                  seq_len=2048, batch_size=256, seeds=[0], eval_batches=64,
                  tokens_per_param=20.0, widths=list(WIDTHS[1:])),
  }
  if args.preset not in presets:
    raise errors.ConfigError(f'preset={args.preset!r} is not one of {sorted(presets)} '
                     f'(configs/sweeps/arch_compare.py)')
  sweep = ml_collections.ConfigDict(presets[args.preset])
  sweep.name = f'arch_compare_{args.preset}'
  sweep.baseline = 'llama'
  sweep.max_layers = 48 if args.preset == 'pod' else 12
  sweep.lr_rule = '3e-3 * sqrt(128 / d)'
  return sweep


def size_overrides(architecture: str, d: int, sweep: ml_collections.ConfigDict) -> dict:
  """The config fields of width `d` under the ladder rule, for `architecture` (depth capped
  at the sweep's `max_layers`)."""
  arch = ARCHITECTURES[architecture]
  heads = max(1, d // (16 if d < 256 else 64))
  kv_heads = heads // 2 if arch['gqa'] and heads % 2 == 0 else heads
  depth = min(sweep.max_layers, max(2, round(d / 24)))
  pattern = arch['unit'] * depth
  mixer_fields = {}
  if 'mixer' in arch:
    pattern = common.hybrid_pattern(arch['mixer'], arch['attention_fraction'], depth)
  if arch.get('mixer') == 'M':  # Mamba-2 heads of the ladder's head dim, expand 2
    head_dim = 16 if d < 256 else 64
    mixer_fields = {'model.mamba.num_heads': 2 * d // head_dim, 'model.mamba.head_dim': head_dim}
  return {
      'model.d_model': d,
      'model.num_heads': heads,
      'model.num_kv_heads': kv_heads,
      'model.head_dim': 0,
      'model.mlp_dim': 16 * round(8 * d / 3 / 16) if arch['gated'] else 4 * d,
      'model.pattern': pattern,
      'optim.lr': round(3e-3 * (128 / d) ** 0.5, 6),
      **mixer_fields,
      **arch['overrides'],
  }
