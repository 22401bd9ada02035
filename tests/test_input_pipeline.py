"""Tests of input_pipeline: corpora, splits, tokenizers, packing, cache, grain iterators."""

import hashlib
import json
import logging
import os
import re
import sysconfig

import ml_collections
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from input_pipeline import BpeTokenizer, ByteTokenizer, build_datasets, load_tokenizer
from input_pipeline import corpus as corpus_lib
from input_pipeline import pipeline
from input_pipeline import tokenizer as tokenizer_lib

B, E = ByteTokenizer.bos_id, ByteTokenizer.eos_id
ROW_FIELDS = ('inputs', 'targets', 'positions', 'segment_ids', 'weights')
WORDS = ('alpha beta gamma delta def class return import lambda yield café naïve 日本 😀 '
         'for while if else').split()


def data_config(tmp_path, **overrides):
  """The defaults of configs/common.py, with the cache under tmp_path."""
  config = ml_collections.ConfigDict(dict(
      corpus='stdlib', paths='', text_field='text', tokenizer='bytes', bpe_vocab_size=4096,
      tokenizer_path='', bpe_train_bytes=8_000_000, seq_len=256, val_fraction=0.05,
      shuffle_seed=0, eval_batches=4, cache_dir=str(tmp_path / 'cache')))
  config.update(overrides)
  return config


def write_text_corpus(directory, num_files=24, words_per_file=300):
  """Writes num_files deterministic text files; returns their glob."""
  rng = np.random.default_rng(0)
  directory.mkdir(parents=True, exist_ok=True)
  for i in range(num_files):
    words = rng.choice(WORDS, size=words_per_file)
    (directory / f'doc{i:02d}.txt').write_text(f'doc {i}\n' + ' '.join(words), encoding='utf-8')
  return str(directory / '*.txt')


def small_config(tmp_path, **overrides):
  glob = write_text_corpus(tmp_path / 'corpus')
  return data_config(tmp_path, corpus='text', paths=glob, seq_len=16, val_fraction=0.25,
                     eval_batches=2, **overrides)


def sha1_unit(key):
  return int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) / 2.0**64


# 1. The default corpus: the standard library.

@pytest.fixture(scope='module')
def stdlib_build(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('stdlib')
  config = data_config(tmp_path)
  return config, build_datasets(config, global_batch_size=8, workdir=None)


def test_stdlib_files_and_split(tmp_path):
  corpus = corpus_lib.list_corpus_files(data_config(tmp_path))
  root = sysconfig.get_paths()['stdlib']
  assert corpus == corpus_lib.list_corpus_files(data_config(tmp_path))
  keys = [key for _, key in corpus.files]
  assert 'json/decoder.py' in keys and 'os.py' in keys
  assert all(not os.path.isabs(k) and '\\' not in k for k in keys)
  assert not any('site-packages' in p or 'dist-packages' in p for p, _ in corpus.files)
  assert all(p.endswith('.py') and p.startswith(root) for p, _ in corpus.files)
  # The split is a function of the relative path alone, by sha1, so any machine agrees.
  for key in keys[:200]:
    assert corpus_lib.is_validation(key, 0.05) == (sha1_unit(key) < 0.05)


def test_stdlib_build(stdlib_build):
  config, datasets = stdlib_build
  stats = datasets.stats
  corpus = corpus_lib.list_corpus_files(config)
  assert stats['num_train_docs'] + stats['num_val_docs'] + stats['skipped_files'] == len(
      corpus.files)
  assert stats['skipped_files'] > 0                     # the empty __init__.py files
  assert stats['val_bytes'] >= 1_000_000
  # Bytes: one token per byte plus BOS and EOS per document.
  assert stats['train_tokens'] == stats['train_bytes'] + 2 * stats['num_train_docs']
  assert stats['val_tokens'] == stats['val_bytes'] + 2 * stats['num_val_docs']
  expected_val = sum(corpus_lib.is_validation(k, 0.05) for p, k in corpus.files
                     if os.path.getsize(p))
  assert stats['num_val_docs'] <= expected_val          # minus the non-UTF-8 ones
  batch = next(datasets.train_iter)
  for name in ROW_FIELDS:
    assert batch[name].shape == (8, 256), name
  assert batch['inputs'].dtype == np.int32 and batch['weights'].dtype == np.float32
  assert len(datasets.eval_batches) == 4


def test_stdlib_second_build_is_cache_hit(stdlib_build, monkeypatch):
  config, first = stdlib_build
  assert not first.stats['cache_hit']
  def fail(*args, **kwargs):
    raise AssertionError('tokenized again despite the cache')
  monkeypatch.setattr(ByteTokenizer, 'encode_batch', fail)
  monkeypatch.setattr(ByteTokenizer, 'encode', fail)
  second = build_datasets(config, global_batch_size=8, workdir=None)
  assert second.stats['cache_hit']
  for a, b in zip(first.eval_batches, second.eval_batches):
    for name in ROW_FIELDS:
      np.testing.assert_array_equal(a[name], b[name])
  directory = second.stats['cache_dir']
  assert sorted(os.listdir(directory)) == ['meta.json', 'train.npy', 'val.npy']   # no temp files
  stream = np.load(os.path.join(directory, 'train.npy'), mmap_mode='r')
  assert isinstance(stream, np.memmap) and stream.dtype == np.uint16


# 2. User data.

def test_text_corpus_comma_separated_globs(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b' / 'sub').mkdir(parents=True)
  (tmp_path / 'a' / 'x.txt').write_text('first ' * 50)
  (tmp_path / 'b' / 'x.txt').write_text('second ' * 50)
  (tmp_path / 'b' / 'sub' / 'y.txt').write_text('third ' * 50)
  paths = f'{tmp_path}/a/*.txt, {tmp_path}/b/**/*.txt'
  corpus = corpus_lib.list_corpus_files(data_config(tmp_path, corpus='text', paths=paths))
  assert [key for _, key in corpus.files] == ['a/x.txt', 'b/sub/y.txt', 'b/x.txt']
  docs = list(corpus_lib.iter_documents(corpus))
  assert [d.text.split()[0] for d in docs] == ['first', 'third', 'second']
  config = data_config(tmp_path, corpus='text', paths=paths, seq_len=8, eval_batches=1,
                       val_fraction=0.5)
  stats = build_datasets(config, global_batch_size=2, workdir=None).stats
  assert stats['num_train_docs'] + stats['num_val_docs'] == 3
  assert stats['num_train_docs'] >= 1 and stats['num_val_docs'] >= 1


def test_jsonl_corpus(tmp_path):
  lines = [json.dumps({'text': f'record {i} ' * 20, 'id': i}) for i in range(10)]
  (tmp_path / 'd.jsonl').write_text('\n'.join(lines[:5]) + '\n\n' + '\n'.join(lines[5:]) + '\n')
  config = data_config(tmp_path, corpus='jsonl', paths=str(tmp_path / '*.jsonl'), seq_len=8,
                       eval_batches=1, val_fraction=0.3)
  docs = list(corpus_lib.iter_documents(corpus_lib.list_corpus_files(config)))
  assert [d.key for d in docs] == [f'd.jsonl:{n}' for n in (1, 2, 3, 4, 5, 7, 8, 9, 10, 11)]
  assert docs[5].text == 'record 5 ' * 20
  stats = build_datasets(config, global_batch_size=2, workdir=None).stats
  assert stats['num_train_docs'] + stats['num_val_docs'] == 10
  expected_val = sum(sha1_unit(d.key) < 0.3 for d in docs)
  assert stats['num_val_docs'] == max(expected_val, 1)


def test_jsonl_missing_field(tmp_path):
  (tmp_path / 'd.jsonl').write_text('{"text": "ok"}\n{"body": "no text"}\n')
  config = data_config(tmp_path, corpus='jsonl', paths=str(tmp_path / 'd.jsonl'))
  with pytest.raises(ValueError, match=r"d\.jsonl:2: no field 'text' \(data.text_field\)"):
    build_datasets(config, global_batch_size=2, workdir=None)


def test_split_never_leaves_validation_empty(tmp_path):
  for i in range(4):
    (tmp_path / f'{i}.txt').write_text(f'document number {i}')
  config = data_config(tmp_path, corpus='text', paths=str(tmp_path / '*.txt'), val_fraction=0.0)
  corpus = corpus_lib.list_corpus_files(config)
  streams, stats = pipeline.tokenize_corpus(corpus, ByteTokenizer(), 0.0)
  assert (stats['num_train_docs'], stats['num_val_docs']) == (3, 1)
  first = min((key for _, key in corpus.files), key=sha1_unit)
  text = (tmp_path / first).read_text()
  np.testing.assert_array_equal(streams['val'], [B, *text.encode(), E])
  assert corpus_lib.balance_split([0.5, 0.2], [True, True]) == [False, True]
  assert corpus_lib.balance_split([0.5], [False]) == [False]


# 3. Bad input.

def test_glob_matching_nothing(tmp_path):
  config = data_config(tmp_path, corpus='text', paths=f'{tmp_path}/*.txt')
  with pytest.raises(ValueError, match=r"data\.paths.*\*\.txt"):
    build_datasets(config, global_batch_size=2, workdir=None)


def test_empty_and_non_utf8_files_skipped(tmp_path, caplog):
  glob = write_text_corpus(tmp_path / 'c', num_files=6)
  (tmp_path / 'c' / 'empty.txt').write_bytes(b'')
  (tmp_path / 'c' / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
  config = data_config(tmp_path, corpus='text', paths=glob, seq_len=8, eval_batches=1,
                       val_fraction=0.3)
  caplog.set_level(logging.INFO)
  stats = build_datasets(config, global_batch_size=2, workdir=None).stats
  assert stats['skipped_files'] == 2
  assert stats['num_train_docs'] + stats['num_val_docs'] == 6
  assert any('skipped 2 of 8 files' in r.getMessage() for r in caplog.records)


def test_all_files_unusable(tmp_path):
  (tmp_path / 'a.txt').write_bytes(b'')
  (tmp_path / 'b.txt').write_bytes(b'\xff\xfe\x00bad')
  (tmp_path / 'c.txt').write_bytes(b'')
  config = data_config(tmp_path, corpus='text', paths=str(tmp_path / '*.txt'))
  with pytest.raises(ValueError, match='all 3 files were empty or not UTF-8'):
    build_datasets(config, global_batch_size=2, workdir=None)


@pytest.mark.parametrize('field,value,allowed', [
    ('corpus', 'wikipedia', "['stdlib', 'text', 'jsonl']"),
    ('tokenizer', 'sentencepiece', "['bytes', 'bpe']"),
])
def test_unknown_names(tmp_path, field, value, allowed):
  config = data_config(tmp_path, **{field: value})
  message = rf'data\.{field}=.{value}. is not one of {re.escape(allowed)}'
  with pytest.raises(ValueError, match=message):
    build_datasets(config, global_batch_size=2, workdir=None)


# 4. Tokenizers.

SAMPLES = ['def f(x):\n    return x + 1\n', 'naïve café — 日本語 😀 \t\r\n ',
           '<bos> <eos><pad>']


@pytest.fixture(scope='module')
def bpe():
  rng = np.random.default_rng(1)
  texts = [' '.join(rng.choice(WORDS, size=100)) for _ in range(30)] + SAMPLES * 3
  return BpeTokenizer.train(iter(texts), 320)


def test_byte_tokenizer():
  tok = ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (
      260, 256, 257, 258, 259)
  assert tok.encode('aé') == [97, 0xC3, 0xA9]
  assert tok.decode([B, 97, 0xC3, 0xA9, E]) == 'aé'
  assert tok.token_bytes_V.dtype == np.int32 and tok.token_bytes_V.sum() == 256


def test_bpe_tokenizer(bpe, tmp_path):
  assert bpe.vocab_size == 320
  assert [bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.mask_id] == [
      bpe._tokenizer.token_to_id(t) for t in ('<pad>', '<bos>', '<eos>', '<mask>')]
  assert (bpe.token_bytes_V[[bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.mask_id]] == 0).all()
  assert bpe.bos_id not in bpe.encode('<bos>')          # special strings in text are text
  for text in SAMPLES:
    assert bpe.decode(bpe.encode(text)) == text
  bpe.save(str(tmp_path / 'tokenizer.json'))
  loaded = load_tokenizer(str(tmp_path / 'tokenizer.json'))
  assert loaded.fingerprint == bpe.fingerprint
  assert loaded.encode(SAMPLES[1]) == bpe.encode(SAMPLES[1])
  ByteTokenizer().save(str(tmp_path / 'bytes.json'))
  assert isinstance(load_tokenizer(str(tmp_path / 'bytes.json')), ByteTokenizer)


def test_byte_level_alphabet_matches_tokenizers():
  alphabet = tokenizer_lib.byte_level_alphabet()
  assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
  assert sorted(alphabet.values()) == list(range(256))


@pytest.mark.parametrize('kind', ['bytes', 'bpe'])
@pytest.mark.parametrize('text', ['plain ascii text, with punctuation!\n', SAMPLES[1],
                                  'mixed: déf gamma 日本 😀😀 alpha'])
def test_token_bytes_exact(bpe, kind, text):
  tok = ByteTokenizer() if kind == 'bytes' else bpe
  ids = tok.encode(text)
  assert tok.token_bytes_V.shape == (tok.vocab_size,)
  assert tok.token_bytes_V[ids].sum() == len(text.encode('utf-8'))


def test_bpe_saved_in_workdir_and_reloaded(tmp_path, monkeypatch):
  config = small_config(tmp_path, tokenizer='bpe', bpe_vocab_size=300, bpe_train_bytes=3000)
  trained_on = []
  original_train = BpeTokenizer.train.__func__
  def recording_train(cls, texts, vocab_size):
    texts = list(texts)
    trained_on.extend(texts)
    return original_train(cls, iter(texts), vocab_size)
  monkeypatch.setattr(BpeTokenizer, 'train', classmethod(recording_train))
  workdir = tmp_path / 'run'
  first = build_datasets(config, global_batch_size=4, workdir=str(workdir))
  assert isinstance(first.tokenizer, BpeTokenizer) and first.tokenizer.vocab_size <= 300
  assert 0 < sum(len(t.encode()) for t in trained_on) <= 3000
  docs = list(corpus_lib.iter_documents(corpus_lib.list_corpus_files(config)))
  train_texts = [d.text for d in docs if not corpus_lib.is_validation(d.key, 0.25)]
  assert len(train_texts) < len(docs)
  assert all(any(d.startswith(t) for d in train_texts) for t in trained_on)  # train split only
  assert (workdir / 'tokenizer.json').is_file()

  def fail(*args, **kwargs):
    raise AssertionError('retrained instead of reloading workdir/tokenizer.json')
  monkeypatch.setattr(BpeTokenizer, 'train', classmethod(fail))
  config.cache_dir = str(tmp_path / 'other_cache')      # only the workdir has the vocabulary
  second = build_datasets(config, global_batch_size=4, workdir=str(workdir))
  assert second.tokenizer.fingerprint == first.tokenizer.fingerprint

  config.tokenizer_path = str(workdir / 'tokenizer.json')
  third = build_datasets(config, global_batch_size=4, workdir=None)
  assert third.tokenizer.fingerprint == first.tokenizer.fingerprint
  config.tokenizer_path = str(tmp_path / 'missing.json')
  with pytest.raises(ValueError, match='data.tokenizer_path'):
    build_datasets(config, global_batch_size=4, workdir=None)


# 5. Packing.

def test_pack_rows_by_hand():
  stream = np.array([B, 97, 98, E, B, 99, 100, 101, E, B, 102, E], np.uint16)
  rows = pipeline.PackedRows(stream, seq_len=5, bos_id=B)
  assert len(rows) == 2
  expected = [
      dict(inputs=[B, 97, 98, E, B], targets=[97, 98, E, B, 99], positions=[0, 1, 2, 3, 0],
           segment_ids=[1, 1, 1, 1, 2], weights=[1, 1, 1, 0, 1]),
      dict(inputs=[99, 100, 101, E, B], targets=[100, 101, E, B, 102],
           positions=[0, 1, 2, 3, 0], segment_ids=[1, 1, 1, 1, 2], weights=[1, 1, 1, 0, 1]),
  ]
  for i, want in enumerate(expected):
    row = rows[i]
    for name in ROW_FIELDS:
      np.testing.assert_array_equal(row[name], want[name], err_msg=f'row {i} {name}')
    assert row['weights'].dtype == np.float32 and row['positions'].dtype == np.int32
  rows = pipeline.PackedRows(stream, seq_len=3, bos_id=B)
  row = rows[1]                                          # stream[3:7] = E B 99 100
  np.testing.assert_array_equal(row['inputs'], [E, B, 99])
  np.testing.assert_array_equal(row['segment_ids'], [1, 2, 2])
  np.testing.assert_array_equal(row['positions'], [0, 0, 1])
  np.testing.assert_array_equal(row['weights'], [0, 1, 1])


def test_packing_end_to_end(tmp_path):
  texts = {'a.txt': 'ab', 'b.txt': 'cdefgh', 'c.txt': 'i', 'd.txt': 'jklmnopqrstu', 'e.txt': 'vw'}
  for name, text in texts.items():
    (tmp_path / name).write_text(text)
  config = data_config(tmp_path, corpus='text', paths=str(tmp_path / '*.txt'), seq_len=4,
                       val_fraction=0.0, eval_batches=0)
  datasets = build_datasets(config, global_batch_size=1, workdir=None)
  val_key = min(texts, key=sha1_unit)
  train_keys = sorted(k for k in texts if k != val_key)
  stream = [t for k in train_keys for t in [B, *texts[k].encode(), E]]
  doc_of = np.cumsum(np.array(stream) == B)              # which document each token is in
  streams = {s: np.load(os.path.join(datasets.stats['cache_dir'], f'{s}.npy')) for s in
             ('train', 'val')}
  np.testing.assert_array_equal(streams['train'], stream)
  np.testing.assert_array_equal(streams['val'], [B, *texts[val_key].encode(), E])
  rows = pipeline.PackedRows(streams['train'], 4, B)
  assert len(rows) == (len(stream) - 1) // 4
  all_targets = np.concatenate([rows[i]['targets'] for i in range(len(rows))])
  np.testing.assert_array_equal(all_targets, stream[1:1 + 4 * len(rows)])   # each once
  for i in range(len(rows)):
    row, docs = rows[i], doc_of[4 * i:4 * i + 4]
    same_segment = row['segment_ids'][:, None] == row['segment_ids'][None, :]
    np.testing.assert_array_equal(same_segment, docs[:, None] == docs[None, :])
    assert row['segment_ids'][0] == 1 and (np.diff(row['segment_ids']) >= 0).all()
    for t in range(4):
      starts = [s for s in range(t + 1) if s == 0 or docs[s] != docs[s - 1]]
      assert row['positions'][t] == t - starts[-1]
    np.testing.assert_array_equal(row['weights'], row['targets'] != B)
  batch = next(datasets.train_iter)
  assert any((batch['inputs'][0] == rows[i]['inputs']).all() for i in range(len(rows)))


# 6. Cache.

def test_cache_invalidated_when_a_file_changes(tmp_path):
  config = small_config(tmp_path)
  assert not build_datasets(config, global_batch_size=4, workdir=None).stats['cache_hit']
  assert build_datasets(config, global_batch_size=4, workdir=None).stats['cache_hit']
  (tmp_path / 'corpus' / 'doc00.txt').write_text('changed text ' * 30)
  assert not build_datasets(config, global_batch_size=4, workdir=None).stats['cache_hit']
  config.val_fraction = 0.3
  assert not build_datasets(config, global_batch_size=4, workdir=None).stats['cache_hit']
  assert pipeline._stream_dtype(65535) == np.uint16
  assert pipeline._stream_dtype(65536) == np.int32


# 7. Grain iterators.

def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for name in ROW_FIELDS:
      np.testing.assert_array_equal(x[name], y[name])


def test_resume_from_state(tmp_path):
  config = small_config(tmp_path)
  uninterrupted = take(build_datasets(config, global_batch_size=4, workdir=None).train_iter, 8)
  iterator = build_datasets(config, global_batch_size=4, workdir=None).train_iter
  take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  resumed = build_datasets(config, global_batch_size=4, workdir=None).train_iter
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), uninterrupted[3:])


def test_shuffle_seed_and_epochs(tmp_path):
  config = small_config(tmp_path)
  rows = pipeline.PackedRows(np.arange(8 * 4 + 1) % 200, 4, B)      # 8 rows, no BOS
  def order(seed, batches):
    it = pipeline.make_train_iter(rows, global_batch_size=8, seed=seed)
    return [tuple(b['inputs'][:, 0] // 4) for b in take(it, batches)]
  epochs = order(0, 3)
  assert all(sorted(e) == list(range(8)) for e in epochs)       # each batch one epoch here
  assert len(set(epochs)) == 3                                   # reshuffled every epoch
  assert order(0, 3) == epochs and order(1, 3) != epochs
  first = take(build_datasets(config, global_batch_size=4, workdir=None).train_iter, 3)
  again = take(build_datasets(config, global_batch_size=4, workdir=None).train_iter, 3)
  assert_batches_equal(first, again)
  config.shuffle_seed = 1
  other = take(build_datasets(config, global_batch_size=4, workdir=None).train_iter, 3)
  assert any((a['inputs'] != b['inputs']).any() for a, b in zip(first, other))


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shards(tmp_path, process_count):
  config = small_config(tmp_path)
  whole = build_datasets(config, global_batch_size=8, workdir=None)
  single = take(whole.train_iter, 3)
  shards = [build_datasets(config, global_batch_size=8, workdir=None, process_index=p,
                           process_count=process_count) for p in range(process_count)]
  for p, shard in enumerate(shards):
    for batch, full in zip(take(shard.train_iter, 3), single):
      for name in ROW_FIELDS:
        assert batch[name].shape[0] == 8 // process_count
        np.testing.assert_array_equal(batch[name], full[name][p::process_count])
    for batch, full in zip(shard.eval_batches, whole.eval_batches):
      np.testing.assert_array_equal(batch['inputs'], full['inputs'][p::process_count])
  with pytest.raises(ValueError, match='train.batch_size'):
    build_datasets(config, global_batch_size=6, workdir=None, process_count=4)


# 8. Evaluation batches.

def test_eval_batches(tmp_path):
  config = small_config(tmp_path)
  datasets = build_datasets(config, global_batch_size=4, workdir=None)
  streams_dir = datasets.stats['cache_dir']
  rows = pipeline.PackedRows(np.load(os.path.join(streams_dir, 'val.npy')), 16, B)
  assert len(datasets.eval_batches) == 2
  for k, batch in enumerate(datasets.eval_batches):
    for name in ROW_FIELDS:
      np.testing.assert_array_equal(batch[name], np.stack([rows[4 * k + i][name]
                                                           for i in range(4)]))
  assert_batches_equal(datasets.eval_batches,
                       build_datasets(config, global_batch_size=4, workdir=None).eval_batches)
  config.eval_batches = len(rows)
  with pytest.raises(ValueError, match=rf'data\.eval_batches.* only {len(rows)} are available'):
    build_datasets(config, global_batch_size=4, workdir=None)
