"""Single-needle retrieval in RULER's three S-NIAH forms (Hsieh et al. 2024, NVIDIA/RULER,
`scripts/data/synthetic/niah.py` with `scripts/synthetic.yaml`'s niah_single_1..3), at the
token level: the prompt and its answer are tokenized with the run's tokenizer and the answer
tokens are scored.

  niah_single_1  haystack: RULER's noise, the line "The grass is green. The sky is blue. The
                 sun is yellow. Here we go. There and back again." repeated; the needle goes
                 between two lines, at a uniformly random one of them; key: a word, value: a
                 7-digit number.
  niah_single_2  haystack: real text, lines of the corpus's documents (RULER uses Paul Graham's
                 essays; here it is `config.data`'s corpus, the held-out split's documents for
                 the val and test instances, the train split's for training), the needle at a
                 depth drawn from RULER's 40 depths 0, 3, ..., 100 percent, at a line boundary;
                 key: a word, value: a 7-digit number.
  niah_single_3  as niah_single_2 with a UUID (version 4 layout) as the value.

The prompt is RULER's template for one needle and one query:

  A special magic number is hidden within the following text. Make sure to memorize it. I
  will quiz you about the number afterwards.
  <haystack with "One of the special magic numbers for <key> is: <value>." inside>
  What is the special magic number for <key> mentioned in the provided text? The special
  magic number for <key> mentioned in the provided text is

and the answer is " <value>". The row is [BOS] + prompt + answer, at most `seq_len` tokens of
input, the haystack as long as fits. Keys are adjective-noun pairs as RULER's (from wonderwords'
lists there, from the short lists below here). Scoring is teacher-forced: an instance is solved
when the argmax at every answer token is that token, which is exactly when greedy decoding
writes the value first (RULER counts the value anywhere in 128 generated tokens).
"""

from __future__ import annotations

import uuid

import numpy as np

import errors
from input_pipeline.tasks import base

NOISE = 'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'
DEPTHS = np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)
_ADJECTIVES = ('amber', 'ancient', 'bitter', 'brave', 'brisk', 'calm', 'clever', 'cold', 'crimson',
               'curious', 'damp', 'eager', 'early', 'faint', 'fancy', 'fierce', 'gentle', 'giant',
               'golden', 'hollow', 'humble', 'icy', 'jolly', 'keen', 'lazy', 'little', 'lively',
               'loud', 'lucky', 'mellow', 'misty', 'narrow', 'noble', 'odd', 'pale', 'proud',
               'quiet', 'rapid', 'rusty', 'silent', 'silver', 'sleepy', 'smooth', 'steep',
               'sturdy', 'tender', 'vivid', 'wild')
_NOUNS = ('anchor', 'badger', 'basket', 'beacon', 'bridge', 'candle', 'canyon', 'castle',
          'cedar', 'comet', 'cottage', 'crystal', 'dragon', 'falcon', 'feather', 'forest',
          'garden', 'glacier', 'harbor', 'helmet', 'island', 'jacket', 'kettle', 'lantern',
          'meadow', 'mirror', 'monkey', 'needle', 'orchard', 'otter', 'pebble', 'pepper',
          'pillow', 'planet', 'quarry', 'rabbit', 'river', 'saddle', 'shadow', 'spider',
          'statue', 'thunder', 'tiger', 'tower', 'valley', 'violin', 'walrus', 'window')
WORDS = tuple(f'{a}-{n}' for a in _ADJECTIVES for n in _NOUNS)


class _Needle(base.Task):
  SOURCE = 'RULER (NVIDIA/RULER, scripts/data/synthetic/niah.py)'
  TEXT = True
  HAYSTACK = 'noise'
  VALUE = 'number'

  def check(self):
    super().check()
    if self.tokenizer is None:
      raise errors.DataError(f'task {self.NAME} is text: it needs a text tokenizer')
    self.tokenizer.encode('a')  # a symbol vocabulary refuses here, in one line
    if self.HAYSTACK == 'corpus' and self.text_source is None:
      raise errors.DataError(f'task {self.NAME} needs a corpus for its haystack')
    self._lines = {}
    sample = self.parts(np.random.default_rng(0), 'test')
    fixed = 1 + sum(len(self.tokenizer.encode(sample[k] + ('\n' if k == 'needle' else '')))
                    for k in ('header', 'question', 'answer', 'needle'))
    if fixed + 8 > self.seq_len + 1:
      self.error('seq_len', f'cannot hold the prompt ({fixed} tokens of template, needle and '
                 f'answer with this tokenizer) and a haystack')

  def _value(self, rng) -> str:
    if self.VALUE == 'number':
      return str(int(rng.integers(10**6, 10**7)))
    return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), 'big'), version=4))

  def _haystack_lines(self, split: str) -> list[str]:
    """The corpus's lines for `split` (train: the train split; val and test: held out)."""
    source = 'train' if split == 'train' else 'val'
    if source not in self._lines:
      lines = [line for line in self.text_source(source).split('\n') if line.strip()]
      if len(lines) < 8:
        raise errors.DataError(f'task {self.NAME}: the corpus\'s {source} split has '
                               f'{len(lines)} non-blank lines, too few for a haystack')
      self._lines[source] = lines
    return self._lines[source]

  def parts(self, rng, split: str) -> dict:
    """The instance as text: prompt pieces, key, value and the needle's place."""
    key = WORDS[int(rng.integers(len(WORDS)))]
    value = self._value(rng)
    kind = self.VALUE
    needle = f'One of the special magic {kind}s for {key} is: {value}.'
    header = (f'A special magic {kind} is hidden within the following text. Make sure to '
              f'memorize it. I will quiz you about the {kind} afterwards.\n')
    question = (f'\nWhat is the special magic {kind} for {key} mentioned in the provided text? '
                f'The special magic {kind} for {key} mentioned in the provided text is')
    return dict(key=key, value=value, needle=needle, header=header, question=question,
                answer=' ' + value)

  def build(self, rng, split: str):
    """(token ids of the prompt, of the answer, the needle's line index, the line count)."""
    encode = self.tokenizer.encode
    p = self.parts(rng, split)
    fixed = 1 + len(encode(p['header'])) + len(encode(p['question'])) + len(encode(p['answer']))
    budget = self.seq_len + 1 - fixed - len(encode(p['needle'] + '\n'))
    if self.HAYSTACK == 'noise':
      per_line = len(encode(NOISE + '\n'))
      lines = [NOISE] * max(1, budget // per_line)
      at = None
    else:
      corpus = self._haystack_lines(split)
      start = int(rng.integers(len(corpus)))
      lines, used = [], 0
      while True:
        line = corpus[(start + len(lines)) % len(corpus)]
        cost = len(encode(line + '\n'))
        if used + cost > budget and lines:
          break
        lines.append(line)
        used += cost
      at = int(len(lines) * DEPTHS[int(rng.integers(len(DEPTHS)))] / 100)
    if at is None:  # RULER's noise form: between lines, uniformly
      at = int(rng.integers(len(lines)))
    while True:
      context = '\n'.join(lines[:at] + [p['needle']] + lines[at:])
      prompt = [self.tokenizer.bos_id] + encode(p['header'] + context + p['question'])
      answer = encode(p['answer'])
      if len(prompt) + len(answer) <= self.seq_len + 1 or len(lines) == 1:
        break
      lines = lines[:-1]  # merges across pieces made it longer than counted: drop a line
      at = min(at, len(lines))
    if len(prompt) + len(answer) > self.seq_len + 1:
      self.error('seq_len', f'cannot hold the prompt and answer '
                 f'({len(prompt) + len(answer)} tokens)')
    return prompt, answer, at, len(lines), p

  def generate(self, rng, split):
    prompt, answer, _, _, _ = self.build(rng, split)
    tokens = np.asarray(prompt + answer, np.int64)
    scored = np.zeros(len(tokens), bool)
    scored[len(prompt):] = True
    return tokens[:-1], tokens[1:], scored[1:]


_NEEDLE_DEFAULTS = dict(seq_len=1024, seed=0, num_train=10_000, num_test=100)


@base.register('niah_single_1')
class NeedleNoise(_Needle):
  DEFAULTS = dict(_NEEDLE_DEFAULTS)
  HAYSTACK, VALUE = 'noise', 'number'


@base.register('niah_single_2')
class NeedleCorpusNumber(_Needle):
  DEFAULTS = dict(_NEEDLE_DEFAULTS)
  HAYSTACK, VALUE = 'corpus', 'number'


@base.register('niah_single_3')
class NeedleCorpusUuid(_Needle):
  DEFAULTS = dict(_NEEDLE_DEFAULTS)
  HAYSTACK, VALUE = 'corpus', 'uuid'
