"""The six MAD tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures"; athms/mad-lab, `mad/data/instances.py`), at the baselines of its
`configs/tasks/*.yml`.

Each returns (inputs, targets, answer) for a causal decoder: the target at position t is what
the model should emit after reading inputs[0..t]; `answer` marks what MAD scores.

  in_context_recall  multi-query recall: V=16, T=128. Keys from the first half of the V
                     non-special ids, values from the second; T/2 - 1 key-value pairs, each
                     key's value fixed within the instance; every value of a key seen before is
                     an answer, and a final probe pair (a presented key, its value) ends the row.
  noisy_recall       the same with V=32 of which 16 are noise ids; each pair is replaced by two
                     noise tokens with probability 0.2 (never all of them).
  fuzzy_recall       keys and values are runs of 1..3 distinct adjacent tokens (V=16, T=128;
                     the last id pads the row on the left); a probe pair is planted at a random
                     point and repeated at the end. Test instances use keys of exactly 3 tokens.
  selective_copying  16 tokens from V-2 ids with 223 blanks inserted at random points, then the
                     copy token and 16 blanks: the answers are the 16 tokens in order (T=256).
  compression        T-1 random tokens then the compression token; the targets are the inputs.
                     MAD trains it with an autoencoder backbone (the sequence pooled into the
                     last token, an MLP decoder), which archlab's decoder is not: the generator
                     is here and tested, training or scoring it refuses in one line.
  memorization       a fixed key -> value map (by `kv_map_seed`) over V=256; 16 keys each
                     followed by an insert token, whose target is the key's value (T=32;
                     only 256 training instances: the map is learnt in the weights).

The recall tasks train on every next token (MAD's `is_training` rows) and score the answers;
the others train and score the answers. Two departures, neither changing a distribution: each
instance draws from its own seeded generator (MAD draws a dataset from one), and a key or value
motif of m tokens is drawn as m distinct tokens in order (MAD picks from the shuffled list of
all m-permutations, which is the same distribution).
"""

from __future__ import annotations

import numpy as np

import errors
from input_pipeline.tasks import base

_COMMON = dict(seed=0, num_train=12_800, num_test=1_280)


def _shifted(tokens: list[int], answer: list[bool]):
  """inputs, targets, answer of a sequence for next-token prediction (one shorter)."""
  tokens = np.asarray(tokens, np.int64)
  return tokens[:-1], tokens[1:], np.asarray(answer[1:], bool)


class _Recall(base.Task):
  SOURCE = 'MAD (athms/mad-lab, generate_in_context_recall_instance)'
  TRAIN_ALL_TOKENS = True

  def check(self):
    super().check()
    if self.seq_len % 2:
      self.error('seq_len', 'must be even (key-value pairs)')
    specials = 0 if self.multi_query else 1
    if (self.vocab_size - specials - self.noise_vocab_size) // 2 < 1:
      self.error('vocab_size', f'leaves no key or value ids after noise_vocab_size='
                 f'{self.noise_vocab_size}')
    if not 0 <= self.frac_noise < 1:
      self.error('frac_noise', 'must be in [0, 1)')
    if self.frac_noise > 0 and self.noise_vocab_size < 1:
      self.error('noise_vocab_size', f'must be positive when frac_noise={self.frac_noise}')

  def generate(self, rng, split):
    del split
    n = (self.vocab_size if self.multi_query else self.vocab_size - 1) - self.noise_vocab_size
    keys, values = np.arange(n // 2), np.arange(n // 2, n)
    noise = np.arange(n, n + self.noise_vocab_size)
    pairs = self.seq_len // 2
    kept = rng.integers(pairs)  # one pair that is never noise
    kv, presented, tokens, answer = {}, [], [], []
    for i in range(pairs - 1):  # the last pair is the probe
      if self.frac_noise > 0 and i != kept and rng.random() < self.frac_noise:
        tokens += rng.choice(noise, size=2).tolist()
        answer += [False, False]
        continue
      k = int(rng.choice(keys))
      if k not in kv:
        kv[k] = int(rng.choice(values))
      tokens += [k, kv[k]]
      answer += [False, self.multi_query and k in presented]
      if k not in presented:
        presented.append(k)
    if not presented:  # every pair was noise (probability frac_noise^(T/2 - 2))
      raise errors.DataError(f'task {self.spec}: an instance drew only noise; lower frac_noise')
    probe = int(rng.choice(presented))
    if not self.multi_query:
      tokens.append(self.vocab_size - 1)  # the copy prefix
      answer.append(False)
    tokens += [probe, kv[probe]]
    answer += [False, True]
    return _shifted(tokens, answer)


@base.register('in_context_recall')
class InContextRecall(_Recall):
  DEFAULTS = dict(vocab_size=16, seq_len=128, multi_query=True, noise_vocab_size=0,
                  frac_noise=0.0, **_COMMON)


@base.register('noisy_recall')
class NoisyRecall(_Recall):
  DEFAULTS = dict(vocab_size=32, seq_len=128, multi_query=True, noise_vocab_size=16,
                  frac_noise=0.2, **_COMMON)


def _motif(rng, vocab: np.ndarray, size: int) -> tuple[int, ...]:
  """`size` distinct tokens in order: uniform over the size-permutations of `vocab`."""
  return tuple(int(t) for t in rng.choice(vocab, size=size, replace=False))


@base.register('fuzzy_recall')
class FuzzyRecall(base.Task):
  SOURCE = 'MAD (athms/mad-lab, generate_fuzzy_in_context_recall_instance)'
  TRAIN_ALL_TOKENS = True
  DEFAULTS = dict(vocab_size=16, seq_len=128, k_motif_size=3, v_motif_size=3, multi_query=True,
                  noise_vocab_size=0, frac_noise=0.0, **_COMMON)

  def check(self):
    super().check()
    n = self.vocab_size - (1 if self.multi_query else 2) - self.noise_vocab_size
    for name, size in (('k_motif_size', self.k_motif_size), ('v_motif_size', self.v_motif_size)):
      if size < 1 or size > n // 2:
        self.error(name, f'must be in [1, {n // 2}] (the key and value ids of vocab_size='
                   f'{self.vocab_size})')
    if self.seq_len <= 4 * (self.k_motif_size + self.v_motif_size):
      self.error('seq_len', 'is too short for the motif sizes')
    if not 0 <= self.frac_noise < 1:
      self.error('frac_noise', 'must be in [0, 1)')
    if self.frac_noise > 0 and self.noise_vocab_size < 1:
      self.error('noise_vocab_size', f'must be positive when frac_noise={self.frac_noise}')

  def generate(self, rng, split):
    train = split == 'train'
    pad = self.vocab_size - (1 if self.multi_query else 2)
    n = pad - self.noise_vocab_size
    keys, values = np.arange(n // 2), np.arange(n // 2, n)
    noise = np.arange(n, n + self.noise_vocab_size)
    key_sizes = np.arange(1, self.k_motif_size + 1) if train else np.array([self.k_motif_size])

    def value_size():
      return int(rng.integers(1, self.v_motif_size + 1))

    k_probe = _motif(rng, keys, int(rng.choice(key_sizes)))
    v_probe = _motif(rng, values, value_size())
    probe_len = len(k_probe) + len(v_probe)
    probe_at = rng.integers(self.seq_len - 2 * probe_len)
    kv, presented, tokens, answer = {}, set(), [], []
    probe_added = False
    while len(tokens) < self.seq_len - probe_len - (self.k_motif_size + self.v_motif_size):
      k_size, v_size = int(rng.choice(key_sizes)), value_size()
      if len(tokens) >= probe_at and not probe_added:
        tokens += k_probe + v_probe
        answer += [False] * probe_len
        kv[k_probe] = v_probe
        presented.add(k_probe)
        probe_added = True
        continue
      if self.frac_noise > 0 and rng.random() < self.frac_noise:
        tokens += rng.choice(noise, size=k_size + v_size).tolist()
        answer += [False] * (k_size + v_size)
        continue
      k = _motif(rng, keys, k_size)
      if k == k_probe:
        v = v_probe
        probe_added = True
      elif k in kv:
        v = kv[k]
      else:
        v = kv[k] = _motif(rng, values, v_size)
      tokens += k + v
      answer += [False] * len(k) + [self.multi_query and k in presented] * len(v)
      presented.add(k)
    if not self.multi_query:
      tokens.append(self.vocab_size - 1)
      answer.append(False)
    tokens += k_probe + v_probe
    answer += [False] * len(k_probe) + [True] * len(v_probe)
    left = self.seq_len + 1 - len(tokens)
    return _shifted([pad] * left + tokens, [False] * left + answer)


@base.register('selective_copying')
class SelectiveCopying(base.Task):
  SOURCE = 'MAD (athms/mad-lab, generate_selective_copying_instance)'
  DEFAULTS = dict(vocab_size=16, seq_len=256, num_tokens_to_copy=16, **_COMMON)

  def check(self):
    super().check()
    if self.vocab_size < 3:
      self.error('vocab_size', 'must be at least 3 (a blank, a copy token and one more)')
    if self.seq_len <= 2 * self.num_tokens_to_copy + 1:
      self.error('seq_len', f'must exceed 2 x num_tokens_to_copy + 1 = '
                 f'{2 * self.num_tokens_to_copy + 1}')

  def generate(self, rng, split):
    del split
    n, copy, blank = self.num_tokens_to_copy, self.vocab_size - 1, self.vocab_size - 2
    num_blank = self.seq_len - 2 * n - 1
    to_copy = rng.choice(self.vocab_size - 2, size=n)
    data = np.insert(to_copy, rng.integers(0, n, size=num_blank), blank)
    inputs = np.concatenate([data, [copy], np.full(n, blank)])
    targets = np.concatenate([inputs[1:n + num_blank + 2], to_copy])
    answer = np.arange(self.seq_len) > n + num_blank
    return inputs, targets, answer


@base.register('compression')
class Compression(base.Task):
  SOURCE = 'MAD (athms/mad-lab, generate_compression_instance)'
  CAUSAL = False
  DEFAULTS = dict(vocab_size=16, seq_len=32, noise_vocab_size=0, frac_noise=0.0, **_COMMON)

  def generate(self, rng, split):
    del split
    n = self.vocab_size - 1 - self.noise_vocab_size
    inputs = np.concatenate([rng.choice(n, size=self.seq_len - 1), [self.vocab_size - 1]])
    answer = np.ones(self.seq_len, bool)
    if self.frac_noise > 0:
      noisy = np.flatnonzero(rng.random(self.seq_len - 1) < self.frac_noise)
      inputs[noisy] = rng.choice(np.arange(n, n + self.noise_vocab_size), size=len(noisy))
      answer[noisy] = False
    return inputs, inputs.copy(), answer


@base.register('memorization')
class Memorization(base.Task):
  SOURCE = 'MAD (athms/mad-lab, generate_memorization_instance)'
  DEFAULTS = dict(vocab_size=256, seq_len=32, kv_map_seed=12345, noise_vocab_size=0,
                  frac_noise=0.0, seed=0, num_train=256, num_test=1_280)

  def check(self):
    super().check()
    if self.seq_len % 2:
      self.error('seq_len', 'must be even (key, insert token)')
    n = self.vocab_size - 1 - self.noise_vocab_size
    if n < 2:
      self.error('vocab_size', 'leaves no keys or values')
    # The fixed map: the keys 0..n/2-1 in a random order, paired with as many of the values
    # n/2..n-1 in a random order (MAD's generate_kv_map).
    map_rng = np.random.default_rng(self.kv_map_seed)
    self.map_keys = map_rng.permutation(n // 2)
    values = map_rng.permutation(np.arange(n // 2, n))[:n // 2]
    self.kv_map = np.zeros(n // 2, np.int64)
    self.kv_map[self.map_keys] = values

  def generate(self, rng, split):
    del split
    n = self.vocab_size - 1 - self.noise_vocab_size
    insert = self.vocab_size - 1
    pairs = self.seq_len // 2
    kept = rng.integers(pairs)
    inputs, targets, answer = [], [], []
    for i in range(pairs):
      if self.frac_noise > 0 and i != kept and rng.random() < self.frac_noise:
        inputs += rng.choice(np.arange(n, n + self.noise_vocab_size), size=2).tolist()
        targets += [inputs[-1], 0]
        answer += [False, False]
        continue
      k = int(rng.choice(self.map_keys))
      inputs += [k, insert]
      targets += [insert, int(self.kv_map[k])]
      answer += [False, True]
    return np.asarray(inputs), np.asarray(targets), np.asarray(answer)
