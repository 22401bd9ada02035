"""Objectives: (model, params, batch, rng) -> (loss, metrics), all reporting bits per byte.

Every objective returns sums as well as the loss, so the trainer can aggregate exactly over
micro-batches, devices and evaluation batches:

  nll_sum      NLL of the weighted targets, in nats
  weight_sum   number of weighted targets (tokens)
  bytes_sum    UTF-8 bytes of raw text those targets stand for

Bits per byte = nll_sum / ln 2 / bytes_sum: it does not depend on the tokenizer.
Side losses from sublayers arrive in `aux` as `loss/<name>` (already weighted by their own
config field) and are added to the training loss and reported.

A model with variable collections besides `params` (the MoE routing biases, `moe_bias`) gets
them as `collections=`; a training step also passes `update_collections=True`, and the
collections' new values come back in `metrics['collections']` (see `apply_model`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import errors

OBJECTIVES = {}


def register_objective(name):
  def wrap(fn):
    if name in OBJECTIVES:
      raise errors.ConfigError(f'objective {name!r} is already registered')
    OBJECTIVES[name] = fn
    return fn
  return wrap


def get_objective(name: str):
  if name not in OBJECTIVES:
    raise errors.ConfigError(f'objective={name!r} is not one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]


def apply_model(model, params, inputs_BT, *, positions_BT, segment_ids_BT, collections=None,
                update_collections=False):
  """`model.apply` with the model's other variable collections; returns (logits, aux).

  With `update_collections` (a training step) the collections are mutable: sublayers may
  change them (the MoE bias update) and their new values come back in `aux['collections']`.
  """
  variables = {'params': params, **(collections or {})}
  kwargs = dict(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)
  if not (update_collections and collections):
    return model.apply(variables, inputs_BT, **kwargs)
  (logits_BTV, aux), new = model.apply(variables, inputs_BT, mutable=list(collections), **kwargs)
  return logits_BTV, {**aux, 'collections': new}


def cross_entropy(logits_BTV, targets_BT, weights_BT):
  """Per-token NLL in nats and log-partition, float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return (lse_BT - target_logit_BT) * weights_BT, lse_BT


@register_objective('next_token')
def next_token(model, params, batch, rng, *, token_bytes_V, z_loss: float = 0.0,
               collections=None, update_collections=False):
  """Causal language modelling: predict batch['targets'] from batch['inputs']."""
  del rng
  logits_BTV, aux = apply_model(model, params, batch['inputs'], positions_BT=batch['positions'],
                                segment_ids_BT=batch['segment_ids'], collections=collections,
                                update_collections=update_collections)
  weights_BT = batch['weights'].astype(jnp.float32)
  nll_BT, lse_BT = cross_entropy(logits_BTV, batch['targets'], weights_BT)
  weight_sum = jnp.sum(weights_BT)
  denom = jnp.maximum(weight_sum, 1.0)
  nll_sum = jnp.sum(nll_BT)
  loss = nll_sum / denom
  metrics = {
      'nll_sum': nll_sum,
      'weight_sum': weight_sum,
      'bytes_sum': jnp.sum(token_bytes_V[batch['targets']] * weights_BT),
  }
  if z_loss:
    z = z_loss * jnp.sum(jnp.square(lse_BT) * weights_BT) / denom
    metrics['z_loss'] = z
    loss = loss + z
  for key, value in aux.items():
    if key.startswith('loss/'):
      loss = loss + value
    if key != 'cache':
      metrics[key] = value
  metrics['loss'] = loss
  return loss, metrics


def bits_per_byte(nll_sum, bytes_sum):
  return nll_sum / math.log(2) / max(float(bytes_sum), 1.0)
