"""Decoding: samplers on hand-made logits, sampled frequencies against the model's softmax
(chi-square), greedy decoding against the argmax of the full forward, stop ids, stop strings,
seeds, and the one-line refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import models
from models import decode
from models import lm
from tests.conftest import tiny_model_config


def kept(sampler, logits, seen=None):
  out = decode.filter_logits(sampler, jnp.asarray([logits], jnp.float32),
                             None if seen is None else jnp.asarray([seen]))
  return set(np.nonzero(np.isfinite(np.asarray(out[0])))[0].tolist())


def test_filters_keep_exactly_the_tokens_they_should():
  logits = np.log(np.array([0.05, 0.4, 0.25, 0.2, 0.1]))
  assert kept(decode.Sampler(), logits) == {0, 1, 2, 3, 4}
  assert kept(decode.Sampler(top_k=2), logits) == {1, 2}
  assert kept(decode.Sampler(top_k=9), logits) == {0, 1, 2, 3, 4}
  # top-p: the smallest set of the likeliest tokens whose mass reaches p.
  assert kept(decode.Sampler(top_p=0.39), logits) == {1}
  assert kept(decode.Sampler(top_p=0.41), logits) == {1, 2}
  assert kept(decode.Sampler(top_p=0.84), logits) == {1, 2, 3}
  assert kept(decode.Sampler(top_p=0.86), logits) == {1, 2, 3, 4}
  # min-p: at least min_p times the likeliest token's probability (0.4).
  assert kept(decode.Sampler(min_p=0.49), logits) == {1, 2, 3}
  assert kept(decode.Sampler(min_p=0.24), logits) == {1, 2, 3, 4}
  assert kept(decode.Sampler(min_p=0.51), logits) == {1, 2}
  # Applied in order: top-k, then top-p over what top-k kept (renormalised), then min-p.
  assert kept(decode.Sampler(top_k=3, top_p=0.6), logits) == {1, 2}
  assert kept(decode.Sampler(temperature=0), logits) == {1}
  # Temperature changes which tokens top-p keeps (it reshapes the distribution first).
  assert kept(decode.Sampler(temperature=0.1, top_p=0.9), logits) == {1}


def test_repetition_penalty_as_transformers():
  logits = jnp.asarray([[2.0, -1.0, 0.5, 3.0]])
  seen = jnp.asarray([[True, True, False, False]])
  out = decode.penalise(logits, seen, 2.0)
  np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 3.0]])
  # Greedy after the penalty: 3.0 wins unpenalised; penalised (1.5) it loses to 2.0.
  s = decode.Sampler(temperature=0, repetition_penalty=2.0)
  assert kept(s, [2.0, -1.0, 0.5, 3.0], [True, True, False, False]) == {3}
  assert kept(s, [2.0, -1.0, 0.5, 3.0], [False, True, False, True]) == {0}


@pytest.mark.parametrize('field,value,message', [
    ('temperature', -1.0, 'temperature=-1.0 must be >= 0'),
    ('top_k', -2, 'top_k=-2 must be >= 0'),
    ('top_p', 0.0, 'top_p=0.0 must be in (0, 1]'),
    ('min_p', 1.0, 'min_p=1.0 must be in [0, 1)'),
    ('repetition_penalty', 0.0, 'repetition_penalty=0.0 must be positive'),
])
def test_bad_sampler_options_are_one_line(field, value, message):
  with pytest.raises(ValueError) as e:
    decode.Sampler(**{field: value})
  assert message in str(e.value) and '\n' not in str(e.value)


def init(model, seed, length=8):
  """`model`'s variables, initialised by one jitted program (op by op is much slower)."""
  dummy = jnp.zeros((1, length), jnp.int32)
  return jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(seed), dummy,
                                                  positions_BT=dummy,
                                                  segment_ids_BT=dummy + 1)))()


@pytest.fixture(scope='module')
def llama():
  cfg = tiny_model_config('llama_tiny')
  model = models.build(cfg)
  variables = init(model, 0)
  # Larger weights: logits spread enough that sampled frequencies are informative.
  variables = jax.tree.map(lambda w: w * 4 if w.ndim > 1 else w, variables)
  return model, variables


def full_logits(model, variables, *seqs):
  """Full-forward logits_BTV of token sequences in one jitted call: rows right-padded to the
  longest with segment 0, after each row's tokens, where causal attention never looks."""
  t = max(len(seq) for seq in seqs)
  tokens_BT, seg_BT = np.zeros((len(seqs), t), np.int32), np.zeros((len(seqs), t), np.int32)
  for row, seq in enumerate(seqs):
    tokens_BT[row, :len(seq)], seg_BT[row, :len(seq)] = seq, 1
  pos_BT = np.broadcast_to(np.arange(t, dtype=np.int32), tokens_BT.shape)
  return jax.jit(lambda v: model.apply(v, tokens_BT, positions_BT=pos_BT,
                                       segment_ids_BT=seg_BT)[0])(variables)


def test_sampled_frequencies_match_the_models_softmax(llama):
  """4096 rows of one prompt, one token each, top-8 at temperature 0.7: the counts against
  softmax(top-8 logits / 0.7) of the full forward (chi-square, 7 degrees of freedom)."""
  model, variables = llama
  prompt = [257, 11, 12, 13, 14]
  sampler = decode.Sampler(temperature=0.7, top_k=8)
  gen = decode.Generator(model, variables, max_len=16, sampler=sampler, prefill_chunk=8,
                         steps_per_call=1)
  rows = 4096
  out = gen.generate([prompt] * rows, max_new_tokens=1, seed=3)
  logits = np.asarray(full_logits(model, variables, prompt)[0, -1], np.float64)
  top = np.argsort(-logits)[:8]
  p = np.exp((logits[top] - logits[top].max()) / 0.7)
  p /= p.sum()
  assert p.max() < 0.9 and p.min() > 0.005, p  # the test can tell distributions apart
  counts = np.bincount([o[0] for o in out.tokens], minlength=logits.size)
  assert counts.sum() == counts[top].sum() == rows  # nothing outside the top 8
  chi2 = stats.chisquare(counts[top], p * rows)
  assert chi2.pvalue > 1e-3, (chi2, counts[top], p * rows)
  # And a wrong distribution (no temperature) is rejected: the test has power.
  q = np.exp(logits[top] - logits[top].max())
  q /= q.sum()
  assert stats.chisquare(counts[top], q * rows).pvalue < 1e-6


def test_greedy_decoding_is_the_argmax_of_the_full_forward_and_seeds_reproduce(llama):
  model, variables = llama
  prompts = [[257, 5, 6, 7, 8, 9, 10], [257, 40, 41], [257]]
  gen = decode.Generator(model, variables, max_len=32, sampler=decode.Sampler(temperature=0),
                         prefill_chunk=8, steps_per_call=3)
  out = gen.generate(prompts, max_new_tokens=10)
  assert out.finish == ['length'] * 3 and out.new_tokens == 30
  # Teacher forcing: each token is the argmax before it.
  logits_BTV = full_logits(model, variables, *[p + o for p, o in zip(prompts, out.tokens)])
  for logits_TV, p, o in zip(logits_BTV, prompts, out.tokens):
    assert np.argmax(np.asarray(logits_TV[len(p) - 1:len(p) + len(o) - 1]), -1).tolist() == o
  sampled = decode.Generator(model, variables, max_len=32, sampler=decode.Sampler(top_p=0.9),
                             prefill_chunk=8, steps_per_call=4)
  a = sampled.generate(prompts, max_new_tokens=12, seed=1).tokens
  assert sampled.generate(prompts, max_new_tokens=12, seed=1).tokens == a
  assert sampled.generate(prompts, max_new_tokens=12, seed=2).tokens != a


def test_a_scanned_model_decodes_unrolled_to_the_same_tokens():
  """`lm.unrolled` splits the stacked layers into the same function, and the Generator's
  default (layers unrolled) decodes what the scan decodes."""
  model = models.build(tiny_model_config('llama_tiny', scan_layers=True))
  variables = init(model, 2)
  variables = jax.tree.map(lambda w: w * 4 if w.ndim > 1 else w, variables)
  cfg, flat = lm.unrolled(model.cfg, variables)
  assert not cfg.scan_layers and 'blocks' not in flat['params'] and 'block_1' in flat['params']
  seq = [257, 3, 1, 4, 1, 5, 9, 2]
  np.testing.assert_allclose(full_logits(models.build(cfg), flat, seq),
                             full_logits(model, variables, seq), atol=1e-5)  # fusion order
  prompts = [[257, 5, 6, 7], [257, 40]]
  outs = [decode.Generator(model, variables, max_len=16, sampler=decode.Sampler(temperature=0),
                           prefill_chunk=4, steps_per_call=4, unroll_layers=unroll)
          .generate(prompts, max_new_tokens=8).tokens for unroll in (True, False)]
  assert outs[0] == outs[1]


def test_rows_finish_on_stop_ids_and_stop_strings(llama):
  model, variables = llama
  prompts = [[257, 5, 6], [257, 40, 41, 42]]
  greedy = decode.Sampler(temperature=0)
  free = decode.Generator(model, variables, max_len=32, sampler=greedy, prefill_chunk=4,
                          steps_per_call=2).generate(prompts, max_new_tokens=12).tokens
  stop = free[0][3]  # row 0's fourth token
  first = [row.index(stop) if stop in row else None for row in free]
  gen = decode.Generator(model, variables, max_len=32, sampler=greedy, prefill_chunk=4,
                         steps_per_call=2, stop_ids=(stop,), pad_id=0)
  out = gen.generate(prompts, max_new_tokens=12)
  for row, f, o, why in zip(free, first, out.tokens, out.finish):
    if f is None:
      assert o == row and why == 'length'
    else:
      assert o == row[:f + 1] and why == 'stop'  # the stop token is the last
  # A stop string, found by the host on the decoded text.
  text = lambda ids: ''.join(chr(65 + i % 26) for i in ids)
  target = text(free[1][:5])[-2:]
  strings = decode.StopStrings(text, [target], batch=2)
  out = gen.generate(prompts, max_new_tokens=12, on_tokens=strings)
  assert out.finish[1] == 'stop' and len(out.tokens[1]) < 12
  assert strings.cut(text(out.tokens[1])) == text(free[1])[:text(free[1]).index(target)]


def test_refusals_are_one_line(llama):
  model, variables = llama
  gen = decode.Generator(model, variables, max_len=16, prefill_chunk=8)
  with pytest.raises(ValueError, match=r'a prompt of 12 tokens \(padded to 16\) plus '
                                       r'max_new_tokens=4 exceeds the maximum length 16'):
    gen.generate([[257] * 12], max_new_tokens=4)
  with pytest.raises(ValueError, match='every prompt needs at least one token'):
    gen.generate([[257], []], max_new_tokens=1)
  with pytest.raises(ValueError, match='outside the vocabulary of 260'):
    gen.generate([[300]], max_new_tokens=1)


# Every attention preset (runlocal size; gpt2_small and llama_small shrink to their tiny
# versions' layouts, so they are left out; G and M decode in tests/test_deltanet.py and
# tests/test_mamba2.py), windows shrunk so 13 tokens wrap a ring several times; MoE in dense
# dispatch for the full forward (decoding routes every token, as dense does).
PRESETS = {'gpt2_tiny': {}, 'llama_tiny': {},
           'qwen3_tiny': {}, 'olmo3_tiny': {'attention.window': 4},
           'gpt_oss_tiny': {'attention.window': 3},
           'deepseek_v3_tiny': {'pattern': 'WFAE', 'attention.window': 5}}


def test_prefill_then_decode_equals_the_full_forward_for_every_preset():
  """Full-forward logits == prefill of k tokens, then one token a step (<= 1e-4 float32), for
  k = 0 and a prompt ending at the window boundary, in every preset (`A`, `W` rings wrapped
  several times, sinks, MLA's latent cache, MoE with capacity dispatch)."""
  from models import lm  # pylint: disable=g-import-not-at-top
  from tests.conftest import packed_batch  # pylint: disable=g-import-not-at-top
  from tests.conftest import prefill_then_decode  # pylint: disable=g-import-not-at-top
  b, t = 2, 13
  for preset, fields in PRESETS.items():
    cfg = tiny_model_config(preset, **fields)
    model = models.build(cfg)
    reference = models.build(tiny_model_config(preset, **dict(fields, **{'moe.dispatch': 'dense'})))
    tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(1), b, t, 260, num_segments=1)
    # The variables (dispatch does not change them) and the full forward: one jitted program.
    out, boxed = jax.jit(lambda m=reference: m.init_with_output(
        jax.random.key(0), tokens_BT, positions_BT=pos_BT, segment_ids_BT=seg_BT))()
    full_BTV, variables = out[0], nn.meta.unbox(boxed)
    apply = jax.jit(lambda x, p, s, c, m=model, v=variables: m.apply(
        v, x, positions_BT=p, segment_ids_BT=s, cache=c))
    window = cfg.attention.window if 'W' in cfg.pattern else 5
    empty = lm.init_cache(model.cfg, b, t)  # arrays, never updated in place: one for both k
    for k in (0, window):
      got_BTV, _ = prefill_then_decode(apply, empty, tokens_BT, pos_BT, seg_BT, k)
      err = float(jnp.max(jnp.abs(got_BTV - full_BTV)))
      assert err <= 1e-4, f'{preset}: prefill {k} + decode differs by {err:.2e}'


def test_window_caches_are_rings_of_window_slots_and_can_be_bfloat16():
  from models import lm  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config('gpt_oss_tiny', **{'attention.window': 8})
  shapes = lambda c, b, n: jax.eval_shape(lambda: lm.init_cache(c, b, n))  # nothing allocated
  sizes = lambda c, n: {k: v['k_BSKH'].shape[1] for k, v in shapes(c, 1, n)['block_0'].items()
                        if 'k_BSKH' in v}
  assert sizes(cfg, 64) == {'0W': 8, '2A': 64} and sizes(cfg, 4096) == {'0W': 8, '2A': 4096}
  mla = tiny_model_config('deepseek_v3_tiny', pattern='WFAE', **{'attention.window': 5})
  caches = shapes(mla, 1, 100)['block_0']
  assert caches['0W']['c_BSR'].shape[1] == 5 and caches['2A']['c_BSR'].shape[1] == 100
  low = tiny_model_config('llama_tiny', cache_dtype='bfloat16')
  assert {x.dtype for x in jax.tree.leaves(shapes(low, 1, 8)) if x.ndim > 2} == {
      jnp.dtype('bfloat16')}
  with pytest.raises(ValueError, match=r"model.cache_dtype='fp8' is not one of"):
    models.build(tiny_model_config('llama_tiny', cache_dtype='fp8'))
  # bfloat16 storage, float32 compute: greedy tokens of a short generation agree, logits close.
  model, low_model = models.build(tiny_model_config('llama_tiny')), models.build(low)
  variables = init(model, 0)
  prompt = [[257, 3, 4, 5, 6, 7]]
  outs = [decode.Generator(m, variables, max_len=24, sampler=decode.Sampler(temperature=0),
                           prefill_chunk=8).generate(prompt, max_new_tokens=8).tokens
          for m in (model, low_model)]
  assert outs[0] == outs[1]


def test_decoding_with_the_batch_over_a_mesh_equals_one_device():
  """8 forced CPU devices (one subprocess): the batch over `data` (dp) and over fsdp with the
  parameters sharded by tensor (fsdp_tp) decode the tokens one device decodes (sampled with
  top-p and a seed, so every logit matters); deepseek_v3 (MLA's latent cache, MoE routing every token)."""
  from tests import sharding_worker  # pylint: disable=g-import-not-at-top
  got = sharding_worker.run('decode', '--families=deepseek_v3', '--cases=dp,fsdp_tp')
  for family, results in got.items():
    for preset in ('dp', 'fsdp_tp'):
      for kind in ('top_p',):
        assert results[preset][kind] == results['single'][kind], (family, preset, kind)
    assert any("'data'" in spec for spec in results['dp']['cache_specs']), results['dp']
    assert any("'fsdp'" in spec for spec in results['fsdp_tp']['cache_specs'])
