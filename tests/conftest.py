"""Test set-up: CPU only, a private data cache, and small helpers shared by test files."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# scipy >= 1.15's L-BFGS-B makes many tiny OpenBLAS calls that OpenBLAS's threads slow ~10x on
# a busy 2-core machine (scipy issue 22438); read when scipy loads OpenBLAS, so set it first.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
jax.config.update("jax_disable_most_optimizations", True)
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import ml_collections  # noqa: E402

from configs import common  # noqa: E402
from configs import transformer  # noqa: E402
from models import objectives  # noqa: E402


@pytest.fixture(autouse=True, scope='session')
def _private_cache(tmp_path_factory):
  """Tokenized corpora go to a per-session cache, never the user's home."""
  os.environ['ARCHLAB_CACHE'] = str(tmp_path_factory.mktemp('archlab_cache'))


def tiny_model_config(preset='llama_tiny', **overrides):
  """A runlocal preset's model config with the byte vocabulary, fields overridden."""
  config = transformer.get_config(f'preset={preset},runlocal').model
  config.vocab_size = 260
  for key, value in overrides.items():
    common.set_field(config, key, value)
  return config


def packed_batch(rng, batch, length, vocab, num_segments=2):
  """Random tokens in `num_segments` documents per row, with positions and segment ids."""
  tokens_BT = jax.random.randint(rng, (batch, length), 0, vocab)
  cut = length // num_segments
  index_T = jnp.arange(length)
  segment_T = jnp.minimum(index_T // cut, num_segments - 1) + 1
  positions_T = index_T - (segment_T - 1) * cut
  return (tokens_BT, jnp.broadcast_to(positions_T, (batch, length)),
          jnp.broadcast_to(segment_T, (batch, length)).astype(jnp.int32))


def next_token_objective(vocab, z_loss=0.0):
  """The next-token objective with one byte per token of a `vocab`-token vocabulary."""
  return objectives.NextToken(ml_collections.FrozenConfigDict(dict(z_loss=z_loss)),
                              objectives.Tokens(bytes_V=jnp.ones((vocab,), jnp.float32)))
