"""Samplers for text diffusion models (models/diffusion.py): generation by iterative unmasking.

A canvas holds the prompt (clean) and `gen_len` MASK tokens after it; a sampler replaces the
MASKs by tokens over `steps` model evaluations. Under SUBS the model never predicts MASK and
an unmasked token stays as it is. Samplers (`Spec.name`):

  ancestral             MDLM's reverse process: from t to s < t (a grid of `steps` times per
                        block), each MASK is revealed with probability (t - s) / t (the same
                        for every eps of the log-linear schedule), its token drawn from the
                        model. When a step reveals nothing the canvas is unchanged, and so is
                        the model's output (no time input): the last prediction is reused
                        without a model evaluation.
  low_confidence        LLaDA: each step predicts every MASK, keeps the k most confident
                        predictions (probability of the drawn token) and remasks the rest;
                        k spreads the block's MASKs evenly over its steps.
  random_order          LLaDA's random remasking: as low_confidence, the k kept at random. With
                        one token a step and exact conditionals it samples the data
                        distribution exactly (tests/test_diffusion.py's chi-square).
  confidence_threshold  parallel unmasking (Fast-dLLM): each step reveals every MASK whose
                        confidence reaches `threshold`, and at least the most confident one;
                        `steps` is not used (the step count is what it takes).
Remasking samplers take no more steps than a block has MASKs.

`block_length` > 0 makes any of them semi-autoregressive (LLaDA): the generated span is cut into
blocks of that many tokens, sampled left to right, `steps` split evenly over the blocks.

Block diffusion (`model.diffusion_block` = L'): `sample_block_diffusion` samples block by block
with an exact KV cache of the clean prefix: the prompt's blocks and every finished block are
written to the attention caches one block per call (each sees the cache and itself:
block-causal, as the clean half of training sees it), and the current block is denoised by
calls that read the cache without writing it (the noisy block sees the clean prefix and itself,
BD3-LM's mask). One extra evaluation per block writes it. The inner sampler is any of the
above, with `steps` split evenly over the blocks that hold MASKs. Prompts of different lengths
are right-padded (segment 0), so that a call covers the same positions in every row.

Token draws use Gumbel noise in float64 on the host (numpy: JAX runs float32 here), argmax of
log p / temperature + Gumbel (temperature 0: the argmax). Each run reports the number of model
evaluations and tokens per second.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import errors
from models import lm

SAMPLERS = ('ancestral', 'low_confidence', 'random_order', 'confidence_threshold')


@dataclasses.dataclass(frozen=True)
class Spec:
  """How a diffusion model is sampled (see the module docstring)."""
  name: str = 'low_confidence'
  steps: int = 64               # model evaluations per generated span (confidence_threshold: unused)
  temperature: float = 1.0      # 0: argmax
  block_length: int = 0         # semi-autoregressive blocks of the generated span (0: one block)
  threshold: float = 0.9        # confidence_threshold's

  def __post_init__(self):
    if self.name not in SAMPLERS:
      raise errors.ConfigError(f'--sampler={self.name!r} is not one of {SAMPLERS}')
    if self.steps < 1:
      raise errors.ConfigError(f'--steps={self.steps} must be positive')
    if self.temperature < 0:
      raise errors.ConfigError(f'--temperature={self.temperature} must be >= 0')
    if self.block_length < 0:
      raise errors.ConfigError(f'--block_length={self.block_length} must be >= 0')
    if not 0.0 < self.threshold <= 1.0:
      raise errors.ConfigError(f'--threshold={self.threshold} must be in (0, 1]')


@dataclasses.dataclass
class Output:
  """The generated tokens of each row, the model evaluations and the time they took."""
  tokens: list[list[int]]
  model_evals: int
  seconds: float
  new_tokens: int

  @property
  def tokens_per_sec(self) -> float:
    return self.new_tokens / max(self.seconds, 1e-9)


def log_probs(logits_BTV, mask_id: int):
  """float64 log-softmax with the MASK logit at -inf (SUBS)."""
  logits_BTV = np.asarray(logits_BTV, np.float64).copy()
  logits_BTV[..., mask_id] = -np.inf
  top_BT1 = np.max(logits_BTV, -1, keepdims=True)
  return logits_BTV - top_BT1 - np.log(np.sum(np.exp(logits_BTV - top_BT1), -1, keepdims=True))


def draw(rng: np.random.Generator, logp_BTV, temperature: float):
  """Tokens and their probabilities: argmax of log p / temperature + Gumbel, float64."""
  if temperature == 0:
    tokens_BT = np.argmax(logp_BTV, -1)
  else:
    gumbel_BTV = -np.log(-np.log(rng.uniform(np.finfo(np.float64).tiny, 1.0, logp_BTV.shape)))
    tokens_BT = np.argmax(logp_BTV / temperature + gumbel_BTV, -1)
  return tokens_BT, np.exp(np.take_along_axis(logp_BTV, tokens_BT[..., None], -1)[..., 0])


def split_evenly(count_B, steps: int):
  """[B, steps]: count_B tokens spread over steps, the remainder on the first steps (LLaDA)."""
  base_B1, extra_B1 = (count_B // steps)[:, None], (count_B % steps)[:, None]
  return base_B1 + (np.arange(steps)[None] < extra_B1)


class _Counter:
  """A denoiser `z_BT -> logits_BTV` that counts its evaluations."""

  def __init__(self, denoise):
    self.denoise, self.calls = denoise, 0

  def __call__(self, z_BT):
    self.calls += 1
    return self.denoise(z_BT)


def _sample_span(denoise, z_BT, active_BT, spec: Spec, steps: int, mask_id: int,
                 rng: np.random.Generator):
  """Fills the MASKs of z_BT where active_BT with `steps` steps of `spec.name`; returns z."""
  z_BT = z_BT.copy()
  if spec.name == 'ancestral':
    logp_BTV = None
    for i in range(steps):
      t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
      if logp_BTV is None:  # the canvas changed since the last evaluation
        logp_BTV = log_probs(denoise(z_BT), mask_id)
      masked_BT = (z_BT == mask_id) & active_BT
      reveal_BT = masked_BT & (rng.uniform(size=z_BT.shape) < (t - s) / t)
      if reveal_BT.any():
        tokens_BT, _ = draw(rng, logp_BTV, spec.temperature)
        z_BT = np.where(reveal_BT, tokens_BT, z_BT)
        logp_BTV = None
    return z_BT
  if spec.name == 'confidence_threshold':
    while ((z_BT == mask_id) & active_BT).any():
      masked_BT = (z_BT == mask_id) & active_BT
      tokens_BT, conf_BT = draw(rng, log_probs(denoise(z_BT), mask_id), spec.temperature)
      conf_BT = np.where(masked_BT, conf_BT, -np.inf)
      best_BT = conf_BT == np.max(conf_BT, -1, keepdims=True)
      first_BT = best_BT & (np.cumsum(best_BT, -1) == 1)  # one most confident per row
      reveal_BT = masked_BT & ((conf_BT >= spec.threshold) | first_BT)
      z_BT = np.where(reveal_BT, tokens_BT, z_BT)
    return z_BT
  # low_confidence / random_order: k_i tokens kept at step i, the rest remasked (no more
  # steps than MASKs: a step that keeps nothing would be an evaluation wasted).
  masked_B = np.sum((z_BT == mask_id) & active_BT, -1)
  steps = max(1, min(steps, int(masked_B.max())))
  counts_BO = split_evenly(masked_B, steps)
  for i in range(steps):
    masked_BT = (z_BT == mask_id) & active_BT
    tokens_BT, conf_BT = draw(rng, log_probs(denoise(z_BT), mask_id), spec.temperature)
    if spec.name == 'random_order':
      conf_BT = rng.uniform(size=z_BT.shape)
    conf_BT = np.where(masked_BT, conf_BT, -np.inf)
    rank_BT = np.argsort(np.argsort(-conf_BT, -1, kind='stable'), -1)  # 0: the most confident
    reveal_BT = masked_BT & (rank_BT < counts_BO[:, i:i + 1])
    z_BT = np.where(reveal_BT, tokens_BT, z_BT)
  return z_BT


def sample_canvas(denoise: Callable, z_BT, *, spec: Spec, mask_id: int, seed: int = 0):
  """Fills every MASK of the canvas z_BT ([B, T] ints) with `denoise(z_BT) -> logits_BTV`;
  returns (z_BT, model evaluations). Semi-autoregressive blocks count canvas columns from
  the first MASK column."""
  rng = np.random.default_rng(seed)
  z_BT = np.asarray(z_BT).copy()
  counter = _Counter(denoise)
  columns = np.nonzero(np.any(z_BT == mask_id, 0))[0]
  if not len(columns):
    return z_BT, 0
  first, last = int(columns[0]), int(columns[-1]) + 1
  block = spec.block_length or last - first
  blocks = -(-(last - first) // block)
  if spec.name != 'confidence_threshold' and spec.steps % blocks:
    raise errors.ConfigError(f'--steps={spec.steps} does not divide into the {blocks} blocks of '
                             f'--block_length={spec.block_length}')
  index_T = np.arange(z_BT.shape[1])
  for b in range(blocks):
    start = first + b * block
    active_BT = np.broadcast_to((index_T >= start) & (index_T < start + block), z_BT.shape)
    z_BT = _sample_span(counter, z_BT, active_BT, spec, spec.steps // blocks, mask_id, rng)
  return z_BT, counter.calls


def left_padded(prompts: Sequence[Sequence[int]], gen_len: int, *, mask_id: int, pad_id: int):
  """(canvas, positions, segment ids) [B, P + gen_len]: prompts left-padded (segment 0, never
  seen), positions from each prompt's first token, gen_len MASKs after each prompt."""
  longest = max(len(p) for p in prompts)
  rows, pos, seg = [], [], []
  for p in prompts:
    pad = longest - len(p)
    rows.append([pad_id] * pad + list(p) + [mask_id] * gen_len)
    pos.append([0] * pad + list(range(len(p) + gen_len)))
    seg.append([0] * pad + [1] * (len(p) + gen_len))
  return (np.asarray(rows, np.int32), np.asarray(pos, np.int32), np.asarray(seg, np.int32))


def model_denoiser(model, variables, positions_BT, segment_ids_BT):
  """`z_BT -> logits_BTV` of a bidirectional model over a fixed layout, jitted."""
  apply = jax.jit(lambda v, z, p, s: model.apply(v, z, positions_BT=p, segment_ids_BT=s)[0])
  pos, seg = jnp.asarray(positions_BT), jnp.asarray(segment_ids_BT)
  return lambda z_BT: np.asarray(apply(variables, jnp.asarray(z_BT, jnp.int32), pos, seg))


def generate(model, variables, prompts: Sequence[Sequence[int]], *, gen_len: int, spec: Spec,
             mask_id: int, pad_id: int = 0, seed: int = 0) -> Output:
  """`gen_len` tokens after each prompt from a masked diffusion model (the whole canvas is
  recomputed by every evaluation; block diffusion models: `sample_block_diffusion`)."""
  if model.cfg.get('diffusion_block', 0):
    return sample_block_diffusion(model, variables, prompts, gen_len=gen_len, spec=spec,
                                  mask_id=mask_id, pad_id=pad_id, seed=seed)
  z_BT, pos_BT, seg_BT = left_padded(prompts, gen_len, mask_id=mask_id, pad_id=pad_id)
  denoise = model_denoiser(model, variables, pos_BT, seg_BT)
  denoise(z_BT)  # compile outside the timing
  start = time.perf_counter()
  z_BT, evals = sample_canvas(denoise, z_BT, spec=spec, mask_id=mask_id, seed=seed)
  seconds = time.perf_counter() - start
  return Output(tokens=z_BT[:, -gen_len:].tolist(), model_evals=evals, seconds=seconds,
                new_tokens=gen_len * len(prompts))


def block_canvas(prompts: Sequence[Sequence[int]], gen_len: int, *, mask_id: int, pad_id: int):
  """(canvas, segment ids) [B, P + gen_len], P the longest prompt: each row is its prompt,
  gen_len MASKs and right padding (segment 0: never seen), at positions 0, 1, ... . Rows of
  different prompt lengths share their block boundaries (blocks are positions // L')."""
  if pad_id == mask_id:
    raise errors.ConfigError(f'pad_id={pad_id} is the MASK token: padding would be sampled')
  total = max(len(p) for p in prompts) + gen_len
  canvas_BT = np.full((len(prompts), total), pad_id, np.int32)
  seg_BT = np.zeros((len(prompts), total), np.int32)
  for row, p in enumerate(prompts):
    canvas_BT[row, :len(p)] = p
    canvas_BT[row, len(p):len(p) + gen_len] = mask_id
    seg_BT[row, :len(p) + gen_len] = 1
  return canvas_BT, seg_BT


def sample_block_diffusion(model, variables, prompts: Sequence[Sequence[int]], *, gen_len: int,
                           spec: Spec, mask_id: int, pad_id: int = 0, seed: int = 0) -> Output:
  """Block-by-block sampling of a block diffusion model with an exact KV cache of the clean
  prefix (module docstring). Prompts of different lengths are right-padded (`block_canvas`):
  a call covers the same positions in every row, which hold prompt, MASKs or padding."""
  cfg = model.cfg
  block = cfg.diffusion_block
  if spec.block_length not in (0, block):
    raise errors.ConfigError(f'--block_length={spec.block_length}: a block diffusion model '
                             f'samples its own blocks (model.diffusion_block={block})')
  canvas_BT, segments_BT = block_canvas(prompts, gen_len, mask_id=mask_id, pad_id=pad_id)
  rows, total = canvas_BT.shape
  starts = range(0, total, block)
  # `steps` covers the generated span: split over the blocks that hold MASKs (in any row).
  masked_blocks = sum(bool(np.any(canvas_BT[:, s:s + block] == mask_id)) for s in starts)
  spec = dataclasses.replace(spec, block_length=0, steps=max(1, spec.steps // masked_blocks))
  apply = jax.jit(lambda v, z, p, s, c: model.apply(v, z, positions_BT=p, segment_ids_BT=s,
                                                    cache=c))
  cache = lm.init_cache(cfg, rows, total)
  rng_seed = np.random.SeedSequence(seed)
  evals, seconds, compiled = 0, 0.0, set()
  for start in starts:
    end = min(start + block, total)
    pos_BT = np.broadcast_to(np.arange(start, end, dtype=np.int32), (rows, end - start))
    seg_BT = segments_BT[:, start:end]
    z_BT = canvas_BT[:, start:end]
    if z_BT.shape not in compiled:  # compile outside the timing (once per block shape)
      jax.block_until_ready(apply(variables, jnp.asarray(z_BT), pos_BT, seg_BT, cache))
      compiled.add(z_BT.shape)
    if (z_BT == mask_id).any():
      def denoise(z, pos_BT=pos_BT, seg_BT=seg_BT, cache=cache):
        return np.asarray(apply(variables, jnp.asarray(z, jnp.int32), pos_BT, seg_BT, cache)[0])
      tick = time.perf_counter()
      z_BT, calls = sample_canvas(denoise, z_BT, spec=spec, mask_id=mask_id,
                                  seed=int(rng_seed.spawn(1)[0].generate_state(1)[0]))
      seconds += time.perf_counter() - tick
      evals += calls
      canvas_BT[:, start:end] = z_BT
    tick = time.perf_counter()
    _, _, cache = apply(variables, jnp.asarray(z_BT), pos_BT, seg_BT, cache)  # write the block
    jax.block_until_ready(cache)
    seconds += time.perf_counter() - tick
    evals += 1
  tokens = [canvas_BT[row, len(p):len(p) + gen_len].tolist() for row, p in enumerate(prompts)]
  return Output(tokens=tokens, model_evals=evals, seconds=seconds, new_tokens=gen_len * rows)
