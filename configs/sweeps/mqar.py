"""MQAR as Zoology runs it: `python -m experiments.sweep --sweep=THIS_FILE:preset=PRESET --dir=D`,
then `python -m experiments.evaluate --sweep_dir=D` and `python -m experiments.report --dir=D`.

Every model of configs/sweeps/capability.py (attention, sliding window, MoE, gated DeltaNet,
Mamba-2 and their hybrids; a sublayer that lands joins there) is trained from scratch on a
mixture of Zoology's training settings, padded to the longest, at each learning rate of
Zoology's grid (np.logspace(-3, -1.5, 4): 1e-3, 3.2e-3, 1e-2, 3.2e-2; weight decay 0.1),
2 blocks of (mixer, MLP) at one width, per seed. Scored on Zoology's test settings
(`eval_tasks`, the held-out split). Optimizer: archlab's AdamW, 5% warmup then cosine to 10%
(Zoology's default schedule differs; the grid and weight decay are Zoology's).

Arguments: `preset=` one of

  micro    one model (attention), one learning rate (1e-2), MQAR at vocabulary 64, length 32,
           4 pairs, d=32, 1 seed: the plan tests/test_capability_sweeps.py runs end to end.
  cpu      every model, Zoology's grid, Zoology's first training setting (64, 4) with its
           100,000 instances at vocabulary 1024 (8192's output layer is 80% of a step at
           this width), d=64, batch 64, 2e12 FLOPs (about 800 steps of attention), 1 seed;
           tested on Zoology's length-64 settings (64, 4), (64, 8), (64, 16): 7 x 4 = 28
           runs (the committed result in experiments/results/mqar_cpu_2026-12-04).
  zoology  the paper's protocol: (64, 4), (128, 8), (256, 16), (256, 32), (256, 64) at
           vocabulary 8192, 100,000 + 4 x 20,000 training instances, d=128, batch 256,
           1.5e16 FLOPs (about Zoology's 32 epochs of them), 3 seeds; tested on (64, 4),
           (64, 8), (64, 16), (128, 32), (256, 64). For a cluster (`--print_commands`).

and `models=a+b` to restrict the models (names of capability.MODELS).
"""

from __future__ import annotations

import numpy as np

from configs import common
from configs.sweeps import capability

ZOOLOGY_LRS = tuple(float(f'{x:.4g}') for x in np.logspace(-3, -1.5, 4))
GRID = [(lr, 0.1) for lr in ZOOLOGY_LRS]
LAYOUT = 'zoology'  # configs/sweeps/capability.py: BaseConv before each mixer, no MLP
_TRAIN = {  # Zoology's training mixture: (length, pairs, instances)
    'zoology': ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000),
                (256, 64, 20_000)),
    'cpu': ((64, 4, 100_000),),
}


def _mixture(settings, vocab: int) -> str:
  return ';'.join(f'mqar:vocab_size={vocab},seq_len={t},num_kv_pairs={p},num_train={n}'
                  for t, p, n in settings)


TASKS = {
    'mqar': _mixture(_TRAIN['zoology'], 8192),
    'mqar_cpu': _mixture(_TRAIN['cpu'], 1024),
    'mqar_micro': 'mqar:vocab_size=64,seq_len=32,num_kv_pairs=4,num_train=4000',
}
ARCHITECTURES = capability.architectures(TASKS, GRID + [(1e-2, 0.0)])


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, preset='micro', models='')
  presets = {
      'micro': dict(models=['attention'], task='mqar_micro', grid=[(1e-2, 0.0)], widths=[32],
                    budgets=[2e9], seeds=[0], seq_len=32, batch_size=16, eval_batches=1,
                    eval_tasks=['mqar:vocab_size=64,seq_len=32,num_kv_pairs=4']),
      'cpu': dict(models=None, task='mqar_cpu', grid=GRID, widths=[64], budgets=[2e12],
                  seeds=[0], seq_len=64, batch_size=64, eval_batches=4,
                  eval_tasks=[f'mqar:vocab_size=1024,seq_len=64,num_kv_pairs={p}'
                              for p in (4, 8, 16)]),
      'zoology': dict(models=None, task='mqar', grid=GRID, widths=[128], budgets=[1.5e16],
                      seeds=[0, 1, 2], seq_len=256, batch_size=256, eval_batches=4,
                      eval_tasks=[f'mqar:seq_len={t},num_kv_pairs={p}'
                                  for t, p in ((64, 4), (64, 8), (64, 16), (128, 32),
                                               (256, 64))]),
  }
  chosen = capability.select([args.preset], 'preset', presets)[0]
  p = dict(presets[chosen])
  models = capability.select([m for m in args.models.split('+') if m] or p.pop('models'),
                             'model', capability.MODELS)
  p.pop('models', None)
  task, grid = p.pop('task'), p.pop('grid')
  sweep = capability.sweep_config('mqar', chosen, models=models, tasks=[task], grid=grid,
                                  architectures_=ARCHITECTURES, **p)
  sweep.layers, sweep.window, sweep.max_layers = 2, 16, 2
  sweep.layout = LAYOUT
  return sweep


def size_overrides(architecture: str, d: int, sweep) -> dict:
  return capability.size_overrides(ARCHITECTURES[architecture], d, sweep)
