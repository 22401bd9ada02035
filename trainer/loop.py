"""The shared loop: `train_and_evaluate(config, workdir)`, used by train.py, sweeps and notebooks.

Steps (DESIGN.md): mesh -> data -> model and objective -> budget, optimizer and the jitted
step (trainer/step.py) -> state, fresh or restored (trainer/state.py) -> train, evaluate,
checkpoint, log -> summary.json (trainer/records.py).
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

import errors
import input_pipeline
from input_pipeline import tasks as tasks_lib
import models
from models import lm
from models import objectives
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from trainer import checkpoint
from trainer import flops as flops_lib
from trainer import init_from as init_from_lib
from trainer import metrics as metrics_lib
from trainer import preemption
from trainer import records
from trainer import state as state_lib
from trainer import step as step_lib
from trainer import workdir as workdir_lib


@dataclasses.dataclass
class Run:
  """Everything the loop builds before its first step."""
  config: ml_collections.ConfigDict
  model: nn.Module
  objective: objectives.Objective
  data: input_pipeline.Datasets
  mesh: jax.sharding.Mesh
  rules: tuple
  fns: step_lib.JitFunctions

  @property
  def total_steps(self) -> int:
    return self.fns.total_steps

  @property
  def tokens_per_step(self) -> int:
    return self.fns.tokens_per_step

  @property
  def train_flops_per_step(self) -> float:
    return self.fns.train_flops_per_token * self.fns.tokens_per_step

  @property
  def train_step(self):
    return self.fns.train_step

  @property
  def eval_step(self):
    return self.fns.eval_step

  @property
  def xla_counts_loops_once(self) -> bool:
    return lm.xla_counts_loops_once(self.model.cfg, self.config.data.seq_len)


def setup(config, workdir: str | None, devices=None) -> Run:
  """Builds data, model, objective, optimizer and the jitted functions (no state yet).

  `devices` (default: all) is the set the mesh is laid over; `config.mesh` must fit it.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if config.get('init_from'):  # checks the model against the checkpoint, takes its tokenizer
    init_from_lib.prepare(config)
  mesh_lib.maybe_initialize_distributed()
  t = config.train
  if t.batch_size <= 0 or t.batch_size % t.grad_accum:
    raise errors.ConfigError(f'train.batch_size={t.batch_size} must be a positive multiple of '
                             f'train.grad_accum={t.grad_accum}')
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = rules_lib.get_rules(config.sharding_rules)
  # The model's and objective's fields are checked before the data is read (which can take
  # minutes); the vocabulary size may still come from the tokenizer.
  models.build(config.model if config.model.vocab_size else
               ml_collections.ConfigDict(dict(config.model.to_dict(), vocab_size=1)))
  objectives.validate(config)
  task = config.data.get('task')
  tasks_lib.check_backbone([cls for cls, _ in tasks_lib.parse_specs(task)] if task else [],
                           bool(config.model.get('autoencoder')))
  data = input_pipeline.build_datasets(
      config.data, global_batch_size=t.batch_size, workdir=workdir,
      process_index=jax.process_index(), process_count=jax.process_count())
  vocab = data.tokenizer.vocab_size
  if config.model.vocab_size == 0:
    config.model.vocab_size = vocab
  model = models.build(config.model)
  objective = objectives.build(config, objectives.Tokens.from_tokenizer(
      data.tokenizer, config.model.vocab_size))
  fns = step_lib.jit_functions(config, model, objective, mesh, rules)
  mesh_lib.check_batch_split(fns.batch_sharding, t.batch_size, jax.process_count())
  step_lib.check_divisible(fns.state_sharding, fns.abstract, mesh, t.batch_size)
  return Run(config=config, model=model, objective=objective, data=data, mesh=mesh,
             rules=rules, fns=fns)


def abstract_state(run: Run):
  """The state's shapes and dtypes with this run's shardings (`JitFunctions.abstract_state`)."""
  return run.fns.abstract_state()


def to_global(run: Run, local_batch: dict) -> dict:
  """Assembles this process's rows into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(run.fns.batch_sharding, np.asarray(v))
          for k, v in local_batch.items()}


def evaluate(run: Run, state) -> dict:
  """Loss in nats per token and bits per byte over the fixed validation batches (with
  `eval_bits_per_byte_is_upper_bound` when the objective reports a bound, the NELBO)."""
  sums = {}
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    for batch in run.data.eval_batches:
      out = run.eval_step(state['params'], state['collections'], to_global(run, batch))
      for k, v in jax.device_get(out).items():
        sums[k] = sums.get(k, 0.0) + float(v)
  out = {'eval_loss': sums['nll_sum'] / max(sums['weight_sum'], 1.0),
         'eval_bits_per_byte': objectives.bits_per_byte(sums['nll_sum'], sums['bytes_sum'])}
  if run.objective.UPPER_BOUND:  # a diffusion NELBO: an upper bound on the NLL, said so
    out['eval_bits_per_byte_is_upper_bound'] = True
  return out


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the summary.

  Process 0 holds the workdir's lock for the whole run (trainer/workdir.py). SIGTERM or SIGINT
  stops every process after the same step, with a checkpoint, by raising
  `errors.Preempted` (trainer/preemption.py).
  """
  wall_start = time.time()
  mesh_lib.maybe_initialize_distributed()
  held = workdir_lib.lock(workdir) if jax.process_index() == 0 else None
  try:
    with preemption.Watcher() as watcher:
      return _train(config, workdir, wall_start, watcher)
  finally:
    if held is not None:
      held.release()


def _train(config, workdir: str, wall_start: float, watcher: preemption.Watcher) -> dict:
  os.makedirs(workdir, exist_ok=True)
  run = setup(config, workdir)
  config, t = run.config, run.config.train
  state, mngr, latest = state_lib.create_or_restore(run, workdir)
  start_step = int(state['step'])
  is_main = jax.process_index() == 0
  if is_main:
    records.write_config(workdir, config)
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    compiled = run.train_step.lower(run.fns.abstract_state(), run.fns.abstract_batch(
        t.batch_size, config.data.seq_len)).compile()
  peak = (config.peak_flops * jax.device_count() if config.peak_flops
          else flops_lib.measure_matmul_peak())
  params_count = flops_lib.count_params(state['params'])
  logging.info('model: %s parameters (%s without embeddings); %d steps of %d tokens',
               f"{params_count['params']:,}", f"{params_count['params_non_embedding']:,}",
               run.total_steps, run.tokens_per_step)

  writer = metrics_lib.MetricWriter(workdir, total_steps=run.total_steps, start_step=start_step,
                                    enabled=is_main, progress_bar=t.progress_bar)
  saved_config = state_lib.saved_model_config(config.model)
  eval_metrics, train_time, interval_time, interval_steps = {}, 0.0, 0.0, 0
  last_saved = latest

  def next_batch():
    batch = to_global(run, next(run.data.train_iter))
    return batch, state_lib.data_state(run)

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
      writer.progress(done, float(metrics['loss']),
                      interval_steps * run.tokens_per_step / max(interval_time, 1e-9))
      evaluating = done % t.eval_every == 0 or last
      if done % t.log_every == 0 or last:
        record = records.log_record(metrics, step=done, tokens_per_step=run.tokens_per_step,
                                    train_flops_per_step=run.train_flops_per_step,
                                    seconds=interval_time, steps=interval_steps, peak_flops=peak)
        if evaluating:
          eval_metrics = evaluate(run, state)
          record.update(eval_metrics)
        writer.write(done, record)
        interval_time, interval_steps = 0.0, 0
      elif evaluating:
        eval_metrics = evaluate(run, state)
        writer.write(done, eval_metrics)
      preempted = watcher.requested() and not last
      if done % t.checkpoint_every == 0 or last or preempted:
        checkpoint.save(mngr, done, state, step_data_state, saved_config)
        last_saved = done
      if preempted:
        checkpoint.wait(mngr, done)
        raise errors.Preempted(
            f'{watcher.signal_name} at step {done} of {run.total_steps}; the checkpoint at '
            f'step {done} is in {workdir}: run the same command again to resume')
    checkpoint.wait(mngr, last_saved)
  finally:
    try:
      mngr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass  # an error already raised above says what failed
    writer.close()

  if not eval_metrics:  # resumed a finished run: evaluate the restored parameters
    eval_metrics = evaluate(run, state)
  summary = records.summary(run, params_count=params_count, eval_metrics=eval_metrics,
                            xla_step_flops=flops_lib.xla_flops(compiled), train_time=train_time,
                            wall_start=wall_start, peak_flops=peak,
                            device_count=jax.device_count())
  if is_main:
    records.write_summary(workdir, summary)
  return summary
