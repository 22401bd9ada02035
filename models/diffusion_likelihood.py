"""Conditional likelihood of a masked diffusion model for evaluation tasks (LLaDA, Eq. 6).

  -log p(r | p) <= E_{l ~ U{1..L}} E_{M: |M| = l} [ (L / l) sum_{i in M} -log p(r_i | p, r with M masked) ]

for a prompt p and a response r of L tokens: exactly l response tokens masked, uniformly, l
uniform in 1..L. It is the masked-diffusion NELBO written over the number of masked tokens
(lower variance than drawing t), and with the exact conditionals of a distribution it is
exactly -log q(r | p): masked diffusion averages any-order autoregression, whose chain rule
holds in every order (tests/test_diffusion.py). `conditional_nll` averages `samples` Monte
Carlo draws and reports their variance, so a comparison of two answers can say whether the
difference is resolved.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

import errors
from models import diffusion_sampling


@dataclasses.dataclass(frozen=True)
class Estimate:
  """The Monte Carlo estimate of -log p(r | p) in nats, with its spread."""
  nll: float          # the mean over samples (an upper bound's estimate)
  variance: float     # of one sample's estimate
  std_error: float    # of the mean: sqrt(variance / samples)
  samples: int
  model_evals: int


def conditional_nll(denoise: Callable, prompt: Sequence[int], response: Sequence[int], *,
                    mask_id: int, samples: int = 64, batch: int = 16, seed: int = 0) -> Estimate:
  """LLaDA's estimator of -log p(response | prompt) from `denoise(z_BT) -> logits_BTV` over
  rows [prompt, response with l tokens masked], `batch` rows per evaluation."""
  length, start = len(response), len(prompt)
  if not length:
    raise errors.ConfigError('the response is empty: nothing to score')
  if samples < 2 or batch < 1:
    raise errors.ConfigError(f'samples={samples} must be >= 2 (a variance) and batch={batch} >= 1')
  rng = np.random.default_rng(seed)
  response_T = np.asarray(response, np.int64)
  estimates, evals = [], 0
  for done in range(0, samples, batch):
    rows = min(batch, samples - done)
    count_B = rng.integers(1, length + 1, rows)  # l
    rank_BT = np.argsort(np.argsort(rng.uniform(size=(rows, length)), -1), -1)
    masked_BT = rank_BT < count_B[:, None]         # exactly l masked, uniformly
    z_BT = np.concatenate([np.broadcast_to(np.asarray(prompt, np.int64), (rows, start)),
                           np.where(masked_BT, mask_id, response_T)], 1)
    logp_BTV = diffusion_sampling.log_probs(denoise(z_BT), mask_id)[:, start:]
    nll_BT = -np.take_along_axis(logp_BTV, np.broadcast_to(response_T, (rows, length))[..., None],
                                 -1)[..., 0]
    estimates.append(length / count_B * np.sum(np.where(masked_BT, nll_BT, 0.0), -1))
    evals += 1
  values = np.concatenate(estimates)
  variance = float(np.var(values, ddof=1))
  return Estimate(nll=float(np.mean(values)), variance=variance,
                  std_error=(variance / samples) ** 0.5, samples=samples, model_evals=evals)
