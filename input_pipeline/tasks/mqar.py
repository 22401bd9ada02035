"""Multi-query associative recall (MQAR), as Zoology defines it (Arora, Eyuboglu et al. 2023,
`zoology/data/multiquery_ar.py`).

An instance of length T with P pairs over a vocabulary of V:

  keys    P distinct ids from 1..V/2-1 (the first half of the vocabulary; 0 marks "empty")
  values  P distinct ids from V/2..V-1 (the second half)
  context k_1 v_1 k_2 v_2 ... k_P v_P                      (positions 0..2P-1)
  queries each key once, key k_i at position 2P + 2 g_i, where the gaps g_1..g_P are drawn
          without replacement from 0..S-1, S = (T - 2P) / 2, with probabilities
          p(g) ∝ a g'^(a-1), g' = g + 1 (a power law: `power_a`, 0.01 in Zoology, so
          near queries are far more likely than far ones; 1 is uniform)
  answer  at the query position 2P + 2 g_i the target is v_i; nothing else is scored
  filler  every other position holds a uniformly random id from 0..V-1
          (`random_non_queries`, Zoology's default), or 0 when it is False

Zoology's paper grid (vocabulary 8192): (T, P) = (64, 4), (128, 8), (256, 16), (256, 32),
(256, 64) for training; tests up to (1024, 256). It trains on the answer tokens only.
"""

from __future__ import annotations

import numpy as np

from input_pipeline.tasks import base


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
  """p(g) for g = 0..space-1: a (g+1)^(a-1), normalised (Zoology's power law)."""
  p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  return p / p.sum()


@base.register('mqar')
class MQAR(base.Task):
  SOURCE = 'Zoology (HazyResearch/zoology, zoology/data/multiquery_ar.py)'
  DEFAULTS = dict(vocab_size=8192, seq_len=64, num_kv_pairs=4, power_a=0.01,
                  random_non_queries=True, seed=0, num_train=100_000, num_test=1000)

  def check(self):
    super().check()
    if self.seq_len % 2:
      self.error('seq_len', 'must be even (Zoology)')
    if self.num_kv_pairs < 1:
      self.error('num_kv_pairs', 'must be positive')
    if 4 * self.num_kv_pairs > self.seq_len:
      self.error('num_kv_pairs', f'needs seq_len >= 4 x num_kv_pairs (pairs, then a query '
                 f'slot for each), but seq_len={self.seq_len}')
    if self.vocab_size // 2 - 1 < self.num_kv_pairs:
      self.error('vocab_size', f'has {self.vocab_size // 2 - 1} keys, fewer than '
                 f'num_kv_pairs={self.num_kv_pairs}')
    if not 0 < self.power_a <= 1:
      self.error('power_a', 'must be in (0, 1]')
    self._p = gap_probabilities((self.seq_len - 2 * self.num_kv_pairs) // 2, self.power_a)

  def generate(self, rng, split):
    del split
    T, P, V = self.seq_len, self.num_kv_pairs, self.vocab_size
    context = 2 * P
    keys = rng.choice(np.arange(1, V // 2), size=P, replace=False)
    values = rng.choice(np.arange(V // 2, V), size=P, replace=False)
    gaps = rng.choice(len(self._p), size=P, replace=False, p=self._p)
    inputs = np.zeros(T, np.int64)
    inputs[0:context:2], inputs[1:context:2] = keys, values
    query_positions = context + 2 * gaps
    inputs[query_positions] = keys
    if self.random_non_queries:
      empty = inputs == 0
      inputs[empty] = rng.integers(0, V, size=int(empty.sum()))
    targets = np.concatenate([inputs[1:], inputs[:1]])  # next tokens (weighted 0)...
    targets[query_positions] = values                   # ...but the answers at the queries
    answer = np.zeros(T, bool)
    answer[query_positions] = True
    return inputs, targets, answer
