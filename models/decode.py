"""Generation: prefill a batch of prompts, then decode one token a step, every sublayer
through its own cache (`Sublayer.init_cache`), under functions compiled once.

  generator = decode.Generator(model, variables, max_len=512, sampler=decode.Sampler(top_p=0.9),
                               stop_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
  out = generator.generate([[bos, 5, 6], [bos, 7]], max_new_tokens=64, seed=0)
  out.tokens  # per prompt: the new tokens, ending with the stop token when one was sampled

Layout. Prompts of different lengths are left-padded to one length, rounded up to a multiple
of `prefill_chunk`: padding has segment id 0, which no key ever sees, and positions count
from each prompt's own first token, so every row writes the same cache slot each step and
the cache index is one scalar. The prefill runs one chunk of `prefill_chunk` tokens per call
of one compiled function (memory bounded by chunk x cache length, whatever the prompt's
length, and one compilation for every prompt length). After the prefill,
`steps_per_call` tokens are decoded per call of one jitted function (a `lax.scan`), so the
host can stream text and stop early without recompiling; `max_len` (the cache length) is
fixed when the Generator is made. A model trained with `scan_layers` decodes with its layers
unrolled (`lm.unrolled`, the same function; `unroll_layers=False` keeps the scan): XLA's CPU
loop copies each layer's slice of the stacked weights and cache every step.

Sampling (`Sampler`), in the order transformers applies it: repetition penalty over the
prompt and the tokens generated so far (a positive logit divided by the penalty, a negative
one multiplied), then temperature (0: greedy), top-k, top-p (the smallest set of most likely
tokens whose probability reaches top_p), min-p (tokens at least min_p times as likely as the
most likely one); then one draw from what is left. Logits are float32. A row that samples a
stop id is finished: the stop token is its last, and it only emits `pad_id` after. The rng is
`jax.random.key(seed)`, split once per token, so a seed reproduces a batch exactly.

Sharding: with `mesh`, the batch (tokens, cache and sampler state) is laid over the mesh's
batch axes by `rules`, as the training step lays out its batch; parameters stay where the
caller put them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import errors
import models
from models import lm


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is drawn from the logits (see the module docstring)."""
  temperature: float = 1.0       # 0: greedy (argmax after the repetition penalty)
  top_k: int = 0                 # 0: off
  top_p: float = 1.0             # 1: off
  min_p: float = 0.0             # 0: off
  repetition_penalty: float = 1.0  # 1: off

  def __post_init__(self):
    if self.temperature < 0:
      raise errors.ConfigError(f'temperature={self.temperature} must be >= 0 (0: greedy)')
    if self.top_k < 0:
      raise errors.ConfigError(f'top_k={self.top_k} must be >= 0 (0: off)')
    if not 0 < self.top_p <= 1:
      raise errors.ConfigError(f'top_p={self.top_p} must be in (0, 1] (1: off)')
    if not 0 <= self.min_p < 1:
      raise errors.ConfigError(f'min_p={self.min_p} must be in [0, 1) (0: off)')
    if self.repetition_penalty <= 0:
      raise errors.ConfigError(f'repetition_penalty={self.repetition_penalty} must be '
                               'positive (1: off)')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def penalised(self) -> bool:
    return self.repetition_penalty != 1


def penalise(logits_BV, seen_BV, penalty: float):
  """The repetition penalty (CTRL, as transformers): seen tokens' logits divided by `penalty`
  where positive, multiplied where negative."""
  penalised_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
  return jnp.where(seen_BV, penalised_BV, logits_BV)


def filter_logits(sampler: Sampler, logits_BV, seen_BV=None):
  """Float32 logits with every token the sampler would not draw set to -inf (the repetition
  penalty and temperature applied to the rest). Greedy keeps only the argmax."""
  logits_BV = logits_BV.astype(jnp.float32)
  if sampler.penalised:
    logits_BV = penalise(logits_BV, seen_BV, sampler.repetition_penalty)
  if sampler.greedy:
    best_B1 = jnp.argmax(logits_BV, -1)[:, None]
    keep_BV = jnp.arange(logits_BV.shape[-1])[None, :] == best_B1
    return jnp.where(keep_BV, logits_BV, -jnp.inf)
  if sampler.temperature != 1:
    logits_BV = logits_BV / sampler.temperature
  v = logits_BV.shape[-1]
  if sampler.top_k and sampler.top_k < v:
    kth_B1 = jax.lax.top_k(logits_BV, sampler.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampler.top_p < 1:
    order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, -1)
    probs_BV = jax.nn.softmax(sorted_BV, -1)
    before_BV = jnp.cumsum(probs_BV, -1) - probs_BV  # mass of the more likely tokens
    keep_sorted_BV = before_BV < sampler.top_p
    keep_sorted_BV = keep_sorted_BV.at[:, 0].set(True)
    keep_BV = jnp.zeros_like(keep_sorted_BV).at[
        jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(keep_sorted_BV)
    logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
  if sampler.min_p:
    probs_BV = jax.nn.softmax(logits_BV, -1)
    logits_BV = jnp.where(probs_BV < sampler.min_p * jnp.max(probs_BV, -1, keepdims=True),
                          -jnp.inf, logits_BV)
  return logits_BV


def sample(sampler: Sampler, rng, logits_BV, seen_BV=None):
  """One token per row from `filter_logits` (argmax when greedy)."""
  logits_BV = filter_logits(sampler, logits_BV, seen_BV)
  if sampler.greedy:
    return jnp.argmax(logits_BV, -1).astype(jnp.int32)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


class _State(NamedTuple):
  """What one decode step carries to the next (every array's first axis is the batch)."""
  cache: object
  logits_BV: jax.Array      # the next token's logits
  positions_B: jax.Array    # the next token's position
  finished_B: jax.Array
  seen_BV: jax.Array        # tokens of the prompt and the output (repetition penalty), else (B, 1)
  rng: jax.Array


@dataclasses.dataclass
class Output:
  """A batch's generation: per prompt its new tokens and why it stopped, and timings."""
  tokens: list[list[int]]
  finish: list[str]          # 'stop' (a stop id or stop string) or 'length'
  prompt_tokens: int         # real (unpadded) prompt tokens of the batch
  new_tokens: int            # tokens generated, stop tokens included
  prefill_seconds: float
  decode_seconds: float
  model_calls: int           # forward passes: one per prefill chunk and per decode step

  @property
  def tokens_per_sec(self) -> float:
    """New tokens per second of decoding (the prefill excluded)."""
    return self.new_tokens / max(self.decode_seconds, 1e-9)


class Generator:
  """Prefill and decoding of one model (`models.build(config.model)`) with its variables
  (`{'params': ..., **collections}`), compiled once per batch size."""

  def __init__(self, model, variables, *, max_len: int, sampler: Sampler = Sampler(),
               stop_ids: Sequence[int] = (), pad_id: int = 0, steps_per_call: int = 8,
               prefill_chunk: int = 128, mesh=None, rules=(), unroll_layers: bool = True):
    if unroll_layers and getattr(model.cfg, 'scan_layers', False):
      cfg, variables = lm.unrolled(model.cfg, variables)
      model = models.build(cfg)
    cfg = model.cfg
    if max_len <= 0:
      raise errors.ConfigError(f'max_len={max_len} must be positive')
    if cfg.position == 'learned' and max_len > cfg.max_len:
      raise errors.ConfigError(f'max_len={max_len} exceeds the learned position table '
                               f'(model.max_len={cfg.max_len})')
    if steps_per_call < 1 or prefill_chunk < 1:
      raise errors.ConfigError(f'steps_per_call={steps_per_call} and prefill_chunk='
                               f'{prefill_chunk} must be positive')
    if cfg.bidirectional:
      raise errors.ConfigError('model.bidirectional=True: a bidirectional model does not decode '
                               'left to right (use a diffusion sampler)')
    self.model, self.variables, self.cfg = model, variables, cfg
    self.max_len, self.sampler = max_len, sampler
    self.stop_ids = tuple(int(s) for s in stop_ids)
    self.pad_id, self.steps_per_call, self.prefill_chunk = pad_id, steps_per_call, prefill_chunk
    self.mesh, self.rules = mesh, rules
    self._prefill = jax.jit(self._prefill_fn)
    self._decode = jax.jit(self._decode_fn, donate_argnums=1)
    self._compiled: dict = {}  # (function, shapes) -> compiled: timings exclude compilation
    self.compile_seconds = 0.0

  # ---- the compiled pieces

  def _apply(self, variables, tokens_BT, positions_BT, segment_ids_BT, cache):
    logits_BTV, _, cache = self.model.apply(variables, tokens_BT, positions_BT=positions_BT,
                                            segment_ids_BT=segment_ids_BT, cache=cache)
    return logits_BTV, cache

  def _prefill_fn(self, variables, tokens_BT, positions_BT, segment_ids_BT, cache):
    logits_BTV, cache = self._apply(variables, tokens_BT, positions_BT, segment_ids_BT, cache)
    return logits_BTV[:, -1], cache

  def _decode_fn(self, variables, state: _State):
    stop_S = jnp.asarray(self.stop_ids or (-1,), jnp.int32)
    b = state.positions_B.shape[0]

    def one(state: _State, _):
      rng, draw = jax.random.split(state.rng)
      token_B = sample(self.sampler, draw, state.logits_BV, state.seen_BV)
      token_B = jnp.where(state.finished_B, self.pad_id, token_B)
      finished_B = state.finished_B | jnp.any(token_B[:, None] == stop_S[None, :], -1)
      seen_BV = state.seen_BV
      if self.sampler.penalised:
        seen_BV = seen_BV.at[jnp.arange(b), token_B].set(True)
      logits_BTV, cache = self._apply(variables, token_B[:, None], state.positions_B[:, None],
                                      jnp.ones((b, 1), jnp.int32), state.cache)
      new = _State(cache=cache, logits_BV=logits_BTV[:, 0], positions_B=state.positions_B + 1,
                   finished_B=finished_B, seen_BV=seen_BV, rng=rng)
      return new, (token_B, state.finished_B)

    state, (tokens_NB, was_finished_NB) = jax.lax.scan(one, state, None,
                                                       length=self.steps_per_call)
    return state, tokens_NB.T, was_finished_NB.T

  # ---- the host loop

  def _place(self, tree):
    """Lays a batch-major tree over the mesh's batch axes (scanned caches: the layer axis first)."""
    if self.mesh is None:
      return tree
    batch = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec('batch'), self.mesh,
                                        self.rules)
    scanned = bool(self.cfg.scan_layers) and lm.split_pattern(self.cfg.pattern)[1] > 1
    layered = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec(None, 'batch'), self.mesh,
                                          self.rules)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def place(path, x):
      in_cache = any(getattr(k, 'name', None) == 'cache' for k in path)
      lead = 2 if in_cache and scanned else 1
      if x.ndim < lead:
        return jax.device_put(x, replicated)
      return jax.device_put(x, layered if lead == 2 else batch)

    return jax.tree_util.tree_map_with_path(place, tree)

  def prompt_layout(self, prompts: Sequence[Sequence[int]]):
    """(tokens_BT, positions_BT, segment_ids_BT) of left-padded prompts, the padded length a
    multiple of `prefill_chunk`."""
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) < 1:
      raise errors.ConfigError('every prompt needs at least one token (a document starts '
                               'with the bos token)')
    t = self.prefill_chunk * math.ceil(max(lengths) / self.prefill_chunk)
    tokens = np.full((len(prompts), t), self.pad_id, np.int32)
    positions = np.zeros((len(prompts), t), np.int32)
    segments = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, t - len(p):] = p
      positions[i, t - len(p):] = np.arange(len(p))
      segments[i, t - len(p):] = 1
    return tokens, positions, segments

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int = 0,
               on_tokens: Callable[[np.ndarray, np.ndarray], Sequence[int] | None] | None = None
               ) -> Output:
    """Generates up to `max_new_tokens` tokens after each prompt (lists of token ids).

    `on_tokens(tokens_BN, live_BN)`, if given, sees each call's new tokens (live: emitted
    before the row finished) as they come, for streaming; it may return rows to finish
    (a stop string found by the caller). Timings exclude compilation (`compile_seconds`).
    """
    if max_new_tokens < 1:
      raise errors.ConfigError(f'max_new_tokens={max_new_tokens} must be positive')
    tokens_BT, positions_BT, segments_BT = self.prompt_layout(prompts)
    b, t = tokens_BT.shape
    if t + max_new_tokens > self.max_len:
      raise errors.ConfigError(
          f'a prompt of {max(len(p) for p in prompts)} tokens (padded to {t}) plus '
          f'max_new_tokens={max_new_tokens} exceeds the maximum length {self.max_len}')
    vocab = self.cfg.vocab_size
    if np.max(tokens_BT) >= vocab or np.min(tokens_BT) < 0:
      raise errors.ConfigError(f'a prompt token id is outside the vocabulary of {vocab}')
    seen = np.zeros((b, vocab if self.sampler.penalised else 1), bool)
    if self.sampler.penalised:
      for i, p in enumerate(prompts):
        seen[i, p] = True
    with contextlib.ExitStack() as stack:
      if self.mesh is not None:
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
      cache = self._place({'cache': lm.init_cache(self.cfg, b, self.max_len)})['cache']
      c = self.prefill_chunk
      chunks = [self._place({'x': tuple(jnp.asarray(a[:, i:i + c]) for a in (
          tokens_BT, positions_BT, segments_BT))})['x'] for i in range(0, t, c)]
      prefill = self._compiled_fn('prefill', self._prefill, self.variables, *chunks[0], cache)
      start = time.perf_counter()
      for chunk in chunks:
        logits_BV, cache = prefill(self.variables, *chunk, cache)
      state = _State(cache=cache, logits_BV=logits_BV, rng=jax.random.key(seed), **self._place({
          's': dict(positions_B=jnp.asarray([len(p) for p in prompts], jnp.int32),
                    finished_B=jnp.zeros((b,), bool), seen_BV=jnp.asarray(seen))})['s'])
      jax.block_until_ready(state.logits_BV)
      prefill_seconds = time.perf_counter() - start
      decode = self._compiled_fn('decode', self._decode, self.variables, state)
      out, finish = [[] for _ in prompts], ['length'] * b
      produced, calls = 0, 0
      start = time.perf_counter()
      while produced < max_new_tokens and not all(f == 'stop' for f in finish):
        state, tokens_BN, was_finished_BN = decode(self.variables, state)
        calls += 1
        take = min(self.steps_per_call, max_new_tokens - produced)
        tokens_BN = np.asarray(tokens_BN)[:, :take]
        live_BN = ~np.asarray(was_finished_BN)[:, :take]
        produced += take
        for i in range(b):
          new = tokens_BN[i][live_BN[i]].tolist()
          out[i] += new
          if new and new[-1] in self.stop_ids:
            finish[i] = 'stop'
        for i in (on_tokens(tokens_BN, live_BN) or ()) if on_tokens else ():
          finish[i] = 'stop'
          state = state._replace(finished_B=self._place(
              {'f': state.finished_B.at[i].set(True)})['f'])
      decode_seconds = time.perf_counter() - start
    return Output(tokens=out, finish=finish, prompt_tokens=sum(len(p) for p in prompts),
                  new_tokens=sum(len(o) for o in out), prefill_seconds=prefill_seconds,
                  decode_seconds=decode_seconds,
                  model_calls=len(chunks) + calls * self.steps_per_call)

  def _compiled_fn(self, name: str, fn, *args):
    """`fn` compiled for these arguments' shapes (once; `compile_seconds` counts the time)."""
    key = (name, str(jax.tree.map(lambda x: (x.shape, x.dtype), args)))
    if key not in self._compiled:
      start = time.perf_counter()
      self._compiled[key] = fn.lower(*args).compile()
      self.compile_seconds += time.perf_counter() - start
    return self._compiled[key]


class StopStrings:
  """An `on_tokens` callback that finishes a row once its decoded text contains a stop
  string; `cut(text)` drops the stop string and what follows."""

  def __init__(self, decode_fn: Callable[[list[int]], str], strings: Sequence[str], batch: int):
    self.decode_fn, self.strings = decode_fn, [s for s in strings if s]
    self.tokens = [[] for _ in range(batch)]

  def __call__(self, tokens_BN, live_BN):
    stop = []
    for i, (row, live) in enumerate(zip(tokens_BN, live_BN)):
      self.tokens[i] += row[live].tolist()
      if self.strings and any(s in self.decode_fn(self.tokens[i]) for s in self.strings):
        stop.append(i)
    return stop

  def cut(self, text: str) -> str:
    cuts = [text.index(s) for s in self.strings if s in text]
    return text[:min(cuts)] if cuts else text
