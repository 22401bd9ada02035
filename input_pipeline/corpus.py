"""Corpora: which files make a corpus, the documents in them, and the train/validation split.

Three kinds, chosen by `data.corpus`:
  stdlib  every *.py file of the running interpreter's standard library (no site-packages or
          dist-packages); one document per file, keyed by its path relative to the stdlib root.
  text    files matched by `data.paths` (one glob or several, comma-separated); one document
          per file, keyed by its path relative to the globs' common root directory.
  jsonl   files matched by `data.paths`; one document per non-blank line (a JSON object whose
          `data.text_field` is the text), keyed `path:line`.

A document belongs to validation when the sha1 of its key, read as a number in [0, 1), is
below `data.val_fraction`, so the split is the same on every machine and every run.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterator

from absl import logging

import errors

CORPORA = ('stdlib', 'text', 'jsonl')
_EXCLUDED_DIRS = ('site-packages', 'dist-packages')


@dataclasses.dataclass(frozen=True)
class CorpusFiles:
  """The files of a corpus.

  Attributes:
    kind: one of CORPORA.
    files: (path on this machine, key) pairs in key order; the key is machine-independent.
    text_field: the JSONL field holding the text (used by kind 'jsonl' only).
  """
  kind: str
  files: tuple[tuple[str, str], ...]
  text_field: str = 'text'


@dataclasses.dataclass(frozen=True)
class Document:
  key: str
  text: str


def list_corpus_files(data_config) -> CorpusFiles:
  """Lists the files of the corpus `data_config` names.

  Args:
    data_config: the `config.data` ConfigDict (reads corpus, paths, text_field).

  Returns:
    The corpus files, sorted by key.

  Raises:
    ValueError: an unknown corpus, no `data.paths` for text/jsonl, or a glob matching no file.
  """
  kind = data_config.corpus
  if kind not in CORPORA:
    raise errors.DataError(f'data.corpus={kind!r} is not one of {list(CORPORA)}')
  if kind == 'stdlib':
    files = _stdlib_files(sysconfig.get_paths()['stdlib'])
  else:
    files = _glob_files(data_config.paths)
  return CorpusFiles(kind=kind, files=tuple(sorted(files, key=lambda f: f[1])),
                     text_field=data_config.text_field)


def _stdlib_files(root: str) -> list[tuple[str, str]]:
  files = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS)
    for name in sorted(names):
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        files.append((path, pathlib.PurePath(os.path.relpath(path, root)).as_posix()))
  if not files:
    raise errors.DataError(f'data.corpus=stdlib: no *.py files under {root}')
  return files


def _glob_root(pattern: str) -> str:
  """The directory part of `pattern` before its first wildcard."""
  parts = pathlib.PurePath(pattern).parts
  fixed = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    fixed.append(part)
  return os.path.abspath(os.path.join(*fixed)) if fixed else os.path.abspath('.')


def _glob_files(paths: str) -> list[tuple[str, str]]:
  patterns = [p.strip() for p in (paths or '').split(',') if p.strip()]
  if not patterns:
    raise errors.DataError('data.paths is empty; give a glob (or comma-separated globs) of files')
  found, roots = {}, []
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
    if not matches:
      raise errors.DataError(f'data.paths: the glob {pattern!r} matches no file')
    roots.append(_glob_root(pattern))
    for match in matches:
      found[os.path.abspath(match)] = None
  root = os.path.commonpath(roots)
  return [(path, pathlib.PurePath(os.path.relpath(path, root)).as_posix()) for path in found]


def files_fingerprint(corpus: CorpusFiles) -> str:
  """A hash of the corpus kind, its files with their sizes and mtimes, and the text field."""
  digest = hashlib.sha1()
  text_field = corpus.text_field if corpus.kind == 'jsonl' else ''
  digest.update(json.dumps([corpus.kind, text_field]).encode('utf-8'))
  for path, key in corpus.files:
    stat = os.stat(path)
    digest.update(json.dumps([path, key, stat.st_size, stat.st_mtime_ns]).encode('utf-8'))
  return digest.hexdigest()


def file_stats(corpus: CorpusFiles) -> dict[str, list[int]]:
  """path -> [size, mtime in ns] of each corpus file (what `files_fingerprint` covers)."""
  stats = {}
  for path, _ in corpus.files:
    stat = os.stat(path)
    stats[path] = [stat.st_size, stat.st_mtime_ns]
  return stats


def key_hash(key: str) -> float:
  """The sha1 of `key` as a number in [0, 1): the same on every machine and run."""
  return int.from_bytes(hashlib.sha1(key.encode('utf-8')).digest()[:8], 'big') / 2.0**64


def is_validation(key: str, val_fraction: float) -> bool:
  """Whether the document with `key` belongs to validation (before `balance_split`)."""
  return key_hash(key) < val_fraction


def balance_split(hashes: list[float], is_val: list[bool]) -> list[bool]:
  """Makes both splits non-empty when there are at least two documents.

  If validation is empty, the document first by hash order moves to validation; if train is
  empty, the document last by hash order moves to train.

  Args:
    hashes: key_hash of each document.
    is_val: the hash split of each document.

  Returns:
    The split of each document.
  """
  is_val = list(is_val)
  if len(is_val) >= 2:
    if not any(is_val):
      is_val[min(range(len(hashes)), key=hashes.__getitem__)] = True
    elif all(is_val):
      is_val[max(range(len(hashes)), key=hashes.__getitem__)] = False
  return is_val


def _read_utf8(path: str) -> str | None:
  """The file's text, or None when it is empty or not UTF-8."""
  with open(path, 'rb') as f:
    raw = f.read()
  if not raw:
    return None
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError:
    return None


def _jsonl_documents(path: str, key: str, text: str, text_field: str) -> list[Document]:
  documents = []
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.DataError(f'{path}:{line_number}: not a JSON object ({e.msg})') from None
    if not isinstance(record, dict) or text_field not in record:
      raise errors.DataError(f'{path}:{line_number}: no field {text_field!r} (data.text_field)')
    if not isinstance(record[text_field], str):
      raise errors.DataError(f'{path}:{line_number}: field {text_field!r} (data.text_field) is '
                       f'{type(record[text_field]).__name__}, not a string')
    documents.append(Document(f'{key}:{line_number}', record[text_field]))
  return documents


def iter_documents(corpus: CorpusFiles, counts: dict[str, int] | None = None,
                   log: bool = True) -> Iterator[Document]:
  """Yields the corpus's documents, skipping files that are empty or not UTF-8.

  Args:
    corpus: the files, from `list_corpus_files`.
    counts: if given, receives 'skipped_files' and 'num_docs' when iteration ends.
    log: whether to log the skipped files.

  Yields:
    Documents in key order.

  Raises:
    ValueError: every file was empty or not UTF-8; a JSONL line without the text field.
  """
  skipped, num_docs = [], 0
  for path, key in corpus.files:
    text = _read_utf8(path)
    documents = []
    if text is not None:
      if corpus.kind == 'jsonl':
        documents = _jsonl_documents(path, key, text, corpus.text_field)
      else:
        documents = [Document(key, text)]
    if not documents:
      skipped.append(path)
      continue
    num_docs += len(documents)
    yield from documents
  if log and skipped:
    logging.info('data: skipped %d of %d files that were empty or not UTF-8 (first: %s)',
                 len(skipped), len(corpus.files), skipped[0])
  if not num_docs:
    raise errors.DataError(f'data.corpus={corpus.kind}: all {len(corpus.files)} files were empty or '
                     'not UTF-8')
  if counts is not None:
    counts.update(skipped_files=len(skipped), num_docs=num_docs)
