"""Runs an isoFLOP sweep: one `train.py` process per run, each in its own workdir.

  python -m experiments.sweep --sweep=configs/sweeps/arch_compare.py:preset=quick --dir=SWEEP_DIR
  python -m experiments.sweep --sweep=...:preset=cpu_small --dir=DIR --dry_run
  python -m experiments.sweep --sweep=...:preset=pod --dir=DIR --print_commands

Running the same command again skips finished runs (their `summary.json` exists) and resumes
interrupted ones from their checkpoints, also after the runner itself was killed (SIGKILL
included: each train.py gets SIGKILL when the runner dies, on Linux, so no orphan holds a
run's workdir lock; its periodic checkpoints stay). A run that fails is tried again up to
`--retries` times, then recorded in `DIR/sweep.json` as failed with the last line of each
attempt's error, and the others go on (a re-run of the sweep tries it again). `DIR/sweep.json` lists
every run with N (parameters), D (tokens), C (FLOPs) and its command; `experiments.report`
reads it.

The runner reads everything about the models from the sweep file that `--sweep` names: its
`ARCHITECTURES` and its size rule `size_overrides(architecture, width, sweep)`, which may set
any config field (configs/sweeps/arch_compare.py states the interface). From Python:

  sweep, module = sweep_lib.load_sweep('configs/sweeps/arch_compare.py:preset=quick')
  runs = sweep_lib.plan(module, sweep, sweep_dir)
  sweep_lib.execute(module, sweep, runs, sweep_dir)
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import types

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import tqdm

import errors
import experiments
import models
from trainer import flops as flops_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_START_UP_SECONDS = 10  # process start, data cache, compilation: measured 8-12 s here

_SWEEP = config_flags.DEFINE_config_file('sweep', None, 'Sweep file with arguments, e.g. '
                                         'configs/sweeps/arch_compare.py:preset=quick')
# experiments.report defines the same --dir; a process importing both (tests) shares it.
_DIR = (flags.FLAGS['dir'] if 'dir' in flags.FLAGS else
        flags.DEFINE_string('dir', None, 'Sweep directory: one workdir per run and sweep.json.'))
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs at once.')
_RETRIES = flags.DEFINE_integer('retries', 2, 'Times a failed run is tried again before it is '
                                'left failed.')
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


# What the runner reads from a sweep config; anything else in it is the sweep module's own.
SWEEP_FIELDS = ('architectures', 'budgets', 'widths', 'sizes', 'seeds', 'tokens_per_param',
                'seq_len', 'batch_size', 'eval_batches')


def load_sweep(path_with_args: str) -> tuple[ml_collections.ConfigDict, types.ModuleType]:
  """The sweep config and module of `'PATH:ARGS'`, `--sweep`'s syntax (PATH relative to the
  working directory, else to the repository root)."""
  path, has_args, arg = path_with_args.partition(':')
  module = load_module(path)
  if not callable(getattr(module, 'get_config', None)):
    raise errors.ConfigError(f'sweep file {path} has no get_config(arg)')
  return (module.get_config(arg) if has_args else module.get_config()), module


def load_module(path: str) -> types.ModuleType:
  """Executes the sweep file at `path` as a module and checks its interface (`check_module`)."""
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(ROOT, path)
  if not os.path.isfile(path):
    raise errors.ConfigError(f'sweep file {path} does not exist')
  name = 'archlab_sweep_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  check_module(module)
  return module


def check_module(module) -> None:
  """Refuses, in one line naming the file, a sweep module (or any object: a notebook's
  namespace) without `ARCHITECTURES` entries holding `config` and `arg`, or `size_overrides`."""
  where = _where(module)
  missing = [n for n in ('ARCHITECTURES', 'size_overrides') if not hasattr(module, n)]
  if missing:
    raise errors.ConfigError(
        f'sweep file {where} has no {" and no ".join(missing)}: a sweep module defines '
        f'ARCHITECTURES (name -> dict(config=FILE, arg=ARG, ...)) and '
        f'size_overrides(architecture, width, sweep) -> {{dotted field: value}}')
  if not isinstance(module.ARCHITECTURES, dict) or not callable(module.size_overrides):
    raise errors.ConfigError(f'sweep file {where}: ARCHITECTURES must be a dict and '
                             f'size_overrides a function')
  for name, arch in module.ARCHITECTURES.items():
    lacks = [k for k in ('config', 'arg') if not isinstance(arch, dict) or k not in arch]
    if lacks:
      raise errors.ConfigError(f'sweep file {where}: ARCHITECTURES[{name!r}] has no '
                               f'{" and no ".join(lacks)} (the config file and argument its '
                               f'runs start from)')


def size_overrides(module, architecture: str, width: int, sweep) -> dict:
  """The module's size rule at `width`, every field checked against the architecture's config."""
  overrides = dict(module.size_overrides(architecture, width, sweep))
  _configured(module, architecture, overrides,
              f'sweep file {_where(module)}: architecture {architecture!r} at width {width}')
  return overrides


def model_size(module, architecture: str, overrides: dict, seq_len: int) -> tuple[int, int, float]:
  """(parameters, non-embedding parameters, training FLOPs per token) of one ladder size."""
  config = _configured(module, architecture, overrides, f'architecture {architecture!r}')
  config.model.max_len = seq_len
  config.model.vocab_size = config.model.vocab_size or 260  # the byte tokenizer's
  key = (config.model.to_json(), seq_len)
  if key not in _SIZES:  # a ladder is planned once per budget and often again (dry runs, tests)
    model = models.build(config.model)
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(
        jax.random.key(0), dummy, positions_BT=dummy, segment_ids_BT=dummy + 1))['params'])
    counts = flops_lib.count_params(params)
    _SIZES[key] = (counts['params'], counts['params_non_embedding'],
                   flops_lib.train_flops_per_token(model.cfg, seq_len))
  return _SIZES[key]


_SIZES: dict = {}  # (model config JSON, seq_len) -> model_size


def plan(module, sweep, sweep_dir: str) -> list[Run]:
  """Every run of the sweep, sizes centred on the expected optimum of each budget."""
  check_module(module)
  missing = [f for f in SWEEP_FIELDS if f not in sweep]
  if missing:
    raise errors.ConfigError(f'the sweep config of {_where(module)} has no {missing}')
  runs = []
  for architecture in sweep.architectures:
    if architecture not in module.ARCHITECTURES:
      raise errors.ConfigError(f'sweep architecture {architecture!r} is not one of '
                               f'{sorted(module.ARCHITECTURES)} ({_where(module)})')
    ladder = []
    for d in sweep.widths:
      overrides = size_overrides(module, architecture, d, sweep)
      ladder.append((d, overrides, *model_size(module, architecture, overrides, sweep.seq_len)))
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
              command=command(module, sweep, architecture, overrides, budget, fpt, seed,
                              os.path.join(sweep_dir, 'runs', name))))
  return runs


def command(module, sweep, architecture: str, overrides: dict, budget: float,
            train_flops_per_token: float, seed: int, workdir: str) -> list[str]:
  """The train.py command of one run: the budget in FLOPs, warmup 5% of its steps, four
  evaluations and checkpoints along the way."""
  arch = module.ARCHITECTURES[architecture]
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


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True) if sys.platform.startswith(
    'linux') else None


def _die_with_runner():
  """In the child between fork and exec: SIGKILL when the thread that started it (the
  runner) dies, so a killed runner leaves no orphan training (Linux's PR_SET_PDEATHSIG)."""
  if _LIBC is not None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def run_one(run: Run, workdir: str, retries: int = 0) -> dict:
  """Runs (or resumes) one training process, `retries` more times while it fails; returns its
  status record (a failure keeps the last line of each attempt's error)."""
  summary_path = os.path.join(workdir, 'summary.json')
  if os.path.exists(summary_path):
    return {'status': 'finished', 'skipped': True}
  os.makedirs(workdir, exist_ok=True)
  start, errors_seen = time.time(), []
  for attempt in range(1, retries + 2):
    with open(os.path.join(workdir, 'train.log'), 'a') as log:
      proc = subprocess.run(run.command, stdout=log, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=_die_with_runner)
      log.write(proc.stderr)
    if not proc.returncode:
      return {'status': 'finished', 'skipped': False, 'attempts': attempt,
              'seconds': time.time() - start, **({'errors': errors_seen} if errors_seen else {})}
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    errors_seen.append(lines[-1] if lines else f'exit code {proc.returncode}')
    if proc.returncode == errors.Preempted.exit_code:  # a signal for the whole job: stop here
      return {'status': 'preempted', 'error': errors_seen[-1], 'attempts': attempt,
              'errors': errors_seen, 'seconds': time.time() - start}
  return {'status': 'failed', 'error': errors_seen[-1], 'attempts': retries + 1,
          'errors': errors_seen, 'seconds': time.time() - start}


def write_state(module, sweep_dir: str, sweep, runs: list[Run], status: dict) -> None:
  """`sweep.json`, written atomically: the sweep file and config, code version, runs and their
  status."""
  state = {
      'sweep': sweep.to_dict(),
      'sweep_file': _where(module),
      'code_version': experiments.code_version(),
      'command': ' '.join(sys.argv),
      'runs': [{**r.to_dict(), **status.get(r.name, {'status': 'pending'})} for r in runs],
  }
  tmp = os.path.join(sweep_dir, 'sweep.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(state, f, indent=1)
  os.replace(tmp, os.path.join(sweep_dir, 'sweep.json'))


def execute(module, sweep, runs: list[Run], sweep_dir: str, parallel: int = 1,
            retries: int = 0) -> list[str]:
  """Runs what is not finished, `parallel` at a time, each failed run tried `retries` more
  times; returns the names of the runs that did not finish."""
  os.makedirs(sweep_dir, exist_ok=True)
  status = {}
  write_state(module, sweep_dir, sweep, runs, status)
  bar = tqdm.tqdm(total=len(runs), unit='run', dynamic_ncols=True, disable=None)
  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    futures = {pool.submit(run_one, r, os.path.join(sweep_dir, 'runs', r.name), retries): r
               for r in runs}
    for future in concurrent.futures.as_completed(futures):
      r = futures[future]
      status[r.name] = future.result()
      if status[r.name]['status'] != 'finished':
        tqdm.tqdm.write(f'{r.name} {status[r.name]["status"]} after '
                        f'{status[r.name]["attempts"]} attempt(s): {status[r.name]["error"]}')
      bar.update(1)
      write_state(module, sweep_dir, sweep, runs, status)
  bar.close()
  return sorted(name for name, s in status.items() if s['status'] != 'finished')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  errors.run_main('sweep', _main)


def _main():
  if _SWEEP.value is None or not _DIR.value:
    raise errors.ConfigError('--sweep and --dir are required')
  sweep, sweep_dir = _SWEEP.value, os.path.abspath(_DIR.value)
  # The flag's file name keeps its ':ARGS'; the flag's value already holds get_config(ARGS).
  module = load_module(config_flags.get_config_filename(flags.FLAGS['sweep']).split(':', 1)[0])
  runs = plan(module, sweep, sweep_dir)
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

  if _RETRIES.value < 0:
    raise errors.ConfigError(f'--retries={_RETRIES.value} must be >= 0')
  failed = execute(module, sweep, runs, sweep_dir, _PARALLEL.value, _RETRIES.value)
  print(f'{len(runs) - len(failed)} of {len(runs)} runs finished in {sweep_dir}'
        + (f'; failed: {", ".join(failed)}' if failed else ''))
  if failed:
    sys.exit(1)


def _where(module) -> str:
  """How an error names a sweep module: its file, else its name."""
  return getattr(module, '__file__', None) or getattr(module, '__name__', None) or repr(module)


def _configured(module, architecture: str, overrides: dict, context: str):
  """The architecture's config with `overrides` set; a field the config lacks (or a value of
  the wrong type) is refused in one line that begins with `context`."""
  arch = module.ARCHITECTURES[architecture]
  config = _load_config(arch['config'], arch['arg'])
  for field, value in overrides.items():
    *parents, leaf = field.split('.')
    node = config
    for key in parents:
      node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      siblings = ['.'.join([*parents, k]) for k in node.keys()] if isinstance(
          node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(field, siblings, n=1)
      raise errors.ConfigError(
          f'{context}: the size rule sets {field!r}, a field {arch["config"]}:{arch["arg"]} '
          f'does not have' + (f'; did you mean {close[0]!r}?' if close else ''))
    try:
      node[leaf] = value
    except TypeError as e:
      raise errors.ConfigError(f'{context}: the size rule sets {field}={value!r}: '
                               f'{str(e).splitlines()[0]}') from None
  return config


def _load_config(path: str, arg: str):
  """`get_config(arg)` of the config file at `path` (relative to the repository root)."""
  spec = importlib.util.spec_from_file_location('sweep_arch_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.flags_parser('sweep'))
