"""Text diffusion (models/diffusion.py): the NELBO against exact enumeration, SUBS, the 1/t
weight, the refusals, block diffusion's mask and its next-token limit, a run of the loop."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import integrate

import errors
import models
from configs import transformer
from models import diffusion
from models import objectives
from models.layers import attention
from tests.conftest import tiny_model_config

VOCAB, MASK = 3, 3  # data tokens 0..2 and the MASK id in a model vocabulary of 4


def objective(name='masked_diffusion', vocab=VOCAB + 1, mask_id=MASK, **fields):
  cls = objectives.get(name)
  cfg = dict(cls.DEFAULTS, mask_id=mask_id, **fields)
  tokens = objectives.Tokens(bytes_V=jnp.ones((vocab,), jnp.float32).at[mask_id].set(0.0))
  return cls(ml_collections.FrozenConfigDict(cfg), tokens)


def batch_of(x_BT):
  x_BT = jnp.asarray(x_BT, jnp.int32)
  rows, length = x_BT.shape
  return {'inputs': x_BT, 'positions': jnp.broadcast_to(jnp.arange(length), x_BT.shape),
          'segment_ids': jnp.ones_like(x_BT), 'targets': x_BT,
          'weights': jnp.ones(x_BT.shape, jnp.float32)}


class TableModel:
  """An explicit model: the logits of every position are a fixed random function of the
  whole noisy row (a table over the (V+1)^L rows), so its conditionals are known."""

  def __init__(self, length, seed=0):
    self.length = length
    rng = np.random.default_rng(seed)
    self.table_RTV = rng.normal(size=((VOCAB + 1) ** length, length, VOCAB + 1)) * 1.5

  def index(self, z):
    return sum(int(c) * (VOCAB + 1) ** i for i, c in enumerate(z))

  def __call__(self, z_BT, *, positions_BT, segment_ids_BT):
    del positions_BT, segment_ids_BT
    weights_T = (VOCAB + 1) ** jnp.arange(self.length)
    return jnp.asarray(self.table_RTV, jnp.float32)[jnp.sum(z_BT * weights_T, axis=-1)]

  def conditional_nll(self, z, x, l):
    """-log p(x_l | z) under SUBS (the MASK logit removed)."""
    logits = self.table_RTV[self.index(z), l, :VOCAB]
    return float(np.log(np.sum(np.exp(logits))) - logits[x[l]])


def exact_estimator_mean(model, x, t_min, eps):
  """E of the estimator: (1 / (1 - t_min)) int_{t_min}^1 (1/t) sum over masks M of
  P_t(M) sum_{l in M} -log p(x_l | x with M masked) dt, by enumerating every mask."""
  length = len(x)
  total = 0.0
  for mask in itertools.product([0, 1], repeat=length):
    k = sum(mask)
    if not k:
      continue
    z = [MASK if m else c for m, c in zip(mask, x)]
    nll = sum(model.conditional_nll(z, x, l) for l in range(length) if mask[l])
    p = lambda t: (1 - eps) * t  # noqa: E731
    weight, _ = integrate.quad(lambda t: p(t) ** k * (1 - p(t)) ** (length - k) / t, t_min, 1,
                               epsabs=1e-12, epsrel=1e-10)
    total += weight * nll
  return total / (1 - t_min)


@pytest.mark.parametrize('eps', [0.0, 0.2])
def test_nelbo_estimator_matches_exact_enumeration(eps):
  """Validation's estimator (stratified t, random masks) averages to the NELBO computed by
  enumerating every mask of a length-3 row over a vocabulary of 3, within its sampling error
  (four evaluation rngs); and evaluation with one rng is deterministic."""
  length, rows = 3, 4096
  model = TableModel(length)
  obj = objective(noise_eps=eps, eval_t_samples=8)
  x = [2, 0, 1]
  batch = batch_of(np.tile(x, (rows, 1)))
  evaluate = jax.jit(lambda rng: obj.loss(model, batch, rng, train=False)[1])
  estimates = []
  for seed in range(4):
    m = evaluate(jax.random.key(seed))
    assert float(m['weight_sum']) == rows * length
    estimates.append(float(m['nll_sum']) / rows)
  exact = exact_estimator_mean(model, x, obj.cfg.t_min, eps)
  mean, spread = np.mean(estimates), np.std(estimates, ddof=1) / 2
  assert abs(mean - exact) < 4 * spread + 1e-3 * exact, (estimates, exact)
  assert spread < 0.01 * exact  # precise enough that a wrong weight fails (next test)
  # Deterministic: the same evaluation rng, the same number.
  again = float(evaluate(jax.random.key(0))['nll_sum']) / rows
  assert again == estimates[0]


def test_the_estimator_weights_by_one_over_t_and_the_schedule():
  """A model that is uniform over the data tokens has loss log(3) on every masked token: its
  1/t-weighted loss is (1 - eps) log 3 per token at every t, which only the 1/t weight and
  the mask rate (1 - eps) t give."""
  uniform = lambda z_BT, **_: jnp.zeros(z_BT.shape + (VOCAB + 1,))  # noqa: E731
  batch = batch_of(jax.random.randint(jax.random.key(1), (2048, 8), 0, VOCAB))
  for eps in (0.0, 0.5):
    obj = objective(noise_eps=eps)
    for t in (0.05, 0.5, 1.0):
      nll_sum, z_BT = obj.weighted_nll(uniform, batch, jax.random.key(2), jnp.full((2048,), t))
      per_token = float(nll_sum) / batch['inputs'].size
      assert abs(per_token / math.log(VOCAB) - (1 - eps)) < 0.06, (eps, t, per_token)
      assert abs(float(jnp.mean(z_BT == MASK)) - (1 - eps) * t) < 0.02
  # Training draws t low-discrepancy over [t_min, 1]: one per row, one per stratum.
  t_B = obj.to_t(diffusion.low_discrepancy(jax.random.key(3), 64))
  assert float(jnp.min(t_B)) >= obj.cfg.t_min and float(jnp.max(t_B)) <= 1.0
  strata = np.floor((np.asarray(t_B) - obj.cfg.t_min) / (1 - obj.cfg.t_min) * 64)
  assert sorted(strata.astype(int)) == list(range(64))


def test_subs_masks_the_mask_logit_and_carries_unmasked_tokens_over():
  logits_BTV = jax.random.normal(jax.random.key(0), (2, 5, VOCAB + 1)) * 3
  x_BT = jnp.array([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])
  z_BT = jnp.where(jnp.array([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]]) == 1, MASK, x_BT)
  logp_BTV = diffusion.subs_log_probs(logits_BTV, z_BT, MASK)
  assert np.all(np.isneginf(np.asarray(logp_BTV[..., MASK])))  # MASK is never predicted
  np.testing.assert_allclose(jnp.sum(jnp.exp(logp_BTV), -1), 1.0, rtol=1e-6)
  unmasked = np.asarray(z_BT != MASK)
  carried = np.asarray(jnp.take_along_axis(logp_BTV, z_BT[..., None], -1)[..., 0])
  assert np.all(carried[unmasked] == 0.0)  # probability exactly one on the token itself
  nll_BT = np.asarray(diffusion.masked_nll(logits_BTV, z_BT, x_BT, MASK))
  assert np.all(nll_BT[unmasked] == 0.0) and np.all(nll_BT[~unmasked] > 0)
  # At masked positions: the cross-entropy of the logits with MASK removed.
  ref = -jax.nn.log_softmax(logits_BTV[..., :VOCAB], -1)
  ref_BT = jnp.take_along_axis(ref, x_BT[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll_BT[~unmasked], np.asarray(ref_BT)[~unmasked], rtol=1e-5)


def test_refusals_name_the_field():
  config = transformer.get_config('preset=llada_tiny,runlocal')
  config.model.vocab_size = 260
  objectives.validate(config)
  for char, name in (('M', 'Mamba2'), ('G', 'GatedDeltaNet')):
    bad = tiny_model_config('llada_tiny', pattern=char + 'F', bidirectional=True)
    with pytest.raises(errors.ConfigError, match=fr"has '{char}' \({name}\), which is causal "
                                                  r'only: it cannot run with model.bidirectional'):
      models.build(bad)
  config.model.bidirectional = False
  with pytest.raises(errors.ConfigError, match=r"'masked_diffusion' trains a bidirectional "
                                                r'backbone.*set model.bidirectional=True'):
    objectives.validate(config)
  block = transformer.get_config('preset=bd3lm_tiny,runlocal')
  block.model.diffusion_block = 8
  with pytest.raises(errors.ConfigError, match=r'objective.block_size=4 but '
                                                r'model.diffusion_block=8; set model.diffusion_block=4'):
    objectives.validate(block)
  block = transformer.get_config('preset=bd3lm_tiny,runlocal,block_size=16')
  assert block.model.diffusion_block == block.objective.block_size == 16
  objectives.validate(block)
  with pytest.raises(errors.ConfigError, match=r"'W' \(SlidingAttention\), which has no "
                                                r'block-diffusion mask'):
    models.build(tiny_model_config('bd3lm_tiny', pattern='WF', **{'attention.window': 8}))
  with pytest.raises(errors.ConfigError, match=r'objective.mask_id=-1: the tokenizer has no mask'):
    diffusion.MaskedDiffusion(ml_collections.FrozenConfigDict(objectives.get(
        'masked_diffusion').DEFAULTS), objectives.Tokens(bytes_V=jnp.ones((4,))))


def test_block_diffusion_mask_is_bd3lms():
  """Against the rule written out per pair: two segments, blocks of 2, halves [noisy, clean]."""
  pos_T = np.array([0, 1, 2, 3, 0, 1])
  seg_T = np.array([1, 1, 1, 1, 2, 2])
  q_pos = np.concatenate([pos_T, pos_T])[None]
  q_seg = np.concatenate([seg_T, seg_T])[None]
  mask = np.asarray(attention.block_diffusion_mask(q_pos, q_seg, q_pos, q_seg, block=2))[0]
  n = len(pos_T)
  for q, k in itertools.product(range(2 * n), repeat=2):
    qn, kn = q < n, k < n
    qb, kb = q_pos[0, q] // 2, q_pos[0, k] // 2
    want = q_seg[0, q] == q_seg[0, k] and (
        (qn and kn and qb == kb) or (qn and not kn and kb < qb) or (not qn and not kn and kb <= qb))
    assert mask[q, k] == want, (q, k)


def tiny_bd3(block):
  return tiny_model_config('bd3lm_tiny', diffusion_block=block, d_model=32, num_heads=2,
                           num_kv_heads=2, pattern='AF', mlp_dim=64, vocab_size=260,
                           scan_layers=False)


@pytest.fixture(scope='module')
def bd3_params():
  """Parameters of the tiny block diffusion backbone (the block length does not change them)."""
  model = models.build(tiny_bd3(4))
  dummy_BT = jnp.zeros((1, 8), jnp.int32)
  return jax.jit(lambda r: model.init(r, dummy_BT, positions_BT=dummy_BT,
                                      segment_ids_BT=dummy_BT + 1))(jax.random.key(1))


def test_block_diffusion_with_blocks_of_one_fully_masked_is_next_token_prediction(bd3_params):
  """L' = 1, every token masked (t = 1): each position's loss is -log p(x_l | x_<l) from a
  MASK query at l that sees the clean prefix, the autoregressive loss of the same network run
  causally on [x_<l, MASK] (checked row by row with the causal mask)."""
  length, vocab = 8, 260
  cfg = tiny_bd3(1)
  model, params = models.build(cfg), bd3_params
  x_BT = jax.random.randint(jax.random.key(0), (2, length), 0, 256)
  batch = batch_of(x_BT)
  obj = objective('block_diffusion', vocab=vocab, mask_id=259, block_size=1)
  forward = jax.jit(lambda z_BT, **k: model.apply(params, z_BT, **k)[0])
  nll_sum, z_BT = obj.weighted_nll(forward, batch, jax.random.key(2), jnp.ones((2, length + 1)))
  assert bool(jnp.all(z_BT == 259))
  # The causal reference: row p holds x_<p then MASK at position p (then nothing: segment 0).
  causal = models.build(ml_collections.ConfigDict(dict(cfg.to_dict(), bidirectional=False,
                                                       diffusion_block=0)))
  index_T = jnp.arange(length)
  causal_logits = jax.jit(lambda *a: causal.apply(params, a[0], positions_BT=a[1],
                                                  segment_ids_BT=a[2])[0])
  total = 0.0
  for b in range(2):
    rows_PT = jnp.where(index_T[None] < index_T[:, None], x_BT[b][None], 259)
    seg_PT = (index_T[None] <= index_T[:, None]).astype(jnp.int32)
    pos_PT = jnp.broadcast_to(index_T, (length, length))
    logits_PTV = causal_logits(rows_PT, pos_PT, seg_PT)
    logits_PV = logits_PTV[index_T, index_T]  # row p's MASK query
    logits_PV = logits_PV.at[:, 259].set(-jnp.inf)
    total += float(jnp.sum(-jax.nn.log_softmax(logits_PV)[index_T, x_BT[b]]))
  np.testing.assert_allclose(float(nll_sum), total, rtol=1e-5)


@pytest.fixture(scope='module')
def trained_mdlm(tmp_path_factory):
  from trainer import loop  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('mdlm')
  config = transformer.get_config('preset=mdlm_tiny,runlocal')
  m = config.model
  m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim, m.pattern = 32, 2, 2, 64, 'AF'
  config.data.seq_len, config.train.batch_size = 32, 8
  config.train.steps, config.train.eval_every, config.train.log_every = 30, 10, 10
  config.train.checkpoint_every = 30
  config.train.progress_bar, config.peak_flops = False, 1e11
  summary = loop.train_and_evaluate(config, str(workdir))
  return workdir, summary


def test_a_tiny_masked_diffusion_run_trains_and_its_nelbo_falls(trained_mdlm):
  workdir, summary = trained_mdlm
  assert summary['objective'] == 'masked_diffusion'
  assert summary['final_eval_bits_per_byte_is_upper_bound'] is True
  evals = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  evals = [r for r in evals if 'eval_bits_per_byte' in r]
  assert len(evals) == 3 and all(r['eval_bits_per_byte_is_upper_bound'] for r in evals)
  assert evals[-1]['eval_bits_per_byte'] < evals[0]['eval_bits_per_byte'] - 0.3, evals
  assert summary['final_eval_bits_per_byte'] == evals[-1]['eval_bits_per_byte']


# ---- samplers (models/diffusion_sampling.py)


def exact_denoiser(q_X, length):
  """`z_BT -> logits_BTV` of the exact conditionals of the distribution q over VOCAB^length
  sequences: log p(x_l = v | the unmasked tokens of z), for every position."""
  seqs = np.array(list(itertools.product(range(VOCAB), repeat=length)))  # x = index in base 3
  table = np.zeros(((VOCAB + 1) ** length, length, VOCAB + 1))
  for r, z in enumerate(itertools.product(range(VOCAB + 1), repeat=length)):
    z = np.array(z[::-1])  # row r's digits, position 0 least significant
    consistent = np.all((seqs == z) | (z == MASK), axis=1)
    for l in range(length):
      with np.errstate(divide='ignore'):  # -inf where z_l is unmasked (SUBS ignores it)
        table[r, l, :VOCAB] = np.log([q_X[consistent & (seqs[:, l] == v)].sum()
                                      for v in range(VOCAB)])
  weights_T = (VOCAB + 1) ** np.arange(length)
  return lambda z_BT: table[np.asarray(z_BT) @ weights_T]


@pytest.mark.parametrize('name,steps,exact', [('random_order', 3, True), ('ancestral', 256, True),
                                              ('ancestral', 1, False)])
def test_a_sampler_on_the_exact_conditionals_reproduces_the_distribution(name, steps, exact):
  """Chi-square of 6000 samples against q over the 27 sequences of length 3. One token a step
  from exact conditionals is exact (random_order with 3 steps; ancestral with 256 steps
  nearly so); ancestral in one step draws the tokens independently, from q's marginals, and
  the test must reject it."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from models import diffusion_sampling  # pylint: disable=g-import-not-at-top
  length, n = 3, 6000
  q_X = np.random.default_rng(0).dirichlet(np.full(VOCAB ** length, 2.0))
  assert n * q_X.min() >= 5
  spec = diffusion_sampling.Spec(name=name, steps=steps)
  z_BT, evals = diffusion_sampling.sample_canvas(exact_denoiser(q_X, length),
                                                 np.full((n, length), MASK), spec=spec,
                                                 mask_id=MASK, seed=1)
  assert not np.any(z_BT == MASK) and evals <= steps
  counts = np.bincount(z_BT @ (VOCAB ** np.arange(length))[::-1], minlength=VOCAB ** length)
  p = stats.chisquare(counts, n * q_X).pvalue
  assert (p > 1e-3) if exact else (p < 1e-6), p


def test_block_diffusion_sampling_cache_is_exact(bd3_params):
  """The cached call that denoises block 1 (cache: clean block 0) gives the logits that the
  training pass over [z, x] gives that noisy block; and block-by-block sampling runs."""
  from models import diffusion_sampling  # pylint: disable=g-import-not-at-top
  from models import lm  # pylint: disable=g-import-not-at-top
  cfg = tiny_bd3(4)
  model, params = models.build(cfg), bd3_params
  x_BT = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  batch = batch_of(x_BT)
  apply = jax.jit(lambda z, p, s, c=None: model.apply(params, z, positions_BT=p,
                                                      segment_ids_BT=s, cache=c))
  z_BT = x_BT.at[:, 4:8].set(jnp.where(jnp.arange(4) % 2 == 0, 259, x_BT[:, 4:8]))
  both = lambda a, b: jnp.concatenate([a, b], 1)  # noqa: E731
  pos_BT, seg_BT = batch['positions'], batch['segment_ids']
  train_BTV = apply(both(z_BT, x_BT), both(pos_BT, pos_BT), both(seg_BT, seg_BT))[0][:, 4:8]
  _, _, cache = apply(x_BT[:, :4], pos_BT[:, :4], seg_BT[:, :4], lm.init_cache(cfg, 2, 12))
  cached_BTV = apply(z_BT[:, 4:8], pos_BT[:, 4:8], seg_BT[:, 4:8], cache)[0]
  np.testing.assert_allclose(cached_BTV, train_BTV, atol=2e-5, rtol=1e-5)
  spec = diffusion_sampling.Spec(name='low_confidence', steps=4)  # 2 for each of 2 blocks
  out = diffusion_sampling.generate(model, params, [[257, 1, 2, 3, 4, 5]] * 2, gen_len=6,
                                    spec=spec, mask_id=259, seed=0)
  assert np.array(out.tokens).shape == (2, 6) and not np.any(np.array(out.tokens) == 259)
  # Blocks [0,4) prompt, [4,8) part prompt, [8,12) generated: 2 steps each for the two
  # blocks with MASKs, and one write per block.
  assert out.model_evals == 2 * 2 + 3 and out.tokens_per_sec > 0


def test_the_sample_command_samples_a_diffusion_run(trained_mdlm, tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir, _ = trained_mdlm
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'samples.jsonl'
  cmd = [sys.executable, '-m', 'experiments.sample', f'--workdir={workdir}', '--prompt=def ',
         '--max_new_tokens=8', '--steps=4', '--sampler=low_confidence', '--block_length=4',
         '--seed=1', f'--output={out}']
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(out.read_text())
  assert row['model_evals'] == 4 and row['tokens_per_sec'] > 0 and row['sampler'] == 'low_confidence'
  assert 0 < len(row['tokens']) <= 8 and 259 not in row['tokens']
  assert '4 model evaluations' in proc.stderr and proc.stdout.startswith('def ')


def test_llada_conditional_likelihood_is_exact_on_the_exact_conditionals():
  """With the exact conditionals of q, the l-masked estimator averages to -log q(r | p)
  exactly (any order's chain rule holds); its mean is within 4 reported standard errors, the
  reported variance is the spread of independent runs."""
  from models import diffusion_likelihood  # pylint: disable=g-import-not-at-top
  length = 3
  q_X = np.random.default_rng(0).dirichlet(np.full(VOCAB ** length, 2.0))
  denoise = exact_denoiser(q_X, length)
  q_ABC = q_X.reshape(VOCAB, VOCAB, VOCAB)
  for response in ([0, 2], [1, 1]):
    exact = -math.log(q_ABC[2, response[0], response[1]] / q_ABC[2].sum())
    est = diffusion_likelihood.conditional_nll(denoise, [2], response, mask_id=MASK,
                                               samples=4000, batch=500, seed=0)
    assert abs(est.nll - exact) < 4 * est.std_error + 1e-9, (est, exact)
    assert est.model_evals == 8 and est.variance > 0
    runs = [diffusion_likelihood.conditional_nll(denoise, [2], response, mask_id=MASK,
                                                 samples=50, seed=s).nll for s in range(40)]
    assert 0.5 < np.var(runs, ddof=1) / (est.variance / 50) < 2.0


def test_the_diffusion_vs_ar_sweep_plans_equal_compute_runs():
  """One network, three objectives: equal parameters; block diffusion's FLOPs per token are
  more than twice the others' (rows [x_noisy, x]), so equal compute means fewer tokens."""
  from experiments import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  sweep, module = sweep_lib.load_sweep('configs/sweeps/diffusion_vs_ar.py:preset=quick')
  assert sweep.baseline == 'ar' and sorted(sweep.architectures) == sorted(module.ARCHITECTURES)
  sizes = {}
  for name in ('ar', 'masked_diffusion', 'block_diffusion_4'):
    overrides = sweep_lib.size_overrides(module, name, 32, sweep)
    sizes[name] = sweep_lib.model_size(module, name, overrides, sweep.seq_len)
  assert sizes['ar'][0] == sizes['masked_diffusion'][0] == sizes['block_diffusion_4'][0]
  assert sizes['ar'][2] == sizes['masked_diffusion'][2] < sizes['block_diffusion_4'][2] / 2
  cmd = sweep_lib.command(module, sweep, 'block_diffusion_4', overrides, 3e10,
                          sizes['block_diffusion_4'][2], 0, '/tmp/unused')
  assert '--config.model.diffusion_block=4' in cmd and '--config.objective.block_size=4' in cmd


def test_block_diffusion_flash_equals_the_dense_mask(bd3_params):
  """`attention.impl='flash'` (blocks of 4 over rows of 2 x 10, two documents) gives the dense
  reference's logits and gradients for block diffusion's rows [x_noisy, x]."""
  x_BT = jax.random.randint(jax.random.key(3), (2, 10), 0, 256)
  z_BT = jnp.where(jax.random.uniform(jax.random.key(4), x_BT.shape) < 0.5, 259, x_BT)
  pos_T, seg_T = jnp.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3]), jnp.array([1] * 6 + [2] * 4)
  both = lambda a, b: jnp.broadcast_to(jnp.concatenate([a, b], -1), (2, 20))  # noqa: E731
  rows, pos, seg = jnp.concatenate([z_BT, x_BT], 1), both(pos_T, pos_T), both(seg_T, seg_T)
  outs = []
  for impl in ('xla', 'flash'):
    model = models.build(tiny_model_config('bd3lm_tiny', diffusion_block=2, d_model=32,
                                           num_heads=2, num_kv_heads=2, pattern='AF', mlp_dim=64,
                                           vocab_size=260, scan_layers=False,
                                           **{'attention.impl': impl, 'attention.causal_block': 4}))
    f = lambda p, m=model: jnp.sum(jnp.sin(m.apply(p, rows, positions_BT=pos,  # noqa: E731
                                                   segment_ids_BT=seg)[0]))
    outs.append(jax.jit(jax.value_and_grad(f))(bd3_params))
  np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(outs[1][1]), jax.tree.leaves(outs[0][1])):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_block_diffusion_sampling_of_mixed_prompt_lengths_equals_each_row_alone_uncached(
    bd3_params):
  """Three prompts of different lengths (right-padded to share block boundaries) sampled in
  one batch with the KV cache, greedy low-confidence, give each row the tokens that an
  uncached reference gives it alone: a step runs the training pass over [canvas, canvas]
  (the noisy copy of the current block sees itself and the clean blocks before it: BD3-LM's
  mask) and reveals the block's most probable MASK. 16 steps over 4 blocks: one token a step."""
  from models import diffusion_sampling  # pylint: disable=g-import-not-at-top
  model, mask, gen_len = models.build(tiny_bd3(4)), 259, 7
  prompts = [[257, 5, 6], [257, 7, 8, 9, 10, 11], [257]]
  train_pass = jax.jit(lambda z: model.apply(bd3_params, z, positions_BT=positions(z),
                                             segment_ids_BT=jnp.ones_like(z))[0])

  def positions(z_BT):
    half = jnp.arange(z_BT.shape[1] // 2)
    return jnp.broadcast_to(jnp.concatenate([half, half]), z_BT.shape)

  def alone(prompt):
    x_T = np.array(list(prompt) + [mask] * gen_len)
    for start in range(0, len(x_T), 4):
      block_T = np.arange(start, min(start + 4, len(x_T)))
      while np.any(x_T[block_T] == mask):
        logits_TV = np.array(train_pass(jnp.asarray(np.concatenate([x_T, x_T])[None]))[0],
                             np.float64)[:len(x_T)]
        logits_TV[:, mask] = -np.inf
        logp_TV = logits_TV - np.logaddexp.reduce(logits_TV, -1, keepdims=True)
        masked_T = block_T[x_T[block_T] == mask]
        best = masked_T[np.argmax(np.max(logp_TV[masked_T], -1))]
        x_T[best] = np.argmax(logits_TV[best])
    return x_T[len(prompt):].tolist()

  spec = diffusion_sampling.Spec(name='low_confidence', steps=16, temperature=0)
  out = diffusion_sampling.generate(model, bd3_params, prompts, gen_len=gen_len, spec=spec,
                                    mask_id=mask, seed=0)
  assert out.tokens == [alone(p) for p in prompts]
  # MASKs per block (rows 0, 1, 2): [1, 0, 3], [4, 2, 4], [2, 4, 0], [0, 1, 0]: each block
  # takes as many evaluations as its row with the most, and one more writes it.
  assert out.model_evals == (3 + 4 + 4 + 1) + 4
