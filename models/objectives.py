"""Objectives as configured objects: (params, batch, rng) -> (loss, metrics), all in bits per byte.

`config.objective` is a ConfigDict: `name` picks a class registered with `@register(name)`,
and the other fields are the union of the objectives' own `DEFAULTS` (each reads its own).
An objective is built once per run, `build(config, tokens)`, from the config and the
tokenizer's `Tokens` (special ids, the UTF-8 bytes of every token); `build` calls the class's
`validate(config)`, which refuses a backbone the objective cannot train in one line (a
causal objective on `model.bidirectional=True`, or the reverse).

A subclass writes only its own loss: `loss(forward, batch, rng, *, train)` returns (loss,
metrics), where `forward(inputs_BT, positions_BT=..., segment_ids_BT=...)` runs the model and
returns its logits. The channels every objective shares are handled once, in `__call__`:

  side losses   sublayers' `loss/<name>` (already weighted) are added to the loss and reported
  statistics    the sublayers' other aux entries are reported (averaged over forward calls)
  collections   the model's variable collections besides params (the MoE routing bias) go
                into the model, and with `update_collections` (a training step) their new
                values come back as the third output, whatever metrics the objective builds

Every objective reports sums as well as the loss, so the trainer can aggregate exactly over
micro-batches, devices and evaluation batches:

  nll_sum      NLL (or its bound) of the weighted targets, in nats
  weight_sum   number of weighted targets (tokens)
  bytes_sum    UTF-8 bytes of raw text those targets stand for

Bits per byte = nll_sum / ln 2 / bytes_sum: it does not depend on the tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import errors
from models import lm


@dataclasses.dataclass(frozen=True)
class Tokens:
  """What an objective knows of the tokenizer: the UTF-8 bytes each token id stands for
  (`bytes_V`, padded with zeros to the model's vocabulary) and the special ids (None where
  the tokenizer has none)."""
  bytes_V: Any
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None
  mask_id: int | None = None

  @classmethod
  def from_tokenizer(cls, tokenizer, vocab_size: int) -> 'Tokens':
    """The tokenizer's token bytes padded to `vocab_size` rows (the model's vocabulary)."""
    bytes_V = np.asarray(tokenizer.token_bytes_V, np.float32)
    if vocab_size < bytes_V.shape[0]:
      raise errors.ConfigError(f'model.vocab_size={vocab_size} is smaller than the '
                               f'tokenizer\'s {bytes_V.shape[0]}')
    bytes_V = np.pad(bytes_V, (0, vocab_size - bytes_V.shape[0]))
    return cls(bytes_V=jnp.asarray(bytes_V), bos_id=getattr(tokenizer, 'bos_id', None),
               eos_id=getattr(tokenizer, 'eos_id', None),
               pad_id=getattr(tokenizer, 'pad_id', None),
               mask_id=getattr(tokenizer, 'mask_id', None))


OBJECTIVES: dict[str, type] = {}


def register(name: str):
  """Registers an `Objective` subclass under `config.objective.name`; duplicates are refused."""
  def wrap(cls):
    if name in OBJECTIVES and OBJECTIVES[name] is not cls:
      raise errors.ConfigError(f'objective {name!r} is already registered')
    cls.NAME = name
    OBJECTIVES[name] = cls
    return cls
  return wrap


def objective_defaults() -> ml_collections.ConfigDict:
  """config.objective: `name` and every registered objective's fields, with defaults."""
  fields: dict = {'name': 'next_token'}
  owner: dict[str, str] = {}
  for name, cls in OBJECTIVES.items():
    for key, value in cls.DEFAULTS.items():
      if key in fields and (key == 'name' or fields[key] != value):
        raise errors.ConfigError(f'objective field {key!r} is declared by {owner.get(key, "the base")} '
                                 f'and by {name} with different defaults')
      fields[key] = value
      owner.setdefault(key, name)
  return ml_collections.ConfigDict(fields)


def get(name: str) -> type:
  if name not in OBJECTIVES:
    raise errors.ConfigError(f'objective.name={name!r} is not one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]


def validate(config) -> type:
  """The objective class of run config `config`, after its `validate(config)`: one line for
  an unknown name or a backbone it cannot train. Needs no tokenizer (a run checks this
  before reading data)."""
  objective = config.objective
  if not hasattr(objective, 'keys'):  # a config written before objectives had fields
    raise errors.ConfigError(f'objective={objective!r}: config.objective is a section now; set '
                             f'objective.name={objective!r}')
  cls = get(objective.name)
  cls.validate(config)
  return cls


def build(config, tokens: Tokens) -> 'Objective':
  """The objective of run config `config` (its `objective` and `model` sections)."""
  return validate(config)(ml_collections.FrozenConfigDict(config.objective), tokens)


class Forward:
  """The model as an objective sees it: `forward(inputs_BT, positions_BT=..., segment_ids_BT=...)`
  returns logits_BTV; each call's aux and (when updating) new collections are kept here for
  `Objective.__call__`."""

  def __init__(self, model, params, collections, update_collections: bool):
    self.model = model
    self.variables = {'params': params, **(collections or {})}
    self.mutable = list(collections) if update_collections and collections else False
    self.collections = collections or {}
    self.auxes: list[dict] = []

  def __call__(self, inputs_BT, *, positions_BT, segment_ids_BT):
    kwargs = dict(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)
    if self.mutable:
      (logits_BTV, aux, _), self.collections = self.model.apply(
          self.variables, inputs_BT, mutable=self.mutable, **kwargs)
    else:
      logits_BTV, aux, _ = self.model.apply(self.variables, inputs_BT, **kwargs)
    self.auxes.append(aux)
    return logits_BTV


def add_side_outputs(loss, metrics: dict, auxes: list[dict]):
  """The loss plus the sublayers' side losses, and metrics with their side losses and
  statistics, each averaged over the forward calls that reported it. Shared by every
  objective (`Objective.__call__`)."""
  metrics = dict(metrics)
  for key, value in lm.merge_aux(auxes).items():
    if key.startswith('loss/'):
      value = value / len(auxes)  # merge_aux sums losses (over layers), here over calls
      loss = loss + value
    metrics[key] = value
  metrics['loss'] = loss
  return loss, metrics


class Objective:
  """Base of every objective: built from config.objective (`cfg`) and the tokenizer's Tokens.

  `BACKBONE` is 'causal' or 'bidirectional': the value of `model.bidirectional` it trains.
  `DEFAULTS` are its fields of config.objective. `UPPER_BOUND` marks an objective whose
  nll_sum is a bound on the NLL (the diffusion NELBO), not the NLL itself.
  """
  NAME: ClassVar[str] = ''
  BACKBONE: ClassVar[str] = 'causal'
  UPPER_BOUND: ClassVar[bool] = False
  DEFAULTS: ClassVar[dict] = {}

  def __init__(self, cfg, tokens: Tokens):
    self.cfg = cfg
    self.tokens = tokens

  @classmethod
  def validate(cls, config) -> None:
    """Refuses a model this objective cannot train, in one line naming the fields."""
    bidirectional = bool(config.model.bidirectional)
    if bidirectional != (cls.BACKBONE == 'bidirectional'):
      raise errors.ConfigError(
          f'objective.name={cls.NAME!r} trains a {cls.BACKBONE} backbone, but '
          f'model.bidirectional={bidirectional}; set model.bidirectional={not bidirectional}')

  def loss(self, forward: Forward, batch: dict, rng, *, train: bool):
    """(loss, metrics with nll_sum, weight_sum and bytes_sum) of one batch."""
    raise NotImplementedError(f'{type(self).__name__} must define loss()')

  def __call__(self, model, params, batch, rng, *, collections=None, update_collections=False,
               train: bool = True):
    """(loss, metrics, collections): the objective's loss with the sublayers' side losses,
    its metrics with theirs, and the model's collections (updated when `update_collections`)."""
    forward = Forward(model, params, collections, update_collections)
    loss, metrics = self.loss(forward, batch, rng, train=train)
    loss, metrics = add_side_outputs(loss, metrics, forward.auxes)
    return loss, metrics, forward.collections


def cross_entropy(logits_BTV, targets_BT, weights_BT):
  """Per-token NLL in nats and log-partition, float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return (lse_BT - target_logit_BT) * weights_BT, lse_BT


@register('next_token')
class NextToken(Objective):
  """Causal language modelling: predict batch['targets'] from batch['inputs'], with an
  optional z-loss, `z_loss * log(Z)^2` on the output softmax (PaLM)."""
  DEFAULTS = dict(z_loss=0.0)  # weight of log(Z)^2 on the output softmax

  def loss(self, forward, batch, rng, *, train):
    del rng, train
    logits_BTV = forward(batch['inputs'], positions_BT=batch['positions'],
                         segment_ids_BT=batch['segment_ids'])
    weights_BT = batch['weights'].astype(jnp.float32)
    nll_BT, lse_BT = cross_entropy(logits_BTV, batch['targets'], weights_BT)
    weight_sum = jnp.sum(weights_BT)
    denom = jnp.maximum(weight_sum, 1.0)
    nll_sum = jnp.sum(nll_BT)
    loss = nll_sum / denom
    metrics = {
        'nll_sum': nll_sum,
        'weight_sum': weight_sum,
        'bytes_sum': jnp.sum(self.tokens.bytes_V[batch['targets']] * weights_BT),
    }
    if self.cfg.z_loss:
      z = self.cfg.z_loss * jnp.sum(jnp.square(lse_BT) * weights_BT) / denom
      metrics['z_loss'] = z
      loss = loss + z
    return loss, metrics


def bits_per_byte(nll_sum, bytes_sum):
  return nll_sum / math.log(2) / max(float(bytes_sum), 1.0)


# Importing the diffusion objectives registers them (models/diffusion.py imports this module).
from models import diffusion  # noqa: E402,F401  pylint: disable=g-import-not-at-top
