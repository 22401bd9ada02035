"""Scaling-law fits: Chinchilla approaches 2 and 3, loss-vs-compute frontiers, compute multipliers.

Pure numpy/scipy. A run is a mapping with keys `N` (parameters), `C` (training FLOPs) and
`loss`. Every result is a dataclass with `to_dict()` (JSON-safe: non-finite numbers become None);
where data cannot support a fit the result holds an `Unfittable` with the reason instead of numbers.
Intervals are 95% bootstrap percentile intervals from a seeded generator.

  Approach 2 (isoFLOP): `fit_isoflop(runs)`; Hoffmann et al. 2022, section 3.2.
  Approach 3 (parametric): `fit_parametric(N, D, loss)`; Hoffmann et al. 2022, section 3.3, as
    replicated by Besiroglu et al. 2024 (Epoch AI): Huber (delta 1e-3) on log loss, summed.
  Frontier: `frontier(runs)`, best loss per budget with L(C) = E + k C^-gamma fitted to it.
  Compute multiplier: `compute_multiplier(baseline, other, loss_levels)`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
from scipy import optimize

CI_PERCENT = 95.0
HUBER_DELTA = 1e-3
# Starting points of approach 3, as in Epoch AI's replication: every combination is scored in
# one vectorised pass and L-BFGS-B runs from the `n_starts` best of them.
DEFAULT_GRID = {
    'a': (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    'b': (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    'e': (-1.0, -0.5, 0.0, 0.5, 1.0),
    'alpha': (0.0, 0.5, 1.0, 1.5, 2.0),
    'beta': (0.0, 0.5, 1.0, 1.5, 2.0),
}
PARAMETRIC_NAMES = ('a', 'b', 'e', 'alpha', 'beta')

Run = Mapping[str, float]
TokensFrom = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _jsonable(x):
  """Dataclasses to dicts (fields with metadata json=False left out), numbers to plain floats."""
  if isinstance(x, Unfittable):
    return {'cannot_fit': x.reason}
  if dataclasses.is_dataclass(x):
    return {f.name: _jsonable(getattr(x, f.name))
            for f in dataclasses.fields(x) if f.metadata.get('json', True)}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


class _Result:
  """Gives a dataclass `to_dict()`: nested dicts and lists that `json.dumps` accepts."""

  def to_dict(self) -> dict:
    return _jsonable(self)


@dataclasses.dataclass(frozen=True)
class Unfittable(_Result):
  """Stands where a fit's numbers would be when the data cannot support the fit."""
  reason: str

  def __str__(self) -> str:
    return f'cannot fit: {self.reason}'


@dataclasses.dataclass(frozen=True)
class Estimate(_Result):
  """A fitted value with its bootstrap interval (None when there were no bootstrap samples)."""
  value: float
  low: float | None = None
  high: float | None = None


def _estimate(value: float, samples: np.ndarray) -> Estimate:
  """`value` with the percentile interval of the finite `samples`."""
  samples = samples[np.isfinite(samples)]
  if not samples.size:
    return Estimate(float(value))
  tail = (100.0 - CI_PERCENT) / 2
  low, high = np.percentile(samples, [tail, 100.0 - tail])
  return Estimate(float(value), float(low), float(high))


def chinchilla_tokens(C: np.ndarray, N: np.ndarray) -> np.ndarray:
  """Tokens D for compute C at N parameters with C = 6 N D."""
  return C / (6 * N)


def _budgets(runs: Sequence[Run], rtol: float) -> list[tuple[float, np.ndarray, np.ndarray]]:
  """Runs grouped by compute: (C, N, loss) per budget, C the geometric mean of the group's C.

  Sorted by C, a run joins the current group while its C is within `rtol` of the group's first.
  """
  rows = sorted((float(r['C']), float(r['N']), float(r['loss'])) for r in runs)
  for C, N, loss in rows:
    if not (C > 0 and N > 0 and loss > 0):
      raise ValueError(f'runs need positive C, N and loss; got C={C}, N={N}, loss={loss}')
  groups = []
  for row in rows:
    if groups and row[0] <= groups[-1][0][0] * (1 + rtol):
      groups[-1].append(row)
    else:
      groups.append([row])
  out = []
  for group in groups:
    C, N, loss = np.array(group).T
    out.append((float(np.exp(np.mean(np.log(C)))), N, loss))
  return out


# Approach 2: isoFLOP parabolas.


@dataclasses.dataclass(frozen=True)
class Vertex(_Result):
  """The minimum of one budget's parabola of loss in log N."""
  N_opt: Estimate
  D_opt: Estimate
  loss_opt: float
  n_runs: int
  n_sizes: int
  n_bootstrap_failed: int  # resamples with < 3 sizes or a parabola opening downward


@dataclasses.dataclass(frozen=True)
class OptimalScaling(_Result):
  """N*(C) = k_N C^a and D*(C) = k_D C^b, fitted in log-log space over the fittable budgets."""
  k_N: Estimate
  a: Estimate
  k_D: Estimate
  b: Estimate
  n_budgets: int
  n_bootstrap: int  # joint resamples in which every budget had a minimum


@dataclasses.dataclass(frozen=True)
class IsoflopFit(_Result):
  """Approach 2: `vertices[i]` belongs to budget `budgets[i]` (FLOPs)."""
  budgets: list[float]
  vertices: list[Vertex | Unfittable]
  scaling: OptimalScaling | Unfittable


def _parabolas(u: np.ndarray, loss: np.ndarray, counts: np.ndarray, ok: np.ndarray) -> np.ndarray:
  """Least-squares loss = p0 + p1 u + p2 u^2 for each row of run counts: (R, n) -> (R, 3).

  Rows where `ok` is False (fewer than 3 distinct sizes: no unique parabola) give NaN.
  """
  powers = u[None, :] ** np.arange(5)[:, None]  # (5, n)
  m = counts @ powers.T  # (R, 5): sums of u^k
  rhs = counts @ (powers[:3] * loss).T  # (R, 3)
  gram = np.stack([m[:, 0:3], m[:, 1:4], m[:, 2:5]], axis=1)  # (R, 3, 3)
  gram[~ok] = np.eye(3)
  coeffs = np.linalg.solve(gram, rhs[..., None])[..., 0]
  coeffs[~ok] = np.nan
  return coeffs


def _fit_vertex(
    C: float, N: np.ndarray, loss: np.ndarray, tokens_from: TokensFrom, n_bootstrap: int,
    rng: np.random.Generator) -> tuple[Vertex | Unfittable, np.ndarray | None]:
  """One budget's vertex and its bootstrap samples of N_opt (NaN where a resample has none)."""
  sizes, size_of_run = np.unique(N, return_inverse=True)
  if sizes.size < 3:
    return Unfittable(f'only {sizes.size} distinct size(s) at C={C:.3g} (need 3)'), None
  x = np.log(N)
  center, half = (x.max() + x.min()) / 2, (x.max() - x.min()) / 2
  u = (x - center) / half  # in [-1, 1], for a well-conditioned fit
  resampled = rng.multinomial(N.size, np.full(N.size, 1 / N.size), size=n_bootstrap)
  counts = np.concatenate([np.ones((1, N.size)), resampled])  # row 0: the runs themselves
  ok = ((counts @ np.eye(sizes.size)[size_of_run]) > 0).sum(axis=1) >= 3
  coeffs = _parabolas(u, loss, counts, ok)
  p0, p1, p2 = coeffs[0]
  if not p2 > 0:
    return Unfittable(f'no minimum at C={C:.3g}: the parabola in log N opens downward'), None
  u_opt = -p1 / (2 * p2)
  N_opt = math.exp(center + half * u_opt)
  if not -1 <= u_opt <= 1:
    return Unfittable(f'minimum outside the sizes at C={C:.3g}: the vertex N={N_opt:.3g} is not '
                      f'within {sizes[0]:.3g}..{sizes[-1]:.3g}'), None
  q = coeffs[1:]
  has_minimum = q[:, 2] > 0  # False for NaN too
  with np.errstate(invalid='ignore', divide='ignore', over='ignore'):
    samples = np.where(has_minimum, np.exp(center - half * q[:, 1] / (2 * q[:, 2])), np.nan)
  vertex = Vertex(
      N_opt=_estimate(N_opt, samples),
      D_opt=_estimate(float(tokens_from(np.float64(C), np.float64(N_opt))),
                      tokens_from(np.full_like(samples, C), samples)),
      loss_opt=float(p0 - p1**2 / (4 * p2)),
      n_runs=int(N.size), n_sizes=int(sizes.size),
      n_bootstrap_failed=int((~has_minimum).sum()))
  return vertex, samples


def _log_linear(log_x: np.ndarray, log_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Least-squares log y = log k + slope log x along the last axis: (log k, slope)."""
  xc = log_x - log_x.mean()
  slope = (log_y - log_y.mean(axis=-1, keepdims=True)) @ xc / (xc @ xc)
  return log_y.mean(axis=-1) - slope * log_x.mean(), slope


def fit_isoflop(runs: Sequence[Run], tokens_from: TokensFrom = chinchilla_tokens,
                n_bootstrap: int = 1000, seed: int = 0, rtol: float = 0.01) -> IsoflopFit:
  """Approach 2: a parabola of loss in log N per compute budget, then power laws in C.

  Runs whose C agree within `rtol` share a budget. A budget needs 3 distinct sizes and a minimum
  inside their range. D_opt = tokens_from(C, N_opt) (default C / (6 N_opt)). Intervals come from
  resampling the runs of each budget with replacement; resample j of every budget together gives
  the power laws' sample j.
  """
  rng = np.random.default_rng(seed)
  budgets, vertices, samples = [], [], []
  for C, N, loss in _budgets(runs, rtol):
    vertex, vertex_samples = _fit_vertex(C, N, loss, tokens_from, n_bootstrap, rng)
    budgets.append(C)
    vertices.append(vertex)
    samples.append(vertex_samples)
  fitted = [i for i, v in enumerate(vertices) if isinstance(v, Vertex)]
  if len(fitted) < 2:
    scaling = Unfittable(f'only {len(fitted)} budget(s) with an interior minimum of '
                         f'{len(budgets)} (the power laws need 2)')
    return IsoflopFit(budgets, vertices, scaling)
  C = np.array([budgets[i] for i in fitted])
  N_opt = np.array([vertices[i].N_opt.value for i in fitted])
  N_samples = np.stack([samples[i] for i in fitted], axis=-1)  # (n_bootstrap, budgets)
  N_samples = N_samples[np.isfinite(N_samples).all(axis=-1)]
  fits = {}
  for name, opt, opt_samples in (('N', N_opt, N_samples),
                                 ('D', tokens_from(C, N_opt), tokens_from(C, N_samples))):
    log_k, slope = _log_linear(np.log(C), np.log(opt))
    log_k_samples, slope_samples = _log_linear(np.log(C), np.log(opt_samples))
    fits[name] = (_estimate(math.exp(log_k), np.exp(log_k_samples)),
                  _estimate(slope, slope_samples))
  scaling = OptimalScaling(k_N=fits['N'][0], a=fits['N'][1], k_D=fits['D'][0], b=fits['D'][1],
                           n_budgets=len(fitted), n_bootstrap=len(N_samples))
  return IsoflopFit(budgets, vertices, scaling)


# Approach 3: parametric L(N, D) = E + A / N^alpha + B / D^beta.


@dataclasses.dataclass(frozen=True)
class ParametricFit(_Result):
  """L(N, D) = E + A / N^alpha + B / D^beta, and the allocation it implies under C = 6 N D:

  N_opt(C) = G (C/6)^a, D_opt(C) = (C/6)^b / G, G = (alpha A / (beta B))^(1/(alpha+beta)),
  a = beta / (alpha + beta), b = alpha / (alpha + beta).
  """
  E: Estimate
  A: Estimate
  B: Estimate
  alpha: Estimate
  beta: Estimate
  G: Estimate
  a: Estimate
  b: Estimate
  objective: float  # summed Huber loss at the fit
  n_points: int
  n_starts: int
  n_bootstrap: int  # refits that converged to finite parameters

  def loss(self, N: npt.ArrayLike, D: npt.ArrayLike) -> np.ndarray:
    """Predicted loss at N parameters and D tokens."""
    return (self.E.value + self.A.value / np.power(N, self.alpha.value)
            + self.B.value / np.power(D, self.beta.value))

  def optimal_allocation(self, C: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) for compute C = 6 N D."""
    scale = np.asarray(C) / 6
    return self.G.value * scale**self.a.value, scale**self.b.value / self.G.value


def _huber_lse(theta_S5: np.ndarray, log_N: np.ndarray, log_D: np.ndarray, log_L: np.ndarray,
               weights: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Weighted sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L), and its gradient.

  Vectorised over S parameter vectors (a, b, e, alpha, beta): returns shapes (S,), (S, 5).
  """
  a, b, e, alpha, beta = (theta_S5[:, i:i + 1] for i in range(5))
  terms = np.stack(np.broadcast_arrays(a - alpha * log_N, b - beta * log_D, e))  # (3, S, n)
  peak = terms.max(axis=0)
  soft = np.exp(terms - peak)
  total = soft.sum(axis=0)
  soft /= total
  r = peak + np.log(total) - log_L
  abs_r = np.abs(r)
  huber = np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))
  dr_soft = np.clip(r, -delta, delta) * weights * soft  # (3, S, n): dHuber/dr times dLSE/dterm
  grad = np.concatenate([dr_soft.sum(axis=2).T, -(dr_soft[0] @ log_N)[:, None],
                         -(dr_soft[1] @ log_D)[:, None]], axis=1)
  return huber @ weights, grad


def _parametric_quantities(theta_K5: np.ndarray) -> dict[str, np.ndarray]:
  """E, A, B, alpha, beta and allocation G, a, b from rows (log A, log B, log E, alpha, beta)."""
  log_A, log_B, log_E, alpha, beta = theta_K5.T
  with np.errstate(invalid='ignore', divide='ignore', over='ignore'):
    return {
        'E': np.exp(log_E), 'A': np.exp(log_A), 'B': np.exp(log_B), 'alpha': alpha, 'beta': beta,
        'G': np.exp((np.log(alpha) + log_A - np.log(beta) - log_B) / (alpha + beta)),
        'a': beta / (alpha + beta), 'b': alpha / (alpha + beta),
    }


def fit_parametric(N: npt.ArrayLike, D: npt.ArrayLike, loss: npt.ArrayLike,
                   grid: Mapping[str, Sequence[float]] = DEFAULT_GRID, n_starts: int = 32,
                   n_bootstrap: int = 1000, seed: int = 0,
                   delta: float = HUBER_DELTA) -> ParametricFit | Unfittable:
  """Approach 3: minimise sum Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L).

  a, b, e are log A, log B, log E. Every combination of `grid` (keys a, b, e, alpha, beta) is
  scored and L-BFGS-B (analytic gradient) runs from the best `n_starts`; the lowest objective
  wins. Intervals: `n_bootstrap` resamples of the points with replacement, each refitted from the
  best fit.
  """
  N, D, loss = (np.asarray(v, dtype=np.float64) for v in (N, D, loss))
  if not N.shape == D.shape == loss.shape or N.ndim != 1:
    raise ValueError(f'N, D and loss must be 1-D of one length; got {N.shape}, {D.shape}, '
                     f'{loss.shape}')
  if not (np.all(N > 0) and np.all(D > 0) and np.all(loss > 0)):
    raise ValueError('N, D and loss must be positive')
  n_params = len(PARAMETRIC_NAMES)
  if N.size < max(5, n_params + 1):
    return Unfittable(f'only {N.size} points (need at least {n_params + 1} for {n_params} '
                      f'parameters)')
  for name, values in (('sizes N', N), ('token counts D', D)):
    if np.unique(values).size < 2:
      return Unfittable(f'only one distinct value among the {name}')
  log_L = np.log(loss)
  # Optimised with log N and log D centred (a' = a - alpha mean log N, likewise b'): the same
  # minimum, far better conditioned. `uncentre` maps parameters back.
  mean_N, mean_D = np.log(N).mean(), np.log(D).mean()
  log_N, log_D = np.log(N) - mean_N, np.log(D) - mean_D

  def uncentre(theta_K5, sign=1.0):  # sign=-1: centre
    out = np.array(theta_K5, dtype=np.float64)
    out[:, 0] += sign * out[:, 3] * mean_N
    out[:, 1] += sign * out[:, 4] * mean_D
    return out

  def objective(theta, weights):
    value, grad = _huber_lse(theta[None], log_N, log_D, log_L, weights, delta)
    return value[0], grad[0]

  def minimise(theta0, weights):
    # ftol=0: the objective is flat along (a, alpha) and (b, beta), so the default relative
    # tolerance stops refits near where they started; stop on the gradient instead.
    result = optimize.minimize(objective, theta0, args=(weights,), jac=True, method='L-BFGS-B',
                               options={'ftol': 0.0, 'gtol': 1e-8})
    return result.x, result.fun

  starts = uncentre(list(itertools.product(*(grid[k] for k in PARAMETRIC_NAMES))), sign=-1.0)
  ones = np.ones_like(log_N)
  chunk = max(1, 2**20 // N.size)
  scores = np.concatenate([_huber_lse(starts[i:i + chunk], log_N, log_D, log_L, ones, delta)[0]
                           for i in range(0, len(starts), chunk)])
  fits = [minimise(theta0, ones) for theta0 in starts[np.argsort(scores)[:n_starts]]]
  best, best_value = min(fits, key=lambda fit: fit[1])

  rng = np.random.default_rng(seed)
  counts = rng.multinomial(N.size, np.full(N.size, 1 / N.size), size=n_bootstrap)
  samples = uncentre(np.array([minimise(best, c.astype(np.float64))[0] for c in counts])
                     .reshape(-1, 5))
  samples = samples[np.isfinite(samples).all(axis=1)]
  best = uncentre(best[None])[0]
  value, sample = _parametric_quantities(best[None]), _parametric_quantities(samples)
  return ParametricFit(**{k: _estimate(value[k][0], sample[k]) for k in value},
                       objective=float(best_value), n_points=int(N.size),
                       n_starts=min(n_starts, len(starts)), n_bootstrap=len(samples))


# Frontier of loss against compute, and compute multipliers between frontiers.

GAMMA_MAX = 5.0  # upper bound on the frontier exponent


@dataclasses.dataclass(frozen=True)
class FrontierLaw(_Result):
  """L(C) = E + k C^-gamma, least squares on log loss, with bootstrap intervals.

  `interval_from` says what the resamples perturb: 'law residuals' (4 budgets or more: the
  law's own residuals), 'isoflop scatter' (3 budgets, where the law passes through the points:
  each budget's best loss moved by the scatter of its runs about their parabola in log N), or
  why there is no interval ('none: ...', with n_bootstrap 0).
  """
  E: Estimate
  k: Estimate
  gamma: Estimate
  n_bootstrap: int
  interval_from: str
  params: np.ndarray = dataclasses.field(repr=False, compare=False, metadata={'json': False})
  samples: np.ndarray = dataclasses.field(repr=False, compare=False, metadata={'json': False})

  def loss(self, C: npt.ArrayLike) -> np.ndarray:
    """The fitted loss at compute C."""
    E, log_k, gamma = self.params
    return E + np.exp(log_k - gamma * np.log(C))


@dataclasses.dataclass(frozen=True)
class Frontier(_Result):
  """One architecture's best loss at each compute budget, and the law fitted to those."""
  budgets: list[float]
  best_loss: list[float]
  law: FrontierLaw | Unfittable


def _frontier_log_loss(p: np.ndarray, c: np.ndarray) -> np.ndarray:
  E, log_k, gamma = p
  return np.log(E + np.exp(log_k - gamma * c))


def _frontier_residuals(p: np.ndarray, c: np.ndarray, log_L: np.ndarray) -> np.ndarray:
  return _frontier_log_loss(p, c) - log_L


def _frontier_jacobian(p: np.ndarray, c: np.ndarray, log_L: np.ndarray) -> np.ndarray:
  del log_L
  E, log_k, gamma = p
  power = np.exp(log_k - gamma * c)
  model = E + power
  return np.stack([1 / model, power / model, -c * power / model], axis=1)


def _fit_frontier_law(c: np.ndarray, log_L: np.ndarray, starts: Sequence[np.ndarray],
                      floor: float) -> np.ndarray:
  """The least-squares (E, log k, gamma), C normalised so that c = log(C / C_ref)."""
  bounds = ([0.0, -np.inf, 0.0], [floor, np.inf, GAMMA_MAX])
  fits = [optimize.least_squares(_frontier_residuals, p0, jac=_frontier_jacobian, bounds=bounds,
                                 args=(c, log_L)) for p0 in starts]
  return min(fits, key=lambda fit: fit.cost).x


def _isoflop_scatter(C: float, N: np.ndarray, loss: np.ndarray) -> float | str:
  """The scatter of one budget's log losses about their parabola in log N, or why there is none.

  Root mean square residual, inflated by sqrt(m / (m - 3)) for the parabola's 3 parameters.
  """
  sizes = np.unique(N).size
  if N.size < 4 or sizes < 3:
    return (f'C={C:.3g} has {N.size} run(s) of {sizes} size(s) (a scatter about the isoFLOP '
            f'parabola needs 4 runs of 3 sizes)')
  x = np.log(N)
  u = (x - x.mean()) / max(np.ptp(x), 1e-12)
  coeffs = np.polyfit(u, np.log(loss), 2)
  residuals = np.log(loss) - np.polyval(coeffs, u)
  return float(np.sqrt(np.mean(residuals**2) * N.size / (N.size - 3)))


def frontier(runs: Sequence[Run], n_bootstrap: int = 1000, seed: int = 0,
             rtol: float = 0.01) -> Frontier:
  """The lower envelope of one architecture's runs: the best loss per budget, and L(C) fitted.

  Group runs by architecture first. Runs whose C agree within `rtol` share a budget. The law
  needs 3 budgets. From 4 budgets on, its intervals resample the fit's residuals in log loss,
  inflated by sqrt(n / (n - 3)), around the fitted curve and refit from the best fit. With
  exactly 3 the law passes through the points and has no residuals: the intervals then move
  each budget's best log loss by Gaussian noise of the scatter of that budget's runs about
  their parabola in log N (root mean square residual, inflated by sqrt(m / (m - 3)) for m runs;
  each budget needs 4 runs of at least 3 sizes), i.e. they measure how run-to-run noise moves
  the law, not whether the law's form is right.
  """
  groups = _budgets(runs, rtol)
  budgets = [C for C, _, _ in groups]
  best_loss = [float(loss.min()) for _, _, loss in groups]
  if len(groups) < 3:
    law = Unfittable(f'only {len(groups)} budget(s) (L(C) = E + k C^-gamma needs 3)')
    return Frontier(budgets, best_loss, law)
  log_C, log_L = np.log(budgets), np.log(best_loss)
  log_C_ref = log_C.mean()
  c = log_C - log_C_ref
  floor = min(best_loss)
  starts = [np.array([E, math.log(np.mean(best_loss) - E), gamma])
            for E in (0.1 * floor, 0.5 * floor, 0.9 * floor) for gamma in (0.05, 0.2, 0.5)]
  best = _fit_frontier_law(c, log_L, starts, floor)
  samples = np.empty((0, 3))
  n = len(budgets)
  rng = np.random.default_rng(seed)
  if not n_bootstrap:
    interval_from = 'none: no resamples asked for'
  elif n > 3:
    interval_from = 'law residuals'
    fitted = _frontier_log_loss(best, c)
    residuals = (log_L - fitted) * math.sqrt(n / (n - 3))
    samples = np.array([_fit_frontier_law(c, fitted + rng.choice(residuals, n), [best], floor)
                        for _ in range(n_bootstrap)])
  else:
    scatter = [_isoflop_scatter(C, N, loss) for C, N, loss in groups]
    reasons = [s for s in scatter if isinstance(s, str)]
    if reasons:
      interval_from = f'none: 3 budgets and {reasons[0]}'
    else:
      interval_from = 'isoflop scatter'
      sigma = np.array(scatter)
      samples = np.array([
          _fit_frontier_law(c, log_L + sigma * rng.standard_normal(n), [best], floor)
          for _ in range(n_bootstrap)])
  to_raw_C = np.array([0.0, log_C_ref, 0.0])  # log k for C in FLOPs: log k' + gamma log C_ref
  params = best + to_raw_C * best[2]
  samples = samples + to_raw_C * samples[:, 2:3]
  law = FrontierLaw(E=_estimate(params[0], samples[:, 0]),
                    k=_estimate(math.exp(params[1]), np.exp(samples[:, 1])),
                    gamma=_estimate(params[2], samples[:, 2]), n_bootstrap=len(samples),
                    interval_from=interval_from, params=params, samples=samples)
  return Frontier(budgets, best_loss, law)


def _log_compute(params: np.ndarray, loss: float) -> np.ndarray:
  """log C at which L(C) = E + k C^-gamma reaches `loss`; NaN where loss <= E."""
  E, log_k, gamma = np.moveaxis(params, -1, 0)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(loss > E, (log_k - np.log(loss - E)) / gamma, np.nan)


@dataclasses.dataclass(frozen=True)
class ComputeMultiplier(_Result):
  """multipliers[i] = C_baseline(L) / C_other(L) at L = loss_levels[i] (> 1: `other` is better).

  extrapolated[i]: L lies outside the best losses observed on one of the two frontiers.
  n_bootstrap[i]: paired bootstrap samples in which both laws reach L (the interval's samples).
  """
  loss_levels: list[float]
  multipliers: list[Estimate | Unfittable]
  extrapolated: list[bool]
  n_bootstrap: list[int]


def compute_multiplier(baseline: Frontier, other: Frontier, loss_levels: Sequence[float],
                       seed: int = 0) -> ComputeMultiplier | Unfittable:
  """How much more compute the baseline needs than `other` to reach each loss level.

  Intervals pair each bootstrap sample of the baseline's law with a random one of the other's
  (shuffled with `seed`, as the two were resampled independently).
  """
  laws = {}
  for name, front in (('baseline', baseline), ('other', other)):
    if isinstance(front.law, Unfittable):
      return Unfittable(f'{name} frontier: {front.law.reason}')
    laws[name] = front.law
  base_samples = laws['baseline'].samples
  other_samples = laws['other'].samples
  n = min(len(base_samples), len(other_samples))
  other_samples = other_samples[np.random.default_rng(seed).permutation(len(other_samples))[:n]]
  base_samples = base_samples[:n]
  multipliers, extrapolated, n_reached = [], [], []
  for loss in loss_levels:
    reason = next((f'loss {loss:.4g} is out of reach of the {name} frontier (its fitted floor '
                   f'is E={law.E.value:.4g})' for name, law in laws.items()
                   if not loss > law.E.value), None)
    log_ratio_samples = _log_compute(base_samples, loss) - _log_compute(other_samples, loss)
    n_reached.append(int(np.isfinite(log_ratio_samples).sum()))
    if reason:
      multipliers.append(Unfittable(reason))
    else:
      log_ratio = (_log_compute(laws['baseline'].params, loss)
                   - _log_compute(laws['other'].params, loss))
      with np.errstate(over='ignore'):
        multipliers.append(_estimate(math.exp(log_ratio), np.exp(log_ratio_samples)))
    extrapolated.append(any(not min(f.best_loss) <= loss <= max(f.best_loss)
                            for f in (baseline, other)))
  return ComputeMultiplier(list(map(float, loss_levels)), multipliers, extrapolated, n_reached)
