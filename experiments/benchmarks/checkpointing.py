"""Checkpoint overhead: step time with a checkpoint every N steps, synchronous against asynchronous.

  python -m experiments.benchmarks.checkpointing --preset=llama_small --every=5 --steps=20

Times `--steps` training steps of one compiled step three ways, each from a fresh state: without
checkpoints, with an orbax save every `--every` steps written synchronously
(`train.async_checkpoint=False`), and asynchronously (the default). Each step waits for its
loss, as the trainer's loop does. Prints the time per step of each way as a ratio to the one
without checkpoints; the asynchronous line also gives the wait for the last save, which a run
pays once at its end.
"""

from __future__ import annotations

import tempfile
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax

from configs import transformer
from trainer import checkpoint
from trainer import loop
from trainer import state as state_lib

_PRESET = flags.DEFINE_string('preset', 'llama_small', 'Preset of configs/transformer.py.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Global batch size in rows.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per way, after two warm-up steps.')
_EVERY = flags.DEFINE_integer('every', 5, 'A checkpoint every this many steps.')


def time_steps(run, state, batch, *, steps: int, every: int, mngr=None, model_config=None):
  """(seconds per step, seconds waiting for the last save after the steps, state)."""
  data_state = state_lib.data_state(run)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = run.train_step(state, batch)
    jax.device_get(metrics['loss'])
    if mngr is not None and (i + 1) % every == 0:
      checkpoint.save(mngr, int(state['step']), state, data_state, model_config)
  per_step = (time.perf_counter() - start) / steps
  start = time.perf_counter()
  if mngr is not None:
    mngr.wait_until_finished()
  return per_step, time.perf_counter() - start, state


def measure(config, *, steps: int, every: int) -> dict:
  """Each way starts from a fresh state (the step donates its input state, so one state
  cannot be timed twice)."""
  run = loop.setup(config, workdir=None)
  model_config = state_lib.saved_model_config(run.config.model)
  result = {}
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    batch = loop.to_global(run, next(run.data.train_iter))

    def fresh_state():
      state = run.fns.init_state(jax.random.key(0))
      for _ in range(2):  # compile (once) and warm up
        state, metrics = run.train_step(state, batch)
      jax.block_until_ready(metrics)
      return state

    state = fresh_state()
    result['params_mb'] = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    result['none'] = time_steps(run, state, batch, steps=steps, every=every)[:2]
    for name, async_checkpoint in (('sync', False), ('async', True)):
      with tempfile.TemporaryDirectory(prefix='archlab-ckpt-bench-') as workdir:
        mngr = checkpoint.manager(workdir, keep=2, async_checkpoint=async_checkpoint)
        result[name] = time_steps(run, fresh_state(), batch, steps=steps, every=every,
                                  mngr=mngr, model_config=model_config)[:2]
        mngr.close()
  return result


def main(argv):
  del argv
  config = transformer.get_config(f'preset={_PRESET.value}')
  config.train.batch_size = _BATCH.value
  config.data.eval_batches = 1
  result = measure(config, steps=_STEPS.value, every=_EVERY.value)
  base = result['none'][0]
  print(f'{_PRESET.value} batch {_BATCH.value} x {config.data.seq_len}, state '
        f'{result["params_mb"]:.0f} MiB, a checkpoint every {_EVERY.value} steps, '
        f'{_STEPS.value} steps on {jax.device_count()} {jax.devices()[0].platform} device(s):')
  print(f'  no checkpoints  {base:.3f} s/step = 1.00')
  for name in ('sync', 'async'):
    per_step, tail = result[name]
    print(f'  {name:5s}           {per_step / base:.2f}x the step time (+{per_step / base - 1:.1%})'
          + (f'; the last save then takes {tail / base:.2f} steps to finish' if name == 'async'
             else ''))
  print(f'  async / sync    {result["async"][0] / result["sync"][0]:.2f}')


if __name__ == '__main__':
  app.run(main)
