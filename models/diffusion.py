"""Text diffusion objectives: masked diffusion (MDLM / LLaDA) and block diffusion (BD3-LM).

Both train a bidirectional backbone (`model.bidirectional=True`; a causal-only sublayer is
refused by models/lm.py naming `model.pattern`) and report bits per byte of the NELBO, an
upper bound on the NLL, on the same axis as autoregressive runs.

Noising. A token is replaced by the MASK id with probability `1 - alpha_t = (1 - eps) t`
(the log-linear schedule; eps = `objective.noise_eps`, 0 by default, so at t = 1 every token
is masked and the prior term of the ELBO is exactly zero). The continuous-time NELBO is

  NELBO(x) = E_{t ~ U(0, 1)} [ -alpha'_t / (1 - alpha_t) * sum_{l masked in z_t} -log p(x_l | z_t) ]
           = E_t [ (1 / t) * sum_{l masked} -log p(x_l | z_t) ]

(the weight -alpha'/(1 - alpha) = (1 - eps) / ((1 - eps) t) = 1 / t for any eps). t is drawn
low-discrepancy across the batch (one uniform offset u, t_i = (u + i / n) mod 1, antithetic
for n = 2), mapped onto [t_min, 1]: the 1/t weight has infinite variance near t = 0, so the
slice t < t_min (`objective.t_min`, 1e-3) is not sampled and the average is taken over
[t_min, 1] (as MDLM does); that slice holds about t_min of one token's NLL each, and the
average over [t_min, 1] covers it whenever the per-token loss grows with the masking rate.

SUBS parameterisation (MDLM): the MASK logit is -inf (the model never predicts MASK) and an
unmasked token is carried over (its probability is one, its loss exactly zero), so only
masked positions are scored.

Which tokens. The clean sequence is the batch's `inputs` with its `positions` and
`segment_ids` (packed rows, one segment a document, attention never crossing one). Every
token but the BOS that opens a segment (and padding, where the tokenizer's pad id is not its
eos) is noised and scored; the BOS stays clean. Over a split's stream this scores the same
tokens as next-token prediction scores as targets (each once, up to the rows' edges), so the
bits per byte compare. A packed row shows the model where each document ends (its segment),
which a causal model does not see; documents' EOS tokens are therefore cheap (they stand for
0 bytes but their NLL is counted).

MASK id: the tokenizer's `mask_id` (the byte tokenizer's 259, archlab's BPE `<mask>`), else
`objective.mask_id`, which must name an id of the model's vocabulary that the tokenizer does
not produce (pad `model.vocab_size` past the tokenizer's to reserve one).

Validation (`train=False`): each row is scored at `objective.eval_t_samples` values of t,
t_{b,k} = (k + (b + 1/2) / B) / K mapped onto [t_min, 1] (together the B*K midpoints of a
regular grid), with masks from the fixed evaluation rng: deterministic, and reported as
`nll_sum` like every objective. `UPPER_BOUND` marks the result as a bound, which the loop
writes as `eval_bits_per_byte_is_upper_bound` (and summary.json as
`final_eval_bits_per_byte_is_upper_bound`).

Block diffusion (BD3-LM, `block_diffusion`): the row is cut into blocks of
`objective.block_size` positions (within a segment); each block has its own t, and one pass
of the model over [x_noisy, x] (2T tokens, `model.diffusion_block` set to the block size so
attention builds the block-diffusion mask: noisy block -> its own noisy block and earlier
clean blocks, clean -> clean blocks up to its own) gives every block's denoising logits
conditioned on the clean earlier blocks. Training t may be clipped to
[`noise_low`, `noise_high`] (BD3-LM's clipped schedule, a lower-variance surrogate);
validation always integrates over [t_min, 1]. With block_size 1 and every token masked it is
next-token prediction with a MASK query (tests/test_diffusion.py).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

import errors
from models import objectives


def mask_rate(t, eps: float):
  """1 - alpha_t of the log-linear schedule: the probability that a token is masked at t."""
  return (1.0 - eps) * t


def low_discrepancy(rng, n: int):
  """n uniforms in [0, 1), one stratum each: (u + i / n) mod 1 for one u ~ U(0, 1)."""
  u = jax.random.uniform(rng, ())
  return jnp.mod(u + jnp.arange(n, dtype=jnp.float32) / n, 1.0)


def stratified_grid(rows: int, samples: int):
  """Evaluation's t grid, [K, B]: t_{b,k} = (k + (b + 1/2) / B) / K, the B*K midpoints."""
  k_K1 = jnp.arange(samples, dtype=jnp.float32)[:, None]
  b_1B = jnp.arange(rows, dtype=jnp.float32)[None, :]
  return (k_K1 + (b_1B + 0.5) / rows) / samples


def subs_log_probs(logits_BTV, z_BT, mask_id: int):
  """SUBS: log p(x_l | z) with the MASK logit at -inf, and an unmasked z_l carried over
  (probability one on z_l, float32)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  vocab = logits_BTV.shape[-1]
  is_mask_V = jnp.arange(vocab) == mask_id
  logp_BTV = jax.nn.log_softmax(jnp.where(is_mask_V, -jnp.inf, logits_BTV), axis=-1)
  carried_BTV = jnp.where(jax.nn.one_hot(z_BT, vocab, dtype=jnp.bool_), 0.0, -jnp.inf)
  return jnp.where((z_BT == mask_id)[..., None], logp_BTV, carried_BTV)


def masked_nll(logits_BTV, z_BT, x_BT, mask_id: int):
  """-log p(x_l | z) under SUBS: the cross-entropy at masked positions, exactly 0 elsewhere."""
  logp_BTV = subs_log_probs(logits_BTV, z_BT, mask_id)
  nll_BT = -jnp.take_along_axis(logp_BTV, x_BT[..., None], axis=-1)[..., 0]
  return jnp.where(z_BT == mask_id, nll_BT, 0.0)


class MaskedDiffusionBase(objectives.Objective):
  """What masked and block diffusion share: the MASK id, the tokens scored, the t's."""
  BACKBONE = 'bidirectional'
  UPPER_BOUND: ClassVar[bool] = True
  SHARED = dict(
      mask_id=-1,            # -1: the tokenizer's mask_id; else a reserved id of the vocabulary
      noise_eps=0.0,         # log-linear schedule: 1 - alpha_t = (1 - noise_eps) t
      t_min=1e-3,            # t ~ U[t_min, 1] (the 1/t weight's variance is infinite at 0)
      eval_t_samples=4,      # validation: t values per row (a stratified grid, deterministic)
  )

  def __init__(self, cfg, tokens):
    super().__init__(cfg, tokens)
    vocab = int(tokens.bytes_V.shape[0])
    mask_id = cfg.mask_id if cfg.mask_id >= 0 else tokens.mask_id
    if mask_id is None:
      raise errors.ConfigError(
          f'objective.mask_id={cfg.mask_id}: the tokenizer has no mask token; set '
          f'objective.mask_id to an id below model.vocab_size={vocab} it never produces')
    if not 0 <= mask_id < vocab:
      raise errors.ConfigError(f'objective.mask_id={mask_id} is outside the vocabulary '
                               f'(model.vocab_size={vocab})')
    if not 0.0 <= cfg.noise_eps < 1.0:
      raise errors.ConfigError(f'objective.noise_eps={cfg.noise_eps} must be in [0, 1)')
    if not 0.0 < cfg.t_min < 1.0:
      raise errors.ConfigError(f'objective.t_min={cfg.t_min} must be in (0, 1)')
    if cfg.eval_t_samples < 1:
      raise errors.ConfigError(f'objective.eval_t_samples={cfg.eval_t_samples} must be >= 1')
    self.mask_id = int(mask_id)

  def scored(self, batch):
    """Weights of the clean tokens that are noised and scored: all but a segment's BOS and
    padding (the pad id, where it is not the eos id)."""
    x_BT = batch['inputs']
    w_BT = batch['segment_ids'] != 0
    if self.tokens.bos_id is not None:
      w_BT &= x_BT != self.tokens.bos_id
    if self.tokens.pad_id is not None and self.tokens.pad_id != self.tokens.eos_id:
      w_BT &= x_BT != self.tokens.pad_id
    return w_BT.astype(jnp.float32)

  def to_t(self, u, low: float = 0.0, high: float = 1.0):
    """u in [0, 1] onto [max(low, t_min), high]."""
    low = max(low, self.cfg.t_min)
    return low + (high - low) * u

  def noise(self, rng, x_BT, w_BT, t_BT):
    """z_t: each scored token masked with probability (1 - eps) t."""
    u_BT = jax.random.uniform(rng, x_BT.shape)
    masked_BT = (u_BT < mask_rate(t_BT, self.cfg.noise_eps)) & (w_BT > 0)
    return jnp.where(masked_BT, self.mask_id, x_BT)

  def sums(self, nll_sum, w_BT, x_BT, extra=None):
    weight_sum = jnp.sum(w_BT)
    metrics = {'nll_sum': nll_sum, 'weight_sum': weight_sum,
               'bytes_sum': jnp.sum(self.tokens.bytes_V[x_BT] * w_BT), **(extra or {})}
    return nll_sum / jnp.maximum(weight_sum, 1.0), metrics


@objectives.register('masked_diffusion')
class MaskedDiffusion(MaskedDiffusionBase):
  """MDLM / LLaDA: the NELBO of absorbing-state (MASK) diffusion, SUBS parameterisation."""
  DEFAULTS = dict(MaskedDiffusionBase.SHARED)

  @classmethod
  def validate(cls, config):
    super().validate(config)
    if config.model.get('diffusion_block', 0):
      raise errors.ConfigError(
          f"objective.name='masked_diffusion' runs plain rows, but model.diffusion_block="
          f"{config.model.diffusion_block}; set it to 0 (or use objective.name='block_diffusion')")

  def weighted_nll(self, forward, batch, rng, t_B):
    """sum_b (1 / t_b) sum_l -log p(x_bl | z_t) over the scored tokens, and z_t."""
    x_BT = batch['inputs']
    w_BT = self.scored(batch)
    t_B1 = t_B[:, None]
    z_BT = self.noise(rng, x_BT, w_BT, t_B1)
    logits_BTV = forward(z_BT, positions_BT=batch['positions'],
                         segment_ids_BT=batch['segment_ids'])
    nll_BT = masked_nll(logits_BTV, z_BT, x_BT, self.mask_id)
    return jnp.sum(nll_BT * w_BT / t_B1), z_BT

  def loss(self, forward, batch, rng, *, train):
    x_BT = batch['inputs']
    w_BT = self.scored(batch)
    rows = x_BT.shape[0]
    if train:
      t_rng, mask_rng = jax.random.split(rng)
      t_B = self.to_t(low_discrepancy(t_rng, rows))
      nll_sum, z_BT = self.weighted_nll(forward, batch, mask_rng, t_B)
      masked = jnp.sum((z_BT == self.mask_id) * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)
      return self.sums(nll_sum, w_BT, x_BT, {'masked_fraction': masked})
    grid_KB = self.to_t(stratified_grid(rows, self.cfg.eval_t_samples))
    total = 0.0
    for k in range(self.cfg.eval_t_samples):
      nll_k, _ = self.weighted_nll(forward, batch, jax.random.fold_in(rng, k), grid_KB[k])
      total += nll_k
    return self.sums(total / self.cfg.eval_t_samples, w_BT, x_BT)


@objectives.register('block_diffusion')
class BlockDiffusion(MaskedDiffusionBase):
  """BD3-LM: masked diffusion within blocks of `block_size`, autoregressive across blocks."""
  DEFAULTS = dict(MaskedDiffusionBase.SHARED,
                  block_size=4,      # L': tokens per block (model.diffusion_block must equal it)
                  noise_low=0.0,     # training t ~ U[noise_low, noise_high] (clipped schedule)
                  noise_high=1.0)

  @classmethod
  def validate(cls, config):
    super().validate(config)
    o, m = config.objective, config.model
    if o.block_size <= 0:
      raise errors.ConfigError(f'objective.block_size={o.block_size} must be positive')
    if m.get('diffusion_block', 0) != o.block_size:
      raise errors.ConfigError(
          f'objective.block_size={o.block_size} but model.diffusion_block='
          f'{m.get("diffusion_block", 0)}; set model.diffusion_block={o.block_size} '
          '(the attention mask\'s blocks)')
    if not 0.0 <= o.noise_low < o.noise_high <= 1.0:
      raise errors.ConfigError(f'objective.noise_low={o.noise_low}, noise_high={o.noise_high}: '
                               'need 0 <= noise_low < noise_high <= 1')
    seq_len = config.get('data', {}).get('seq_len', 0)
    if seq_len and seq_len % o.block_size:
      raise errors.ConfigError(f'data.seq_len={seq_len} is not a multiple of '
                               f'objective.block_size={o.block_size}')

  def weighted_nll(self, forward, batch, rng, t_BA):
    """sum over blocks of (1 / t_block) sum_l -log p(x_l | z_t of its block, clean earlier
    blocks), from one pass over [z_t, x]; and z_t."""
    x_BT, pos_BT, seg_BT = batch['inputs'], batch['positions'], batch['segment_ids']
    w_BT = self.scored(batch)
    rows, length = x_BT.shape
    block = self.cfg.block_size
    # Blocks are positions // block within a segment; a row holds at most length // block + 1
    # of them (a segment may start mid-block), clipped into t_BA's columns.
    index_BT = jnp.minimum(pos_BT // block, t_BA.shape[1] - 1)
    t_BT = jnp.take_along_axis(t_BA, index_BT, axis=1)
    z_BT = self.noise(rng, x_BT, w_BT, t_BT)
    both = lambda a_BT, b_BT: jnp.concatenate([a_BT, b_BT], axis=1)
    logits_BTV = forward(both(z_BT, x_BT), positions_BT=both(pos_BT, pos_BT),
                         segment_ids_BT=both(seg_BT, seg_BT))[:, :length]
    nll_BT = masked_nll(logits_BTV, z_BT, x_BT, self.mask_id)
    return jnp.sum(nll_BT * w_BT / t_BT), z_BT

  def num_blocks(self, length: int) -> int:
    return length // self.cfg.block_size + 1

  def loss(self, forward, batch, rng, *, train):
    x_BT = batch['inputs']
    w_BT = self.scored(batch)
    rows, length = x_BT.shape
    blocks = self.num_blocks(length)
    if train:
      t_rng, mask_rng = jax.random.split(rng)
      u_BA = low_discrepancy(t_rng, rows * blocks).reshape(rows, blocks)
      t_BA = self.to_t(u_BA, self.cfg.noise_low, self.cfg.noise_high)
      nll_sum, z_BT = self.weighted_nll(forward, batch, mask_rng, t_BA)
      masked = jnp.sum((z_BT == self.mask_id) * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)
      return self.sums(nll_sum, w_BT, x_BT, {'masked_fraction': masked})
    # Every block of row b at pass k: the grid's t_{b,k}, shifted per block so a row's
    # blocks spread over the stratum too.
    grid_KB = stratified_grid(rows, self.cfg.eval_t_samples)
    shift_A = jnp.arange(blocks, dtype=jnp.float32) / (blocks * rows * self.cfg.eval_t_samples)
    total = 0.0
    for k in range(self.cfg.eval_t_samples):
      t_BA = self.to_t(jnp.mod(grid_KB[k][:, None] + shift_A[None, :], 1.0))
      nll_k, _ = self.weighted_nll(forward, batch, jax.random.fold_in(rng, k), t_BA)
      total += nll_k
    return self.sums(total / self.cfg.eval_t_samples, w_BT, x_BT)
