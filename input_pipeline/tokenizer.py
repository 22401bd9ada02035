"""Tokenizers: raw bytes and byte-level BPE (HuggingFace `tokenizers`).

Both expose one interface the pipeline and the objectives rely on:

  vocab_size, pad_id, bos_id, eos_id, mask_id
  encode(text) -> list[int]            no special tokens added; '<bos>' in text is plain text
  encode_batch(texts) -> list[np.ndarray]   the fast path the pipeline uses
  decode(ids) -> str                   special tokens dropped
  token_bytes_V                        np.int32 [vocab_size]: UTF-8 bytes of raw text per id
  save(path), fingerprint              a stable hash of the vocabulary

`token_bytes_V` is exact: for any text, `token_bytes_V[encode(text)].sum()` equals
`len(text.encode('utf-8'))`, which is what turns a loss in nats into bits per byte (for a
tokenizer with a Unicode normalizer, such as Qwen's NFC, exact for text already normalised).

BPE tokenizers are archlab's own (trained with the special tokens of SPECIAL_TOKENS) or a
Hugging Face checkpoint's byte-level `tokenizer.json` (GPT-2, Llama 3, Qwen, OLMo, GPT-OSS,
DeepSeek V3): its bos/eos/pad/mask tokens are named by the `tokenizer_config.json` (or
`special_tokens_map.json`, or `config.json` ids) beside it. A real tokenizer needs an eos token
(the document separator); without a bos token documents start with eos (GPT-2's convention),
without a pad token padding is eos, and without a mask token `mask_id` is None (objectives
that need one refuse such a tokenizer).
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

import errors

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
  """A byte-level BPE `tokenizers.Tokenizer` and the ids of its special tokens.

  `special_tokens` maps 'bos', 'eos', 'pad', 'mask' to token strings; None means archlab's
  own SPECIAL_TOKENS, all four required.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, special_tokens: dict | None = None,
               source: str = 'BPE tokenizer'):
    self._tokenizer = tokenizer
    # Special-token strings in documents are text, never control tokens.
    self._tokenizer.encode_special_tokens = True
    if special_tokens is None:
      special_tokens = dict(zip(_SPECIAL_NAMES, SPECIAL_TOKENS))
      for token in SPECIAL_TOKENS:
        if tokenizer.token_to_id(token) is None:
          raise errors.DataError(f'{source} has no special token {token!r}; archlab needs all of '
                           f'{list(SPECIAL_TOKENS)}')
    if not special_tokens.get('eos'):
      raise errors.DataError(f'{source}: no eos token is named (archlab separates documents with it)')
    ids = {}
    for name, token in special_tokens.items():
      if token:
        ids[name] = tokenizer.token_to_id(token)
        if ids[name] is None:
          raise errors.DataError(f'{source}: its {name} token {token!r} is not in the vocabulary')
    self.special_tokens = {n: special_tokens[n] for n in _SPECIAL_NAMES if n in ids}
    self.eos_id = ids['eos']
    self.bos_id = ids.get('bos', self.eos_id)
    self.pad_id = ids.get('pad', self.eos_id)
    self.mask_id = ids.get('mask')
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.token_bytes_V = self._token_bytes(source)
    canonical = json.loads(tokenizer.to_str())
    content = {'model': canonical.get('model'),
               'added_tokens': [(t['id'], t['content']) for t in canonical.get('added_tokens', [])],
               'pre_tokenizer': canonical.get('pre_tokenizer')}
    if self.special_tokens != dict(zip(_SPECIAL_NAMES, SPECIAL_TOKENS)):
      content['special_tokens'] = self.special_tokens  # the separator changes the streams
    self.fingerprint = 'bpe-' + hashlib.sha1(
        json.dumps(content, sort_keys=True).encode('utf-8')).hexdigest()

  def _token_bytes(self, source: str) -> np.ndarray:
    """Bytes of raw text per id: from the byte-level alphabet for vocabulary tokens, the UTF-8
    length of an added token's text for added non-special tokens (Qwen's `<think>`), 0 for
    special tokens (which documents never contain: their text encodes as ordinary tokens)."""
    alphabet = byte_level_alphabet()
    added = self._tokenizer.get_added_tokens_decoder()
    token_bytes_V = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if i in added:
        if not added[i].special:
          token_bytes_V[i] = len(added[i].content.encode('utf-8'))
        continue
      token = self._tokenizer.id_to_token(i)
      if token is None:
        continue
      if any(c not in alphabet for c in token):
        raise errors.DataError(f'{source}: token {i} ({token!r}) is not byte-level BPE; archlab '
                         'supports byte-level BPE tokenizers only (GPT-2, Llama 3, Qwen, OLMo, '
                         'GPT-OSS, DeepSeek V3 style)')
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
    """A tokenizer.json; special tokens from archlab's names, else from the files beside it."""
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
      raise errors.DataError(f'{path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0]})') from None
    if all(tokenizer.token_to_id(t) is not None for t in SPECIAL_TOKENS):
      return cls(tokenizer, source=path)
    return cls(tokenizer, hf_special_tokens(path, tokenizer), source=path)

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, path: str) -> None:
    """Writes the tokenizer.json and, for a tokenizer whose special tokens are not archlab's,
    the Hugging Face tokenizer_config.json beside it that names them (so `from_file` and
    transformers both read them back)."""
    if self.special_tokens != dict(zip(_SPECIAL_NAMES, SPECIAL_TOKENS)):
      config_path = os.path.join(os.path.dirname(os.path.abspath(path)), 'tokenizer_config.json')
      fields = {}
      if os.path.isfile(config_path):
        with open(config_path, encoding='utf-8') as f:
          fields = json.load(f)
      fields.update({f'{name}_token': token for name, token in self.special_tokens.items()})
      atomic_write_text(config_path, json.dumps(fields, indent=2, ensure_ascii=False))
    atomic_write_text(path, self._tokenizer.to_str())

  def __repr__(self) -> str:
    return f'BpeTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:16]})'


class SymbolTokenizer:
  """The vocabulary of a synthetic task (input_pipeline/tasks): symbols 0..num_symbols-1, then
  <pad>, <bos>, <eos>, <mask>. Each symbol counts as one byte, so a task run's "bits per byte"
  is bits per scored symbol; special tokens count zero. It encodes no text (`encode` refuses)."""

  def __init__(self, num_symbols: int):
    self.num_symbols = int(num_symbols)
    self.vocab_size = self.num_symbols + 4
    self.pad_id, self.bos_id, self.eos_id, self.mask_id = range(self.num_symbols,
                                                                 self.num_symbols + 4)
    self.fingerprint = f'{_SYMBOLS_MARKER}-{self.num_symbols}'
    self.token_bytes_V = np.zeros(self.vocab_size, np.int32)
    self.token_bytes_V[:self.num_symbols] = 1

  def encode(self, text: str) -> list[int]:
    raise errors.DataError(f'the task vocabulary ({self.num_symbols} symbols) has no text '
                           'encoding; text tasks (niah) need a text tokenizer (data.tokenizer)')

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(self.encode(t)) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    return ' '.join(str(int(i)) for i in ids if 0 <= int(i) < self.num_symbols)

  def save(self, path: str) -> None:
    atomic_write_text(path, json.dumps({'archlab_tokenizer': _SYMBOLS_MARKER,
                                        'num_symbols': self.num_symbols}) + '\n')

  def __repr__(self) -> str:
    return f'SymbolTokenizer(num_symbols={self.num_symbols})'


_SYMBOLS_MARKER = 'archlab-symbols-v1'
Tokenizer = ByteTokenizer | BpeTokenizer | SymbolTokenizer
_SPECIAL_NAMES = ('pad', 'bos', 'eos', 'mask')


def hf_special_tokens(path: str, tokenizer: tokenizers.Tokenizer) -> dict[str, str]:
  """The special tokens a Hugging Face checkpoint names for the tokenizer.json at `path`.

  Read from tokenizer_config.json (`bos_token`, ...), else special_tokens_map.json, else the
  `*_token_id` fields of config.json, in the same directory. Raises one line when none names
  an eos token.
  """
  directory = os.path.dirname(os.path.abspath(path))
  found = {}
  for name in ('tokenizer_config.json', 'special_tokens_map.json'):
    sidecar = os.path.join(directory, name)
    if os.path.isfile(sidecar):
      with open(sidecar, encoding='utf-8') as f:
        try:
          fields = json.load(f)
        except json.JSONDecodeError as e:
          raise errors.DataError(f'{sidecar}: not JSON ({e})') from None
      for key in _SPECIAL_NAMES:
        value = fields.get(f'{key}_token')
        if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
          value = value.get('content')
        if isinstance(value, str) and value and key not in found:
          found[key] = value
  config_path = os.path.join(directory, 'config.json')
  if 'eos' not in found and os.path.isfile(config_path):
    with open(config_path, encoding='utf-8') as f:
      fields = json.load(f)
    for key in _SPECIAL_NAMES:
      value = fields.get(f'{key}_token_id')
      if isinstance(value, list):  # several eos ids (Llama 3.1 instruct): the first
        value = value[0] if value else None
      if isinstance(value, int) and key not in found:
        token = tokenizer.id_to_token(value)
        if token is not None:
          found[key] = token
  if 'eos' not in found:
    raise errors.DataError(f'{path} has none of archlab\'s special tokens {list(SPECIAL_TOKENS)} and '
                     f'no tokenizer_config.json, special_tokens_map.json or config.json beside '
                     f'it that names an eos token')
  return found


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer saved by `save`: the bytes marker file or a `tokenizer.json`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no tokenizer file at {path}')
  with open(path, encoding='utf-8') as f:
    content = json.load(f)
  if content.get('archlab_tokenizer') == _BYTES_MARKER:
    return ByteTokenizer()
  if content.get('archlab_tokenizer') == _SYMBOLS_MARKER:
    return SymbolTokenizer(content['num_symbols'])
  return BpeTokenizer.from_file(path)
