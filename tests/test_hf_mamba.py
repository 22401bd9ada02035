"""Hugging Face interop for Mamba-2 and Nemotron-H: logits, export and greedy decoding against
transformers (its PyTorch paths: mamba_ssm and causal-conv1d are not installed).

Tier 3 (parity with a reference). Tiny random float32 models: Mamba-2 with 2 groups and tied
embeddings; Mamba-2 with projection biases, no conv bias, 3 taps and a dt limit that binds;
Nemotron-H with every layer kind (Mamba-2, ReLU^2 MLP, attention, MoE with group-limited
sigmoid routing, a correction bias and a shared expert). Rows of 21 tokens cross chunks of
8 on both sides. Each imports to logits within 1e-4, exports (Nemotron-H through
experiments.convert, both ways) and reloads in transformers with the same logits; changing a
translated field moves the logits, and Nemotron-H's clip of dt at time_step_min matches while
it binds; greedy decoding of the first and third from left-padded prompts, imported and
decoded with the layers stacked (scan_layers), equals transformers' `generate`.
"""

import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import models  # noqa: E402
from configs import common as configs_common  # noqa: E402
from configs import transformer  # noqa: E402
from experiments import convert  # noqa: E402
from models import decode  # noqa: E402
from models import hf  # noqa: E402
from tests.test_hf import VOCAB, _write_config, hf_logits, make_hf_model  # noqa: E402
from tests.test_hf import run_config  # noqa: E402

LENGTH, CHUNK = 21, 8
VARIANTS = {
    'mamba2': ('mamba2', dict(
        hidden_size=16, num_heads=4, head_dim=8, state_size=8, n_groups=2, num_hidden_layers=2,
        layer_norm_epsilon=1e-3, chunk_size=CHUNK, tie_word_embeddings=True)),
    'mamba2_biases': ('mamba2', dict(
        hidden_size=16, num_heads=2, head_dim=8, expand=1, state_size=4, n_groups=1,
        num_hidden_layers=2, conv_kernel=3, use_bias=True, use_conv_bias=False,
        chunk_size=CHUNK, time_step_limit=(0.03, 0.08))),
    'nemotron_h': ('nemotron_h', dict(
        hidden_size=16, layers_block_type=['linear_attention', 'mlp', 'full_attention', 'moe',
                                           'linear_attention'],
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=24,
        mamba_num_heads=4, mamba_head_dim=4, ssm_state_size=8, n_groups=2, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=8, moe_shared_expert_intermediate_size=12,
        n_group=2, topk_group=1, routed_scaling_factor=1.5, layer_norm_epsilon=1e-3,
        chunk_size=CHUNK, time_step_min=0.01)),
}
# variant -> (model field, value that must change the logits)
SENSITIVE = {'mamba2_biases': [('mamba.dt_limit_max', float('inf'))]}


def archlab_logits(run, params, tokens_BT):
  """The imported model's float32 logits (one compiled forward: eager dispatch of the scans'
  small ops is slower than compiling them)."""
  model = models.build(run.model)
  positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
  return np.asarray(jax.jit(lambda p: model.apply(
      {'params': p}, jnp.asarray(tokens_BT), positions_BT=positions_BT,
      segment_ids_BT=jnp.ones_like(positions_BT))[0])(params))


def config(scan_layers):
  run = run_config(scan_layers)
  run.model.mamba.chunk = CHUNK
  return run


@pytest.fixture(scope='module')
def tokens():
  return np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH))


@pytest.fixture(scope='module')
def hf_models(tmp_path_factory):
  """{variant: (checkpoint dir, transformers model)}; Nemotron-H's correction bias (a
  buffer, which make_hf_model leaves at zero) is set large enough to change the routing."""
  out = {}
  for name, (model_type, fields) in VARIANTS.items():
    path = str(tmp_path_factory.mktemp(name))
    model = make_hf_model(model_type, path, **fields)
    if model_type == 'nemotron_h':
      with torch.no_grad():
        for module in model.modules():
          if hasattr(module, 'e_score_correction_bias'):
            module.e_score_correction_bias.copy_(torch.tensor([0.5, 0.0, -0.3, 0.1]))
      model.save_pretrained(path)
    out[name] = (path, model)
  return out


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_import_and_export_match_transformers(variant, hf_models, tokens, tmp_path):
  path, hf_model = hf_models[variant]
  expected_BTV = hf_logits(hf_model, tokens)
  # (the scanned layout, stacked then split per layer, is what the decoding test imports)
  run, params = hf.import_hf(path, config(False))
  diff = np.abs(archlab_logits(run, params, tokens) - expected_BTV).max()
  print(f'{variant}: import max abs logit diff {diff:.2e}')
  assert diff <= 1e-4, diff

  out = str(tmp_path / 'hf')
  if VARIANTS[variant][0] == 'nemotron_h':  # through the conversion tool, both ways
    convert.convert(f'hf:{path}', f'archlab:{tmp_path / "archlab"}')
    convert.convert(f'archlab:{tmp_path / "archlab"}', f'hf:{out}')
  else:
    assert hf.export_hf(run, params, out) == VARIANTS[variant][0]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(hf_logits(reloaded, tokens), expected_BTV, atol=1e-5, rtol=0)


@pytest.mark.parametrize('variant', sorted(SENSITIVE))
def test_each_translated_field_changes_the_logits(variant, hf_models, tokens):
  path, hf_model = hf_models[variant]
  expected_BTV = hf_logits(hf_model, tokens)
  run, params = hf.import_hf(path, config(False))
  for field, value in SENSITIVE[variant]:
    changed = run.copy_and_resolve_references()
    assert configs_common.get_field(changed.model, field) != value, field
    configs_common.set_field(changed.model, field, value)
    diff = np.abs(archlab_logits(changed, params, tokens) - expected_BTV).max()
    assert diff > 1e-3, (field, value, diff)


def test_nemotron_h_clips_dt_below_at_time_step_min(hf_models, tokens, tmp_path):
  """NemotronHMamba2Mixer clips dt to (time_step_min, inf), whatever time_step_limit says.
  With time_step_min above every dt (about 1.3 here) the clip binds: the logits move, and the
  import (`mamba.dt_limit_min`) still equals transformers."""
  path, hf_model = hf_models['nemotron_h']
  unclipped_BTV = hf_logits(hf_model, tokens)
  clipped = tmp_path / 'clipped'
  shutil.copytree(path, clipped)
  _write_config(tmp_path, path, time_step_min=1.6)
  shutil.copyfile(tmp_path / 'bad' / 'config.json', clipped / 'config.json')
  mixers = [m for m in hf_model.modules() if hasattr(m, 'time_step_limit')]
  limits = [m.time_step_limit for m in mixers]
  try:
    for m in mixers:
      m.time_step_limit = (1.6, float('inf'))
    want_BTV = hf_logits(hf_model, tokens)
  finally:
    for m, limit in zip(mixers, limits):
      m.time_step_limit = limit
  assert np.abs(want_BTV - unclipped_BTV).max() > 1e-3
  run, params = hf.import_hf(str(clipped), config(False))
  assert run.model.mamba.dt_limit_min == 1.6
  np.testing.assert_allclose(archlab_logits(run, params, tokens), want_BTV, atol=1e-4, rtol=0)


@pytest.mark.parametrize('variant,changes,match', [
    ('nemotron_h', dict(layers_block_type=['linear_attention', 'hybrid']),
     r"layers_block_type=\['linear_attention', 'hybrid'\] must list one of"),
    ('nemotron_h', dict(moe_latent_size=4), 'moe_latent_size=4 is not supported'),
    ('nemotron_h', dict(mamba_hidden_act='gelu'), "mamba_hidden_act='gelu' is not supported"),
    ('mamba2', dict(expand=4), 'expand=4 x hidden_size=16 must equal num_heads x head_dim=32'),
])
def test_untranslatable_config_is_one_line(variant, changes, match, hf_models, tmp_path):
  path = _write_config(tmp_path, hf_models[variant][0], **changes)
  with pytest.raises(ValueError, match=match) as e:
    hf.import_hf(path)
  assert '\n' not in str(e.value) and 'config.json' in str(e.value)


@pytest.mark.parametrize('preset,model_type', [('mamba2_tiny', 'mamba2'),
                                               ('nemotron_h_tiny', 'nemotron_h')])
def test_presets_are_these_families(preset, model_type):
  """The presets' configs translate to their family's config.json and back unchanged (what
  export and `init_from=hf:` need; no weights involved)."""
  model = transformer.get_config(f'preset={preset}').model
  model.vocab_size = VOCAB
  family, hf_config = hf.interop.hf_config_for(model)
  assert family.model_type == model_type and hf_config['model_type'] == model_type


def test_hybrid_override_pattern_and_the_legacy_names_read_as_layers_block_type(hf_models,
                                                                                 tmp_path):
  path = hf_models['nemotron_h'][0]
  for changes in (dict(layers_block_type=None, hybrid_override_pattern='M-*EM'),
                  dict(layers_block_type=['mamba', 'mlp', 'attention', 'moe', 'mamba'])):
    fields = hf.interop.translate_config(_write_config(tmp_path, path, **changes))[1]
    assert fields['pattern'] == 'MFAEM'


NEW_TOKENS = 16


@pytest.mark.parametrize('variant,prefill_chunk', [('mamba2', 1), ('nemotron_h', 16)])
def test_greedy_decoding_equals_transformers_generate(variant, prefill_chunk, hf_models):
  """Prompts of 5 and 11 tokens, left-padded (transformers masks the padding out of the Mamba
  state; archlab's padding is segment 0), 16 new tokens each. The prompts prefill one token
  a call (the recurrent step) for mamba2, in one chunked call for nemotron_h."""
  path, hf_model = hf_models[variant]
  rng = np.random.RandomState(7)
  prompts = [rng.randint(0, VOCAB, n).tolist() for n in (5, 11)]
  t = max(map(len, prompts))
  ids = torch.zeros((2, t), dtype=torch.long)
  mask = torch.zeros((2, t), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, t - len(p):], mask[i, t - len(p):] = torch.tensor(p), 1
  with torch.no_grad():
    want = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             pad_token_id=0, eos_token_id=None)[:, t:].tolist()
  run, params = hf.import_hf(path, config(True))
  gen = decode.Generator(models.build(run.model), {'params': jax.tree.map(jnp.asarray, params)},
                         max_len=16 + NEW_TOKENS, sampler=decode.Sampler(temperature=0),
                         prefill_chunk=prefill_chunk, steps_per_call=4, unroll_layers=False)
  got = gen.generate(prompts, max_new_tokens=NEW_TOKENS).tokens
  assert got == want
