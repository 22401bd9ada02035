"""A sweep's scaling-law report: `report.md`, `fits.json` and PNG plots, written into its directory.

  python -m experiments.report --dir=SWEEP_DIR [--loss=bits_per_byte|nats] [--n_bootstrap=1000]
      [--loss_levels=2.9,3.1]

Reads `SWEEP_DIR/sweep.json` (written by `experiments.sweep`) and the `summary.json` of every run
that finished: N = parameters, D = tokens, C = training FLOPs as the trainer counted them, loss =
the final evaluation loss (bits per byte by default). Per architecture it fits approach 2
(isoFLOP parabolas, N* and D* against C), approach 3 (L = E + A/N^alpha + B/D^beta) and the
loss-versus-compute frontier (`experiments/scaling.py`), then every architecture's compute
multiplier against the sweep's baseline. Where the data cannot support a fit the report prints
the reason ("cannot fit: ...") instead of numbers. About 10 s per architecture at the default
1000 bootstrap resamples on 2 CPU cores (approach 3's refits are most of it).
"""

from __future__ import annotations

import os

# scipy's L-BFGS-B makes many tiny OpenBLAS calls that OpenBLAS's threads slow ~10x on a busy
# 2-core machine (scipy issue 22438); OpenBLAS reads this when it loads, so before numpy.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import matplotlib  # noqa: E402
matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

import experiments  # noqa: E402
from experiments import scaling  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --loss: the summary field read and how the report names its unit.
LOSSES = {'bits_per_byte': ('final_eval_bits_per_byte', 'bits per byte'),
          'nats': ('final_eval_loss', 'nats per token')}
LEVEL_QUANTILES = (0.25, 0.5, 0.75)  # default loss levels: inside the range all frontiers reached
# An approach-3 interval wider than this is flagged as not determined by the runs: a factor for
# E, A and B, a width for the exponents.
SPAN_FACTOR = 100.0
SPAN_EXPONENT = 1.0
MIN_POINTS_PER_PARAMETER = 3  # fewer runs than this per fitted parameter get a warning too

# experiments.sweep defines the same --dir; a process importing both (tests) shares it.
_DIR = (flags.FLAGS['dir'] if 'dir' in flags.FLAGS else
        flags.DEFINE_string('dir', None, 'Sweep directory (holds sweep.json and runs/).'))
_LOSS = flags.DEFINE_enum('loss', 'bits_per_byte', list(LOSSES), 'Which evaluation loss to fit.')
_N_BOOTSTRAP = flags.DEFINE_integer('n_bootstrap', 1000, 'Bootstrap resamples per interval.')
_LOSS_LEVELS = flags.DEFINE_list('loss_levels', [], 'Loss levels of the compute multipliers '
                                 '(default: three inside the range every frontier reached).')


class ReportError(Exception):
  """A sweep directory the report cannot read; the message is one line naming the path."""


@dataclasses.dataclass
class Sweep:
  """What `sweep.json` and the finished runs' summaries hold."""
  path: str
  config: dict
  code_version: str
  command: str
  runs: list[dict]  # sweep.json's records, with 'state': finished / failed / pending
  points: dict[str, list[dict]]  # architecture -> finished runs: name, N, D, C, loss, budget
  excluded: list[tuple[str, str]]  # finished runs left out of the fits, with the reason


@dataclasses.dataclass
class ArchitectureFits:
  isoflop: scaling.IsoflopFit
  parametric: scaling.ParametricFit | scaling.Unfittable
  frontier: scaling.Frontier


def load(sweep_dir: str, loss: str = 'bits_per_byte') -> Sweep:
  """Reads a sweep directory; raises ReportError (one line, naming the path) when it can't."""
  path = os.path.abspath(sweep_dir)
  if not os.path.isdir(path):
    raise ReportError(f'{path} is not a directory')
  state_path = os.path.join(path, 'sweep.json')
  try:
    with open(state_path) as f:
      state = json.load(f)
    runs, config = state['runs'], state['sweep']
    missing = next((k for r in runs for k in ('name', 'architecture', 'budget') if k not in r),
                   None)
    if missing:
      raise KeyError(f'a run has no {missing!r}')
  except FileNotFoundError:
    raise ReportError(f'{path} has no sweep.json (run experiments.sweep with --dir={path})'
                      ) from None
  except (ValueError, KeyError, TypeError) as e:
    raise ReportError(f'{state_path} is not a sweep record: {type(e).__name__}: {e}') from None
  field = LOSSES[loss][0]
  points, excluded = {}, []
  for run in runs:
    summary_path = os.path.join(path, 'runs', run['name'], 'summary.json')
    if not os.path.exists(summary_path):  # the runner's own test of a finished run
      run['state'] = 'failed' if run.get('status') == 'failed' else 'pending'
      continue
    run['state'] = 'finished'
    try:
      with open(summary_path) as f:
        summary = json.load(f)
      point = {'name': run['name'], 'N': float(summary['params']),
               'D': float(summary['tokens']), 'C': float(summary['flops']),
               'loss': float(summary[field]), 'budget': float(run['budget']),
               # A diffusion run's bits per byte are its NELBO, an upper bound on the NLL.
               'upper_bound': bool(summary.get('final_eval_bits_per_byte_is_upper_bound'))}
    except (ValueError, KeyError, TypeError) as e:
      excluded.append((run['name'], f'unreadable summary.json ({type(e).__name__}: {e})'))
      continue
    bad = [k for k in ('N', 'D', 'C', 'loss') if not (math.isfinite(point[k]) and point[k] > 0)]
    if bad:
      excluded.append((run['name'], ', '.join(f'{k}={point[k]}' for k in bad)
                       + ' (need finite and positive)'))
      continue
    points.setdefault(run['architecture'], []).append(point)
  if not points:
    counts = {s: sum(r['state'] == s for r in runs) for s in ('failed', 'pending')}
    raise ReportError(f'no finished runs in {path} ({len(runs)} planned: {counts["failed"]} '
                      f'failed, {counts["pending"]} pending, {len(excluded)} unusable summaries)')
  return Sweep(path, config, state.get('code_version', 'unknown'), state.get('command', ''), runs,
               points, excluded)


def load_recorded(path: str) -> Sweep:
  """The sweep a report recorded: `path/fits.json` (a committed result under
  experiments/results/, or a sweep directory the report has run on) holds every fitted run's
  N, D, C, loss and budget, so it refits without the runs' directories. Its loss is the one it
  was written for (`fits.json`'s `loss`). Raises ReportError (one line, naming the file)."""
  fits_path = os.path.join(os.path.abspath(path), 'fits.json')
  try:
    with open(fits_path) as f:
      recorded = json.load(f)
    points = {arch: [dict(p) for p in a['runs']] for arch, a in recorded['architectures'].items()}
    missing = next((k for ps in points.values() for p in ps
                    for k in ('name', 'N', 'D', 'C', 'loss', 'budget') if k not in p), None)
    if missing:
      raise KeyError(f'a run has no {missing!r}')
  except FileNotFoundError:
    raise ReportError(f'{fits_path} does not exist (run experiments.report on the sweep first)'
                      ) from None
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ReportError(f'{fits_path} is not a report record: {type(e).__name__}: {e}') from None
  if not any(points.values()):
    raise ReportError(f'{fits_path} records no fitted runs')
  runs = [{'name': p['name'], 'architecture': arch, 'budget': p['budget'], 'state': 'finished'}
          for arch, ps in points.items() for p in ps]
  return Sweep(os.path.abspath(path), dict(recorded.get('sweep', {})),
               recorded.get('sweep_code_version', 'unknown'), recorded.get('sweep_command', ''),
               runs, points, [(e['name'], e['reason']) for e in recorded.get('excluded_runs', [])])


def load_any(path: str, loss: str = 'bits_per_byte') -> Sweep:
  """A live sweep directory (`sweep.json` and runs/) through `load`, else its recorded
  `fits.json` through `load_recorded` (whose loss must be `loss`)."""
  if os.path.exists(os.path.join(path, 'sweep.json')):
    return load(path, loss)
  sweep = load_recorded(path)
  with open(os.path.join(path, 'fits.json')) as f:
    recorded_loss = json.load(f).get('loss', 'bits_per_byte')
  if recorded_loss != loss:
    raise ReportError(f'{path}/fits.json records loss={recorded_loss!r}, not {loss!r}; '
                      'refitting another loss needs the runs (sweep.json and runs/)')
  return sweep


def budget_rtol(sweep: Sweep) -> float:
  """How far a run's counted FLOPs may sit from its budget's and still share it: 10%, or less
  when the sweep's budgets are closer than a factor 1.2 (the trainer stops at the first step
  past the budget, so counted FLOPs exceed it slightly)."""
  budgets = sorted({float(r['budget']) for r in sweep.runs})
  ratios = [b / a for a, b in zip(budgets, budgets[1:])]
  return min([0.1] + [(r - 1) / 2 for r in ratios])


def tokens_rule(points: list[dict]):
  """D_opt for approach 2: C / (training FLOPs per token at N), the FLOPs per token C/D of the
  runs interpolated piecewise-linearly in log N (extended along the end segments). Small models
  cost far more than 6 N per token (attention, the output layer), so C / (6 N) would be wrong."""
  log_N = np.log([p['N'] for p in points])
  log_fpt = np.log([p['C'] / p['D'] for p in points])
  xs = np.unique(log_N)
  ys = np.array([log_fpt[log_N == x].mean() for x in xs])

  def log_flops_per_token(log_n):
    if xs.size == 1:
      return np.full_like(log_n, ys[0])
    out = np.interp(log_n, xs, ys)
    low, high = log_n < xs[0], log_n > xs[-1]
    out = np.where(low, ys[0] + (log_n - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0]), out)
    return np.where(high, ys[-1] + (log_n - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), out)

  def tokens_from(C, N):
    C, N = np.asarray(C, np.float64), np.asarray(N, np.float64)
    with np.errstate(invalid='ignore', divide='ignore'):
      return C / np.exp(log_flops_per_token(np.log(N)))

  return tokens_from


def fit_all(sweep: Sweep, n_bootstrap: int) -> dict[str, ArchitectureFits]:
  rtol = budget_rtol(sweep)
  fits = {}
  for arch in _architectures(sweep):
    points = sweep.points[arch]
    with np.errstate(divide='ignore', invalid='ignore'):  # resamples with an absurd N_opt give
      isoflop = scaling.fit_isoflop(points, tokens_from=tokens_rule(points),  # D_opt 0 or inf,
                                    n_bootstrap=n_bootstrap, rtol=rtol)  # dropped as non-finite
    parametric = scaling.fit_parametric(*(np.array([p[k] for p in points]) for k in 'ND'),
                                        np.array([p['loss'] for p in points]),
                                        n_bootstrap=n_bootstrap)
    fits[arch] = ArchitectureFits(isoflop, parametric,
                                  scaling.frontier(points, n_bootstrap=n_bootstrap, rtol=rtol))
  return fits


def default_loss_levels(fits: dict[str, ArchitectureFits]) -> tuple[list[float], str]:
  """Three levels at the quartiles of the loss range every frontier reached, and how they were
  chosen. Only frontiers with a fitted law count (the others cannot give a multiplier)."""
  fronts = [f.frontier for f in fits.values() if not isinstance(f.frontier.law, scaling.Unfittable)]
  which = 'fitted frontier'
  if not fronts:
    fronts, which = [f.frontier for f in fits.values()], 'frontier (none has a fitted law)'
  low = max(min(f.best_loss) for f in fronts)
  high = min(max(f.best_loss) for f in fronts)
  how = f'the quartiles of the loss range that every {which} reached'
  if not low < high:
    low = min(min(f.best_loss) for f in fronts)
    high = max(max(f.best_loss) for f in fronts)
    how = ('the quartiles of the loss range of all frontiers together (no loss was reached by '
           'every frontier, so some multipliers extrapolate)')
  levels = sorted({float(f'{low + q * (high - low):.4g}') for q in LEVEL_QUANTILES})
  return levels, how


def undetermined(fit: scaling.ParametricFit | scaling.Unfittable) -> list[str]:
  """The parameters of an approach-3 fit whose intervals are too wide to mean anything."""
  if isinstance(fit, scaling.Unfittable):
    return []
  loose = []
  for name in ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b'):
    e = getattr(fit, name)
    if e.low is None:
      continue
    if name in ('E', 'A', 'B'):
      wide = not e.low > 0 or e.high / e.low > SPAN_FACTOR
    else:
      wide = e.high - e.low > SPAN_EXPONENT
    if wide:
      loose.append(name)
  return loose


def upper_bound_architectures(sweep: Sweep) -> list[str]:
  """Architectures whose finished runs report a bound (the diffusion NELBO), not the NLL."""
  return sorted(a for a, points in sweep.points.items() if any(p.get('upper_bound')
                                                              for p in points))


def baseline_of(sweep: Sweep) -> str:
  return sweep.config.get('baseline') or _architectures(sweep)[0]


def multipliers(sweep: Sweep, fits: dict[str, ArchitectureFits], levels: list[float]) -> dict:
  """Architecture -> its ComputeMultiplier against the baseline (or Unfittable)."""
  baseline = baseline_of(sweep)
  out = {}
  for arch in fits:
    if arch == baseline:
      continue
    if baseline not in fits:
      out[arch] = scaling.Unfittable(f'the baseline {baseline} has no finished runs')
    else:
      out[arch] = scaling.compute_multiplier(fits[baseline].frontier, fits[arch].frontier, levels)
  return out


def write_report(sweep_dir: str, loss: str = 'bits_per_byte', n_bootstrap: int = 1000,
                 loss_levels: list[float] | None = None) -> dict:
  """Fits the sweep and writes report.md, fits.json and the plots; returns fits.json's content."""
  sweep = load(sweep_dir, loss)
  fits = fit_all(sweep, n_bootstrap)
  if loss_levels:
    levels, how = sorted(map(float, loss_levels)), 'given with --loss_levels'
  else:
    levels, how = default_loss_levels(fits)
  mults = multipliers(sweep, fits, levels)
  command = (f'python -m experiments.report --dir={sweep.path} --loss={loss} '
             f'--n_bootstrap={n_bootstrap}'
             + (f' --loss_levels={",".join(map(str, levels))}' if loss_levels else ''))
  images = plot_all(sweep, fits, levels, LOSSES[loss][1])
  ratio = attention_ratio(sweep)
  if ratio:
    images['attention_ratio'] = 'attention_ratio.png'
    _save(plot_attention_ratio(ratio, LOSSES[loss][1]), sweep.path, images['attention_ratio'])
  accuracy = capability(sweep)
  if accuracy:
    images['accuracy'] = 'accuracy.png'
    _save(plot_capability(accuracy), sweep.path, images['accuracy'])
  result = {
      'sweep_dir': sweep.path, 'sweep': sweep.config, 'baseline': baseline_of(sweep),
      'loss': loss, 'loss_field': LOSSES[loss][0], 'n_bootstrap': n_bootstrap,
      'sweep_command': sweep.command, 'sweep_code_version': sweep.code_version,
      'report_command': command, 'report_code_version': experiments.code_version(),
      'runs': {s: sum(r['state'] == s for r in sweep.runs)
               for s in ('finished', 'failed', 'pending')},
      'excluded_runs': [{'name': n, 'reason': r} for n, r in sweep.excluded],
      'upper_bound_architectures': upper_bound_architectures(sweep),
      'architectures': {arch: {'runs': sweep.points[arch], 'isoflop': f.isoflop.to_dict(),
                               'parametric': f.parametric.to_dict(),
                               'parametric_undetermined': undetermined(f.parametric),
                               'frontier': f.frontier.to_dict()} for arch, f in fits.items()},
      'compute_multipliers': {'baseline': baseline_of(sweep), 'loss_levels': levels,
                              'loss_levels_chosen': how,
                              'by_architecture': {a: m.to_dict() for a, m in mults.items()}},
      'attention_ratio': ratio,
      'capability': accuracy,
      'images': images,
  }
  _write(os.path.join(sweep.path, 'fits.json'), json.dumps(result, indent=1, allow_nan=False))
  _write(os.path.join(sweep.path, 'report.md'),
         markdown(sweep, fits, mults, levels, how, loss, n_bootstrap, command,
                  result['report_code_version'], images))
  return result


# Loss against the attention fraction, for a sweep whose config maps its architectures to a
# mixer and an attention fraction (configs/sweeps/attention_ratio.py).


def attention_ratio(sweep: Sweep) -> list[dict]:
  """Rows of (mixer, budget, attention fraction): the seeds' losses, their mean, min, max and
  standard deviation (ddof 1; None for one seed), for sweeps whose config has
  `attention_fraction` and `mixer` maps (architecture -> value); [] for any other sweep."""
  fractions, mixers = sweep.config.get('attention_fraction'), sweep.config.get('mixer')
  if not fractions or not mixers:
    return []
  groups = {}
  for arch, points in sweep.points.items():
    if arch not in fractions or arch not in mixers:
      continue
    for p in points:
      key = (mixers[arch], p['budget'], float(fractions[arch]))
      groups.setdefault(key, []).append(p)
  rows = []
  for (mixer, budget, fraction), points in sorted(groups.items()):
    losses = [p['loss'] for p in sorted(points, key=lambda p: p['name'])]
    rows.append({'mixer': mixer, 'budget': budget, 'attention_fraction': fraction,
                 'runs': sorted(p['name'] for p in points), 'losses': losses,
                 'mean': float(np.mean(losses)), 'min': min(losses), 'max': max(losses),
                 'std': float(np.std(losses, ddof=1)) if len(losses) > 1 else None})
  return rows


def _attention_ratio_section(sweep: Sweep, unit: str, images: dict) -> list[str]:
  rows = attention_ratio(sweep)
  if not rows:
    return []
  seeds = sorted({len(r['losses']) for r in rows})
  out = ['## Loss against the attention fraction', '',
         f'Final evaluation {unit} of each mixer\'s hybrid against the fraction of its mixer '
         f'layers that are global attention, at equal training FLOPs: mean over seeds '
         f'({"/".join(map(str, seeds))} per point), bars from the lowest to the highest seed.',
         '']
  out += _table(['mixer', 'budget', 'attention fraction', 'mean', 'min', 'max', 'std', 'seeds'],
                [[r['mixer'], f'{r["budget"]:.3g}', f'{r["attention_fraction"]:g}',
                  f'{r["mean"]:.4f}', f'{r["min"]:.4f}', f'{r["max"]:.4f}',
                  'n/a' if r['std'] is None else f'{r["std"]:.4f}', str(len(r['losses']))]
                 for r in rows])
  out += [f'![loss against the attention fraction]({images["attention_ratio"]})', '']
  return out


def plot_attention_ratio(rows: list[dict], unit: str):
  """One line per mixer (and budget, when there are several): the seeds' mean loss against
  the attention fraction, bars from the seeds' min to max."""
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  budgets = sorted({r['budget'] for r in rows})
  styles = ['-', '--', ':', '-.']
  for (mixer, color) in zip(sorted({r['mixer'] for r in rows}), plt.get_cmap('tab10').colors):
    for budget, style in zip(budgets, styles * len(budgets)):
      line = sorted((r for r in rows if r['mixer'] == mixer and r['budget'] == budget),
                    key=lambda r: r['attention_fraction'])
      if not line:
        continue
      x = np.array([r['attention_fraction'] for r in line])
      mean = np.array([r['mean'] for r in line])
      low, high = mean - [r['min'] for r in line], [r['max'] for r in line] - mean
      label = mixer if len(budgets) == 1 else f'{mixer}, C={budget:.2g}'
      ax.errorbar(x, mean, yerr=[low, high], fmt='o' + style, color=color, capsize=4,
                  label=label)
  ax.set_xticks(sorted({r['attention_fraction'] for r in rows}))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
  ax.set(xlabel='fraction of mixer layers that are attention', ylabel=f'loss ({unit})',
         title='Loss against the attention fraction (bars: min to max over seeds)')
  ax.legend(fontsize=8)
  return fig


# Capability accuracy, for runs scored by experiments.evaluate (their eval.json): per model
# and task setting, the grid point of lowest validation loss for each seed (a capability
# sweep's `capability` map says which architectures are one model's grid points; any other
# sweep's architectures are models of one point each), then the spread over seeds.


def capability(sweep: Sweep) -> list[dict]:
  """Rows of (model, task setting, budget): the chosen runs' test accuracy and exact match
  per seed, their mean, min and max, the decode-state bytes and the chosen grid points;
  [] when no finished run has an eval.json."""
  grid = sweep.config.get('capability') or {}
  chosen: dict[tuple, dict] = {}
  for run in sweep.runs:
    workdir = os.path.join(sweep.path, 'runs', run['name'])
    eval_path, summary_path = (os.path.join(workdir, n) for n in ('eval.json', 'summary.json'))
    if run.get('state') != 'finished' or not os.path.isfile(eval_path):
      continue
    try:
      with open(eval_path) as f:
        scored = json.load(f)['tasks']
      with open(summary_path) as f:
        val_loss = float(json.load(f)['final_eval_loss'])
    except (ValueError, KeyError, TypeError, OSError):
      continue  # an unreadable record is left out, as load() leaves out unreadable summaries
    meta = grid.get(run['architecture'], {})
    model = meta.get('model', run['architecture'])
    for setting, r in scored.items():
      key = (model, setting, float(run['budget']), run.get('seed', 0))
      if key not in chosen or val_loss < chosen[key]['val_loss']:
        chosen[key] = {'val_loss': val_loss, 'run': run['name'], 'accuracy': r['accuracy'],
                       'exact_match': r['exact_match'], 'state_bytes': r['state_bytes'],
                       'answer_nll': r.get('answer_nll'),  # absent from older eval.json
                       'lr': meta.get('lr'), 'weight_decay': meta.get('weight_decay')}
  groups: dict[tuple, list[dict]] = {}
  for (model, setting, budget, _), point in sorted(chosen.items(), key=lambda kv: str(kv[0])):
    groups.setdefault((model, setting, budget), []).append(point)
  order = {m: i for i, m in enumerate(dict.fromkeys(
      grid[a]['model'] for a in sweep.config.get('architectures', []) if a in grid))}
  rows = []
  for (model, setting, budget), points in sorted(
      groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], len(order)), kv[0][0])):
    acc = [p['accuracy'] for p in points]
    rows.append({'model': model, 'task': setting, 'budget': budget,
                 'runs': [p['run'] for p in points], 'accuracy': acc,
                 'mean': float(np.mean(acc)), 'min': min(acc), 'max': max(acc),
                 'exact_match': float(np.mean([p['exact_match'] for p in points])),
                 'answer_nll': (None if any(p['answer_nll'] is None for p in points) else
                                float(np.mean([p['answer_nll'] for p in points]))),
                 'state_bytes': points[0]['state_bytes'],
                 'chosen': [{'lr': p['lr'], 'weight_decay': p['weight_decay']} for p in points]})
  return rows


def _capability_section(sweep: Sweep, images: dict) -> list[str]:
  rows = capability(sweep)
  if not rows:
    return []
  out = ['## Capability evaluations', '',
         'Test accuracy on held-out task instances (`experiments.evaluate`: the fraction of '
         'answer tokens whose argmax is right; exact match: instances with every answer token '
         'right). For each model, task and seed the learning-rate grid point with the lowest '
         'validation loss is kept; mean over seeds, [min, max]. Answer NLL: nats per answer '
         'token (teacher-forced; LLaDA\'s estimator, an upper bound, for diffusion runs). '
         'State: the decode cache of one sequence at the task\'s length.', '']
  out += _table(['task', 'model', 'budget', 'accuracy', '[min, max]', 'exact match',
                 'answer NLL', 'seeds', 'state (KiB)', 'chosen lr / wd'],
                [[f'`{r["task"]}`', r['model'], f'{r["budget"]:.3g}', f'{r["mean"]:.4f}',
                  f'[{r["min"]:.4f}, {r["max"]:.4f}]', f'{r["exact_match"]:.4f}',
                  '-' if r['answer_nll'] is None else f'{r["answer_nll"]:.4f}',
                  str(len(r['accuracy'])), f'{r["state_bytes"] / 1024:.1f}',
                  ', '.join('-' if c['lr'] is None else f'{c["lr"]:g} / {c["weight_decay"]:g}'
                            for c in r['chosen'])] for r in rows])
  out += [f'![accuracy against state size]({images["accuracy"]})', '']
  return out


def plot_capability(rows: list[dict]):
  """One panel per task setting: each model's mean accuracy against its decode-state size,
  bars from the lowest to the highest seed."""
  tasks = list(dict.fromkeys(r['task'] for r in rows))
  cols = min(3, len(tasks))
  nrows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
  models = list(dict.fromkeys(r['model'] for r in rows))
  colors = dict(zip(models, plt.get_cmap('tab10').colors * (len(models) // 10 + 1)))
  for ax, task in zip(axes.flat, tasks):
    for r in (r for r in rows if r['task'] == task):
      ax.errorbar([r['state_bytes'] / 1024], [r['mean']], yerr=[[r['mean'] - r['min']],
                  [r['max'] - r['mean']]], fmt='o', color=colors[r['model']], capsize=3,
                  label=r['model'])
    ax.set_xscale('log')
    ax.set_ylim(-0.02, 1.02)
    ax.set(title=task if len(task) < 40 else task[:37] + '...', xlabel='state (KiB)',
           ylabel='accuracy')
    ax.title.set_fontsize(8)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis('off')
  legend = {}
  for ax in axes.flat:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(label, handle)
  fig.legend(list(legend.values()), list(legend), loc='lower center', ncol=min(4, len(models)), fontsize=8,
             bbox_to_anchor=(0.5, -0.02))
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  return fig


# Markdown.


def _architectures(sweep: Sweep) -> list[str]:
  order = list(sweep.config.get('architectures', []))
  return [a for a in order if a in sweep.points] + sorted(set(sweep.points) - set(order))


def _num(x: float | None, spec: str = '.4g') -> str:
  return 'n/a' if x is None else format(x, spec)


def _est(e: scaling.Estimate, spec: str = '.4g') -> str:
  if e.low is None:
    return f'{_num(e.value, spec)} (no interval)'
  return f'{_num(e.value, spec)} [{_num(e.low, spec)}, {_num(e.high, spec)}]'


def _cell(text: str) -> str:
  return str(text).replace('|', '\\|').replace('\n', ' ')


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(_cell(c) for c in row) + ' |' for row in rows]
  return lines + ['']


def _unfit_row(first: list[str], result: scaling.Unfittable, width: int) -> list[str]:
  return first + [str(result)] + [''] * (width - len(first) - 1)


def _sweep_command(command: str) -> str:
  """sweep.json records sys.argv; under `python -m` its first word is the module's path."""
  words = command.split(' ', 1)
  if words and words[0].endswith(os.path.join('experiments', 'sweep.py')):
    return 'python -m experiments.sweep' + (' ' + words[1] if len(words) > 1 else '')
  return command


def markdown(sweep: Sweep, fits: dict[str, ArchitectureFits], mults: dict, levels: list[float],
             how: str, loss: str, n_bootstrap: int, command: str, code_version: str,
             images: dict) -> str:
  cfg, unit = sweep.config, LOSSES[loss][1]
  preset = re.search(r'preset=(\w+)', sweep.command)
  counts = {s: [r for r in sweep.runs if r['state'] == s]
            for s in ('finished', 'failed', 'pending')}
  out = [f'# Scaling-law report: {cfg.get("name", os.path.basename(sweep.path))}', '',
         f'Sweep directory `{sweep.path}`. Loss: final evaluation {unit} (`{LOSSES[loss][0]}`). '
         'N = parameters (embeddings included), D = training tokens, C = training FLOPs as the '
         'trainer counted them. Intervals are 95% bootstrap percentile intervals '
         f'({n_bootstrap} resamples).', '', '## What was run', '']
  budgets = ', '.join(f'{b:.3g}' for b in cfg.get('budgets', []))
  out += [f'- Preset: `{preset.group(1) if preset else "(not in the command)"}`; baseline: '
          f'`{baseline_of(sweep)}`.',
          f'- Architectures: {", ".join(f"`{a}`" for a in cfg.get("architectures", []))}.',
          f'- Budgets (FLOPs): {budgets}; {cfg.get("sizes", "?")} sizes per budget, seeds '
          f'{cfg.get("seeds", "?")}.',
          f'- Ladder: widths {cfg.get("widths", "?")}, at most {cfg.get("max_layers", "?")} '
          f'layers; per budget C the sizes centre on the width whose parameter count is closest '
          f'to sqrt(C / (6 x {cfg.get("tokens_per_param", "?")})) (tokens per parameter '
          f'{cfg.get("tokens_per_param", "?")}); tokens = C / training FLOPs per token.',
          f'- Learning rate: `{cfg.get("lr_rule", "?")}` (d the width); sequence length '
          f'{cfg.get("seq_len", "?")}, batch size {cfg.get("batch_size", "?")}.',
          f'- Runs: {len(counts["finished"])} of {len(sweep.runs)} finished, '
          f'{len(counts["failed"])} failed, {len(counts["pending"])} pending.']
  out += [f'  - failed `{r["name"]}`: {r.get("error", "(no error recorded)")}'
          for r in counts['failed']]
  bounds = upper_bound_architectures(sweep)
  if bounds:
    out += [f'- Upper bounds: the losses of {", ".join(f"`{a}`" for a in bounds)} are NELBOs '
            '(text diffusion), upper bounds on the NLL, so their fits and compute multipliers '
            'are pessimistic for them.']
  out += [f'  - left out `{name}`: {reason}' for name, reason in sweep.excluded]
  out += ['']

  out += _attention_ratio_section(sweep, unit, images)
  out += _capability_section(sweep, images)
  out += ['## Approach 2: isoFLOP parabolas', '',
          'Per budget, a parabola of loss in log N; its vertex is the compute-optimal N. '
          'D_opt = C / (training FLOPs per token at N_opt), the FLOPs per token interpolated '
          'between the sizes run.', '']
  rows = []
  for arch, f in fits.items():
    for C, v in zip(f.isoflop.budgets, f.isoflop.vertices):
      if isinstance(v, scaling.Unfittable):
        rows.append(_unfit_row([arch, f'{C:.3g}'], v, 6))
      else:
        rows.append([arch, f'{C:.3g}', _est(v.N_opt, '.3g'), _est(v.D_opt, '.3g'),
                     f'{v.loss_opt:.4g}', f'{v.n_runs} runs, {v.n_sizes} sizes'])
  out += _table(['architecture', 'C (FLOPs)', 'N_opt', 'D_opt', 'loss at vertex', 'runs'],
                rows)
  rows = []
  for arch, f in fits.items():
    s = f.isoflop.scaling
    if isinstance(s, scaling.Unfittable):
      rows.append(_unfit_row([arch], s, 6))
    else:
      rows.append([arch, _est(s.a, '.3f'), _est(s.b, '.3f'), _est(s.k_N, '.3g'),
                   _est(s.k_D, '.3g'), f'{s.n_budgets} budgets, {s.n_bootstrap} resamples'])
  out += ['Power laws N*(C) = k_N C^a and D*(C) = k_D C^b:', '']
  out += _table(['architecture', 'a', 'b', 'k_N', 'k_D', 'from'], rows)
  out += [f'![isoFLOP curves: {a}]({p})' for a, p in images['isoflop'].items()]
  out += ['', f'![N* and D* against C]({images["allocation"]})', '']

  out += ['## Approach 3: parametric fit', '',
          'L(N, D) = E + A / N^alpha + B / D^beta, Huber (delta 1e-3) on log loss over every '
          'finished run; allocation exponents under C = 6 N D: N_opt ~ C^a, D_opt ~ C^b with '
          'a = beta / (alpha + beta), b = alpha / (alpha + beta).', '']
  rows = []
  for arch, f in fits.items():
    p = f.parametric
    if isinstance(p, scaling.Unfittable):
      rows.append(_unfit_row([arch], p, 9))
    else:
      rows.append([arch] + [_est(getattr(p, k), spec) for k, spec in (
          ('E', '.4g'), ('A', '.4g'), ('B', '.4g'), ('alpha', '.3f'), ('beta', '.3f'),
          ('a', '.3f'), ('b', '.3f'))] + [f'{p.n_points} runs, {p.n_bootstrap} resamples'])
  out += _table(['architecture', 'E', 'A', 'B', 'alpha', 'beta', 'a', 'b', 'from'], rows)
  for arch, f in fits.items():
    if isinstance(f.parametric, scaling.Unfittable):
      continue
    warnings = []
    if f.parametric.n_points < MIN_POINTS_PER_PARAMETER * 5:
      warnings.append(f'only {f.parametric.n_points} runs for 5 parameters (fewer than '
                      f'{MIN_POINTS_PER_PARAMETER} per parameter)')
    loose = undetermined(f.parametric)
    if loose:
      warnings.append(f'the intervals of {", ".join(loose)} span more than a factor '
                      f'{SPAN_FACTOR:g} (scales) or {SPAN_EXPONENT:g} (exponents)')
    if warnings:
      out += [f'Warning, {arch}: {"; ".join(warnings)}: these runs do not determine the law.', '']
  out += [f'![residuals of the parametric fit]({images["residuals"]})', '']

  out += ['## Frontier: best loss against compute', '',
          'The best loss at each budget, and L(C) = E + k C^-gamma fitted to it. Intervals: from '
          '4 budgets on, by resampling the law\'s residuals (`law residuals`); with exactly 3 the '
          'law passes through the points, and the intervals instead move each budget\'s best '
          'loss by the scatter of its runs about their isoFLOP parabola (`isoflop scatter`): '
          'run-to-run noise, not the law\'s form.', '']
  rows = []
  for arch, f in fits.items():
    front = f.frontier
    reached = ', '.join(f'{l:.4g}' for l in front.best_loss)
    if isinstance(front.law, scaling.Unfittable):
      rows.append(_unfit_row([arch, str(len(front.budgets)), reached], front.law, 8))
    else:
      law = front.law
      rows.append([arch, str(len(front.budgets)), reached, _est(law.E), _est(law.k, '.3g'),
                   _est(law.gamma, '.3f'), str(law.n_bootstrap), law.interval_from])
  out += _table(['architecture', 'budgets', 'best losses', 'E', 'k', 'gamma', 'resamples',
                 'interval from'], rows)
  out += [f'![frontiers]({images["frontiers"]})', '']

  out += [f'## Compute multipliers against `{baseline_of(sweep)}`', '',
          'C_baseline(L) / C_architecture(L): how much more compute the baseline needs to reach '
          'the loss L (> 1: the architecture is better), from the two frontier laws. Loss levels '
          f'({unit}): {", ".join(f"{l:.4g}" for l in levels)}, {how}. '
          '(extrapolated) marks a level outside the best losses one of the two frontiers '
          'observed.', '']
  rows = []
  for arch, m in mults.items():
    if isinstance(m, scaling.Unfittable):
      rows.append(_unfit_row([arch], m, len(levels) + 1))
      continue
    row = [arch]
    for value, extrapolated in zip(m.multipliers, m.extrapolated):
      text = str(value) if isinstance(value, scaling.Unfittable) else _est(value, '.3g')
      row.append(text + (' (extrapolated)' if extrapolated else ''))
    rows.append(row)
  if rows:
    out += _table(['architecture'] + [f'L = {l:.4g}' for l in levels], rows)
  else:
    out += ['No architecture besides the baseline finished a run.', '']

  out += ['## Reproduce', '', 'Sweep (from sweep.json), code version '
          f'`{sweep.code_version}`:', '', '```', _sweep_command(sweep.command) or '(not recorded)',
          '```', '', f'Report, code version `{code_version}`:', '', '```', command, '```', '']
  out += ['## Runs', '']
  rows = [[arch, p['name'], f'{p["budget"]:.3g}', f'{p["N"]:,.0f}', f'{p["D"]:,.0f}',
           f'{p["C"]:.4g}', f'{p["loss"]:.4f}']
          for arch in fits for p in sorted(sweep.points[arch], key=lambda p: (p['budget'], p['N']))]
  out += _table(['architecture', 'run', 'budget', 'N', 'D', 'C', f'loss ({unit})'], rows)
  return '\n'.join(out)


# Plots.


def plot_all(sweep: Sweep, fits: dict[str, ArchitectureFits], levels: list[float],
             unit: str) -> dict:
  """Writes the PNGs into the sweep directory; returns their names, relative to it."""
  images = {'isoflop': {}}
  for arch, f in fits.items():
    name = f'isoflop_{re.sub(r"[^A-Za-z0-9_.-]", "_", arch)}.png'
    _save(plot_isoflop(arch, sweep.points[arch], f.isoflop, unit), sweep.path, name)
    images['isoflop'][arch] = name
  for key, fig in (('frontiers', plot_frontiers(sweep, fits, levels, unit)),
                   ('allocation', plot_allocation(fits)),
                   ('residuals', plot_residuals(sweep, fits))):
    images[key] = f'{key}.png'
    _save(fig, sweep.path, images[key])
  return images


def _colors(n: int):
  return plt.get_cmap('viridis')(np.linspace(0.0, 0.85, max(n, 1)))


def _budget_index(budgets: list[float], C: float) -> int:
  return int(np.argmin(np.abs(np.log(budgets) - math.log(C))))


def plot_isoflop(arch: str, points: list[dict], fit: scaling.IsoflopFit, unit: str):
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for i, (C, vertex, color) in enumerate(zip(fit.budgets, fit.vertices,
                                             _colors(len(fit.budgets)))):
    group = [p for p in points if _budget_index(fit.budgets, p['C']) == i]
    N = np.array([p['N'] for p in group])
    loss = np.array([p['loss'] for p in group])
    label = f'C={C:.2g}'
    if isinstance(vertex, scaling.Unfittable):
      ax.plot(N, loss, 'o:', color=color, label=f'{label}: cannot fit (see report.md)')
      continue
    ax.plot(N, loss, 'o', color=color, label=label)
    coeffs = np.polyfit(np.log(N), loss, 2)  # the same least-squares parabola as the fit's
    grid = np.geomspace(N.min(), N.max(), 100)
    ax.plot(grid, np.polyval(coeffs, np.log(grid)), '-', color=color)
    n_opt = vertex.N_opt
    ax.plot([n_opt.value], [vertex.loss_opt], '*', color=color, markersize=14, markeredgecolor='k')
    if n_opt.low is not None:
      ax.errorbar([n_opt.value], [vertex.loss_opt], color=color, capsize=3,
                  # A percentile interval may miss the point estimate (a vertex at the ladder's
                  # edge); matplotlib refuses negative error bars, so they are clipped at 0.
                  xerr=[[max(0.0, n_opt.value - n_opt.low)], [max(0.0, n_opt.high - n_opt.value)]])
  ax.set_xscale('log')
  if points:  # the runs set the view; an interval reaching far beyond them runs off the edge
    sizes = [p['N'] for p in points]
    ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # labels of minor ticks overlap
  ax.set(xlabel='N (parameters)', ylabel=f'loss ({unit})', title=f'isoFLOP curves: {arch}')
  ax.legend(fontsize=7)
  return fig


def plot_frontiers(sweep: Sweep, fits: dict[str, ArchitectureFits], levels: list[float],
                   unit: str):
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for (arch, f), color in zip(fits.items(), plt.get_cmap('tab10').colors):
    points = sweep.points[arch]
    ax.plot([p['C'] for p in points], [p['loss'] for p in points], '.', color=color, alpha=0.3)
    law = f.frontier.law
    label = arch if not isinstance(law, scaling.Unfittable) else f'{arch}: law cannot fit'
    ax.plot(f.frontier.budgets, f.frontier.best_loss, 'o', color=color, label=label)
    if not isinstance(law, scaling.Unfittable):
      grid = np.geomspace(min(f.frontier.budgets) / 1.5, max(f.frontier.budgets) * 1.5, 100)
      ax.plot(grid, law.loss(grid), '-', color=color)
  for level in levels:
    ax.axhline(level, color='gray', linestyle=':', linewidth=0.8)
  ax.set_xscale('log')
  ax.set(xlabel='C (training FLOPs)', ylabel=f'loss ({unit})',
         title='Frontiers: best loss per budget, L(C) = E + k C^-gamma')
  ax.legend(fontsize=7)
  return fig


def plot_allocation(fits: dict[str, ArchitectureFits]):
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for (arch, f), color in zip(fits.items(), plt.get_cmap('tab10').colors):
    iso = f.isoflop
    fitted = [(C, v) for C, v in zip(iso.budgets, iso.vertices) if isinstance(v, scaling.Vertex)]
    grid = np.geomspace(min(iso.budgets) / 1.5, max(iso.budgets) * 1.5, 50)
    for ax, key, k_name, exp_name, index in ((axes[0], 'N_opt', 'k_N', 'a', 0),
                                             (axes[1], 'D_opt', 'k_D', 'b', 1)):
      if fitted:
        C = np.array([c for c, _ in fitted])
        est = [getattr(v, key) for _, v in fitted]
        value = np.array([e.value for e in est])
        low = np.array([e.value if e.low is None else e.low for e in est])
        high = np.array([e.value if e.high is None else e.high for e in est])
        ax.errorbar(C, value, yerr=[np.maximum(0, value - low), np.maximum(0, high - value)],
                    fmt='o', color=color, capsize=3)
      s = iso.scaling
      if isinstance(s, scaling.Unfittable):
        ax.plot([], [], 'o', color=color, label=f'{arch} approach 2: cannot fit')
      else:
        k, exponent = getattr(s, k_name).value, getattr(s, exp_name).value
        ax.plot(grid, k * grid**exponent, '-', color=color,
                label=f'{arch} approach 2: {key[0]}* ~ C^{exponent:.3f}')
      p = f.parametric
      if not isinstance(p, scaling.Unfittable):
        ax.plot(grid, p.optimal_allocation(grid)[index], '--', color=color,
                label=f'{arch} approach 3 (C = 6ND)')
  for ax, name in zip(axes, ('N* (parameters)', 'D* (tokens)')):
    if not any(len(line.get_xdata()) for line in ax.get_lines()) and not ax.collections:
      ax.text(0.5, 0.5, 'no isoFLOP vertex could be fitted', ha='center', va='center',
              transform=ax.transAxes)  # (a log scale over no data cannot be drawn)
    else:
      ax.set_xscale('log')
      ax.set_yscale('log')
    ax.set(xlabel='C (training FLOPs)', ylabel=name, title=f'{name.split()[0]} against compute')
    ax.legend(fontsize=7)
  return fig


def plot_residuals(sweep: Sweep, fits: dict[str, ArchitectureFits]):
  fig, axes = plt.subplots(1, len(fits), figsize=(4.5 * len(fits), 4), squeeze=False)
  for ax, (arch, f) in zip(axes[0], fits.items()):
    p = f.parametric
    ax.set(title=f'{arch}', xlabel='N (parameters)', ylabel='log loss - log fitted loss')
    ax.set_xscale('log')
    if isinstance(p, scaling.Unfittable):
      ax.text(0.5, 0.5, str(p), ha='center', va='center', wrap=True, transform=ax.transAxes)
      continue
    points = sweep.points[arch]
    budgets = f.isoflop.budgets
    colors = _colors(len(budgets))
    for i, C in enumerate(budgets):
      group = [q for q in points if _budget_index(budgets, q['C']) == i]
      N = np.array([q['N'] for q in group])
      residual = np.log([q['loss'] for q in group]) - np.log(p.loss(N, [q['D'] for q in group]))
      ax.plot(N, residual, 'o', color=colors[i], label=f'C={C:.2g}')
    ax.axhline(0.0, color='gray', linewidth=0.8)
    ax.legend(fontsize=7)
  fig.suptitle('Residuals of L = E + A/N^alpha + B/D^beta')
  fig.tight_layout()
  return fig


# Files.


def _write(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text if text.endswith('\n') else text + '\n')
  os.replace(tmp, path)


def _save(fig, directory: str, name: str) -> None:
  path = os.path.join(directory, name)
  fig.savefig(path + '.tmp', format='png', dpi=110, bbox_inches='tight')
  plt.close(fig)
  os.replace(path + '.tmp', path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _DIR.value:
    sys.exit('report: error: --dir is required')
  try:
    levels = [float(x) for x in _LOSS_LEVELS.value]
  except ValueError:
    sys.exit(f'report: error: --loss_levels must be numbers, got {_LOSS_LEVELS.value}')
  try:
    result = write_report(_DIR.value, _LOSS.value, _N_BOOTSTRAP.value, levels or None)
  except ReportError as e:
    sys.exit(f'report: error: {e}')
  print(f'wrote {os.path.join(result["sweep_dir"], "report.md")}, fits.json and '
        f'{len(result["images"]["isoflop"]) + 3 + ("attention_ratio" in result["images"])} plots')


if __name__ == '__main__':
  app.run(main)
