"""FLOPs and parameter counts: analytic, from XLA's cost analysis, and the machine's peak."""

from __future__ import annotations

import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from models import lm

EMBEDDING_PARAMS = ('embed', 'pos_embed')


def count_params(params) -> dict[str, int]:
  """Total parameters and those outside the input embeddings (token and position tables).

  The output head, when untied, counts as a non-embedding parameter (it is a matmul per
  token, like Chinchilla's N); a tied head shares the embedding table.
  """
  flat = flax.traverse_util.flatten_dict(params)
  total = sum(int(np.prod(v.shape)) for v in flat.values())
  embedding = sum(int(np.prod(v.shape)) for k, v in flat.items()
                  if len(k) == 1 and k[0] in EMBEDDING_PARAMS)
  return {'params': total, 'params_non_embedding': total - embedding}


def train_flops_per_token(model_config, seq_len: int) -> float:
  """Forward + backward: 3x the analytic forward count (DESIGN.md). Block diffusion
  (`model.diffusion_block`) runs each token twice, in rows [x_noisy, x] of 2 x seq_len."""
  if model_config.get('diffusion_block', 0):
    return 2 * 3.0 * lm.flops_per_token(model_config, 2 * seq_len)
  return 3.0 * lm.flops_per_token(model_config, seq_len)


def xla_flops(compiled) -> float | None:
  """FLOPs XLA's cost analysis reports for one call of a compiled function (per device)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def measure_matmul_peak(seconds: float = 1.0, n: int = 1024) -> float:
  """The fp32 matmul rate of the default device in FLOP/s: best of repeated n x n products."""
  a = jnp.ones((n, n), jnp.float32)
  b = jnp.ones((n, n), jnp.float32) * 0.5
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = float('inf')
  deadline = time.perf_counter() + seconds
  while time.perf_counter() < deadline:
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best
