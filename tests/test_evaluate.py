"""experiments/evaluate.py: scoring against an oracle (a model that always says token 0),
the command line on a run trained on a task, eval.json, the suites and the one-line errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import errors
from configs import transformer
from experiments import evaluate
from input_pipeline import tasks as tasks_lib
from input_pipeline import tokenizer as tokenizer_lib
from trainer import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = 'mqar:vocab_size=64,seq_len=32,num_kv_pairs=4,num_test=24'


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A 2-layer attention model trained for a few steps on a small MQAR."""
  workdir = str(tmp_path_factory.mktemp('mqar_run'))
  config = transformer.get_config('preset=llama_tiny,runlocal')
  config.model.pattern = 'AF' * 2
  config.data.task, config.data.seq_len, config.data.eval_batches = TASK, 32, 1
  config.model.max_len = 32
  config.train.steps, config.train.batch_size, config.train.progress_bar = 4, 8, False
  config.train.checkpoint_every, config.peak_flops = 4, 1e11
  loop.train_and_evaluate(config, workdir)
  return workdir


def test_scores_equal_an_oracle_on_a_zero_model(run_dir):
  """All-zero parameters give all-zero logits, whose argmax is token 0: accuracy must be the
  fraction of answer tokens that are 0, computed here from the instances themselves."""
  model_config, params, _ = evaluate.checkpoint.read_model(run_dir)
  zero = {'params': jax.tree.map(np.zeros_like, params)}
  tokenizer = tokenizer_lib.SymbolTokenizer(60)
  spec = 'selective_copying:vocab_size=4,seq_len=32,num_tokens_to_copy=6'
  result, = evaluate.evaluate(model_config, zero, tokenizer, [spec], instances=40,
                              batch_size=16).values()  # 40 = 2.5 batches: a padded last one
  task, = tasks_lib.build([spec])
  answers = [task.instance('test', i) for i in range(40)]
  zeros_I = np.array([np.sum(a['targets'][a['answer']] == 0) for a in answers])
  assert result['answer_tokens'] == 40 * 6
  assert result['accuracy'] == pytest.approx(zeros_I.sum() / 240)
  assert result['exact_match'] == pytest.approx(np.mean(zeros_I == 6))
  # Zero logits: every answer token has probability 1 / V, teacher-forced.
  assert result['answer_nll'] == pytest.approx(np.log(model_config.vocab_size), rel=1e-5)
  low, high = result['accuracy_interval']
  assert low < result['accuracy'] < high and 0.2 < result['accuracy'] < 0.8  # ids 0, 1 of 2
  # MQAR's answers are values (the upper half of the ids): never 0.
  mqar, = evaluate.evaluate(model_config, zero, tokenizer, ['mqar:vocab_size=60,seq_len=32'],
                            instances=8).values()
  assert mqar['accuracy'] == 0.0 and mqar['state_bytes'] > 0


def test_command_line_scores_the_trained_task(run_dir):
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.evaluate', f'--workdir={run_dir}',
       '--tasks=mqar:seq_len=32,num_kv_pairs=8', '--task_options=mqar:vocab_size=64',
       '--instances=16'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(run_dir, 'eval.json')) as f:
    record = json.load(f)
  assert set(record['tasks']) == {'mqar:num_kv_pairs=8,seq_len=32,vocab_size=64'}
  assert record['step'] == 4 and record['trained_on'] == TASK
  for r in record['tasks'].values():
    assert r['instances'] == 16 and 0.0 <= r['accuracy'] <= 1.0
  # Without --tasks: the run's own task, added to eval.json beside the others.
  again = evaluate.evaluate_workdir(run_dir, [], [], instances=8)
  assert set(again['tasks']) == {'mqar:num_kv_pairs=8,seq_len=32,vocab_size=64',
                                 'mqar:seq_len=32,vocab_size=64'}


def test_expand_suites_and_options():
  assert len(evaluate.expand(['mqar', 'mad', 'niah'], [])) == 5 + 5 + 9
  specs = evaluate.expand(['mad'], ['mad:vocab_size=32', 'memorization:vocab_size=512'])
  assert 'memorization:vocab_size=512' in specs and 'selective_copying:vocab_size=32' in specs
  # --tasks is a comma list: options after a task's first join it (no ':' in them).
  assert evaluate.expand(['niah_single_1', 'mqar:seq_len=128', 'num_kv_pairs=8'], []) == [
      'niah_single_1', 'mqar:num_kv_pairs=8,seq_len=128']


@pytest.mark.parametrize('call, message', [
    (lambda d: evaluate.evaluate_workdir(d, ['copying'], []), "unknown task 'copying'"),
    (lambda d: evaluate.evaluate_workdir(d + '/nothing', ['mqar'], []), 'no such directory'),
    (lambda d: evaluate.evaluate_workdir(d, ['mqar'], []), 'give the task vocab_size<=68'),
    (lambda d: evaluate.evaluate_workdir(d, ['niah'], []), 'no text encoding'),
    (lambda d: evaluate.evaluate_workdir(d, ['compression'], []), 'autoencoder'),
    (lambda d: evaluate.expand(['mqar'], ['mqar:pairs=3']), "no option 'pairs'"),
    (lambda d: evaluate.expand(['mqar'], ['chess:depth=3']), "'chess' is not a suite"),
])
def test_one_line_errors(run_dir, call, message):
  with pytest.raises(errors.UserError, match=message) as e:
    call(run_dir)
  assert '\n' not in str(e.value)


def test_a_corpus_run_needs_tasks(tmp_path):
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'data': {'task': ''}, 'objective': {'name': 'next_token'}}, f)
  with pytest.raises(errors.ConfigError, match='trained on a corpus, not a task: give --tasks'):
    evaluate.evaluate_workdir(str(tmp_path), [], [])
  with pytest.raises(errors.CheckpointError, match='no checkpoints/'):
    evaluate.evaluate_workdir(str(tmp_path), ['mqar'], [])


def test_diffusion_rows_mask_exactly_the_answers():
  """The whole sequence (inputs[0], then the targets), the answers one later than their
  targets' index, and nothing else masked."""
  task, = tasks_lib.build(['selective_copying:vocab_size=4,seq_len=32,num_tokens_to_copy=6'])
  instance = task.instance('test', 3)
  row = tasks_lib.pad_row(instance, 32, 0)
  z_BS, x_BS, answer_BS = (np.asarray(a)[0] for a in evaluate.diffusion_rows(
      {k: v[None] for k, v in row.items()}, mask_id=99))
  np.testing.assert_array_equal(x_BS[1:len(instance['targets']) + 1], instance['targets'])
  assert x_BS[0] == instance['inputs'][0]
  np.testing.assert_array_equal(np.flatnonzero(answer_BS), np.flatnonzero(instance['answer']) + 1)
  np.testing.assert_array_equal(x_BS[answer_BS], instance['targets'][instance['answer']])
  assert np.all(z_BS[answer_BS] == 99) and np.array_equal(z_BS[~answer_BS], x_BS[~answer_BS])


@pytest.mark.parametrize('objective', ['masked_diffusion', 'block_diffusion'])
def test_diffusion_scoring_against_oracles(run_dir, objective):
  """A zero model says token 0 everywhere: accuracy is the share of answers that are 0 (the
  answers are read where they are). A model that copies its input (one-hot tied embeddings,
  every sublayer's output zero) says MASK at every masked answer: accuracy 0 (the answers are
  hidden, and block diffusion's logits are the noisy stream's, not the clean one's)."""
  model_config, params, _ = evaluate.checkpoint.read_model(run_dir)
  model_config.bidirectional = True
  if objective == 'block_diffusion':
    model_config.diffusion_block = 4
  tokenizer = tokenizer_lib.SymbolTokenizer(60)
  spec = 'selective_copying:vocab_size=4,seq_len=32,num_tokens_to_copy=6'
  zero = {'params': jax.tree.map(np.zeros_like, params)}
  result, = evaluate.evaluate(model_config, zero, tokenizer, [spec], instances=24,
                              objective={'name': objective}).values()
  task, = tasks_lib.build([spec])
  answers = [task.instance('test', i) for i in range(24)]
  zeros = sum(np.sum(a['targets'][a['answer']] == 0) for a in answers)
  assert result['answer_tokens'] == 24 * 6 and 0 < zeros < 24 * 6
  assert result['accuracy'] == pytest.approx(zeros / (24 * 6))
  # LLaDA's estimator on zero logits: each masked answer costs log(V - 1) (MASK excluded), and
  # l masked of L weighted L / l is exactly L log(V - 1) per instance, whatever the draws.
  assert result['answer_nll'] == pytest.approx(np.log(model_config.vocab_size - 1), rel=1e-5)

  vocab, width = params['embed'].shape  # 68 x 64: every id these rows hold (< 60) is one-hot
  copy = jax.tree_util.tree_map_with_path(
      lambda path, p: np.ones_like(p) if 'scale' in jax.tree_util.keystr(path) else
      np.zeros_like(p), params)
  copy['embed'] = np.eye(vocab, width, dtype=params['embed'].dtype)
  if 'head' in copy:  # untied: the head reads the one-hot back
    copy['head'] = copy['embed'].T.copy()
  result, = evaluate.evaluate(model_config, {'params': copy}, tokenizer, [spec], instances=24,
                              objective={'name': objective, 'mask_id': 59}).values()
  assert result['accuracy'] == 0.0


def test_a_masked_diffusion_run_is_scored_by_its_denoiser(tmp_path):
  workdir = str(tmp_path / 'mdlm')
  config = transformer.get_config('preset=llada_tiny,runlocal')
  config.model.pattern = 'AF'
  config.data.task, config.data.seq_len, config.data.eval_batches = TASK, 32, 1
  config.train.steps, config.train.batch_size, config.train.progress_bar = 2, 8, False
  config.train.checkpoint_every, config.peak_flops = 2, 1e11
  loop.train_and_evaluate(config, workdir)
  record = evaluate.evaluate_workdir(workdir, [], [], instances=8)
  assert record['objective'] == 'masked_diffusion'
  assert record['scoring'] == evaluate.DIFFUSION_SCORING
  result, = record['tasks'].values()
  assert result['instances'] == 8 and result['answer_tokens'] == 8 * 4
  assert 0.0 <= result['accuracy'] <= 1.0
