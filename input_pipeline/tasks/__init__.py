"""Synthetic capability tasks: MQAR (Zoology), the six MAD tasks, RULER's single-needle
retrieval; as training data (`data.task`) and as the suites `experiments.evaluate` scores.

`data.task='mqar:seq_len=128,num_kv_pairs=8'` makes a run train on a task instead of a corpus
(`;` joins several into one mixture, each contributing its `num_train` instances): the rows
are the task's instances, left-aligned and padded to `data.seq_len` with the pad token (weight
0); the loss weights the answers (every next token for MAD's recall tasks, as MAD trains them)
and the trainer's evaluation reads the `val` split. Symbolic tasks get a vocabulary of their own
(`SymbolTokenizer`: the task's ids, then the four special tokens, saved as the workdir's
tokenizer.json); text tasks (needle retrieval) use `data.tokenizer` and `data.corpus`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

import errors
from input_pipeline import corpus as corpus_lib
from input_pipeline import pipeline
from input_pipeline import tokenizer as tokenizer_lib
from input_pipeline.tasks import mad, mqar, niah  # noqa: F401  (registers the tasks)
from input_pipeline.tasks.base import (SPLITS, TASKS, Task, parse_one, parse_specs, register,
                                       spec_of)

__all__ = ['SPLITS', 'SUITES', 'TASKS', 'Task', 'TaskRows', 'build', 'build_datasets',
           'corpus_text', 'parse_one', 'parse_specs', 'register', 'spec_of', 'suite']

# What `experiments.evaluate --tasks=NAME` scores for a suite name (any task name is a suite
# of itself at its defaults). MQAR: Zoology's training grid at vocabulary 8192; MAD: the five
# tasks a causal decoder can run, at MAD's baselines (compression scores only an autoencoder
# run, `--tasks=compression`); needle: the three forms at 512 to 2K
# tokens (RULER's template, needle and answer take about 350 bytes: 256 fits BPE tokens only).
SUITES = {
    'mqar': [f'mqar:seq_len={t},num_kv_pairs={p}'
             for t, p in ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))],
    'mad': ['in_context_recall', 'fuzzy_recall', 'noisy_recall', 'selective_copying',
            'memorization'],
    'niah': [f'niah_single_{form}:seq_len={t}' for form in (1, 2, 3)
             for t in (512, 1024, 2048)],
}

_HAYSTACK_BYTES = 4_000_000  # text kept per split for the corpus haystack


def suite(name: str) -> list[str]:
  """The specs of a suite name, or [name] for a task spec; one line for an unknown name."""
  if name in SUITES:
    return list(SUITES[name])
  parse_one(name)  # refuses an unknown task or option
  return [name]


def corpus_text(data_config) -> Callable[[str], str]:
  """split ('train' or 'val') -> up to 4 MB of that split's documents, joined by newlines
  (read on first use): the real-text haystack of needle retrieval."""
  cache: dict[str, str] = {}

  def text(split: str) -> str:
    if split not in cache:
      files = corpus_lib.list_corpus_files(data_config)
      want_val = split == 'val'
      if files.kind != 'jsonl':  # one document per file: pick the split's files unread
        files = dataclasses.replace(files, files=tuple(
            f for f in files.files
            if corpus_lib.is_validation(f[1], data_config.val_fraction) == want_val))
      pieces, size = [], 0
      if files.files:
        for document in corpus_lib.iter_documents(files, log=False):
          if corpus_lib.is_validation(document.key, data_config.val_fraction) != want_val:
            continue
          pieces.append(document.text)
          size += len(document.text)
          if size >= _HAYSTACK_BYTES:
            break
      if not pieces:
        raise errors.DataError(f'data.corpus={data_config.corpus}: the {split} split is empty '
                               f'(data.val_fraction={data_config.val_fraction}); the needle '
                               'haystack needs text in it')
      cache[split] = '\n'.join(pieces)
    return cache[split]

  return text


def build(specs: str | list[str], tokenizer=None, text_source=None,
          overrides: dict | None = None) -> list[Task]:
  """The tasks of `specs` (a `;`-separated string or a list of specs)."""
  if isinstance(specs, str):
    specs = [s for s in specs.split(';') if s.strip()]
  parsed = [parse_one(s, overrides) for s in specs]
  if not parsed:
    raise errors.DataError(f'no task given; the tasks are {sorted(TASKS)}')
  return [cls(options, tokenizer=tokenizer, text_source=text_source) for cls, options in parsed]


class TaskRows:
  """Rows of one split of a mixture of tasks, padded to `seq_len` (a grain MapDataset source).

  Train rows are the tasks' instances one after another (the iterator shuffles them); other
  splits interleave the tasks, so the first rows of a split cover every task.
  """

  def __init__(self, tasks: list[Task], split: str, seq_len: int, pad_id: int,
               sizes: list[int]):
    self.tasks, self.split, self.seq_len, self.pad_id = tasks, split, seq_len, pad_id
    self.sizes = list(sizes)
    self.offsets = np.cumsum([0] + self.sizes)

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def locate(self, index: int) -> tuple[int, int]:
    """(task, instance) of row `index`."""
    if self.split == 'train' or len(self.tasks) == 1:
      k = int(np.searchsorted(self.offsets, index, side='right')) - 1
      return k, index - int(self.offsets[k])
    return index % len(self.tasks), index // len(self.tasks)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'row {index} out of range [0, {len(self)})')
    k, j = self.locate(index)
    return pad_row(self.tasks[k].instance(self.split, j), self.seq_len, self.pad_id)


def pad_row(instance: dict, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """A training row (inputs, targets, positions, segment_ids, weights) of `seq_len` from an
  instance: left-aligned, one segment, padding with `pad_id` at weight 0."""
  length = len(instance['inputs'])
  if length > seq_len:
    raise errors.DataError(f'a task instance has {length} tokens, more than data.seq_len='
                           f'{seq_len}')
  pad = seq_len - length

  def padded(x, value, dtype):
    return np.concatenate([np.asarray(x, dtype), np.full(pad, value, dtype)])

  return {
      'inputs': padded(instance['inputs'], pad_id, np.int32),
      'targets': padded(instance['targets'], pad_id, np.int32),
      'positions': np.arange(seq_len, dtype=np.int32),
      'segment_ids': np.ones(seq_len, np.int32),
      'weights': padded(instance['weights'], 0.0, np.float32),
  }


def check_backbone(task_classes, autoencoder: bool) -> None:
  """One line where the model's head does not fit its data (`task_classes`, [] for a corpus):
  reconstruction (MAD's compression, `CAUSAL = False`) needs `model.autoencoder=True`, and
  the autoencoder, which sees the whole row before it predicts, would read the answers of
  every other task and of a corpus."""
  if autoencoder and not task_classes:
    raise errors.DataError('model.autoencoder=True trains on a reconstruction task '
                           '(data.task=compression, MAD), not on a corpus')
  for cls in task_classes:
    if not cls.CAUSAL and not autoencoder:
      raise errors.DataError(f'task {cls.NAME} reconstructs its input and needs MAD\'s '
                             'autoencoder backbone: set model.autoencoder=True')
    if cls.CAUSAL and autoencoder:
      raise errors.DataError(f'model.autoencoder=True sees the whole row before it predicts; '
                             f'task {cls.NAME} is scored on what its inputs do not show yet '
                             '(train it without the autoencoder)')


def check_trainable(tasks: list[Task], vocab_size: int, what: str) -> None:
  """One line for ids beyond the vocabulary."""
  for task in tasks:
    if not task.TEXT and task.num_symbols > vocab_size:
      raise errors.DataError(f'task {task.spec} uses ids 0..{task.num_symbols - 1} but {what} '
                             f'has {vocab_size} tokens; give the task vocab_size<={vocab_size}')


def _tokenizer(data_config, tasks_spec: str, workdir, process_index):
  """The run's tokenizer: a text one when a task is text, else the tasks' symbols."""
  classes = [cls for cls, _ in parse_specs(tasks_spec)]
  if any(cls.TEXT for cls in classes):
    corpus = corpus_lib.list_corpus_files(data_config)
    return pipeline.resolve_tokenizer(data_config, corpus, corpus_lib.files_fingerprint(corpus),
                                      workdir, process_index)
  symbols = max(int(options['vocab_size']) for _, options in parse_specs(tasks_spec))
  tokenizer = tokenizer_lib.SymbolTokenizer(symbols)
  if workdir:
    path = os.path.join(workdir, 'tokenizer.json')
    if os.path.isfile(path):
      saved = tokenizer_lib.load_tokenizer(path)
      if saved.fingerprint != tokenizer.fingerprint:
        raise errors.DataError(f'{path} holds a different vocabulary ({saved!r}) from '
                               f'data.task={tasks_spec!r} ({tokenizer!r}); use a fresh workdir')
    elif process_index == 0:
      tokenizer.save(path)
  return tokenizer


def build_datasets(data_config, *, global_batch_size: int, workdir: str | None,
                   process_index: int = 0, process_count: int = 1) -> pipeline.Datasets:
  """`input_pipeline.build_datasets` for `data.task`: the tokenizer, the shuffled endless
  iterator of train instances and the validation batches (the `val` split)."""
  spec = data_config.task
  if global_batch_size < 1 or global_batch_size % process_count:
    raise errors.DataError(f'train.batch_size={global_batch_size} must be a positive multiple '
                           f'of the process count {process_count}')
  tokenizer = _tokenizer(data_config, spec, workdir, process_index)
  tasks = build(spec, tokenizer, corpus_text(data_config))
  check_trainable(tasks, tokenizer.vocab_size, f'the run\'s tokenizer ({tokenizer!r})')
  for task in tasks:
    if task.seq_len > data_config.seq_len:
      raise errors.DataError(f'data.task: {task.spec} has rows of {task.seq_len} tokens but '
                             f'data.seq_len={data_config.seq_len}; set data.seq_len>='
                             f'{task.seq_len}')
  train_rows = TaskRows(tasks, 'train', data_config.seq_len, tokenizer.pad_id,
                        [t.num_train for t in tasks])
  needed = data_config.eval_batches * global_batch_size
  per_task = -(-needed // len(tasks))
  val_rows = TaskRows(tasks, 'val', data_config.seq_len, tokenizer.pad_id,
                      [per_task] * len(tasks))
  eval_batches = pipeline.make_eval_batches(
      val_rows, num_batches=data_config.eval_batches, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count)
  train_iter = pipeline.make_train_iter(
      train_rows, global_batch_size=global_batch_size, seed=data_config.shuffle_seed,
      process_index=process_index, process_count=process_count)
  stats = {'task': ';'.join(t.spec for t in tasks), 'train_rows': len(train_rows),
           'val_rows': len(val_rows), 'vocab_size': tokenizer.vocab_size}
  return pipeline.Datasets(tokenizer=tokenizer, train_iter=train_iter,
                           eval_batches=eval_batches, stats=stats)
