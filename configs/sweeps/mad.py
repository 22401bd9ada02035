"""The MAD protocol: `python -m experiments.sweep --sweep=THIS_FILE:preset=PRESET --dir=D`, then
`python -m experiments.evaluate --sweep_dir=D` and `python -m experiments.report --dir=D`.

Every model of configs/sweeps/capability.py is trained from scratch on each MAD task at its
baseline (input_pipeline/tasks/mad.py) over MAD's grid, learning rates 1e-4, 5e-4, 1e-3 x
weight decay 0, 0.1, and scored on the task's held-out instances (its `test` split); the
report keeps the best grid point per model, task and seed. Compression trains each model
as MAD does, as the encoder of its autoencoder (`model.autoencoder=True`: the last token's
vector decoded at every position; models/layers/autoencoder.py). MAD trains 200 epochs of 12,800 instances (256 for memorization) at batch 128;
the `mad` preset's budget is that many tokens at d=128 with 2 blocks of (mixer, MLP).

Arguments: `preset=` one of

  micro  attention on in-context recall at length 32, one grid point (1e-3, 0), d=32, 1 seed.
  cpu    with `task=NAME`: every model on one task at its own length, one grid point
         (lr 1e-3, weight decay 0.1, the grid's largest step, for a short run), d=64,
         batch 32, about 1,000 steps of attention (at most a 75th of MAD's epochs; 125 of
         memorization's 256 rows), 1 seed:
         7 runs a task (the committed result in experiments/results/mad_cpu_2026-12-04).
  mad    every model, the six tasks, the 6-point grid, d=128, 3 seeds, rows of the longest
         task (256; shorter tasks are padded). `task=NAME` runs one task at its own length
         with MAD's budget for it.

and `models=a+b` to restrict the models (names of capability.MODELS).
"""

from __future__ import annotations

import errors
from configs import common
from configs.sweeps import capability

GRID = [(lr, wd) for lr in (1e-4, 5e-4, 1e-3) for wd in (0.0, 0.1)]
LAYOUT = 'mad'  # configs/sweeps/capability.py: (mixer, MLP) blocks
# task -> (spec, row length, training instances)
MAD_TASKS = {
    'in_context_recall': ('in_context_recall', 128, 12_800),
    'fuzzy_recall': ('fuzzy_recall', 128, 12_800),
    'noisy_recall': ('noisy_recall', 128, 12_800),
    'selective_copying': ('selective_copying', 256, 12_800),
    'memorization': ('memorization', 32, 256),
    'compression': ('compression', 32, 12_800),
}
_EPOCHS = 200
# Training FLOPs per token of the d=128 2-block attention model at these lengths, about 6 N
# with N ~ 0.4M non-embedding parameters plus attention: a budget of MAD's epochs.
_FLOPS_PER_TOKEN = 2.6e6
TASKS = {name: spec for name, (spec, _, _) in MAD_TASKS.items()}
TASKS['recall_micro'] = 'in_context_recall:seq_len=32'
ARCHITECTURES = capability.architectures(TASKS, GRID)


def _budget(task: str) -> float:
  _, length, n = MAD_TASKS[task]
  return float(f'{_EPOCHS * n * length * _FLOPS_PER_TOKEN:.2g}')


# Training FLOPs per token of the d=64 2-block attention model at length T, about
# 6.6e5 + 1150 T (read off its plans; the step count is checked in
# tests/test_capability_sweeps.py): the cpu budget is 1,000 steps of it.
_CPU_STEPS, _CPU_BATCH = 1000, 32


def _cpu_budget(task: str) -> float:
  length = MAD_TASKS[task][1]
  return float(f'{_CPU_STEPS * _CPU_BATCH * length * (6.6e5 + 1150 * length):.2g}')


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, preset='micro', models='', task='')
  if args.preset == 'micro':
    p = dict(models=['attention'], tasks=['recall_micro'], grid=[(1e-3, 0.0)], widths=[32],
             budgets=[2e9], seeds=[0], seq_len=32, batch_size=16, eval_batches=1)
  elif args.preset == 'cpu':
    if not args.task:
      raise errors.ConfigError(f'mad preset=cpu needs task= one of {sorted(MAD_TASKS)} (each '
                               'task is its own sweep, at its own length)')
    task, = capability.select([args.task], 'task', MAD_TASKS)
    p = dict(models=None, tasks=[task], grid=[(1e-3, 0.1)], widths=[64], seeds=[0],
             budgets=[_cpu_budget(task)], seq_len=MAD_TASKS[task][1], batch_size=_CPU_BATCH,
             eval_batches=2)
  else:
    capability.select([args.preset], 'preset', ('micro', 'cpu', 'mad'))
    tasks = capability.select([args.task] if args.task else None, 'task', MAD_TASKS)
    p = dict(models=None, tasks=tasks, grid=GRID, widths=[128], seeds=[0, 1, 2],
             budgets=[_budget(args.task) if args.task else max(map(_budget, MAD_TASKS))],
             seq_len=max(MAD_TASKS[t][1] for t in tasks), batch_size=128, eval_batches=2)
  models = capability.select([m for m in args.models.split('+') if m] or p.pop('models'),
                             'model', capability.MODELS)
  p.pop('models', None)
  sweep = capability.sweep_config('mad', args.preset, models=models, tasks=p.pop('tasks'),
                                  grid=p.pop('grid'), architectures_=ARCHITECTURES, **p)
  sweep.layers, sweep.window, sweep.max_layers = 2, 16, 2
  sweep.layout = LAYOUT
  sweep.eval_tasks = []  # each run is scored on the task it trained on
  return sweep


def size_overrides(architecture: str, d: int, sweep) -> dict:
  return capability.size_overrides(ARCHITECTURES[architecture], d, sweep)
