"""Runs an isoFLOP sweep: one `train.py` process per run, each in its own workdir.

  python -m experiments.sweep --sweep=configs/sweeps/arch_compare.py:preset=quick --dir=SWEEP_DIR
  python -m experiments.sweep --sweep=...:preset=cpu_small --dir=DIR --dry_run
  python -m experiments.sweep --sweep=...:preset=pod --dir=DIR --print_commands

Running the same command again skips finished runs (their `summary.json` exists) and resumes
interrupted ones from their checkpoints; a failed run is recorded in `DIR/sweep.json` with the
last line of its error and the others go on (a re-run tries it again). `DIR/sweep.json` lists
every run with N (parameters), D (tokens), C (FLOPs) and its command; `experiments.report`
reads it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import tqdm

import errors
import experiments
import models
from configs import common
from configs.sweeps import arch_compare
from trainer import flops as flops_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_START_UP_SECONDS = 10  # process start, data cache, compilation: measured 8-12 s here

_SWEEP = config_flags.DEFINE_config_file('sweep', None, 'Sweep file with arguments, e.g. '
                                         'configs/sweeps/arch_compare.py:preset=quick')
# experiments.report defines the same --dir; a process importing both (tests) shares it.
_DIR = (flags.FLAGS['dir'] if 'dir' in flags.FLAGS else
        flags.DEFINE_string('dir', None, 'Sweep directory: one workdir per run and sweep.json.'))
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs at once.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'List the runs with N, D, C and an estimated time.')
_PRINT = flags.DEFINE_bool('print_commands', False, 'Print one command per run and exit.')
_MFU = flags.DEFINE_float('assumed_mfu', 0.15, 'MFU assumed by --dry_run time estimates.')


@dataclasses.dataclass
class Run:
  """One point of the sweep."""
  name: str
  architecture: str
  budget: float
  width: int
  seed: int
  params: int
  params_non_embedding: int
  train_flops_per_token: float
  tokens: float
  command: list[str]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def model_size(architecture: str, overrides: dict, seq_len: int) -> tuple[int, int, float]:
  """(parameters, non-embedding parameters, training FLOPs per token) of one ladder size."""
  arch = arch_compare.ARCHITECTURES[architecture]
  config = _load_config(arch['config'], arch['arg'])
  for field, value in overrides.items():
    common.set_field(config, field, value)
  config.model.max_len = seq_len
  config.model.vocab_size = config.model.vocab_size or 260  # the byte tokenizer's
  model = models.build(config.model)
  dummy = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), dummy, positions_BT=dummy, segment_ids_BT=dummy + 1))['params'])
  counts = flops_lib.count_params(params)
  return (counts['params'], counts['params_non_embedding'],
          flops_lib.train_flops_per_token(model.cfg, seq_len))


def plan(sweep, sweep_dir: str) -> list[Run]:
  """Every run of the sweep, sizes centred on the expected optimum of each budget."""
  runs = []
  for architecture in sweep.architectures:
    if architecture not in arch_compare.ARCHITECTURES:
      raise errors.ConfigError(f'sweep architecture {architecture!r} is not one of '
                       f'{sorted(arch_compare.ARCHITECTURES)}')
    ladder = []
    for d in sweep.widths:
      overrides = arch_compare.size_overrides(architecture, d, sweep.max_layers)
      ladder.append((d, overrides, *model_size(architecture, overrides, sweep.seq_len)))
    for budget in sweep.budgets:
      target = math.sqrt(budget / (6 * sweep.tokens_per_param))
      centre = min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i][2] / target)))
      first = min(max(0, centre - sweep.sizes // 2), max(0, len(ladder) - sweep.sizes))
      for d, overrides, n, n_non_embedding, fpt in ladder[first:first + sweep.sizes]:
        for seed in sweep.seeds:
          name = f'{architecture}_C{budget:.0e}_d{d}_s{seed}'.replace('+', '')
          runs.append(Run(
              name=name, architecture=architecture, budget=budget, width=d, seed=seed,
              params=n, params_non_embedding=n_non_embedding, train_flops_per_token=fpt,
              tokens=budget / fpt,
              command=command(sweep, architecture, overrides, budget, fpt, seed,
                              os.path.join(sweep_dir, 'runs', name))))
  return runs


def command(sweep, architecture: str, overrides: dict, budget: float, train_flops_per_token: float,
            seed: int, workdir: str) -> list[str]:
  """The train.py command of one run: the budget in FLOPs, warmup 5% of its steps, four
  evaluations and checkpoints along the way."""
  arch = arch_compare.ARCHITECTURES[architecture]
  steps = math.ceil(budget / (train_flops_per_token * sweep.batch_size * sweep.seq_len))
  fields = {
      **overrides,
      'model.max_len': sweep.seq_len,
      'optim.warmup_steps': max(1, round(0.05 * steps)),
      'train.eval_every': max(1, steps // 4),
      'train.checkpoint_every': max(1, steps // 4),
      'data.seq_len': sweep.seq_len,
      'data.eval_batches': sweep.eval_batches,
      'train.batch_size': sweep.batch_size,
      'train.steps': 0,
      'train.flops': budget,
      'train.seed': seed,
      'train.progress_bar': False,
  }
  return [sys.executable, os.path.join(ROOT, 'train.py'),
          f'--config={os.path.join(ROOT, arch["config"])}:{arch["arg"]}', f'--workdir={workdir}',
          *(f'--config.{k}={v}' for k, v in fields.items())]


def run_one(run: Run, workdir: str) -> dict:
  """Runs (or resumes) one training process; returns its status record."""
  summary_path = os.path.join(workdir, 'summary.json')
  if os.path.exists(summary_path):
    return {'status': 'finished', 'skipped': True}
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  with open(os.path.join(workdir, 'train.log'), 'a') as log:
    proc = subprocess.run(run.command, stdout=log, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log.write(proc.stderr)
  if proc.returncode:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return {'status': 'failed', 'error': lines[-1] if lines else f'exit code {proc.returncode}',
            'seconds': time.time() - start}
  return {'status': 'finished', 'skipped': False, 'seconds': time.time() - start}


def write_state(sweep_dir: str, sweep, runs: list[Run], status: dict) -> None:
  """`sweep.json`, written atomically: the sweep config, code version, runs and their status."""
  state = {
      'sweep': sweep.to_dict(),
      'code_version': experiments.code_version(),
      'command': ' '.join(sys.argv),
      'runs': [{**r.to_dict(), **status.get(r.name, {'status': 'pending'})} for r in runs],
  }
  tmp = os.path.join(sweep_dir, 'sweep.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(state, f, indent=1)
  os.replace(tmp, os.path.join(sweep_dir, 'sweep.json'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _SWEEP.value is None or not _DIR.value:
    sys.exit('sweep: error: --sweep and --dir are required')
  sweep, sweep_dir = _SWEEP.value, os.path.abspath(_DIR.value)
  try:
    runs = plan(sweep, sweep_dir)
  except ValueError as e:
    sys.exit(f'sweep: error: {e}')
  if _PRINT.value:
    for r in runs:
      print(' '.join(r.command))
    return
  if _DRY_RUN.value:
    peak = flops_lib.measure_matmul_peak()
    total = 0.0
    print(f'{"run":32s} {"N":>10s} {"D":>12s} {"C":>9s} {"est. time":>10s}')
    for r in runs:
      seconds = _START_UP_SECONDS + r.budget / (peak * _MFU.value)
      total += seconds
      print(f'{r.name:32s} {r.params:10,d} {r.tokens:12,.0f} {r.budget:9.1e} {seconds / 60:9.1f}m')
    print(f'{len(runs)} runs, about {total / 60 / max(1, _PARALLEL.value):.0f} minutes at '
          f'{_MFU.value:.0%} of the measured {peak / 1e9:.0f} GFLOP/s matmul peak '
          f'(--assumed_mfu) plus {_START_UP_SECONDS} s of start-up each')
    return

  failed = execute(sweep, runs, sweep_dir, _PARALLEL.value)
  print(f'{len(runs) - len(failed)} of {len(runs)} runs finished in {sweep_dir}'
        + (f'; failed: {", ".join(failed)}' if failed else ''))
  if failed:
    sys.exit(1)


def execute(sweep, runs: list[Run], sweep_dir: str, parallel: int = 1) -> list[str]:
  """Runs what is not finished, `parallel` at a time; returns the names of failed runs."""
  os.makedirs(sweep_dir, exist_ok=True)
  status = {}
  write_state(sweep_dir, sweep, runs, status)
  bar = tqdm.tqdm(total=len(runs), unit='run', dynamic_ncols=True, disable=None)
  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    futures = {pool.submit(run_one, r, os.path.join(sweep_dir, 'runs', r.name)): r for r in runs}
    for future in concurrent.futures.as_completed(futures):
      r = futures[future]
      status[r.name] = future.result()
      if status[r.name]['status'] == 'failed':
        tqdm.tqdm.write(f'{r.name} failed: {status[r.name]["error"]}')
      bar.update(1)
      write_state(sweep_dir, sweep, runs, status)
  bar.close()
  return sorted(name for name, s in status.items() if s['status'] == 'failed')


def _load_config(path: str, arg: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('sweep_arch_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


if __name__ == '__main__':
  app.run(main)
