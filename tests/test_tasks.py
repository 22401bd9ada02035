"""The task generators against their definitions (input_pipeline/tasks): where the answers are,
which ids keys, values and noise come from, the gap and depth distributions, seeds and splits,
the training rows `data.task` makes, and the one-line refusals."""

import os
import re

import numpy as np
import pytest
from scipy import stats

import errors
from configs import common
from input_pipeline import tasks
from input_pipeline import tokenizer as tokenizer_lib
from input_pipeline.tasks import mqar as mqar_lib
from input_pipeline.tasks import niah as niah_lib


def _instances(spec, n, split='test', **kwargs):
  task, = tasks.build([spec], **kwargs)
  return task, [task.instance(split, i) for i in range(n)]


# --- MQAR (Zoology) ---

def test_mqar_layout_and_vocabulary_split():
  task, rows = _instances('mqar', 300)
  V, P, T = 8192, 4, 64
  for row in rows:
    x, y, answer = row['inputs'], row['targets'], row['answer']
    assert len(x) == T and answer.sum() == P
    keys, values = x[0:2 * P:2], x[1:2 * P:2]
    assert ((1 <= keys) & (keys < V // 2)).all() and ((V // 2 <= values) & (values < V)).all()
    assert len(set(keys)) == P and len(set(values)) == P
    at = np.flatnonzero(answer)
    assert (at >= 2 * P).all() and ((at - 2 * P) % 2 == 0).all()   # queries at 2P + 2g
    assert sorted(x[at]) == sorted(keys)                            # each key queried once
    assert dict(zip(keys, values)) == dict(zip(x[at], y[at]))       # the answer is its value
    np.testing.assert_array_equal(row['weights'], answer)           # only answers are scored
  train = task.instance('train', 0)
  np.testing.assert_array_equal(train['weights'], train['answer'])  # and trained (Zoology)


def test_mqar_gaps_follow_the_power_law():
  task, rows = _instances('mqar:num_kv_pairs=1,seq_len=64', 4000)  # one gap: its law exactly
  p = mqar_lib.gap_probabilities(31, 0.01)
  gaps = np.array([(np.flatnonzero(r['answer'])[0] - 2) // 2 for r in rows])
  counts = np.bincount(gaps, minlength=31)
  observed, expected = counts, p * len(gaps)
  assert expected.min() > 5                        # the chi-square test's condition holds
  assert stats.chisquare(observed, expected).pvalue > 1e-3
  assert counts[0] > 0.2 * len(gaps)  # p(0) = 0.25: near queries dominate
  # Uniform (power_a=1) is a different law: the same test rejects it.
  assert stats.chisquare(observed, np.full(len(observed), len(gaps) / len(observed))).pvalue < 1e-6


def test_mqar_filler_is_uniform_and_seeds_split():
  task, rows = _instances('mqar:seq_len=256,num_kv_pairs=16', 100)
  filler = np.concatenate([r['inputs'][32:][~r['answer'][32:]] for r in rows])
  assert abs(filler.mean() / 8192 - 0.5) < 0.02 and filler.min() >= 0 and filler.max() < 8192
  plain, = tasks.build(['mqar:random_non_queries=false'])
  x = plain.instance('test', 0)['inputs']
  assert (x[8:][~plain.instance('test', 0)['answer'][8:]] == 0).all()
  a, b = task.instance('test', 5), task.instance('test', 5)
  np.testing.assert_array_equal(a['inputs'], b['inputs'])            # deterministic
  other, = tasks.build(['mqar:seq_len=256,num_kv_pairs=16,seed=1'])
  assert not np.array_equal(a['inputs'], other.instance('test', 5)['inputs'])
  assert not np.array_equal(a['inputs'], task.instance('train', 5)['inputs'])


# --- MAD ---

def _check_recall(x, y, answer, n_keys, n, noise=()):
  """Pairs (key, value) over the row; answers are exactly the values of keys seen before."""
  seq = np.append(x, y[-1])
  seen, kv = set(), {}
  for i in range(0, len(seq), 2):
    k, v = int(seq[i]), int(seq[i + 1])
    assert not (i and answer[i - 1])                     # keys (and noise) are never scored
    if k in noise:
      assert v in noise and not answer[i]
      continue
    assert 0 <= k < n_keys <= v < n, (k, v)
    assert kv.setdefault(k, v) == v                      # one value per key in an instance
    assert answer[i] == (k in seen)                      # a value is scored iff its key came before
    seen.add(k)
  assert answer[-1]                                      # the final probe is scored


def test_in_context_recall():
  task, rows = _instances('in_context_recall', 50)
  for r in rows:
    assert len(r['inputs']) == 127
    _check_recall(r['inputs'], r['targets'], r['answer'], 8, 16)
    np.testing.assert_array_equal(r['targets'][:-1], r['inputs'][1:])
  train = task.instance('train', 0)
  assert (train['weights'] == 1).all() and train['answer'].any()  # MAD trains on every token


def test_noisy_recall_noise_fraction():
  task, rows = _instances('noisy_recall', 200)
  noise = set(range(16, 32))
  pairs = np.concatenate([np.append(r['inputs'], r['targets'][-1])[:-2:2] for r in rows])
  fraction = np.isin(pairs, list(noise)).mean()
  assert abs(fraction - 0.2 * 62 / 63) < 0.015, fraction   # 0.2 of all but the kept pair
  for r in rows[:20]:
    _check_recall(r['inputs'], r['targets'], r['answer'], 8, 16, noise)
    assert not np.isin(r['targets'][r['answer']], list(noise)).any()


def _runs(tokens, n_keys):
  """Maximal runs of key ids (< n_keys) and value ids, as (is_key, tuple)."""
  out = []
  for t in tokens:
    is_key = t < n_keys
    if out and out[-1][0] == is_key:
      out[-1][1].append(int(t))
    else:
      out.append((is_key, [int(t)]))
  return [(k, tuple(v)) for k, v in out]


def test_fuzzy_recall_motifs():
  for split in ('train', 'test'):
    task, rows = _instances('fuzzy_recall', 60, split=split)
    sizes, planted = set(), 0
    for r in rows:
      seq = np.append(r['inputs'], r['targets'][-1])
      assert len(r['inputs']) == 128
      body = seq[np.argmax(seq != 15):]                  # the last id pads on the left
      runs = _runs(body, 7)
      assert [k for k, _ in runs] == [True, False] * (len(runs) // 2)
      kv = {}
      for (_, k), (_, v) in zip(runs[0::2], runs[1::2]):
        assert len(set(k)) == len(k) <= 3 and len(set(v)) == len(v) <= 3
        sizes.add(len(k))
        assert kv.setdefault(k, v) == v
      probe_k, probe_v = runs[-2][1], runs[-1][1]
      planted += runs.count((True, probe_k)) >= 2        # planted earlier, repeated at the end
      scored = r['targets'][r['answer']]
      assert tuple(scored[-len(probe_v):]) == probe_v
    assert sizes == ({1, 2, 3} if split == 'train' else {3})  # tests prompt 3-token keys
    # MAD plants the probe at a random point of the row; one drawn in the last few tokens is
    # never planted (as in MAD), so the probe is recallable in most rows, not all.
    assert planted >= 0.85 * len(rows)


def test_selective_copying():
  task, rows = _instances('selective_copying', 50)
  for r in rows:
    x, y, answer = r['inputs'], r['targets'], r['answer']
    assert len(x) == 256 and x[-17] == 15 and (x[-16:] == 14).all()
    data = x[:-17]
    assert (data == 14).sum() == 223
    np.testing.assert_array_equal(y[answer], data[data != 14])  # the tokens, in order
    assert answer.sum() == 16 and answer[-16:].all()
  assert np.mean([r['inputs'][0] == 14 for r in rows]) > 0.5   # blanks land anywhere before


def test_memorization_map_is_fixed():
  task, rows = _instances('memorization', 40)
  train = [task.instance('train', i) for i in range(40)]
  mapping = {}
  for r in rows + train:
    x, y, answer = r['inputs'], r['targets'], r['answer']
    assert (x[1::2] == 255).all() and (answer == (np.arange(32) % 2 == 1)).all()
    for k, v in zip(x[0::2], y[1::2]):
      assert 0 <= k < 127 <= v < 255
      assert mapping.setdefault(int(k), int(v)) == v     # one map across instances and splits
  assert len(set(mapping.values())) == len(mapping)


def test_compression_generator_and_refusal():
  task, rows = _instances('compression', 5)
  for r in rows:
    assert r['inputs'][-1] == 15 and (r['inputs'][:-1] < 15).all()
    np.testing.assert_array_equal(r['targets'], r['inputs'])
  tasks.check_trainable([task], 20, 'the model')  # ids fit
  tasks.check_backbone([type(task)], autoencoder=True)
  with pytest.raises(errors.DataError, match='needs MAD.s autoencoder backbone: set model.autoencoder=True'):
    tasks.check_backbone([type(task)], autoencoder=False)
  with pytest.raises(errors.DataError, match='model.autoencoder=True sees the whole row'):
    tasks.check_backbone([tasks.TASKS['mqar']], autoencoder=True)


# --- needle retrieval (RULER) ---

@pytest.fixture(scope='module')
def text_source():
  return tasks.corpus_text(common.base_config().data)


@pytest.mark.parametrize('form', [1, 2, 3])
def test_needle_prompt_answer_and_length(form, text_source):
  tokenizer = tokenizer_lib.ByteTokenizer()
  task, rows = _instances(f'niah_single_{form}:seq_len=1024', 30, tokenizer=tokenizer,
                          text_source=text_source)
  value_re = r'\d{7}' if form < 3 else r'[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}'
  kind = 'number' if form < 3 else 'uuid'
  for r in rows:
    assert r['inputs'][0] == tokenizer.bos_id and len(r['inputs']) <= 1024
    assert len(r['inputs']) > 1024 - 200                 # the haystack fills the row
    answer = tokenizer.decode(r['targets'][r['answer']])
    assert re.fullmatch(' ' + value_re, answer) and r['answer'][-len(answer):].all()
    text = tokenizer.decode(r['inputs'])
    key = re.search(rf'special magic {kind} for (\S+) mentioned', text).group(1)
    needle = f'One of the special magic {kind}s for {key} is: {answer[1:]}.'
    assert text.count(needle) == 1 and text.count(answer[1:]) == 1
    assert text.endswith(f'The special magic {kind} for {key} mentioned in the provided text is'
                         + answer[:-1])
    if form == 1:
      assert set(text.split('\n')[1:-1]) == {needle, niah_lib.NOISE}


def test_needle_depths_and_held_out_haystack(text_source):
  tokenizer = tokenizer_lib.ByteTokenizer()
  noise, = tasks.build(['niah_single_1:seq_len=2048'], tokenizer)
  depth = []
  for i in range(200):
    _, _, at, lines, _ = noise.build(noise.rng('test', i), 'test')
    depth.append((at + 0.5) / lines)
  assert stats.kstest(depth, 'uniform').pvalue > 1e-3   # uniformly between the lines
  corpus, = tasks.build(['niah_single_2:seq_len=2048'], tokenizer, text_source)
  allowed = set(niah_lib.DEPTHS.tolist())
  val, train = text_source('val'), text_source('train')
  for i in range(40):
    _, _, at, lines, _ = corpus.build(corpus.rng('test', i), 'test')
    assert any(at == int(lines * d / 100) for d in allowed)  # one of RULER's 40 depths
  x = tokenizer.decode(corpus.instance('test', 0)['inputs']).split('\n')
  long_lines = [line for line in x[2:-2] if len(line) > 40 and 'special magic' not in line]
  assert long_lines and all(line in val for line in long_lines)
  assert not all(line in train for line in long_lines)  # held-out text, not the train split's
  with pytest.raises(errors.DataError, match='seq_len=256 cannot hold'):
    tasks.build(['niah_single_1:seq_len=256'], tokenizer)


# --- rows for the trainer, specs, refusals ---

def test_data_task_builds_training_rows(tmp_path):
  config = common.base_config()
  config.data.task = 'mqar:vocab_size=64,num_kv_pairs=2,seq_len=16;in_context_recall:seq_len=32'
  config.data.seq_len, config.data.eval_batches = 32, 2
  data = tasks.build_datasets(config.data, global_batch_size=4, workdir=str(tmp_path))
  assert data.tokenizer.vocab_size == 64 + 4
  assert tokenizer_lib.load_tokenizer(os.path.join(tmp_path, 'tokenizer.json')).fingerprint == \
      data.tokenizer.fingerprint
  batch = next(data.train_iter)
  assert batch['inputs'].shape == (4, 32) and set(batch) == {
      'inputs', 'targets', 'positions', 'segment_ids', 'weights'}
  first = data.eval_batches[0]
  mqar_row, recall_row = first['inputs'][0], first['inputs'][1]     # val interleaves the tasks
  assert (mqar_row[16:] == data.tokenizer.pad_id).all() and (first['weights'][0][16:] == 0).all()
  assert first['weights'][0].sum() == 2 and recall_row[-1] == data.tokenizer.pad_id
  assert data.stats['train_rows'] == 100_000 + 12_800


@pytest.mark.parametrize('spec, field, message', [
    ('copying', 'task', "unknown task 'copying'"),
    ('mqar:pairs=4', 'task', "unknown option 'pairs'"),
    ('mqar:seq_len=sixty', 'task', 'is not a int'),
    ('mqar:seq_len=64,num_kv_pairs=17', 'task', 'num_kv_pairs=17 needs seq_len'),
    ('mqar:seq_len=128', 'seq_len', 'set data.seq_len>=128'),
])
def test_bad_task_specs_are_one_line(spec, field, message, tmp_path):
  del field
  config = common.base_config()
  config.data.task, config.data.seq_len = spec, 64
  with pytest.raises(errors.DataError, match=re.escape(message)) as e:
    tasks.build_datasets(config.data, global_batch_size=4, workdir=str(tmp_path))
  assert '\n' not in str(e.value)
