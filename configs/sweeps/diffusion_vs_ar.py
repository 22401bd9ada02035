"""Autoregression against masked and block diffusion at equal compute:
`python -m experiments.sweep --sweep=THIS_FILE:PRESET`, then `python -m experiments.report`.

Four architectures on one backbone (llama_tiny's sublayers: RoPE, RMSNorm, SwiGLU, GQA) and
arch_compare's size ladder (configs/sweeps/arch_compare.py): `ar` (next-token, causal),
`masked_diffusion` (llada_tiny: the same network bidirectional, MDLM's NELBO), and
`block_diffusion_4` / `block_diffusion_16` (BD3-LM with L' = 4 and 16). Each run gets the
budget's training FLOPs (`train.flops`); block diffusion's rows [x_noisy, x] cost more than
twice a token's FLOPs (trainer/flops.py), so its runs see fewer tokens. The diffusion runs'
bits per byte are NELBOs (upper bounds; summary.json's
`final_eval_bits_per_byte_is_upper_bound`), the AR runs' exact.

The published anchors to compare with: masked diffusion needs about 16x the compute of
autoregression for equal likelihood (Nie et al., scaling laws for masked diffusion), and the
likelihoods keep the order AR < block diffusion L'=4 < L'=16 < masked diffusion (BD3-LM).
`experiments.report` states each architecture's compute multiplier against the `ar` baseline
with its interval. No run of this sweep has been recorded yet.

Presets:
  quick  budgets 3e10 and 1e11 FLOPs, 3 sizes each, 1 seed: 24 runs, a smoke-sized answer.
  cpu    budgets 1e12, 2.5e12 and 6e12, 5 sizes, 1 seed: 60 runs (hours on this machine).
  pod    budgets 1e18 to 1e20, 7 sizes: for `--print_commands` and a scheduler.
"""

from __future__ import annotations

import ml_collections

import errors
from configs import common
from configs.sweeps import arch_compare


def _block(size: int) -> dict:
  return {'objective.name': 'block_diffusion', 'objective.block_size': size,
          'model.diffusion_block': size}


ARCHITECTURES = {
    'ar': dict(config='configs/transformer.py', arg='preset=llama_tiny', overrides={}),
    'masked_diffusion': dict(config='configs/transformer.py', arg='preset=llada_tiny',
                             overrides={}),
    'block_diffusion_4': dict(config='configs/transformer.py', arg='preset=llada_tiny',
                              overrides=_block(4)),
    'block_diffusion_16': dict(config='configs/transformer.py', arg='preset=llada_tiny',
                               overrides=_block(16)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, preset='quick')
  presets = {
      'quick': dict(budgets=[3e10, 1e11], sizes=3, seq_len=64, batch_size=8, eval_batches=4,
                    tokens_per_param=20.0, widths=list(arch_compare.WIDTHS[1:10])),
      'cpu': dict(budgets=[1e12, 2.5e12, 6e12], sizes=5, seq_len=128, batch_size=16,
                  eval_batches=16, tokens_per_param=80.0, widths=list(arch_compare.WIDTHS[:10])),
      'pod': dict(budgets=[1e18, 1e19, 1e20], sizes=7, seq_len=2048, batch_size=256,
                  eval_batches=64, tokens_per_param=20.0, widths=list(arch_compare.WIDTHS[1:])),
  }
  if args.preset not in presets:
    raise errors.ConfigError(f'preset={args.preset!r} is not one of {sorted(presets)} '
                             f'(configs/sweeps/diffusion_vs_ar.py)')
  sweep = ml_collections.ConfigDict(presets[args.preset])
  sweep.name = f'diffusion_vs_ar_{args.preset}'
  sweep.architectures = list(ARCHITECTURES)
  sweep.seeds = [0]
  sweep.baseline = 'ar'
  sweep.max_layers = 48 if args.preset == 'pod' else 12
  sweep.lr_rule = '3e-3 * sqrt(128 / d)'
  return sweep


def size_overrides(architecture: str, d: int, sweep: ml_collections.ConfigDict) -> dict:
  """arch_compare's llama ladder at width `d`, plus the architecture's objective fields."""
  return {**arch_compare.size_overrides('llama', d, sweep),
          **ARCHITECTURES[architecture]['overrides']}
