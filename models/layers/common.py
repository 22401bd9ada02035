"""Small helpers shared by the layers: dtypes, initialisers with logical axis names."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

import errors

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype_of(name: str):
  """Maps a config dtype name to a jnp dtype, naming the allowed ones on error."""
  if name not in DTYPES:
    raise errors.ConfigError(f'dtype {name!r} is not one of {sorted(DTYPES)}')
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


def project(x, w, contract: int = 1, out_dtype=None):
  """`x[..., *w.shape[:contract]] @ w` as one 2-D matmul, e.g. BTD x DNH -> BTNH.

  Dots with several free or contracting dimensions take XLA:CPU about twice as long in the
  backward pass as the same product flattened to (tokens, in) x (in, out) (measured with
  llama_small's MLP on 2 cores), so every dense projection goes through here.
  """
  in_shape, out_shape = w.shape[:contract], w.shape[contract:]
  assert x.shape[x.ndim - contract:] == in_shape, (x.shape, w.shape)
  lead = x.shape[:x.ndim - contract]
  y = jnp.matmul(x.reshape(-1, math.prod(in_shape)), w.reshape(math.prod(in_shape), -1),
                 preferred_element_type=out_dtype)
  return y.reshape(lead + out_shape)
