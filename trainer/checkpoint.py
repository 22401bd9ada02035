"""Checkpoints with orbax: train state, data iterator state and the model config, atomically.

Each checkpoint holds three items: `state` (step, params, optimizer state), `data` (the
grain iterator state, JSON) and `config` (the run's model config, JSON). A workdir whose
latest checkpoint was written for a different model config is refused before anything is
written, so a run is never overwritten by mistake.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import errors
from configs import common as configs_common
from models import schema
from models.hf import interop


class ConfigMismatchError(errors.CheckpointError):
  pass


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options, item_names=('state', 'data', 'config'))


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, model_config: dict):
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(model_config)))


def check_config(mngr: ocp.CheckpointManager, workdir: str, model_config: dict,
                 skip=()) -> int | None:
  """Returns the latest step, after checking it was written for `model_config`: the model
  fields must mean the same (`models.schema.diff`), except those under `skip`."""
  step = mngr.latest_step()
  if step is None:
    return None
  saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  diffs = schema.diff(saved, json.loads(json.dumps(model_config)), skip=skip)
  if diffs:
    shown = '; '.join(f'model.{k}: {a!r} in the checkpoint, {b!r} now' for k, a, b in diffs[:3])
    raise ConfigMismatchError(
        f'workdir {workdir} holds a checkpoint (step {step}) of a different model config '
        f'({shown}); nothing was written: use a new --workdir, or delete '
        f'{os.path.join(workdir, "checkpoints")} to start fresh')
  return step


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


def read_model(workdir: str, step: int | None = None):
  """(model config, params, other collections) of a workdir's latest checkpoint (or `step`),
  as numpy; the collections (e.g. the MoE routing biases) are {} for most models."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise errors.CheckpointError(f'{workdir}: no checkpoints/ directory (not an archlab workdir)')
  mngr = ocp.CheckpointManager(directory, item_names=('state', 'data', 'config'),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise errors.CheckpointError(f'{workdir}: no checkpoint'
                                 f'{"" if step is None else f" at step {step}"} '
                                 f'(steps: {list(mngr.all_steps())})')
  saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  model_config = schema.model_defaults()
  for name, value in schema.leaves(saved).items():
    try:
      configs_common.set_field(model_config, name, value)
    except KeyError:
      raise errors.CheckpointError(f'{workdir}: checkpoint {step} has model.{name}, which the '
                                   'model config (models/schema.py) no longer has') from None
  shapes = interop.variable_shapes(model_config)
  abstract = {}
  for collection, paths in shapes.items():
    dtype = jnp.dtype(model_config.param_dtype) if collection == 'params' else jnp.float32
    abstract[collection] = interop.unflatten(
        {path: jax.ShapeDtypeStruct(shape, dtype) for path, shape in paths.items()})
  item = {'params': abstract.pop('params')}
  if abstract:  # the trainer keeps the other collections in state['collections']
    item['collections'] = abstract
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True)))['state']
  mngr.close()
  return model_config, restored['params'], restored.get('collections', {})
