"""Checkpoints with orbax: train state, data iterator state and the model config, atomically.

Each checkpoint holds three items: `state` (step, params, optimizer state), `data` (the
grain iterator state, JSON) and `config` (the run's model config, JSON). A workdir whose
latest checkpoint was written for a different model config is refused before anything is
written, so a run is never overwritten by mistake.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp

import errors
from models import schema


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
