"""Scaling-law fits: oracles from known laws, unfittable data, and Epoch AI's Chinchilla fit."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from experiments import scaling

# A Chinchilla-like law L = E + A / N^alpha + B / D^beta.
LAW = {'E': 1.8, 'A': 400.0, 'B': 2000.0, 'alpha': 0.34, 'beta': 0.37}
BUDGETS = np.logspace(18, 22, 5)
CHINCHILLA_CSV = (Path(__file__).resolve().parents[2] / 'shared' / 'data'
                  / 'epoch_chinchilla_svg_extracted_data.csv')
# Epoch AI's 95% intervals for their fit of that file (../shared/data/README.md).
EPOCH_INTERVALS = {'A': (285, 744), 'B': (1042, 5810), 'E': (1.769, 1.871),
                   'alpha': (0.317, 0.373), 'beta': (0.331, 0.415)}


def law_loss(N, D):
  return LAW['E'] + LAW['A'] / N**LAW['alpha'] + LAW['B'] / D**LAW['beta']


def isoflop_runs(noise=0.0, seed=0, budgets=BUDGETS, span=10.0, centre=None, n_sizes=9):
  """The law's runs on an isoFLOP grid: per budget, sizes log-spaced over centre/span..centre*span.

  `centre` defaults to sqrt(C / 120) (D = 20 N), not the law's optimum, as a real sweep would
  guess. Losses get multiplicative log-normal noise of scale `noise`.
  """
  rng = np.random.default_rng(seed)
  runs = []
  for C in budgets:
    sizes = (centre or np.sqrt(C / 120)) * np.geomspace(1 / span, span, n_sizes)
    for N in sizes:
      loss = law_loss(N, C / (6 * N)) * np.exp(noise * rng.standard_normal())
      runs.append({'N': N, 'D': C / (6 * N), 'C': C, 'loss': loss})
  return runs


def columns(runs):
  return (np.array([r[k] for r in runs]) for k in ('N', 'D', 'loss'))


def test_parametric_recovers_the_law_within_its_intervals():
  # 1% noise. With these settings, for noise seeds 0-39 all five parameters were inside their
  # intervals on 39 (seed 10 misses B and beta); 8 starts gave the same fits as 32.
  runs = isoflop_runs(noise=0.01, seed=0)
  fit = scaling.fit_parametric(*columns(runs), n_starts=8, n_bootstrap=100)
  assert fit.n_bootstrap == 100
  for name, true in LAW.items():
    estimate = getattr(fit, name)
    assert estimate.low <= true <= estimate.high, f'{name}={true} outside {estimate}'
  for name, width in (('E', 0.3), ('alpha', 0.15), ('beta', 0.15)):  # 1.7x the widest seen
    estimate = getattr(fit, name)
    assert estimate.high - estimate.low < width, f'{name}: interval {estimate} is uninformative'
  assert fit.a.value == pytest.approx(fit.beta.value / (fit.alpha.value + fit.beta.value))
  N_opt, D_opt = fit.optimal_allocation(1e21)
  assert 6 * N_opt * D_opt == pytest.approx(1e21)


def test_parametric_is_exact_on_noise_free_data():
  # The objective is flat along (A, alpha) and (B, beta): L-BFGS-B's default stopping rule
  # leaves A off by 5e-6 here, and bootstrap refits close to where they start.
  runs = isoflop_runs()
  fit = scaling.fit_parametric(*columns(runs), n_starts=8, n_bootstrap=0)
  for name, true in LAW.items():
    assert getattr(fit, name).value == pytest.approx(true, rel=1e-7), name
  N, D, loss = columns(runs)
  assert fit.loss(N, D) == pytest.approx(loss, rel=1e-9)


def test_isoflop_exponents_match_the_law_on_noise_free_data():
  fit = scaling.fit_isoflop(isoflop_runs())
  assert all(isinstance(v, scaling.Vertex) for v in fit.vertices)
  total = LAW['alpha'] + LAW['beta']
  assert fit.scaling.a.value == pytest.approx(LAW['beta'] / total, abs=0.02)
  assert fit.scaling.b.value == pytest.approx(LAW['alpha'] / total, abs=0.02)
  assert fit.scaling.a.low <= fit.scaling.a.value <= fit.scaling.a.high
  vertex = fit.vertices[2]
  assert vertex.D_opt.value == pytest.approx(fit.budgets[2] / (6 * vertex.N_opt.value))


def test_isoflop_tokens_from_sets_d_opt():
  fit = scaling.fit_isoflop(isoflop_runs(), tokens_from=lambda C, N: C / (8 * N))
  vertex = fit.vertices[0]
  assert vertex.D_opt.value == pytest.approx(fit.budgets[0] / (8 * vertex.N_opt.value))
  assert fit.scaling.k_D.value == pytest.approx(
      scaling.fit_isoflop(isoflop_runs()).scaling.k_D.value * 6 / 8)


def test_isoflop_reports_unfittable_budgets_and_power_law():
  two_sizes = isoflop_runs(budgets=[1e18], n_sizes=2)
  at_edge = isoflop_runs(budgets=[1e19], centre=1e6)  # every size far below the optimum
  concave = [{'N': N, 'C': 1e20, 'loss': loss} for N, loss in ((1e8, 2.0), (1e9, 2.5), (1e10, 2.0))]
  good = isoflop_runs(budgets=[1e21])
  fit = scaling.fit_isoflop(two_sizes + at_edge + concave + good)
  assert fit.budgets == pytest.approx([1e18, 1e19, 1e20, 1e21])
  reasons = [str(v) for v in fit.vertices[:3]]
  assert reasons[0] == 'cannot fit: only 2 distinct size(s) at C=1e+18 (need 3)'
  assert reasons[1].startswith('cannot fit: minimum outside the sizes at C=1e+19')
  assert reasons[2] == 'cannot fit: no minimum at C=1e+20: the parabola in log N opens downward'
  assert isinstance(fit.vertices[3], scaling.Vertex)
  assert isinstance(fit.scaling, scaling.Unfittable)
  assert 'only 1 budget(s) with an interior minimum of 4' in fit.scaling.reason
  as_dict = fit.to_dict()
  assert as_dict['vertices'][0] == {'cannot_fit': fit.vertices[0].reason}
  assert as_dict['scaling'] == {'cannot_fit': fit.scaling.reason}


def test_parametric_refuses_too_little_data():
  N, D, loss = columns(isoflop_runs(budgets=[1e19]))
  assert str(scaling.fit_parametric(N[:5], D[:5], loss[:5])) == (
      'cannot fit: only 5 points (need at least 6 for 5 parameters)')
  one_size = scaling.fit_parametric(np.full(9, 1e8), D, loss)
  assert one_size.reason == 'only one distinct value among the sizes N'


def frontier_law(C):
  return 2.0 + 300.0 * C**-0.12


def frontier_runs(law, budgets=np.logspace(17, 21, 9)):
  """At each budget the law's loss and two worse runs, which the envelope must ignore."""
  return [{'N': 1e8 * i, 'C': C, 'loss': law(C) + extra}
          for C in budgets for i, extra in ((2, 0.1), (1, 0.0), (3, 0.3))]


def test_compute_multiplier_of_a_law_shifted_in_compute():
  base = scaling.frontier(frontier_runs(frontier_law), n_bootstrap=50)
  other = scaling.frontier(frontier_runs(lambda C: frontier_law(2 * C)), n_bootstrap=50, seed=1)
  assert base.best_loss == pytest.approx([frontier_law(C) for C in base.budgets])
  assert base.law.E.value == pytest.approx(2.0, rel=1e-6)
  assert base.law.gamma.value == pytest.approx(0.12, rel=1e-6)
  assert base.law.loss(3e19) == pytest.approx(frontier_law(3e19), rel=1e-9)
  levels = [frontier_law(1e18), frontier_law(1e20), 1.9]
  result = scaling.compute_multiplier(base, other, levels)
  for multiplier in result.multipliers[:2]:
    assert multiplier.value == pytest.approx(2.0, rel=1e-6)
    assert multiplier.low == pytest.approx(2.0, rel=1e-6)
    assert multiplier.high == pytest.approx(2.0, rel=1e-6)
  assert str(result.multipliers[2]).startswith('cannot fit: loss 1.9 is out of reach of the '
                                               'baseline frontier')
  assert result.extrapolated == [False, False, True]
  assert result.n_bootstrap == [50, 50, 0]


def test_frontier_and_multiplier_need_three_budgets():
  short = scaling.frontier(frontier_runs(frontier_law, budgets=[1e18, 1e19]))
  assert short.law.reason == 'only 2 budget(s) (L(C) = E + k C^-gamma needs 3)'
  base = scaling.frontier(frontier_runs(frontier_law), n_bootstrap=0)
  assert str(scaling.compute_multiplier(base, short, [3.0])) == (
      'cannot fit: other frontier: only 2 budget(s) (L(C) = E + k C^-gamma needs 3)')


def test_frontier_intervals_with_three_budgets_come_from_the_isoflop_scatter():
  # Three budgets: the law passes through the best losses, so there are no residuals; the
  # interval comes from each budget's scatter about its parabola, and widens with the noise.
  rng = np.random.default_rng(0)
  widths = []
  for noise in (0.002, 0.02):
    runs = [{'N': 1e8 * 2.0**i, 'C': C, 'loss': frontier_law(C) + 0.02 * (i - 2)**2
             + noise * rng.standard_normal()} for C in (1e18, 1e19, 1e20) for i in range(5)]
    law = scaling.frontier(runs, n_bootstrap=200).law
    assert law.interval_from == 'isoflop scatter' and law.n_bootstrap == 200
    assert law.gamma.low < law.gamma.value < law.gamma.high
    widths.append(law.gamma.high - law.gamma.low)
  assert widths[1] > 3 * widths[0]
  # Three runs per budget leave no scatter to measure: the law stands, without an interval.
  law = scaling.frontier(frontier_runs(frontier_law, budgets=[1e18, 1e19, 1e20]),
                         n_bootstrap=50).law
  assert law.n_bootstrap == 0 and law.gamma.low is None
  assert law.interval_from == ('none: 3 budgets and C=1e+18 has 3 run(s) of 3 size(s) (a scatter '
                               'about the isoFLOP parabola needs 4 runs of 3 sizes)')


def test_results_round_trip_through_json():
  runs = isoflop_runs(noise=0.01)
  base = scaling.frontier(runs, n_bootstrap=20)
  results = [
      scaling.fit_isoflop(runs + isoflop_runs(budgets=[1e17], n_sizes=2), n_bootstrap=50),
      scaling.fit_parametric(*columns(runs), n_starts=4, n_bootstrap=5),
      base,
      scaling.compute_multiplier(base, base, [3.0, 1.0]),
  ]
  for result in results:
    as_dict = result.to_dict()
    assert json.loads(json.dumps(as_dict, allow_nan=False)) == as_dict


def test_parametric_fit_of_chinchilla_lies_in_epochs_intervals():
  if not CHINCHILLA_CSV.exists():
    pytest.skip(f'{CHINCHILLA_CSV} is absent')
  with CHINCHILLA_CSV.open() as f:
    rows = list(csv.DictReader(f))
  N, C, loss = (np.array([float(r[k]) for r in rows])
                for k in ('Model Size', 'Training FLOP', 'loss'))
  keep = np.argsort(loss)[:-5]  # Epoch drop the 5 highest-loss runs
  N, C, loss = N[keep], C[keep], loss[keep]
  fit = scaling.fit_parametric(N, C / (6 * N), loss, n_bootstrap=0)
  for name, (low, high) in EPOCH_INTERVALS.items():
    assert low <= getattr(fit, name).value <= high, f'{name}={getattr(fit, name).value}'
