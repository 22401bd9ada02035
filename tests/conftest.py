"""Test set-up: CPU only, a private data cache, and small helpers shared by test files."""

import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Every process of the suite (xdist workers, and the train.py / sweep / worker subprocesses
# the tests start, which inherit the environment) compiles without XLA's slow optimisation
# passes and shares one persistent compilation cache for the run: a step compiled by one test
# is loaded, not compiled again, by the next test or subprocess that builds the same program.
# The cache is made by the first process (the xdist controller) and removed when it ends.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# XLA:CPU's older loop emitters instead of its MLIR fusion emitters, and LLVM code generation in
# one piece: a tiny model's training step compiles in 0.15 s instead of 0.34 s, an op run
# eagerly (model.init outside jit) in 16 ms instead of 28 ms, the same programs running as
# fast (measured on the 2-core machine, 2026-12-04). Appended to what XLA_FLAGS holds;
# subprocesses that force a device count keep them (sharding_worker, test_multihost).
FAST_COMPILE_FLAGS = '--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1'
if FAST_COMPILE_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
_OWN_COMPILATION_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_COMPILATION_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='archlab-test-xla-cache-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')
# scipy >= 1.15's L-BFGS-B makes many tiny OpenBLAS calls that OpenBLAS's threads slow ~10x on
# a busy 2-core machine (scipy issue 22438); read when scipy loads OpenBLAS, so set it first.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ml_collections  # noqa: E402

from configs import common  # noqa: E402
from configs import transformer  # noqa: E402
from models import objectives  # noqa: E402


@pytest.fixture(autouse=True, scope='session')
def _private_cache(tmp_path_factory):
  """Tokenized corpora go to a per-session cache, never the user's home."""
  os.environ['ARCHLAB_CACHE'] = str(tmp_path_factory.mktemp('archlab_cache'))


def pytest_unconfigure(config):
  del config
  if _OWN_COMPILATION_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


def tiny_model_config(preset='llama_tiny', **overrides):
  """A runlocal preset's model config with the byte vocabulary, fields overridden."""
  config = transformer.get_config(f'preset={preset},runlocal').model
  config.vocab_size = 260
  for key, value in overrides.items():
    common.set_field(config, key, value)
  return config


def pairwise(factors: dict[str, list], candidates: int = 50) -> list[dict]:
  """Rows (one level per factor) covering every pair of levels of two factors.

  AETG-style: each row is the best of `candidates` seeded random completions of the first
  uncovered pair, so the sweep stays near the minimum (the product of the two largest
  factors' level counts) and is the same on every run.
  """
  names = list(factors)
  rng = np.random.default_rng(0)
  uncovered = {(a, i, b, j) for n, a in enumerate(names) for b in names[n + 1:]
               for i in range(len(factors[a])) for j in range(len(factors[b]))}

  def pairs(row):
    return {(a, row[a], b, row[b]) for n, a in enumerate(names) for b in names[n + 1:]}

  rows = []
  while uncovered:
    a, i, b, j = min(uncovered)
    options = [{**{n: int(rng.integers(len(factors[n]))) for n in names}, a: i, b: j}
               for _ in range(candidates)]
    row = max(options, key=lambda r: len(pairs(r) & uncovered))
    uncovered -= pairs(row)
    rows.append({name: factors[name][row[name]] for name in names})
  return rows


def packed_batch(rng, batch, length, vocab, num_segments=2):
  """Random tokens in `num_segments` documents per row, with positions and segment ids."""
  tokens_BT = jax.random.randint(rng, (batch, length), 0, vocab)
  cut = length // num_segments
  index_T = jnp.arange(length)
  segment_T = jnp.minimum(index_T // cut, num_segments - 1) + 1
  positions_T = index_T - (segment_T - 1) * cut
  return (tokens_BT, jnp.broadcast_to(positions_T, (batch, length)),
          jnp.broadcast_to(segment_T, (batch, length)).astype(jnp.int32))


def prefill_then_decode(apply, cache, tokens_BT, pos_BT, seg_BT, k):
  """(logits_BTV, cache) of a prefill of the first k tokens, then one token a step, through
  `apply(tokens, positions, segments, cache) -> (logits, aux, cache)`."""
  outs = []
  if k:
    out_BTV, _, cache = apply(tokens_BT[:, :k], pos_BT[:, :k], seg_BT[:, :k], cache)
    outs.append(out_BTV)
  for i in range(k, tokens_BT.shape[1]):
    out_BTV, _, cache = apply(tokens_BT[:, i:i + 1], pos_BT[:, i:i + 1], seg_BT[:, i:i + 1],
                              cache)
    outs.append(out_BTV)
  return jnp.concatenate(outs, 1), cache


def next_token_objective(vocab, z_loss=0.0):
  """The next-token objective with one byte per token of a `vocab`-token vocabulary."""
  return objectives.NextToken(ml_collections.FrozenConfigDict(dict(z_loss=z_loss)),
                              objectives.Tokens(bytes_V=jnp.ones((vocab,), jnp.float32)))
