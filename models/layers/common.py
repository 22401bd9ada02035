"""Small helpers shared by the layers: dtypes, initialisers with logical axis names."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype_of(name: str):
  """Maps a config dtype name to a jnp dtype, naming the allowed ones on error."""
  if name not in DTYPES:
    raise ValueError(f'dtype {name!r} is not one of {sorted(DTYPES)}')
  return DTYPES[name]


def normal_init(std: float, axes: tuple[str, ...]):
  """A normal(0, std) initialiser whose parameter carries logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def zeros_init(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def constrain(x, axes: tuple[str | None, ...]):
  """Constrains an activation's sharding by logical axis names (no-op without rules)."""
  return nn.with_logical_constraint(x, axes)
