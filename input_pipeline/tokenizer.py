"""Tokenizers: raw bytes and byte-level BPE (HuggingFace `tokenizers`).

Both expose one interface the pipeline and the objectives rely on:

  vocab_size, pad_id, bos_id, eos_id, mask_id
  encode(text) -> list[int]            no special tokens added; '<bos>' in text is plain text
  encode_batch(texts) -> list[np.ndarray]   the fast path the pipeline uses
  decode(ids) -> str                   special tokens dropped
  token_bytes_V                        np.int32 [vocab_size]: UTF-8 bytes of raw text per id
  save(path), fingerprint              a stable hash of the vocabulary

`token_bytes_V` is exact: for any text, `token_bytes_V[encode(text)].sum()` equals
`len(text.encode('utf-8'))`, which is what turns a loss in nats into bits per byte.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ('<pad>', '<bos>', '<eos>', '<mask>')
_BYTES_MARKER = 'archlab-bytes-v1'


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and `os.replace`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.json')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
  """Maps each character of the GPT-2 byte-level alphabet back to the byte it stands for.

  This is `bytes_to_unicode` from GPT-2, which `tokenizers.pre_tokenizers.ByteLevel` uses:
  printable Latin-1 bytes map to themselves, the others to code points from 256 on.
  """
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      chars[chr(byte)] = byte
    else:
      chars[chr(256 + extra)] = byte
      extra += 1
  return chars


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; then <pad>=256, <bos>=257, <eos>=258, <mask>=259."""

  vocab_size = 260
  pad_id, bos_id, eos_id, mask_id = 256, 257, 258, 259
  fingerprint = _BYTES_MARKER

  def __init__(self):
    self.token_bytes_V = np.zeros(self.vocab_size, np.int32)
    self.token_bytes_V[:256] = 1

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(text.encode('utf-8'), np.uint8) for text in texts]

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode('utf-8', errors='replace')

  def save(self, path: str) -> None:
    atomic_write_text(path, json.dumps({'archlab_tokenizer': _BYTES_MARKER}) + '\n')

  def __repr__(self) -> str:
    return 'ByteTokenizer(vocab_size=260)'


class BpeTokenizer:
  """A byte-level BPE `tokenizers.Tokenizer` with the four special tokens of SPECIAL_TOKENS."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self._tokenizer = tokenizer
    # Special-token strings in documents are text, never control tokens.
    self._tokenizer.encode_special_tokens = True
    ids = {}
    for name, token in zip(('pad_id', 'bos_id', 'eos_id', 'mask_id'), SPECIAL_TOKENS):
      ids[name] = tokenizer.token_to_id(token)
      if ids[name] is None:
        raise ValueError(f'BPE tokenizer has no special token {token!r}; archlab needs all of '
                         f'{list(SPECIAL_TOKENS)}')
    self.pad_id, self.bos_id, self.eos_id, self.mask_id = (
        ids['pad_id'], ids['bos_id'], ids['eos_id'], ids['mask_id'])
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.token_bytes_V = self._token_bytes()
    canonical = json.loads(tokenizer.to_str())
    content = {'model': canonical.get('model'),
               'added_tokens': [(t['id'], t['content']) for t in canonical.get('added_tokens', [])],
               'pre_tokenizer': canonical.get('pre_tokenizer')}
    self.fingerprint = 'bpe-' + hashlib.sha1(
        json.dumps(content, sort_keys=True).encode('utf-8')).hexdigest()

  def _token_bytes(self) -> np.ndarray:
    """Bytes of raw text per id, from the byte-level alphabet; 0 for special tokens."""
    alphabet = byte_level_alphabet()
    special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
    token_bytes_V = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      token = self._tokenizer.id_to_token(i)
      if token is None or token in special:
        continue
      if any(c not in alphabet for c in token):
        raise ValueError(f'token {i} ({token!r}) is not byte-level BPE; archlab supports '
                         'byte-level BPE tokenizers only')
      token_bytes_V[i] = len(token)
    return token_bytes_V

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """Trains byte-level BPE on `texts` with `vocab_size` ids including the special tokens."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return cls(tokenizer)

  @classmethod
  def from_file(cls, path: str) -> BpeTokenizer:
    return cls(tokenizers.Tokenizer.from_file(path))

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, path: str) -> None:
    atomic_write_text(path, self._tokenizer.to_str())

  def __repr__(self) -> str:
    return f'BpeTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:16]})'


Tokenizer = ByteTokenizer | BpeTokenizer


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer saved by `save`: the bytes marker file or a `tokenizer.json`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no tokenizer file at {path}')
  with open(path, encoding='utf-8') as f:
    content = json.load(f)
  if content.get('archlab_tokenizer') == _BYTES_MARKER:
    return ByteTokenizer()
  return BpeTokenizer.from_file(path)
