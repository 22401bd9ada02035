"""Hugging Face interop for qwen3_moe and olmo3: logit parity with transformers, both ways.

Tier 3 (parity with a reference): a tiny random transformers model (float32, CPU) is saved,
imported and run by archlab (max abs logit difference <= 1e-4), then exported and reloaded
in transformers (same logits). The sequence (24 tokens) is longer than every sliding window
here, and a window one longer, or norm_topk_prob flipped, changes the logits, so the test
sees those fields. About 45 s of CPU time on 2 cores (2.5 min wall on a shared, loaded machine).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from configs import transformer  # noqa: E402
from models import hf  # noqa: E402
from models import lm  # noqa: E402
from tests.test_hf import archlab_init, archlab_logits, hf_logits, make_hf_model  # noqa: E402
from tests.test_hf import run_config  # noqa: E402

VOCAB, LENGTH = 300, 24
ROPE_500 = {'rope_type': 'default', 'rope_theta': 500.0}
ROPE_YARN = {'rope_type': 'yarn', 'rope_theta': 500.0, 'factor': 4.0,
             'original_max_position_embeddings': 16}
VARIANTS = {
    # Layers 0, 1, 3 sparse, 2 dense (mlp_only_layers); renormalised top-2 of 8 experts;
    # head_dim 32 != hidden/heads; q/k/v/o biases.
    'qwen3_moe': ('qwen3_moe', dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[2], num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, attention_bias=True,
        rms_norm_eps=1e-4, rope_parameters=ROPE_500, max_position_embeddings=64)),
    # Every second layer sparse (decoder_sparse_step), raw top-3 softmax weights, a sliding
    # window of 7 on every layer, tied embeddings, GeGLU experts.
    'qwen3_moe_step_window': ('qwen3_moe', dict(
        hidden_size=64, intermediate_size=48, moe_intermediate_size=24, num_experts=6,
        num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, use_sliding_window=True,
        sliding_window=7, tie_word_embeddings=True, hidden_act='gelu_pytorch_tanh',
        max_position_embeddings=64)),
    # Default layer_types (3 sliding : 1 full), window 5.
    'olmo3': ('olmo3', dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=5, rms_norm_eps=1e-3, max_position_embeddings=64,
        rope_parameters={'full_attention': ROPE_500, 'sliding_attention': ROPE_500},
        pad_token_id=None)),
    # Custom layer_types, window 3, YaRN RoPE on both layer types, biases, head_dim 8, tied.
    'olmo3_bias_yarn': ('olmo3', dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, attention_bias=True, tie_word_embeddings=True,
        layer_types=['full_attention', 'sliding_attention', 'sliding_attention',
                     'full_attention'], sliding_window=3, max_position_embeddings=64,
        rope_parameters={'full_attention': ROPE_YARN, 'sliding_attention': ROPE_YARN},
        pad_token_id=None)),
}
PATTERNS = {'qwen3_moe': 'AEAEAFAE', 'qwen3_moe_step_window': 'WFWEWFWE',
            'olmo3': 'WFWFWFAF', 'olmo3_bias_yarn': 'AFWFWFAF'}


@pytest.fixture(scope='module')
def tokens():
  return np.random.RandomState(1).randint(0, VOCAB, (2, LENGTH))


@pytest.fixture(scope='module')
def hf_models(tmp_path_factory):
  """{variant: (checkpoint dir, transformers model)}."""
  out = {}
  for name, (model_type, fields) in VARIANTS.items():
    path = str(tmp_path_factory.mktemp(name))
    out[name] = (path, make_hf_model(model_type, path, **fields))
  return out


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_import_and_export_match_transformers(variant, hf_models, tokens, tmp_path):
  path, hf_model = hf_models[variant]
  expected_BTV = hf_logits(hf_model, tokens)
  imported = {}
  # Both layouts where they differ (the pattern repeats a unit, so scanning stacks layers).
  scans = (False, True) if lm.split_pattern(PATTERNS[variant])[1] > 1 else (True,)
  for scan_layers in scans:
    config, params = hf.import_hf(path, run_config(scan_layers))
    assert ('blocks' in params) == (len(scans) == 2 and scan_layers)
    assert config.model.pattern == PATTERNS[variant]
    got_BTV = archlab_logits(config, params, tokens)
    np.testing.assert_allclose(got_BTV, expected_BTV, atol=1e-4, rtol=0)
    imported[scan_layers] = (config, params)
  print(f'{variant}: max abs logit difference {np.max(np.abs(got_BTV - expected_BTV)):.2e}')

  config, params = imported[True]
  model_type = VARIANTS[variant][0]
  out = str(tmp_path / 'exported')
  assert hf.export_hf(config, params, out) == model_type
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(hf_logits(reloaded, tokens), expected_BTV, atol=1e-5, rtol=0)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  a = load_file(os.path.join(out, 'model.safetensors'))
  if False in imported:  # unrolled and scanned layouts export the same tensors
    hf.export_hf(*imported[False], str(tmp_path / 'unrolled'))
    b = load_file(str(tmp_path / 'unrolled' / 'model.safetensors'))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  if model_type == 'qwen3_moe':  # experts stored one tensor each, as transformers writes them
    assert 'model.layers.1.mlp.experts.0.gate_proj.weight' in a


@pytest.mark.parametrize('variant,field,value', [
    ('olmo3', 'attention.window', 6),             # window one longer than sliding_window=5
    ('qwen3_moe_step_window', 'attention.window', 8),
    ('qwen3_moe', 'moe.norm_topk_prob', False),
    ('qwen3_moe_step_window', 'moe.norm_topk_prob', True),
])
def test_parity_sees_the_field(variant, field, value, hf_models, tokens):
  """The comparison is sharp enough to fail when one translated field is off."""
  path, hf_model = hf_models[variant]
  config, params = hf.import_hf(path, run_config(False))
  section, _, name = field.rpartition('.')
  config.model[section][name] = value
  diff = np.max(np.abs(archlab_logits(config, params, tokens) - hf_logits(hf_model, tokens)))
  assert diff > 1e-3, (field, diff)


def _write_config(tmp_path, base_dir, **changes):
  """A copy of base_dir's config.json with `changes` (None deletes a field), no weights."""
  fields = json.load(open(os.path.join(base_dir, 'config.json')))
  for key, value in changes.items():
    if value is None:
      fields.pop(key, None)
    else:
      fields[key] = value
  path = tmp_path / 'bad'
  path.mkdir(exist_ok=True)
  (path / 'config.json').write_text(json.dumps(fields))
  return str(path)


@pytest.mark.parametrize('variant,changes,match', [
    ('qwen3_moe', dict(decoder_sparse_step=0), 'decoder_sparse_step=0 must be a positive'),
    ('qwen3_moe', dict(hidden_act='relu'), "hidden_act='relu' is not supported"),
    ('qwen3_moe', dict(num_experts_per_tok=9), 'num_experts_per_tok=9 must be in'),
    ('qwen3_moe_step_window', dict(sliding_window=None), 'sliding_window=None must be a positive'),
    ('olmo3', dict(rope_parameters={'full_attention': ROPE_YARN, 'sliding_attention': ROPE_500}),
     'rope_parameters=.*archlab has one RoPE for all layers'),
    # transformers 5 gives sliding layers theta 500000 when only the legacy rope_theta is set
    ('olmo3', dict(rope_parameters=None, rope_theta=1000.0),
     'rope_parameters=None gives sliding_attention layers'),
    ('olmo3', dict(layer_types=['chunked_attention'] * 4), 'layer_types=.*must give one of'),
    ('olmo3', dict(rope_parameters={'full_attention': {'rope_type': 'dynamic', 'factor': 2.0,
                                                       'rope_theta': 1e4}}),
     'rope_parameters.full_attention: rope_parameters=.*dynamic'),
])
def test_untranslatable_config_is_one_line(variant, changes, match, hf_models, tmp_path):
  path = _write_config(tmp_path, hf_models[variant][0], **changes)
  with pytest.raises(ValueError, match=match) as e:
    hf.import_hf(path)
  assert '\n' not in str(e.value) and 'config.json' in str(e.value)


def test_legacy_olmo3_rope_theta_500k_imports(hf_models, tokens, tmp_path):
  """A transformers 4 config.json (rope_theta 500000, no rope_parameters), as OLMo 3 7B's."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  path, _ = hf_models['olmo3']
  fields = json.load(open(os.path.join(path, 'config.json')))
  del fields['rope_parameters']
  fields['rope_theta'] = 500000.0
  (tmp_path / 'config.json').write_text(json.dumps(fields))
  save_file(load_file(os.path.join(path, 'model.safetensors')), str(tmp_path / 'model.safetensors'))
  config, params = hf.import_hf(str(tmp_path))
  assert config.model.rope_theta == 500000.0
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  np.testing.assert_allclose(archlab_logits(config, params, tokens), hf_logits(reference, tokens),
                             atol=1e-4, rtol=0)


def _random_params(config):
  params = archlab_init(config.model, length=4)['params']
  # Perturb norms too (they start at one), so a misplaced norm shows in the logits.
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.randn(*x.shape).astype(np.float32),
                      params)


@pytest.mark.parametrize('preset,pattern,model_type', [
    ('olmo3_tiny', None, 'olmo3'),
    ('qwen3_tiny', 'AEAF', 'qwen3_moe'),
])
def test_archlab_presets_export(preset, pattern, model_type, tokens, tmp_path):
  """archlab-made models (the presets; qwen3_tiny with an E layer) export and transformers
  computes the same logits."""
  config = transformer.get_config(f'preset={preset},runlocal')
  config.model.vocab_size = VOCAB
  if pattern:
    config.model.pattern = pattern
    config.model.moe.num_experts, config.model.moe.expert_mlp_dim = 4, 32
  assert config.model.attention.window in (0, 64)
  config.model.attention.window = 5 if 'W' in config.model.pattern else 0  # < LENGTH
  params = _random_params(config)
  out = str(tmp_path / 'out')
  assert hf.export_hf(config, params, out) == model_type
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(hf_logits(reloaded, tokens), archlab_logits(config, params, tokens),
                             atol=1e-4, rtol=0)


def test_export_refuses_a_mixed_qwen3_moe(tmp_path):
  config = transformer.get_config('preset=olmo3_tiny,runlocal')
  config.model.vocab_size = VOCAB
  config.model.norm_placement = 'pre'
  config.model.attention.qk_norm = 'head'
  config.model.pattern = 'WEAF'
  with pytest.raises(ValueError, match="qwen3_moe: model.pattern='WEAF' mixes A and W") as e:
    hf.export_hf(config, {}, str(tmp_path / 'out'), model_type='qwen3_moe')
  assert '\n' not in str(e.value)


def test_stacked_experts_import(hf_models, tokens, tmp_path):
  """A checkpoint whose experts are stored stacked, as transformers 5 holds them in memory
  (`experts.gate_up_proj`, `experts.down_proj`: a state_dict saved as it is), imports to the
  same logits; bad stacked shapes and a tensor stored both ways are refused in one line."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  path, hf_model = hf_models['qwen3_moe']
  state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
  assert state['model.layers.0.mlp.experts.gate_up_proj'].shape == (8, 2 * 32, 64)
  stacked = tmp_path / 'stacked'
  stacked.mkdir()
  shutil.copy(os.path.join(path, 'config.json'), stacked / 'config.json')
  save_file(state, str(stacked / 'model.safetensors'))
  config, params = hf.import_hf(str(stacked), run_config(True))
  np.testing.assert_allclose(archlab_logits(config, params, tokens), hf_logits(hf_model, tokens),
                             atol=1e-4, rtol=0)

  bad = dict(state, **{'model.layers.0.mlp.experts.down_proj':
                       state['model.layers.0.mlp.experts.down_proj'][0]})
  save_file(bad, str(stacked / 'model.safetensors'))
  with pytest.raises(ValueError, match=r'stacked.*tensor model.layers.0.mlp.experts.down_proj has '
                                       r'shape \(64, 32\); stacked experts are') as e:
    hf.import_hf(str(stacked))
  assert '\n' not in str(e.value)
  both = dict(state, **{'model.layers.0.mlp.experts.3.down_proj.weight':
                        state['model.layers.0.mlp.experts.down_proj'][3].clone()})
  save_file(both, str(stacked / 'model.safetensors'))
  with pytest.raises(ValueError, match=r'experts.3.down_proj.weight is stored both on its own '
                                       r'and in model.layers.0.mlp.experts.down_proj'):
    hf.import_hf(str(stacked))
