"""The optimizer: AdamW with a schedule that ends exactly at the budget, clipping, decay mask,
and a mask of the parameters that train (`optim.trainable`).

`optim.trainable='indexer'` is the dense warm-up of DeepSeek V3.2's two-stage recipe
(models/layers/dsa.py, README "Sparse attention"): only parameters under a module named
`indexer` (DSA's lightning indexer) train; every other parameter gets a zero update (weight
decay included). The mask wraps the whole chain without adding state of its own, so the
optimizer state has the same shapes whatever `optim.trainable` is: a stage-1 checkpoint
resumes in stage 2 with `optim.trainable=all`.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import errors

SCHEDULES = ('cosine', 'linear', 'wsd', 'constant')
# optim.trainable -> the module name whose parameters train (None: every parameter).
TRAINABLE = {'all': None, 'indexer': 'indexer'}


def make_schedule(optim_config, total_steps: int):
  """Learning rate per step: linear warmup, then the named decay ending at `total_steps`."""
  o = optim_config
  if o.schedule not in SCHEDULES:
    raise errors.ConfigError(f'optim.schedule={o.schedule!r} is not one of {SCHEDULES}')
  warmup = min(o.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  final = o.lr * o.final_lr_fraction
  warm = optax.linear_schedule(0.0, o.lr, warmup) if warmup else optax.constant_schedule(o.lr)
  if o.schedule == 'cosine':
    main = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.final_lr_fraction)
  elif o.schedule == 'linear':
    main = optax.linear_schedule(o.lr, final, decay_steps)
  elif o.schedule == 'wsd':
    cool = max(int(round(o.decay_fraction * total_steps)), 1)
    stable = max(decay_steps - cool, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, final, cool)], [stable])
  else:
    main = optax.constant_schedule(o.lr)
  return optax.join_schedules([warm, main], [warmup])


def decay_mask(params, decay_embeddings: bool):
  """True for parameters that get weight decay: matrices, not norms, biases or (by default) embeddings."""
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(params))
  mask = {}
  for path, leaf in flat.items():
    name = path[-1]
    layer_axes = 1 if 'blocks' in path else 0  # scanned parameters carry a layer axis
    is_matrix = leaf.ndim - layer_axes >= 2 and name != 'scale' and not name.endswith('bias')
    is_embedding = len(path) == 1 and name in ('embed', 'pos_embed', 'head')
    mask[path] = is_matrix and (decay_embeddings or not is_embedding)
  return flax.traverse_util.unflatten_dict(mask)


def trainable_mask(tree, module: str | None):
  """True for the leaves under a module named `module` (every leaf when None)."""
  def inside(path) -> bool:
    return module is None or any(getattr(k, 'key', None) == module for k in path)
  return jax.tree_util.tree_map_with_path(lambda path, _: inside(path), tree)


def only_trainable(inner: optax.GradientTransformation, trainable: str):
  """`inner` training only the parameters `optim.trainable` names; the others get zero updates.

  Their gradients are zeroed before `inner` (so gradient clipping and the moments see only
  the trained parameters) and their updates after it (so weight decay does not move them
  either). The state is `inner`'s own: its shapes do not depend on `trainable`.
  """
  if trainable not in TRAINABLE:
    raise errors.ConfigError(f'optim.trainable={trainable!r} is not one of {tuple(TRAINABLE)}')
  module = TRAINABLE[trainable]
  if module is None:
    return inner

  def keep(tree):
    mask = trainable_mask(tree, module)
    return jax.tree.map(lambda m, x: x if m else jnp.zeros_like(x), mask, tree)

  def init(params):
    if not any(jax.tree.leaves(trainable_mask(params, module))):
      raise errors.ConfigError(f'optim.trainable={trainable!r} but the model has no {module!r} '
                               "parameters (DSA 'S' sublayers have them)")
    return inner.init(params)

  def update(updates, state, params=None):
    updates, state = inner.update(keep(updates), state, params)
    return keep(updates), state

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_config, total_steps: int):
  """Returns (optax transformation, schedule)."""
  o = optim_config
  schedule = make_schedule(o, total_steps)
  chain = []
  if o.grad_clip:
    chain.append(optax.clip_by_global_norm(o.grad_clip))
  chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=lambda p: decay_mask(p, o.decay_embeddings)))
  return only_trainable(optax.chain(*chain), o.get('trainable', 'all')), schedule


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
