"""From `config.data` to a grain iterator of packed training batches and fixed eval batches.

Each document is tokenized as [BOS] + tokens + [EOS]; a split's documents are concatenated
into one token stream, cached on disk as .npy and opened with mmap. Row i of a split covers
stream[i*T : i*T + T + 1]: inputs are its first T tokens, targets its last T, so every token
of the stream is a target exactly once. Within a row a new segment starts at each BOS of the
inputs (positions restart at 0 there, and at the row's start), and a target that is a BOS has
weight 0, so neither attention nor loss crosses a document boundary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any

from absl import logging
import grain
import numpy as np

import errors
from input_pipeline import corpus as corpus_lib
from input_pipeline.tokenizer import (BpeTokenizer, ByteTokenizer, Tokenizer, atomic_write_text,
                                     load_tokenizer)

TOKENIZERS = ('bytes', 'bpe')
_CACHE_VERSION = 'archlab-streams-v1'
_ENCODE_CHUNK_BYTES = 4_000_000
# Rows are slices of an mmap, so one reader thread and a short buffer keep up with training.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


@dataclasses.dataclass
class Datasets:
  """What the trainer reads.

  Attributes:
    tokenizer: ByteTokenizer or BpeTokenizer.
    train_iter: endless grain iterator of this process's share of each global batch; it has
      `get_state()` and `set_state(state)` for checkpoints.
    eval_batches: fixed validation batches, this process's share.
    stats: document, token and byte counts of both splits, skipped files, rows, cache_hit.
    fingerprint: sha1 of both token streams and the row length: checkpoints store it, so a
      resumed run whose data changed says so (trainer/state.py).
  """
  tokenizer: Tokenizer
  train_iter: grain.DatasetIterator
  eval_batches: list[dict[str, np.ndarray]]
  stats: dict[str, Any]
  fingerprint: str = ''


def pack_row(window_T1: np.ndarray, bos_id: int) -> dict[str, np.ndarray]:
  """Turns T + 1 consecutive stream tokens into one training row of length T."""
  tokens = np.asarray(window_T1, np.int32)
  inputs_T, targets_T = tokens[:-1], tokens[1:]
  seq_len = inputs_T.shape[0]
  starts_T = inputs_T == bos_id
  starts_T[0] = True                      # a partial document at the row's start is a segment
  index_T = np.arange(seq_len, dtype=np.int32)
  segment_start_T = np.maximum.accumulate(np.where(starts_T, index_T, 0))
  return {
      'inputs': inputs_T,
      'targets': targets_T,
      'positions': index_T - segment_start_T,
      'segment_ids': np.cumsum(starts_T, dtype=np.int32),
      'weights': (targets_T != bos_id).astype(np.float32),
  }


class PackedRows:
  """Random access to the rows of one split's token stream (a grain MapDataset source)."""

  def __init__(self, stream: np.ndarray, seq_len: int, bos_id: int):
    self.stream, self.seq_len, self.bos_id = stream, seq_len, bos_id

  def __len__(self) -> int:
    return max(len(self.stream) - 1, 0) // self.seq_len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'row {index} out of range [0, {len(self)})')
    start = index * self.seq_len
    return pack_row(self.stream[start:start + self.seq_len + 1], self.bos_id)


def _process_share(rows: list[int], process_index: int, process_count: int) -> list[int]:
  """The rows of one global batch that `process_index` reads: rows[p::n]."""
  return rows[process_index::process_count]


def make_train_iter(rows: PackedRows, *, global_batch_size: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Shuffled (differently every epoch), endless, batched rows; this process's share.

  Element m of the sharded dataset is element p + n*m of the global order, so batch k of
  process p holds rows p::n of global batch k.
  """
  dataset = grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
  dataset = dataset[process_index::process_count]
  dataset = dataset.batch(global_batch_size // process_count, drop_remainder=True)
  return iter(dataset.to_iter_dataset(_READ_OPTIONS))


def make_eval_batches(rows: PackedRows, *, num_batches: int, global_batch_size: int,
                      process_index: int = 0, process_count: int = 1
                      ) -> list[dict[str, np.ndarray]]:
  """The first num_batches * global_batch_size rows, unshuffled, this process's share."""
  needed = num_batches * global_batch_size
  if len(rows) < needed:
    raise errors.DataError(f'data.eval_batches={num_batches} needs {needed} validation rows '
                     f'(train.batch_size={global_batch_size}) but only {len(rows)} are '
                     'available; lower data.eval_batches or raise data.val_fraction')
  batches = []
  for k in range(num_batches):
    share = _process_share(list(range(k * global_batch_size, (k + 1) * global_batch_size)),
                           process_index, process_count)
    examples = [rows[i] for i in share]
    batches.append({name: np.stack([e[name] for e in examples]) for name in examples[0]})
  return batches


def _check_config(data_config, global_batch_size: int, process_index: int,
                  process_count: int) -> None:
  if data_config.tokenizer not in TOKENIZERS:
    raise errors.DataError(f'data.tokenizer={data_config.tokenizer!r} is not one of {list(TOKENIZERS)}')
  if data_config.corpus not in corpus_lib.CORPORA:
    raise errors.DataError(f'data.corpus={data_config.corpus!r} is not one of {list(corpus_lib.CORPORA)}')
  if data_config.seq_len < 1:
    raise errors.DataError(f'data.seq_len={data_config.seq_len} must be positive')
  if not 0.0 <= data_config.val_fraction < 1.0:
    raise errors.DataError(f'data.val_fraction={data_config.val_fraction} must be in [0, 1)')
  if data_config.eval_batches < 0:
    raise errors.DataError(f'data.eval_batches={data_config.eval_batches} must be >= 0')
  if not 0 <= data_config.shuffle_seed < 2**32:
    raise errors.DataError(f'data.shuffle_seed={data_config.shuffle_seed} must be in [0, 2**32)')
  if not 0 <= process_index < process_count:
    raise errors.DataError(f'process_index={process_index} is not in [0, {process_count})')
  if global_batch_size < 1 or global_batch_size % process_count:
    raise errors.DataError(f'train.batch_size={global_batch_size} must be a positive multiple of the '
                     f'process count {process_count}')


def cache_root(data_config) -> str:
  """`data.cache_dir`, else $ARCHLAB_CACHE, else ~/.cache/archlab."""
  return (data_config.cache_dir or os.environ.get('ARCHLAB_CACHE')
          or os.path.join(os.path.expanduser('~'), '.cache', 'archlab'))


def _hash(*parts) -> str:
  return hashlib.sha1(json.dumps(parts, sort_keys=True).encode('utf-8')).hexdigest()


def _bpe_training_texts(corpus: corpus_lib.CorpusFiles, val_fraction: float, max_bytes: int):
  """Train-split texts, truncated so their UTF-8 total is at most `max_bytes`."""
  remaining = max_bytes
  for document in corpus_lib.iter_documents(corpus, log=False):
    if remaining <= 0:
      return
    if corpus_lib.is_validation(document.key, val_fraction):
      continue
    raw = document.text.encode('utf-8')[:remaining]
    remaining -= len(raw)
    yield raw.decode('utf-8', errors='ignore')


def resolve_tokenizer(data_config, corpus: corpus_lib.CorpusFiles, files_key: str,
                      workdir: str | None, process_index: int = 0) -> Tokenizer:
  """The run's tokenizer: data.tokenizer_path, else workdir/tokenizer.json, else trained.

  A trained BPE tokenizer is also kept in the cache (keyed by corpus and BPE settings), and
  process 0 saves the run's BPE tokenizer to workdir/tokenizer.json so a resumed run reloads it.
  """
  if data_config.tokenizer == 'bytes':
    if data_config.tokenizer_path:
      raise errors.DataError(f'data.tokenizer_path={data_config.tokenizer_path!r} is set but '
                       "data.tokenizer='bytes'; set data.tokenizer='bpe' to load it")
    return ByteTokenizer()
  in_workdir = os.path.join(workdir, 'tokenizer.json') if workdir else None
  if data_config.tokenizer_path:
    if not os.path.isfile(data_config.tokenizer_path):
      raise errors.DataError(f'data.tokenizer_path={data_config.tokenizer_path!r}: no such file')
    tokenizer = load_tokenizer(data_config.tokenizer_path)
    if in_workdir and os.path.isfile(in_workdir):
      if load_tokenizer(in_workdir).fingerprint != tokenizer.fingerprint:
        raise errors.DataError(f'{in_workdir} holds a different vocabulary from data.tokenizer_path='
                         f'{data_config.tokenizer_path!r}; use a fresh workdir')
  elif in_workdir and os.path.isfile(in_workdir):
    tokenizer = load_tokenizer(in_workdir)
    logging.info('data: reloaded the tokenizer from %s', in_workdir)
  else:
    if data_config.bpe_vocab_size < 260:
      raise errors.DataError(f'data.bpe_vocab_size={data_config.bpe_vocab_size} must be at least 260 '
                       '(256 bytes + 4 special tokens)')
    cached = os.path.join(cache_root(data_config), 'tokenizers', _hash(
        _CACHE_VERSION, files_key, data_config.val_fraction, data_config.bpe_vocab_size,
        data_config.bpe_train_bytes) + '.json')
    if os.path.isfile(cached):
      tokenizer = load_tokenizer(cached)
    else:
      logging.info('data: training BPE (vocab %d) on up to %d bytes', data_config.bpe_vocab_size,
                   data_config.bpe_train_bytes)
      tokenizer = BpeTokenizer.train(
          _bpe_training_texts(corpus, data_config.val_fraction, data_config.bpe_train_bytes),
          data_config.bpe_vocab_size)
      tokenizer.save(cached)
  if in_workdir and process_index == 0 and not os.path.isfile(in_workdir):
    tokenizer.save(in_workdir)
  return tokenizer


def _stream_dtype(vocab_size: int):
  return np.uint16 if vocab_size < 65536 else np.int32


def tokenize_corpus(corpus: corpus_lib.CorpusFiles, tokenizer: Tokenizer, val_fraction: float
                    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Tokenizes every document and concatenates each split into one stream.

  Returns:
    ({'train': stream, 'val': stream}, stats) where each stream is [BOS] + tokens + [EOS]
    per document, in key order.
  """
  counts, hashes, is_val, arrays, num_bytes = {}, [], [], [], []
  pending = []

  def encode_pending():
    arrays.extend(tokenizer.encode_batch([d.text for d in pending]))
    pending.clear()

  pending_bytes = 0
  for document in corpus_lib.iter_documents(corpus, counts):
    doc_bytes = len(document.text.encode('utf-8'))
    hashes.append(corpus_lib.key_hash(document.key))
    is_val.append(hashes[-1] < val_fraction)
    num_bytes.append(doc_bytes)
    pending.append(document)
    pending_bytes += doc_bytes
    if pending_bytes >= _ENCODE_CHUNK_BYTES:
      encode_pending()
      pending_bytes = 0
  encode_pending()
  is_val = corpus_lib.balance_split(hashes, is_val)

  dtype = _stream_dtype(tokenizer.vocab_size)
  streams, stats = {}, {'skipped_files': counts['skipped_files']}
  for split, want_val in (('train', False), ('val', True)):
    members = [i for i, v in enumerate(is_val) if v == want_val]
    # bos doc eos, per document; a tokenizer whose bos is its eos (GPT-2, Qwen) writes one
    # separator per document: eos doc.
    extra = 1 if tokenizer.bos_id == tokenizer.eos_id else 2
    stream = np.empty(sum(len(arrays[i]) + extra for i in members), dtype)
    offset = 0
    for i in members:
      stream[offset] = tokenizer.bos_id
      stream[offset + 1:offset + 1 + len(arrays[i])] = arrays[i]
      offset += len(arrays[i]) + extra
      if extra == 2:
        stream[offset - 1] = tokenizer.eos_id
    streams[split] = stream
    stats[f'num_{split}_docs'] = len(members)
    stats[f'{split}_tokens'] = int(len(stream))
    stats[f'{split}_bytes'] = int(sum(num_bytes[i] for i in members))
  return streams, stats


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
  fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-', suffix='.npy')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.save(f, array)
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def streams_fingerprint(streams: dict[str, np.ndarray]) -> str:
  """sha1 of the train and validation token streams (their dtype, length and tokens)."""
  digest = hashlib.sha1()
  for split in ('train', 'val'):
    stream = np.ascontiguousarray(streams[split])
    digest.update(f'{split}:{stream.dtype.str}:{len(stream)}:'.encode('utf-8'))
    digest.update(memoryview(stream).cast('B'))
  return digest.hexdigest()


def load_or_build_streams(data_config, corpus: corpus_lib.CorpusFiles, files_key: str,
                          tokenizer: Tokenizer) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The split streams from the cache (mmap), tokenizing the corpus on a miss.

  The cache key covers the corpus kind, its files with sizes and mtimes, the JSONL text
  field, val_fraction and the tokenizer fingerprint, so a corpus file that changed after its
  cache was written misses the cache and is tokenized again; `streams/latest/` remembers
  the files each corpus (its file list and settings) was last tokenized from, so that miss
  is reported in one line naming a changed file. meta.json is written last, so a directory
  without it is an interrupted build and is rebuilt. stats['fingerprint'] is
  `streams_fingerprint`, computed once per cache entry.
  """
  key = _hash(_CACHE_VERSION, files_key, data_config.val_fraction, tokenizer.fingerprint)
  directory = os.path.join(cache_root(data_config), 'streams', key)
  meta_path = os.path.join(directory, 'meta.json')
  if os.path.isfile(meta_path):
    with open(meta_path, encoding='utf-8') as f:
      meta = json.load(f)
    streams = {split: np.load(os.path.join(directory, f'{split}.npy'), mmap_mode='r')
               for split in ('train', 'val')}
    stats = dict(meta['stats'])
    stats.setdefault('fingerprint', meta.get('fingerprint') or streams_fingerprint(streams))
    return streams, dict(stats, cache_hit=True, cache_dir=directory)
  identity = _hash(_CACHE_VERSION, corpus.kind, [k for _, k in corpus.files], corpus.text_field,
                   data_config.val_fraction, tokenizer.fingerprint)
  latest_path = os.path.join(cache_root(data_config), 'streams', 'latest', identity + '.json')
  files = corpus_lib.file_stats(corpus)
  changed = _changed_files(latest_path, files)
  if changed:
    logging.warning('data: %d corpus file(s) changed since their tokenized cache was written '
                    '(%s); tokenizing again into %s', len(changed), changed[0], directory)
  else:
    logging.info('data: tokenizing corpus %s (%d files) into %s', corpus.kind,
                 len(corpus.files), directory)
  streams, stats = tokenize_corpus(corpus, tokenizer, data_config.val_fraction)
  stats['fingerprint'] = streams_fingerprint(streams)
  os.makedirs(directory, exist_ok=True)
  for split, stream in streams.items():
    _atomic_save_npy(os.path.join(directory, f'{split}.npy'), stream)
  atomic_write_text(meta_path, json.dumps({'key': key, 'stats': stats}, indent=1))
  os.makedirs(os.path.dirname(latest_path), exist_ok=True)
  atomic_write_text(latest_path, json.dumps({'key': key, 'files': files}, indent=1))
  streams = {split: np.load(os.path.join(directory, f'{split}.npy'), mmap_mode='r')
             for split in ('train', 'val')}
  return streams, dict(stats, cache_hit=False, cache_dir=directory)


def _changed_files(latest_path: str, files: dict[str, list[int]]) -> list[str]:
  """'PATH: size A -> B bytes' (or 'modified') for each file whose size or mtime differs
  from the record at `latest_path` (none when there is no record)."""
  try:
    with open(latest_path, encoding='utf-8') as f:
      before = json.load(f)['files']
  except (OSError, ValueError, KeyError):
    return []
  changed = []
  for path, (size, mtime_ns) in files.items():
    if path in before and list(before[path]) != [size, mtime_ns]:
      old_size = before[path][0]
      changed.append(f'{path}: {old_size} -> {size} bytes' if old_size != size else
                     f'{path}: modified')
  return changed


def build_datasets(data_config, *, global_batch_size: int, workdir: str | None,
                   process_index: int = 0, process_count: int = 1) -> Datasets:
  """Builds the tokenizer, the training iterator and the evaluation batches.

  Args:
    data_config: the `config.data` ConfigDict (see configs/common.py).
    global_batch_size: rows per global batch (train.batch_size).
    workdir: the run's directory (tokenizer.json lives there), or None.
    process_index: this process, in [0, process_count).
    process_count: number of processes; each reads rows p::n of every global batch.

  Returns:
    Datasets with this process's share of every batch.

  Raises:
    ValueError: a bad config field, a glob matching nothing, unreadable data, or too little
      data for one training row or for the evaluation batches; the message names the field.
  """
  if data_config.get('task'):  # a synthetic task instead of a corpus (input_pipeline/tasks)
    from input_pipeline import tasks  # pylint: disable=import-outside-toplevel (tasks imports this)
    return tasks.build_datasets(data_config, global_batch_size=global_batch_size,
                                workdir=workdir, process_index=process_index,
                                process_count=process_count)
  _check_config(data_config, global_batch_size, process_index, process_count)
  corpus = corpus_lib.list_corpus_files(data_config)
  files_key = corpus_lib.files_fingerprint(corpus)
  tokenizer = resolve_tokenizer(data_config, corpus, files_key, workdir, process_index)
  streams, stats = load_or_build_streams(data_config, corpus, files_key, tokenizer)

  seq_len = data_config.seq_len
  train_rows = PackedRows(streams['train'], seq_len, tokenizer.bos_id)
  val_rows = PackedRows(streams['val'], seq_len, tokenizer.bos_id)
  if not len(train_rows):
    raise errors.DataError(f'data.seq_len={seq_len}: the train split has {len(streams["train"])} '
                     f'tokens, fewer than one row of seq_len + 1')
  stats.update(train_rows=len(train_rows), val_rows=len(val_rows))
  eval_batches = make_eval_batches(
      val_rows, num_batches=data_config.eval_batches, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count)
  train_iter = make_train_iter(
      train_rows, global_batch_size=global_batch_size, seed=data_config.shuffle_seed,
      process_index=process_index, process_count=process_count)
  logging.info('data: %s', json.dumps(stats))
  return Datasets(tokenizer=tokenizer, train_iter=train_iter, eval_batches=eval_batches,
                  stats=stats, fingerprint=_hash(stats['fingerprint'], seq_len))
