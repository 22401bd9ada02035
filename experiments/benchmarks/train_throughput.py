"""Training throughput: tokens/s and MFU of a preset against the machine's measured matmul peak.

  python -m experiments.benchmarks.train_throughput --preset=llama_small --batch_size=8

MFU = (analytic training FLOPs per step x steps/s) / peak, where the peak is the fp32 matmul
rate measured in the same run (best of the measurements before and after the timed steps),
unless --peak_flops gives an accelerator's. Target (the foundation issue): >= 40% on CPU.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import flax.linen as nn
import jax

from configs import common
from configs import transformer
from trainer import flops
from trainer import loop

_PRESET = flags.DEFINE_string('preset', 'llama_small', 'Preset of configs/transformer.py.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Global batch size in rows.')
_SEQ = flags.DEFINE_integer('seq_len', 0, 'Sequence length (0: the preset\'s).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps after two warm-up steps.')
_PEAK = flags.DEFINE_float('peak_flops', 0.0, 'Peak FLOP/s per device (0: measure fp32 matmul).')
_OVERRIDES = flags.DEFINE_multi_string('set', [], 'Config overrides FIELD=VALUE, e.g. model.remat=full.')


def measure(config) -> dict:
  """Times `--steps` training steps; returns tokens/s, MFU and the peak used."""
  run = loop.setup(config, workdir=None)
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    state = run.fns.init_state(jax.random.key(0))
    batches = [loop.to_global(run, next(run.data.train_iter)) for _ in range(2)]
    for batch in batches:  # compile and warm up
      state, metrics = run.train_step(state, batch)
    jax.block_until_ready(metrics)
    peak_before = flops.measure_matmul_peak()
    start = time.perf_counter()
    for i in range(_STEPS.value):
      state, metrics = run.train_step(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
  peak = _PEAK.value * jax.device_count() or max(peak_before, flops.measure_matmul_peak())
  steps_per_sec = _STEPS.value / elapsed
  return {'tokens_per_sec': steps_per_sec * run.tokens_per_step,
          'model_flops_per_sec': steps_per_sec * run.train_flops_per_step,
          'peak_flops': peak,
          'mfu': steps_per_sec * run.train_flops_per_step / peak}


def main(argv):
  del argv
  config = transformer.get_config(f'preset={_PRESET.value}')
  config.train.batch_size = _BATCH.value
  if _SEQ.value:
    config.data.seq_len = _SEQ.value
  for item in _OVERRIDES.value:
    field, _, value = item.partition('=')
    old = common.get_field(config, field)
    common.set_field(config, field, value == 'True' if isinstance(old, bool) else type(old)(value))
  result = measure(config)
  print(f'{_PRESET.value} batch {_BATCH.value} x {config.data.seq_len} on '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s): '
        f'{result["tokens_per_sec"]:,.0f} tokens/s, '
        f'{result["model_flops_per_sec"] / 1e9:.1f} GFLOP/s model, '
        f'peak {result["peak_flops"] / 1e9:.1f} GFLOP/s -> MFU {100 * result["mfu"]:.1f}%')


if __name__ == '__main__':
  app.run(main)
