"""Sanity anchors of the capability protocol (configs/sweeps/mqar.py's models, trained by the
shared loop, scored by experiments.evaluate on held-out instances): two-layer attention in
Zoology's layout (BaseConv, then attention) solves MQAR at (64, 4) above 99%, and the same
model whose attention sees one position (a state far too small for the pairs) stays near
chance. About 25 s each on 2 cores."""

import ml_collections
import numpy as np

from configs import transformer
from configs.sweeps import capability
from experiments import evaluate
from input_pipeline import tasks as tasks_lib
from trainer import loop

TASK = 'mqar:vocab_size=256,seq_len=64,num_kv_pairs=4'


def train(workdir, model: str, *, steps=800, window=16):
  """One protocol point (capability.size_overrides at d=64, lr 3e-3, weight decay 0.1) trained
  for `steps` steps of 64 rows."""
  config = transformer.get_config('preset=llama_tiny,seq_len=64,batch_size=64')
  arch = dict(model=model, spec=TASK, lr=3e-3, weight_decay=0.1)
  sweep = ml_collections.ConfigDict(dict(layout='zoology', window=window, layers=2))
  for field, value in capability.size_overrides(arch, 64, sweep).items():
    *path, leaf = field.split('.')
    node = config
    for key in path:
      node = node[key]
    node[leaf] = value
  config.model.max_len = 64
  config.data.eval_batches = 1
  config.train.steps, config.train.progress_bar = steps, False
  config.train.eval_every = config.train.checkpoint_every = steps
  config.optim.warmup_steps = steps // 20
  loop.train_and_evaluate(config, workdir)
  record = evaluate.evaluate_workdir(workdir, [TASK], [], instances=1000)
  result, = record['tasks'].values()
  return result


def test_two_layer_attention_solves_mqar(tmp_path):
  result = train(str(tmp_path), 'attention')
  assert result['accuracy'] > 0.99, result


def test_attention_that_sees_one_position_stays_near_chance(tmp_path):
  """A window of 1 behind BaseConv's 3 taps reads 3 positions: it can see a pair only when
  that pair ends right before its query (`reachable`, counted from the instances), and
  otherwise guesses among 128 values."""
  result = train(str(tmp_path), 'sliding_window', window=1)
  task, = tasks_lib.build(TASK, None, None)
  hits = total = 0
  for index in range(1000):
    inputs, _, answer = task.generate(task.rng('test', index), 'test')
    for q in np.nonzero(answer)[0]:
      pair = int(np.nonzero(inputs[:8:2] == inputs[q])[0][0])
      hits += 2 * pair + 1 >= q - 2   # the value within the convolution's reach
      total += 1
  reachable = hits / total
  assert reachable < 0.1, reachable
  assert result['accuracy'] < reachable + 0.05, (result, reachable)
