"""A run's state at its first step: restored from the workdir's latest checkpoint, or fresh
(random, or another model's parameters with `init_from`: trainer/init_from.py)."""

from __future__ import annotations

from absl import logging
import flax.linen as nn
import jax

from models import schema
from trainer import checkpoint
from trainer import init_from as init_from_lib


def saved_model_config(model_config) -> dict:
  """The model config as checkpoints store it (plain JSON types)."""
  return model_config.to_dict()


def create_or_restore(run, workdir: str):
  """(state, checkpoint manager, latest step or None) for `run` (trainer.loop.Run).

  A workdir whose latest checkpoint holds another model (a field outside
  `schema.resumable_fields()` differs) is refused before anything is written. Checkpoints
  that do not read are moved aside and the newest one that reads is restored
  (`checkpoint.restore_latest`). A restored run also gets its data iterator's position back,
  and says so in a line when the data it reads changed since the checkpoint was written.
  """
  t = run.config.train
  mngr = checkpoint.manager(workdir, t.keep_checkpoints, t.async_checkpoint)
  latest = None
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    found = checkpoint.restore_latest(mngr, workdir, run.fns.abstract_state(),
                                      saved_model_config(run.config.model),
                                      skip=schema.resumable_fields())
    if found is not None:
      latest, state, data_state = found
      check_data_fingerprint(data_state.pop(checkpoint.FINGERPRINT_KEY, None),
                             run.data.fingerprint, latest)
      run.data.train_iter.set_state(data_state)
      logging.info('resumed from the checkpoint at step %d', latest)
    else:
      state = run.fns.init_state(jax.random.key(t.seed))
      if run.config.get('init_from'):
        state['params'] = jax.device_put(init_from_lib.load_params(run.config, state['params']),
                                         run.fns.state_sharding['params'])
  return state, mngr, latest


def data_state(run) -> dict:
  """What a checkpoint stores of the data: the iterator's position and the data's fingerprint."""
  return {**run.data.train_iter.get_state(), checkpoint.FINGERPRINT_KEY: run.data.fingerprint}


def check_data_fingerprint(saved: str | None, current: str, step: int) -> None:
  """Logs one line when a resumed run's data differ from those its checkpoint was trained on
  (the same iterator position then reads other rows)."""
  if saved and saved != current:
    logging.warning('data: the tokenized data changed since the checkpoint at step %d was '
                    'written (fingerprint %s then, %s now): the run goes on from the same '
                    'position but reads other rows than it would have', step, saved[:12],
                    current[:12])
