"""Compile time against depth: the training step of a deep model vs a shallow one.

  python -m experiments.benchmarks.compile_time --preset=llama_small --shallow=2 --deep=24

Lowers and compiles the real training step (`jax.jit(...).lower(...).compile()`) of the preset
with `--shallow` and `--deep` repeats of its pattern unit, alternately `--repeats` times each,
and prints the best time of each and their ratio, with the layers scanned and unrolled.
Target (the performance issue): deep / shallow <= 1.5 with the layers scanned.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import flax.linen as nn
import jax

from configs import transformer
from models import lm
from trainer import loop

_PRESET = flags.DEFINE_string('preset', 'llama_small', 'Preset of configs/transformer.py.')
_SHALLOW = flags.DEFINE_integer('shallow', 2, 'Repeats of the pattern unit, shallow model.')
_DEEP = flags.DEFINE_integer('deep', 24, 'Repeats of the pattern unit, deep model.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Compilations of each, alternately.')


def compile_seconds(repeats: int, scan: bool) -> float:
  config = transformer.get_config(f'preset={_PRESET.value}')
  unit, _ = lm.split_pattern(config.model.pattern)
  config.model.pattern = unit * repeats
  config.model.scan_layers = scan
  config.train.batch_size = 8
  run = loop.setup(config, workdir=None)
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    state = run.fns.abstract_state()
    batch = run.fns.abstract_batch(8, config.data.seq_len)
    start = time.perf_counter()
    run.train_step.lower(state, batch).compile()
  return time.perf_counter() - start


def main(argv):
  del argv
  for scan in (True, False):
    best = {_SHALLOW.value: float('inf'), _DEEP.value: float('inf')}
    for _ in range(_REPEATS.value):
      for depth in best:
        best[depth] = min(best[depth], compile_seconds(depth, scan))
    print(f'{_PRESET.value} {"scanned" if scan else "unrolled"}: compile {best[_SHALLOW.value]:.1f} s '
          f'at {_SHALLOW.value} repeats, {best[_DEEP.value]:.1f} s at {_DEEP.value} -> ratio '
          f'{best[_DEEP.value] / best[_SHALLOW.value]:.2f}' + (' (target <= 1.5)' if scan else ''))


if __name__ == '__main__':
  app.run(main)
