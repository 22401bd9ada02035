"""The training and evaluation step, jitted over a mesh: shared by the loop and the AOT planner.

`jit_functions(config, model, objective, mesh, rules)` makes the budget, the optimizer and
the jitted functions of one run without reading data or making arrays: trainer/loop.py runs
them, sharding/aot.py lowers the same step for a TPU topology it does not have.

The state is `{'step', 'params', 'opt_state', 'collections'}`; `collections` holds the model's
variable collections besides params (the MoE routing biases): not trained by the optimizer,
updated by each step, checkpointed. A step whose loss or gradient norm is not finite leaves
the state as it was and reports `ok=False`, which stops the loop.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import errors
from trainer import flops as flops_lib
from trainer import optim

# The arrays of a batch and their dtypes (input_pipeline makes them; the step reads them).
BATCH_FIELDS = (('inputs', jnp.int32), ('targets', jnp.int32), ('positions', jnp.int32),
                ('segment_ids', jnp.int32), ('weights', jnp.float32))


def total_steps_for(train_config, tokens_per_step: int, train_flops_per_token: float) -> int:
  """The budget in steps: `train.flops` or `train.tokens` when given, else `train.steps`."""
  t = train_config
  if t.flops and t.tokens:
    raise errors.ConfigError(f'give one budget: train.flops={t.flops} and train.tokens={t.tokens} '
                             'are both set')
  if t.flops:
    steps = math.ceil(t.flops / (train_flops_per_token * tokens_per_step))
  elif t.tokens:
    steps = math.ceil(t.tokens / tokens_per_step)
  else:
    steps = t.steps
  if steps <= 0:
    raise errors.ConfigError('no budget: set train.steps, train.tokens or train.flops to a '
                             'positive value')
  return int(steps)


def make_init_fn(model, tx, seq_len: int):
  """`rng -> state` with parameters boxed with their logical axis names."""

  def init(rng):
    dummy_BT = jnp.zeros((1, seq_len), jnp.int32)
    variables = model.init(rng, dummy_BT, positions_BT=dummy_BT, segment_ids_BT=dummy_BT + 1)
    params = variables['params']
    collections = {k: v for k, v in variables.items() if k != 'params'}
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
            'collections': collections}

  return init


def make_step_fns(model, tx, schedule, objective, train_config, freeze_collections=False):
  """The training step `(state, batch) -> (state, metrics)` and `(params, collections,
  batch) -> sums`, for an `objectives.Objective`. `freeze_collections` keeps the collections
  (the MoE routing biases) as they are: the rest of the model is frozen (`optim.trainable`)."""
  t = train_config

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.key(t.seed), state['step'])

    def grads_of(micro, micro_rng):
      def fn(params):
        loss, metrics, collections = objective(
            model, params, micro, micro_rng, collections=state['collections'],
            update_collections=True, train=True)
        return loss, (metrics, collections)
      grads, (metrics, collections) = jax.grad(fn, has_aux=True)(state['params'])
      return grads, metrics, collections

    if t.grad_accum == 1:
      grads, metrics, collections = grads_of(batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape((t.grad_accum, -1) + x.shape[1:]), batch)

      def accumulate(carry, inputs):
        micro_batch, i = inputs
        out = grads_of(micro_batch, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, out), None

      zeros = jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], micro), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, metrics, collections), _ = jax.lax.scan(accumulate, zeros,
                                                      (micro, jnp.arange(t.grad_accum)))
      scale = 1.0 / t.grad_accum
      grads = jax.tree.map(lambda g: g * scale, grads)
      # Sums stay sums; the rest (and the collections' new values) average over micro-batches.
      metrics = {k: v if k.endswith('_sum') else jax.tree.map(lambda x: x * scale, v)
                 for k, v in metrics.items()}
      collections = jax.tree.map(lambda c: c * scale, collections)
    if freeze_collections:
      collections = state['collections']
    grad_norm = optim.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state['params'], updates)
    ok = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
    new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
           'collections': collections}
    # A non-finite step leaves the state as it was; the host stops the run on `ok=False`.
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    metrics.update(grad_norm=grad_norm, lr=schedule(state['step']), ok=ok)
    return new, metrics

  def eval_step(params, collections, batch):
    _, metrics, _ = objective(model, params, batch, jax.random.key(0), collections=collections,
                              train=False)
    return {k: v for k, v in metrics.items() if k.endswith('_sum')}

  return train_step, eval_step


def check_divisible(state_sharding, abstract, mesh, batch_size: int) -> None:
  """One-line errors for a layout the mesh cannot hold: a sharded dimension (or the batch)
  that does not divide by its mesh axes, before jit fails with a long message."""
  rows = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']
  if batch_size % rows:
    raise errors.ConfigError(f'train.batch_size={batch_size} does not divide by the batch mesh '
                             f'axes data x fsdp x expert = {rows}; change config.mesh or '
                             'train.batch_size')
  flat_sharding = dict(jax.tree_util.tree_leaves_with_path(state_sharding))
  for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract)):
    sharding = flat_sharding[path]
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = int(np.prod([mesh.shape[a] for a in axes]))
      if size % ways:
        name = jax.tree_util.keystr(path, simple=True, separator='/')
        raise errors.ConfigError(f'{name} {tuple(leaf.shape)}: dimension {dim} ({size}) does not '
                                 f'divide by mesh axes {"x".join(axes)} = {ways}; change '
                                 'config.mesh or config.sharding_rules')


@dataclasses.dataclass
class JitFunctions:
  """The step functions jitted over a mesh, with the shardings and budget they were made for."""
  total_steps: int
  tokens_per_step: int
  train_flops_per_token: float
  abstract: object        # the initial state's shapes, parameters boxed with logical axes
  state_sharding: object
  batch_sharding: object
  train_step: object      # (state, batch) -> (state, metrics), the state donated
  eval_step: object       # (params, collections, batch) -> sums
  init_state: object      # rng -> state

  def abstract_state(self):
    """The state's shapes and dtypes with their shardings: what a checkpoint restores into
    (a checkpoint written under another mesh is resharded to these) and what AOT lowers."""
    boxed = lambda x: isinstance(x, nn.Partitioned)
    shapes = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if boxed(x) else x,
                          self.abstract, is_leaf=boxed)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_sharding)

  def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
    """A global batch's shapes and dtypes with its sharding."""
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=self.batch_sharding)
            for k, dt in BATCH_FIELDS}


def jit_functions(config, model, objective, mesh, rules) -> JitFunctions:
  """Budget, optimizer and the jitted step functions of `model` trained on `objective`."""
  t = config.train
  seq_len = config.data.seq_len
  tokens_per_step = t.batch_size * seq_len
  train_fpt = flops_lib.train_flops_per_token(model.cfg, seq_len)
  total_steps = total_steps_for(t, tokens_per_step, train_fpt)
  tx, schedule = optim.make_optimizer(config.optim, total_steps)
  init = make_init_fn(model, tx, seq_len)
  frozen = config.optim.get('trainable', 'all') != 'all'
  train_step, eval_step = make_step_fns(model, tx, schedule, objective, t, freeze_collections=frozen)
  rng = jax.random.key(t.seed)  # made outside the mesh, whose devices may be abstract (aot)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init, rng)
    state_sharding = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    batch_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec('batch', 'length'),
                                                 mesh, rules)
    train_jit = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                        out_shardings=(state_sharding, None), donate_argnums=0)
    eval_jit = jax.jit(eval_step, in_shardings=(state_sharding['params'],
                                                state_sharding['collections'], batch_sharding))
    init_jit = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_sharding)
  return JitFunctions(total_steps=total_steps, tokens_per_step=tokens_per_step,
                      train_flops_per_token=train_fpt, abstract=abstract,
                      state_sharding=state_sharding, batch_sharding=batch_sharding,
                      train_step=train_jit, eval_step=eval_jit, init_state=init_jit)
