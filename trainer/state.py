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
  `schema.resumable_fields()` differs) is refused before anything is written. A restored run
  also gets its data iterator's position back.
  """
  t = run.config.train
  mngr = checkpoint.manager(workdir, t.keep_checkpoints)
  latest = checkpoint.check_config(mngr, workdir, saved_model_config(run.config.model),
                                   skip=schema.resumable_fields())
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    if latest is not None:
      state, data_state = checkpoint.restore(mngr, latest, run.fns.abstract_state())
      run.data.train_iter.set_state(data_state)
      logging.info('resumed from the checkpoint at step %d', latest)
    else:
      state = run.fns.init_state(jax.random.key(t.seed))
      if run.config.get('init_from'):
        state['params'] = jax.device_put(init_from_lib.load_params(run.config),
                                         run.fns.state_sharding['params'])
  return state, mngr, latest
