"""Sanity anchors of the capability protocol (configs/sweeps/mqar.py's models, trained by the
shared loop, scored by experiments.evaluate on held-out instances): two-layer attention in
Zoology's layout (BaseConv, then attention) solves MQAR at (64, 4) above 99%; the same model
whose attention sees one position (a state far too small for the pairs) stays near chance;
attention's needle accuracy is flat in context length. About 20-40 s each on 2 cores."""

import os

import ml_collections
import numpy as np
import pytest

from configs import common
from configs import transformer
from configs.sweeps import capability
from experiments import evaluate
from input_pipeline import tasks as tasks_lib
from trainer import loop

TASK = 'mqar:vocab_size=1024,seq_len=64,num_kv_pairs=4'  # 256: filler collisions cap it near 99.3%


def protocol_config(model: str, task: str, *, steps: int, seq_len=64, batch_size=64, window=16):
  """One protocol point (capability.size_overrides at d=64, lr 1e-2 of Zoology's grid,
  weight decay 0.1) for `steps` steps."""
  config = transformer.get_config(f'preset=llama_tiny,seq_len={seq_len},batch_size={batch_size}')
  arch = dict(model=model, spec=task, lr=1e-2, weight_decay=0.1)
  sweep = ml_collections.ConfigDict(dict(layout='zoology', window=window, layers=2))
  for field, value in capability.size_overrides(arch, 64, sweep).items():
    common.set_field(config, field, value)
  config.data.eval_batches = 1
  config.train.steps, config.train.progress_bar = steps, False
  config.train.eval_every = config.train.checkpoint_every = steps
  config.optim.warmup_steps = steps // 20
  return config


def train(workdir, model: str, *, steps=350, window=16):
  loop.train_and_evaluate(protocol_config(model, TASK, steps=steps, window=window), workdir)
  record = evaluate.evaluate_workdir(workdir, [TASK], [], instances=1000)
  result, = record['tasks'].values()
  return result


def test_two_layer_attention_solves_mqar(tmp_path):
  result = train(str(tmp_path), 'attention')
  assert result['accuracy'] > 0.99, result


def test_attention_that_sees_one_position_stays_near_chance(tmp_path):
  """A window of 1 behind BaseConv's 3 taps reads 3 positions: it can see a pair only when
  that pair ends right before its query (`reachable`, counted from the instances), and
  otherwise guesses among 512 values. Trained as long as the attention anchor (which reaches
  99.7%), it scores 2.2% against a reachable 3.2% here (2026-12-04)."""
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


@pytest.mark.skipif(not os.environ.get('ARCHLAB_SLOW_TESTS'),
                    reason='about 70 s of training: set ARCHLAB_SLOW_TESTS=1')
def test_attention_needle_accuracy_is_flat_in_context_length(tmp_path):
  """Zoology's attention layout twice over (`CACA`: the needle's key and value are several
  tokens, which one BaseConv-attention pair does not copy; it stayed at 21% for 600 steps),
  a BPE tokenizer of 1024 tokens, trained on RULER's S-NIAH-1 at 256 tokens for 800 steps and
  scored at 256, 512 and 1024 tokens (no positions: nothing in the model knows the length):
  every length above 85% token accuracy (97.7% at all three here, 2026-12-04), within 6
  points of each other. At 600 steps it is still before its transition: 55% at all three.
  Opt-in (ARCHLAB_SLOW_TESTS=1): it would add a minute to a suite at its time budget."""
  config = protocol_config('attention', 'niah_single_1:seq_len=256', steps=800, seq_len=256,
                           batch_size=16)
  config.model.pattern = 'CACA'
  config.data.tokenizer, config.data.bpe_vocab_size = 'bpe', 1024
  loop.train_and_evaluate(config, str(tmp_path))
  specs = [f'niah_single_1:seq_len={t}' for t in (256, 512, 1024)]
  record = evaluate.evaluate_workdir(str(tmp_path), specs, [], instances=100)
  accuracy = [r['accuracy'] for r in record['tasks'].values()]
  assert len(accuracy) == 3 and min(accuracy) > 0.85, record['tasks']
  assert max(accuracy) - min(accuracy) < 0.06, accuracy
