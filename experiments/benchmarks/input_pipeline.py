"""Input pipeline vs training: tokens/s the grain iterator delivers over tokens/s training uses.

  python -m experiments.benchmarks.input_pipeline --preset=llama_small --batch_size=8

Both are measured in the same run on the same machine: first the training step (as
train_throughput.py does), then `--pipeline_batches` batches pulled from the training iterator
and assembled into global arrays, the work the loop does per step. Target (the performance
issue): the pipeline delivers at least 50x what training consumes.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags

from configs import transformer
from experiments.benchmarks import train_throughput
from trainer import loop

_BATCHES = flags.DEFINE_integer('pipeline_batches', 500, 'Batches pulled from the iterator.')


def pipeline_tokens_per_sec(config) -> float:
  run = loop.setup(config, workdir=None)
  loop.to_global(run, next(run.data.train_iter))  # opens the cached streams
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    batch = loop.to_global(run, next(run.data.train_iter))
  batch['inputs'].block_until_ready()
  return _BATCHES.value * run.tokens_per_step / (time.perf_counter() - start)


def main(argv):
  del argv
  config = transformer.get_config(f'preset={train_throughput._PRESET.value}')
  config.train.batch_size = train_throughput._BATCH.value
  if train_throughput._SEQ.value:
    config.data.seq_len = train_throughput._SEQ.value
  training = train_throughput.measure(config)['tokens_per_sec']
  pipeline = pipeline_tokens_per_sec(config)
  print(f'{train_throughput._PRESET.value} batch {config.train.batch_size} x '
        f'{config.data.seq_len}: input pipeline {pipeline:,.0f} tokens/s, training '
        f'{training:,.0f} tokens/s -> ratio {pipeline / training:,.0f}x (target >= 50x)')


if __name__ == '__main__':
  app.run(main)
