"""The shared loop: `train_and_evaluate(config, workdir)`, used by train.py, sweeps and notebooks.

Steps (DESIGN.md): mesh -> data -> model -> budget -> optimizer -> sharded state (fresh or
restored) -> compiled step -> train, evaluate, checkpoint, log -> summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import errors
import input_pipeline
import models
from models import objectives
from models.layers import attention
from models.hf import init_from as hf_init_from
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from trainer import checkpoint
from trainer import flops as flops_lib
from trainer import metrics as metrics_lib
from trainer import optim

# Model fields that change how a step computes, not what the parameters are: a checkpoint
# written with other values of these can be resumed.
RUNTIME_MODEL_FIELDS = ('remat', 'dtype', 'attention.impl', 'attention.causal_block',
                        'moe.dispatch', 'moe.capacity_factor', 'moe.capacity_group')


def total_steps_for(train_config, tokens_per_step: int, train_flops_per_token: float) -> int:
  """The budget in steps: `train.flops` or `train.tokens` when given, else `train.steps`."""
  t = train_config
  if t.flops and t.tokens:
    raise errors.ConfigError(f'give one budget: train.flops={t.flops} and train.tokens={t.tokens} are both set')
  if t.flops:
    steps = math.ceil(t.flops / (train_flops_per_token * tokens_per_step))
  elif t.tokens:
    steps = math.ceil(t.tokens / tokens_per_step)
  else:
    steps = t.steps
  if steps <= 0:
    raise errors.ConfigError('no budget: set train.steps, train.tokens or train.flops to a positive value')
  return int(steps)


def comparable_model_config(model_config) -> dict:
  """The model config as stored in checkpoints, without runtime-only fields."""
  d = json.loads(model_config.to_json())
  for field in RUNTIME_MODEL_FIELDS:
    *parents, leaf = field.split('.')
    node = d
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  return d


@dataclasses.dataclass
class Run:
  """Everything the loop builds before its first step."""
  config: ml_collections.ConfigDict
  model: nn.Module
  data: input_pipeline.Datasets
  mesh: jax.sharding.Mesh
  rules: tuple
  total_steps: int
  tokens_per_step: int
  train_flops_per_step: float
  state_sharding: object
  batch_sharding: object
  train_step: object
  eval_step: object
  init_state: object


def make_init_fn(model, tx, seq_len: int):
  """`rng -> state` with parameters boxed with their logical axis names.

  `state['collections']` holds the model's variable collections other than params (e.g. the
  MoE routing biases): not trained by the optimizer, updated by the step, checkpointed.
  """

  def init(rng):
    dummy_BT = jnp.zeros((1, seq_len), jnp.int32)
    variables = model.init(rng, dummy_BT, positions_BT=dummy_BT, segment_ids_BT=dummy_BT + 1)
    params = variables['params']
    collections = {k: v for k, v in variables.items() if k != 'params'}
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
            'collections': collections}

  return init


def make_step_fns(model, tx, schedule, objective, config, token_bytes_V):
  """The training step `(state, batch) -> (state, metrics)` and `(params, batch) -> sums`."""
  t = config.train
  loss_kwargs = dict(token_bytes_V=token_bytes_V, z_loss=config.optim.z_loss)

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.key(t.seed), state['step'])
    extra = {}
    if state['collections']:  # e.g. MoE routing biases, updated by the step
      extra = dict(collections=state['collections'], update_collections=True)

    def grads_of(micro, micro_rng):
      fn = lambda p: objective(model, p, micro, micro_rng, **extra, **loss_kwargs)
      return jax.grad(fn, has_aux=True)(state['params'])

    if t.grad_accum == 1:
      grads, metrics = grads_of(batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape((t.grad_accum, -1) + x.shape[1:]), batch)

      def accumulate(carry, inputs):
        micro_batch, i = inputs
        g, m = grads_of(micro_batch, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], micro), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(t.grad_accum)))
      scale = 1.0 / t.grad_accum
      grads = jax.tree.map(lambda g: g * scale, grads)
      metrics = {k: v if k.endswith('_sum') else jax.tree.map(lambda x: x * scale, v)
                 for k, v in metrics.items()}
    # New values of the other collections (averaged over micro-batches).
    collections = metrics.pop('collections', state['collections'])
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
    extra = dict(collections=collections) if collections else {}
    _, metrics = objective(model, params, batch, jax.random.key(0), **extra, **loss_kwargs)
    return {k: v for k, v in metrics.items() if k.endswith('_sum')}

  return train_step, eval_step


def check_divisible(state_sharding, abstract, mesh, batch_size: int) -> None:
  """One-line errors for a layout the mesh cannot hold: a sharded dimension (or the batch)
  that does not divide by its mesh axes, before jit fails with a long message."""
  rows = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']
  if batch_size % rows:
    raise errors.ConfigError(f'train.batch_size={batch_size} does not divide by the batch mesh axes '
                     f'data x fsdp x expert = {rows}; change config.mesh or train.batch_size')
  flat_sharding = dict(jax.tree_util.tree_leaves_with_path(state_sharding))
  for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract)):
    sharding = flat_sharding[path]
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = int(np.prod([mesh.shape[a] for a in axes]))
      if size % ways:
        name = jax.tree_util.keystr(path, simple=True, separator='/')
        raise errors.ConfigError(f'{name} {tuple(leaf.shape)}: dimension {dim} ({size}) does not divide '
                         f'by mesh axes {"x".join(axes)} = {ways}; change config.mesh or '
                         f'config.sharding_rules')


def setup(config, workdir: str | None, devices=None) -> Run:
  """Builds data, model, optimizer and the jitted functions (no state is created yet).

  `devices` (default: all) is the set the mesh is laid over; `config.mesh` must fit it.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if config.get('init_from'):  # checks the model against the checkpoint, takes its tokenizer
    hf_init_from.prepare(config)
  mesh_lib.maybe_initialize_distributed()
  t = config.train
  if t.batch_size <= 0 or t.batch_size % t.grad_accum:
    raise errors.ConfigError(f'train.batch_size={t.batch_size} must be a positive multiple of '
                     f'train.grad_accum={t.grad_accum}')
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = rules_lib.get_rules(config.sharding_rules)
  # The model's fields are checked before the data is read (which can take minutes); the
  # vocabulary size may still come from the tokenizer.
  models.build(config.model if config.model.vocab_size else
               ml_collections.ConfigDict(dict(config.model.to_dict(), vocab_size=1)))
  data = input_pipeline.build_datasets(
      config.data, global_batch_size=t.batch_size, workdir=workdir,
      process_index=jax.process_index(), process_count=jax.process_count())
  vocab = data.tokenizer.vocab_size
  if config.model.vocab_size == 0:
    config.model.vocab_size = vocab
  elif config.model.vocab_size < vocab:
    raise errors.ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                     f'tokenizer\'s {vocab}')
  model = models.build(config.model)
  token_bytes_V = jnp.asarray(np.pad(data.tokenizer.token_bytes_V,
                                     (0, config.model.vocab_size - vocab)), jnp.float32)
  fns = jit_functions(config, model, mesh, rules, token_bytes_V)
  mesh_lib.check_batch_split(fns.batch_sharding, t.batch_size, jax.process_count())
  check_divisible(fns.state_sharding, fns.abstract, mesh, t.batch_size)
  return Run(config=config, model=model, data=data, mesh=mesh, rules=rules,
             total_steps=fns.total_steps, tokens_per_step=fns.tokens_per_step,
             train_flops_per_step=fns.train_flops_per_token * fns.tokens_per_step,
             state_sharding=fns.state_sharding, batch_sharding=fns.batch_sharding,
             train_step=fns.train_step, eval_step=fns.eval_step, init_state=fns.init_state)


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


def jit_functions(config, model, mesh, rules, token_bytes_V) -> JitFunctions:
  """Budget, optimizer, objective and the jitted step functions of `model` on `mesh`.

  Shared by `setup` and the ahead-of-time planner (sharding/aot.py), which lowers the same
  step for devices it does not have; nothing here reads data or makes arrays on the mesh.
  """
  t = config.train
  seq_len = config.data.seq_len
  tokens_per_step = t.batch_size * seq_len
  train_fpt = flops_lib.train_flops_per_token(model.cfg, seq_len)
  total_steps = total_steps_for(t, tokens_per_step, train_fpt)
  tx, schedule = optim.make_optimizer(config.optim, total_steps)
  objective = objectives.get_objective(config.objective)
  init = make_init_fn(model, tx, seq_len)
  train_step, eval_step = make_step_fns(model, tx, schedule, objective, config, token_bytes_V)
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


def abstract_state(run: Run):
  """The state's shapes and dtypes with this run's shardings: what a checkpoint restores
  into (a checkpoint written under another mesh is resharded to these) and what AOT
  compilation lowers against."""
  shapes = nn.meta.unbox(jax.eval_shape(run.init_state, jax.random.key(0)))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      run.state_sharding)


def to_global(run: Run, local_batch: dict) -> dict:
  """Assembles this process's rows into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(run.batch_sharding, np.asarray(v))
          for k, v in local_batch.items()}


def evaluate(run: Run, state) -> dict:
  """Loss in nats per token and bits per byte over the fixed validation batches."""
  sums = {}
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    for batch in run.data.eval_batches:
      out = run.eval_step(state['params'], state['collections'], to_global(run, batch))
      for k, v in jax.device_get(out).items():
        sums[k] = sums.get(k, 0.0) + float(v)
  return {'eval_loss': sums['nll_sum'] / max(sums['weight_sum'], 1.0),
          'eval_bits_per_byte': objectives.bits_per_byte(sums['nll_sum'], sums['bytes_sum'])}


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the summary."""
  wall_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  run = setup(config, workdir)
  config, t = run.config, run.config.train
  saved_model_config = comparable_model_config(config.model)
  mngr = checkpoint.manager(workdir, t.keep_checkpoints)
  latest = checkpoint.check_config(mngr, workdir, saved_model_config)
  is_main = jax.process_index() == 0

  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    abstract = abstract_state(run)
    if latest is not None:
      state, data_state = checkpoint.restore(mngr, latest, abstract)
      run.data.train_iter.set_state(data_state)
      logging.info('resumed from the checkpoint at step %d', latest)
    else:
      state = run.init_state(jax.random.key(t.seed))
      if config.get('init_from'):
        state['params'] = jax.device_put(hf_init_from.load_params(config),
                                         run.state_sharding['params'])
    start_step = int(state['step'])
    abstract_batch = {
        k: jax.ShapeDtypeStruct((t.batch_size, config.data.seq_len), dt, sharding=run.batch_sharding)
        for k, dt in (('inputs', jnp.int32), ('targets', jnp.int32), ('positions', jnp.int32),
                      ('segment_ids', jnp.int32), ('weights', jnp.float32))}
    compiled = run.train_step.lower(abstract, abstract_batch).compile()
  xla_step_flops = flops_lib.xla_flops(compiled)
  cfg = run.model.cfg
  flash_attention = bool({'A', 'W'} & set(cfg.pattern)) and attention.resolve_impl(
      cfg, (attention.head_dim(cfg),),
      causal_rows=0 if cfg.bidirectional else config.data.seq_len) == 'flash'
  peak = (config.peak_flops * jax.device_count() if config.peak_flops
          else flops_lib.measure_matmul_peak())
  params_count = flops_lib.count_params(state['params'])
  logging.info('model: %s parameters (%s without embeddings); %d steps of %d tokens',
               f"{params_count['params']:,}", f"{params_count['params_non_embedding']:,}",
               run.total_steps, run.tokens_per_step)

  writer = metrics_lib.MetricWriter(workdir, total_steps=run.total_steps, start_step=start_step,
                                    enabled=is_main, progress_bar=t.progress_bar)
  eval_metrics, train_time, interval_time, interval_steps = {}, 0.0, 0.0, 0
  last_saved = latest
  def next_batch():
    batch = to_global(run, next(run.data.train_iter))
    return batch, run.data.train_iter.get_state()

  try:
    if start_step < run.total_steps:
      batch, data_state = next_batch()
    for step in range(start_step, run.total_steps):
      tick = time.perf_counter()
      state, metrics = compiled(state, batch)  # dispatched asynchronously
      done = step + 1
      step_data_state = data_state
      if done < run.total_steps:  # the next batch is read while this step computes
        batch, data_state = next_batch()
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - tick
      train_time += elapsed
      interval_time += elapsed
      interval_steps += 1
      if not metrics['ok']:
        kept = f'the checkpoint at step {last_saved} is kept' if last_saved else 'no checkpoint was written'
        raise FloatingPointError(f'loss became {float(metrics["loss"])} (grad norm '
                                 f'{float(metrics["grad_norm"])}) at step {done}; the run stopped '
                                 f'and {kept} in {workdir}')
      last = done == run.total_steps
      tokens_per_sec = interval_steps * run.tokens_per_step / max(interval_time, 1e-9)
      writer.progress(done, float(metrics['loss']), tokens_per_sec)
      if done % t.log_every == 0 or last:
        record = {
            'tokens': done * run.tokens_per_step,
            'flops': done * run.train_flops_per_step,
            'loss': metrics['loss'],
            'bits_per_byte': objectives.bits_per_byte(metrics['nll_sum'], metrics['bytes_sum']),
            'lr': metrics['lr'],
            'grad_norm': metrics['grad_norm'],
            'tokens_per_sec': tokens_per_sec,
            'mfu': run.train_flops_per_step * interval_steps / max(interval_time, 1e-9) / peak,
        }
        for k, v in metrics.items():
          if k in ('ok', 'nll_sum', 'weight_sum', 'bytes_sum') or k in record:
            continue
          if np.ndim(v):  # a vector (e.g. the MoE load per expert): one scalar per entry
            record.update({f'{k}/{i}': x for i, x in enumerate(np.ravel(v))})
          else:
            record[k] = v
        if done % t.eval_every == 0 or last:
          eval_metrics = evaluate(run, state)
          record.update(eval_metrics)
        writer.write(done, record)
        interval_time, interval_steps = 0.0, 0
      elif done % t.eval_every == 0:
        eval_metrics = evaluate(run, state)
        writer.write(done, eval_metrics)
      if done % t.checkpoint_every == 0 or last:
        checkpoint.save(mngr, done, state, step_data_state, saved_model_config)
        last_saved = done
  finally:
    mngr.wait_until_finished()
    writer.close()

  if not eval_metrics:  # resumed a finished run: evaluate the restored parameters
    eval_metrics = evaluate(run, state)
  summary = {
      **params_count,
      'steps': run.total_steps,
      'tokens': run.total_steps * run.tokens_per_step,
      'flops': run.total_steps * run.train_flops_per_step,
      'flops_per_token': run.train_flops_per_step / run.tokens_per_step,
      'xla_flops_per_step': xla_step_flops * jax.device_count() if xla_step_flops else None,
      # XLA's cost analysis counts a while loop's body once: with scanned layers its count
      # covers one repeat of the pattern, with flash attention one block of scores.
      'xla_flops_scan_body_counted_once': bool(config.model.scan_layers) or flash_attention,
      'analytic_flops_per_step': run.train_flops_per_step,
      'final_eval_loss': eval_metrics['eval_loss'],
      'final_eval_bits_per_byte': eval_metrics['eval_bits_per_byte'],
      'train_time_sec': train_time,
      'wall_time_sec': time.time() - wall_start,
      'peak_flops': peak,
      'devices': jax.device_count(),
      'data': run.data.stats,
      'config': json.loads(config.to_json()),
  }
  if is_main:
    tmp = os.path.join(workdir, 'summary.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(summary, f, indent=2, default=str)
    os.replace(tmp, os.path.join(workdir, 'summary.json'))
  return summary
