"""How much attention does a hybrid need? `python -m experiments.sweep --sweep=THIS_FILE:PRESET`.

At a fixed compute budget and model size, the fraction of the mixer layers that are global
attention varies over FRACTIONS (0, 1/8, 1/4, 1/2, 1) in two hybrids: gated DeltaNet (`G`,
from `deltanet_hybrid_tiny`) and Mamba-2 (`M`, from `mamba2_hybrid_tiny`), each layer a mixer
(or `A`) then a SwiGLU MLP, the attention layers spread evenly with each last in its group
(`configs.common.hybrid_pattern`: 1/4 of 8 layers is GFGFGFAF GFGFGFAF). Fraction 1 is the
same llama-style transformer in both families; fraction 0 is the pure mixer stack.

Every run of a budget gets the same training FLOPs (`train.flops`; an attention layer costs
more per token than a mixer at these lengths, so its runs see slightly fewer tokens) and the
same width and depth: only the attention fraction and the seed change. `experiments.report`
plots validation bits per byte against the fraction, one line per mixer, with the spread
over seeds (`attention_ratio.png`, and a table in report.md).

Presets:
  quick  width 64, 8 layers, budget 1e11 FLOPs, 2 seeds: 20 runs, a smoke-sized answer (the
         run recorded in README took 17 minutes with --parallel=2 on 2 cores beside other jobs).
  cpu    width 128, 8 layers, budgets 1e12 and 3e12, 3 seeds: 60 runs, about an hour here.
  pod    width 1024, 24 layers (multiples of 8 keep every fraction exact), budgets 1e19 and
         1e20, 3 seeds: for `--print_commands` and a scheduler.

The size rule is arch_compare's (configs/sweeps/arch_compare.py): heads of 16 below d=256 and
64 from there (half as many kv heads), MLP 8d/3 rounded to 16, learning rate
3e-3 * sqrt(128 / d); Mamba-2 heads of the same head dim, expand 2, state 32.
"""

from __future__ import annotations

import ml_collections

import errors
from configs import common

FRACTIONS = (0.0, 0.125, 0.25, 0.5, 1.0)
# name -> (pattern character of the mixer, the preset its runs start from)
MIXERS = {'deltanet': ('G', 'deltanet_hybrid_tiny'), 'mamba2': ('M', 'mamba2_hybrid_tiny')}


def architecture_name(mixer: str, fraction: float) -> str:
  """'deltanet_a1_8' for 1/8 (no dots: the names become run directories and config keys)."""
  labels = {0.0: '0', 0.125: '1_8', 0.25: '1_4', 0.5: '1_2', 1.0: '1'}
  return f'{mixer}_a{labels[fraction]}'


ARCHITECTURES = {
    architecture_name(mixer, f): dict(
        config='configs/transformer.py', arg=f'preset={preset},attention_fraction={f}',
        mixer=mixer, char=char, attention_fraction=f)
    for mixer, (char, preset) in MIXERS.items() for f in FRACTIONS}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, preset='quick')
  presets = {
      'quick': dict(widths=[64], layers=8, budgets=[1e11], seeds=[0, 1], seq_len=64,
                    batch_size=8, eval_batches=4),
      'cpu': dict(widths=[128], layers=8, budgets=[1e12, 3e12], seeds=[0, 1, 2], seq_len=128,
                  batch_size=16, eval_batches=16),
      'pod': dict(widths=[1024], layers=24, budgets=[1e19, 1e20], seeds=[0, 1, 2],
                  seq_len=4096, batch_size=256, eval_batches=64),
  }
  if args.preset not in presets:
    raise errors.ConfigError(f'preset={args.preset!r} is not one of {sorted(presets)} '
                             f'(configs/sweeps/attention_ratio.py)')
  sweep = ml_collections.ConfigDict(presets[args.preset])
  sweep.name = f'attention_ratio_{args.preset}'
  sweep.architectures = list(ARCHITECTURES)
  sweep.sizes = 1  # one width: compute and size fixed, the fraction varies
  sweep.tokens_per_param = 20.0  # unused with one width (the plan centres on it)
  sweep.baseline = architecture_name('deltanet', 1.0)  # the all-attention stack
  sweep.max_layers = sweep.layers
  sweep.lr_rule = '3e-3 * sqrt(128 / d)'
  # What experiments.report plots: architecture -> its mixer and attention fraction.
  sweep.attention_fraction = {a: arch['attention_fraction'] for a, arch in ARCHITECTURES.items()}
  sweep.mixer = {a: arch['mixer'] for a, arch in ARCHITECTURES.items()}
  return sweep


def size_overrides(architecture: str, d: int, sweep: ml_collections.ConfigDict) -> dict:
  """Width `d`, `sweep.layers` layers of which round(fraction x layers) are attention."""
  arch = ARCHITECTURES[architecture]
  head_dim = 16 if d < 256 else 64
  heads = max(1, d // head_dim)
  fields = {
      'model.d_model': d,
      'model.num_heads': heads,
      'model.num_kv_heads': heads // 2 if heads % 2 == 0 else heads,
      'model.head_dim': 0,
      'model.mlp_dim': 16 * round(8 * d / 3 / 16),
      'model.pattern': common.hybrid_pattern(arch['char'], arch['attention_fraction'],
                                             sweep.layers),
      'optim.lr': round(3e-3 * (128 / d) ** 0.5, 6),
  }
  if arch['char'] == 'M':
    fields.update({'model.mamba.num_heads': 2 * d // head_dim, 'model.mamba.head_dim': head_dim})
  return fields
