"""Hugging Face interop for Qwen3-Next: logit parity with transformers both ways, and greedy
decoding against `generate`.

Tier 3 (parity with a reference). A tiny random float32 Qwen3NextForCausalLM (three gated
DeltaNet layers then a gated-attention layer; value heads twice the key heads; MoE with a
gated shared expert and one dense layer; partial RoPE) on 70 tokens, so transformers' and
archlab's chunked forms both cross a chunk boundary. flash-linear-attention and causal-conv1d
are not installed, so transformers runs its PyTorch reference paths.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import models  # noqa: E402
from models import decode  # noqa: E402
from models import hf  # noqa: E402
from tests import test_generate_hf  # noqa: E402
from tests.test_hf import VOCAB, archlab_logits, hf_logits, make_hf_model, run_config  # noqa: E402

FIELDS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=8, linear_value_head_dim=6, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=16, shared_expert_intermediate_size=24,
              max_position_embeddings=128, rms_norm_eps=1e-5, mlp_only_layers=[1])


@pytest.fixture(scope='module')
def qwen3_next(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('qwen3_next'))
  return path, make_hf_model('qwen3_next', path, **FIELDS)


def test_import_and_export_match_transformers(qwen3_next, tmp_path):
  path, hf_model = qwen3_next
  tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 70))
  want_BTV = hf_logits(hf_model, tokens)
  config, params = hf.import_hf(path, run_config(scan_layers=False))
  assert config.model.pattern == 'GEGFGEAE' and config.model.rope_fraction == 0.25
  got_BTV = archlab_logits(config, params, tokens)
  np.testing.assert_allclose(got_BTV, want_BTV, atol=1e-4, rtol=0)
  assert hf.export_hf(config, params, str(tmp_path)) == 'qwen3_next'
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  np.testing.assert_allclose(hf_logits(reloaded, tokens), want_BTV, atol=1e-5, rtol=0)


def test_greedy_decoding_equals_transformers_generate(qwen3_next):
  path, hf_model = qwen3_next
  config, params = hf.import_hf(path, run_config(scan_layers=True))
  prompts = test_generate_hf.prompts(config.model.vocab_size)
  want = test_generate_hf.hf_generate(hf_model, prompts)
  gen = decode.Generator(models.build(config.model),
                         {'params': jax.tree.map(jnp.asarray, params)},
                         max_len=16 + test_generate_hf.NEW_TOKENS,
                         sampler=decode.Sampler(temperature=0), prefill_chunk=16,
                         steps_per_call=16)
  got = gen.generate(prompts, max_new_tokens=test_generate_hf.NEW_TOKENS).tokens
  for row, (g, w) in enumerate(zip(got, want)):
    first = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
    assert first is None, f'row {row}: token {first} differs ({g[first]} vs {w[first]})'
