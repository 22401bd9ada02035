"""Hugging Face interop for DeepSeek V3.2 (models/hf/deepseek_v32.py): DSA `S` against
transformers' `deepseek_v32`.

Tier 3 (parity with a reference): a tiny random float32 DeepseekV32ForCausalLM (a dense
layer then a MoE layer, 8 indexer heads, index_topk=8) on rows of 24 tokens, longer than
index_topk so that selection matters (the test shows it does, on both sides): imported logits
within 1e-4 of transformers', exported and reloaded equal. The `deepseek_v32_tiny` preset
(its first two layers) exports to transformers with the same logits on 40-token rows
(its topk is 32). Greedy decoding of the imported model (64 new tokens, so each step selects
8 of up to 75 cached keys) equals transformers' `generate`. About 50 s on 2 cores.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import models  # noqa: E402
from configs import transformer  # noqa: E402
from models import decode  # noqa: E402
from models import hf  # noqa: E402
from tests import test_generate_hf  # noqa: E402
from tests.test_hf import VOCAB, _write_config, archlab_logits, hf_logits, make_hf_model  # noqa: E402
from tests.test_hf import archlab_init, run_config  # noqa: E402

FIELDS = dict(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
    kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, index_topk=8,
    index_head_dim=16, index_n_heads=8, max_position_embeddings=128, rms_norm_eps=1e-3)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('deepseek_v32'))
  return path, make_hf_model('deepseek_v32', path, **FIELDS)


@pytest.fixture(scope='module')
def tokens():
  return np.random.RandomState(0).randint(0, VOCAB, (2, 24))


def test_import_and_export_match_transformers(checkpoint, tokens, tmp_path):
  path, hf_model = checkpoint
  want_BTV = hf_logits(hf_model, tokens)
  config, params = hf.import_hf(path, run_config(False))
  assert config.model.pattern == 'SFSE' and config.model.dsa.topk == 8
  got_BTV = archlab_logits(config, params, tokens)
  diff = np.abs(got_BTV - want_BTV).max()
  print(f'deepseek_v32: import max abs logit diff {diff:.2e}')
  np.testing.assert_allclose(got_BTV, want_BTV, atol=1e-4, rtol=0)

  # Selection matters at these lengths, on both sides alike: every key kept changes them.
  wide = config.copy_and_resolve_references()
  wide.model.dsa.topk = 64
  assert np.abs(archlab_logits(wide, params, tokens) - want_BTV).max() > 1e-2

  assert hf.export_hf(config, params, str(tmp_path)) == 'deepseek_v32'
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  np.testing.assert_allclose(hf_logits(reloaded, tokens), want_BTV, atol=1e-5, rtol=0)
  for module in reloaded.modules():
    if hasattr(module, 'index_topk'):
      module.index_topk = 64
  np.testing.assert_allclose(hf_logits(reloaded, tokens), archlab_logits(wide, params, tokens),
                             atol=1e-4, rtol=0)


def test_preset_exports_to_transformers(tmp_path):
  """deepseek_v32_tiny (runlocal; its first two layers, to keep the test short), random
  weights, 40-token rows (topk 32): same logits in HF."""
  config = transformer.get_config('preset=deepseek_v32_tiny,runlocal')
  config.model.vocab_size = VOCAB
  config.model.pattern = config.model.pattern[:4]
  variables = archlab_init(config.model)
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(
      np.float32), variables.pop('params'))
  assert hf.export_hf(config, params, str(tmp_path), collections=variables) == 'deepseek_v32'
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  config.model.moe.dispatch = 'dropless'  # transformers routes every token
  tokens = np.random.RandomState(1).randint(0, VOCAB, (1, 40))
  np.testing.assert_allclose(hf_logits(reloaded, tokens),
                             archlab_logits(config, params, tokens, variables), atol=1e-4, rtol=0)


def test_greedy_decoding_equals_transformers_generate(checkpoint):
  """Prompts of 5 and 11 tokens (left-padded), 64 new tokens greedily: each step selects the
  top 8 of up to 75 cached keys on both sides (archlab: the cached indexer keys), same tokens."""
  path, hf_model = checkpoint
  config, params = hf.import_hf(path, run_config(scan_layers=True))
  prompts = test_generate_hf.prompts(config.model.vocab_size)
  want = test_generate_hf.hf_generate(hf_model, prompts)
  new = test_generate_hf.NEW_TOKENS
  gen = decode.Generator(models.build(config.model), {'params': jax.tree.map(jnp.asarray, params)},
                         max_len=16 + new, sampler=decode.Sampler(temperature=0),
                         prefill_chunk=16, steps_per_call=16)
  got = gen.generate(prompts, max_new_tokens=new).tokens
  for row, (g, w) in enumerate(zip(got, want)):
    first = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
    assert first is None, f'row {row}: token {first} differs ({g[first]} vs {w[first]})'


@pytest.mark.parametrize('changes,match', [
    (dict(q_lora_rank=None), "q_lora_rank=None must be set"),
    (dict(mlp_layer_types=['sparse', 'sparse']), "mlp_layer_types=.* must be 'dense'"),
])
def test_untranslatable_config_is_one_line(changes, match, checkpoint, tmp_path):
  path = _write_config(tmp_path, checkpoint[0], **changes)
  with pytest.raises(ValueError, match=match) as e:
    hf.import_hf(path)
  assert '\n' not in str(e.value) and 'config.json' in str(e.value)


def test_init_from_hf_and_from_a_dense_deepseek_v3_checkpoint(checkpoint, tokens, tmp_path):
  """`init_from=hf:` of the deepseek_v32 checkpoint loads what import_hf reads; a dense
  `deepseek_v3` checkpoint (the same model without indexers) starts an `S` model (the indexer
  fresh, trainer/init_from.py) whose logits with top-k covering the row are transformers'
  deepseek_v3's: DeepSeek V3.2's adaptation before its indexer warm-up."""
  from trainer import init_from  # pylint: disable=g-import-not-at-top
  path, _ = checkpoint
  config, params = hf.import_hf(path, run_config(False))
  config.init_from = f'hf:{path}'
  init_from.prepare(config)
  loaded = init_from.load_params(config)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)

  dense_path = str(tmp_path / 'deepseek_v3')
  dense = make_hf_model('deepseek_v3', dense_path, **{
      k: v for k, v in FIELDS.items() if not k.startswith('index')})
  adapted = config.copy_and_resolve_references()
  adapted.init_from = f'hf:{dense_path}'
  adapted.model.dsa.topk = tokens.shape[1]
  init_from.prepare(adapted)
  model, dummy_BT = models.build(adapted.model), np.zeros((1, 1), np.int32)
  fresh = jax.jit(lambda r: nn.meta.unbox(model.init(
      r, dummy_BT, positions_BT=dummy_BT, segment_ids_BT=dummy_BT + 1))['params'])(
          jax.random.key(0))
  got = init_from.load_params(adapted, fresh)
  positions_BT = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits_BTV = jax.jit(lambda p: model.apply({'params': p}, tokens, positions_BT=positions_BT,
                                             segment_ids_BT=np.ones_like(tokens))[0])(got)
  np.testing.assert_allclose(np.asarray(logits_BTV), hf_logits(dense, tokens), atol=1e-4, rtol=0)
  adapted.model.pattern = 'SESE'  # only an `A` may change
  with pytest.raises(ValueError, match=r"model.pattern='SESE' but the source has 'AFAE'"):
    init_from.prepare(adapted)
