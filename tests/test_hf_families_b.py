"""Hugging Face interop for GPT-OSS and DeepSeek V3: logit parity with transformers, both ways.

Tier 3 (parity with a reference). Tiny random float32 models with every feature of each
family on (sinks, alternating windows shorter than the row, YaRN, biased router and experts,
clamped SwiGLU; MLA with and without the query bottleneck, interleaved RoPE, YaRN mscale,
sigmoid group-limited routing with a non-zero correction bias, shared experts, dense first
layers), imported and compared with transformers' logits, exported and reloaded. A second
test shows each translated switch changes the logits, so parity cannot hold by accident.
About 40 s on 2 CPU cores.
"""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import trainer  # noqa: E402
from configs import common as configs_common  # noqa: E402
from configs import transformer  # noqa: E402
from experiments import convert  # noqa: E402
from models import hf  # noqa: E402
from models import lm  # noqa: E402
from tests.test_hf import VOCAB, _write_config, archlab_logits, hf_logits, make_hf_model  # noqa: E402
from tests.test_hf import archlab_init, run_config  # noqa: E402

LENGTH = 24  # longer than every window below
YARN = {'rope_type': 'yarn', 'rope_theta': 500.0, 'factor': 4.0,
        'original_max_position_embeddings': 16, 'beta_fast': 8.0, 'beta_slow': 1.0,
        'truncate': False}
VARIANTS = {
    # Alternating sliding (window 5) and full layers, YaRN, biases, sinks, clamped SwiGLU
    # with a limit the pre-activations exceed.
    'gpt_oss': ('gpt_oss', dict(
        hidden_size=32, intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=5, max_position_embeddings=64, rms_norm_eps=1e-3, rope_parameters=YARN,
        swiglu_limit=0.3, swiglu_alpha=1.5)),
    'gpt_oss_layer_types': ('gpt_oss', dict(
        hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, num_local_experts=3, num_experts_per_tok=3,
        sliding_window=3, max_position_embeddings=64, attention_bias=False,
        tie_word_embeddings=True, rope_parameters={'rope_type': 'default', 'rope_theta': 900.0},
        layer_types=['full_attention', 'sliding_attention', 'sliding_attention'])),
    # Query bottleneck, interleaved RoPE, YaRN with mscale_all_dim (softmax scale), attention
    # biases, one dense layer, sigmoid routing in 2 of 4 groups, 2 shared experts.
    'deepseek_v3': ('deepseek_v3', dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=16,
        kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
        max_position_embeddings=64, rms_norm_eps=1e-3, attention_bias=True,
        routed_scaling_factor=2.5, rope_parameters={
            'rope_type': 'yarn', 'rope_theta': 500.0, 'factor': 4.0, 'mscale': 0.7,
            'mscale_all_dim': 1.0, 'original_max_position_embeddings': 16})),
    # Full-rank queries, rotate-half RoPE, MoE from the first layer (scanned), no renormalising.
    'deepseek_v3_full_rank_q': ('deepseek_v3', dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
        q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=8, v_head_dim=8,
        max_position_embeddings=64, rope_interleave=False, norm_topk_prob=False,
        routed_scaling_factor=1.5, tie_word_embeddings=True,
        rope_parameters={'rope_type': 'default', 'rope_theta': 700.0})),
}
# variant -> (model field, value that must change the logits): each translated switch matters.
SENSITIVE = {
    'gpt_oss': [('attention.window', 64), ('swiglu_limit', 100.0), ('swiglu_alpha', 1.702),
                ('attention.sinks', False), ('rope_scaling.kind', 'none'),
                ('mlp_activation', 'swiglu')],
    'deepseek_v3': [('attention.mla.norm_eps', 1e-3), ('rope_interleaved', False),
                    ('rope_scaling.mscale_all_dim', 0.0), ('moe.correction_bias', False),
                    ('moe.topk_group', 4), ('moe.routed_scaling_factor', 1.0)],
}


def make_model(name, path):
  """The variant's transformers model; DeepSeek's correction bias (a buffer, which
  make_hf_model does not perturb) is set large enough to change which experts win."""
  model_type, fields = VARIANTS[name]
  model = make_hf_model(model_type, path, **fields)
  if model_type == 'deepseek_v3':
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
      for module in model.modules():
        if hasattr(module, 'e_score_correction_bias'):
          bias = module.e_score_correction_bias
          bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
    model.save_pretrained(path)
  return model


@pytest.fixture(scope='module')
def tokens():
  return np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH))


@pytest.fixture(scope='module')
def hf_models(tmp_path_factory):
  """{variant: (checkpoint dir, transformers model)}."""
  out = {}
  for name in VARIANTS:
    path = str(tmp_path_factory.mktemp(name))
    out[name] = (path, make_model(name, path))
  return out


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_import_and_export_match_transformers(variant, hf_models, tokens, tmp_path):
  path, hf_model = hf_models[variant]
  expected_BTV = hf_logits(hf_model, tokens)
  for scan_layers in (False, True):
    config, params = hf.import_hf(path, run_config(scan_layers))
    if scan_layers and lm.split_pattern(config.model.pattern)[1] == 1:
      break  # nothing to stack: the scanned layout is the unrolled one
    got_BTV = archlab_logits(config, params, tokens)
    diff = np.abs(got_BTV - expected_BTV).max()
    print(f'{variant} scan_layers={scan_layers}: import max abs logit diff {diff:.2e}')
    np.testing.assert_allclose(got_BTV, expected_BTV, atol=1e-4, rtol=0)

  model_type = VARIANTS[variant][0]
  assert hf.export_hf(config, params, str(tmp_path)) == model_type
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  diff = np.abs(hf_logits(reloaded, tokens) - expected_BTV).max()
  print(f'{variant}: export -> transformers max abs logit diff {diff:.2e}')
  np.testing.assert_allclose(hf_logits(reloaded, tokens), expected_BTV, atol=1e-5, rtol=0)


@pytest.mark.parametrize('variant', sorted(SENSITIVE))
def test_each_translated_switch_changes_the_logits(variant, hf_models, tokens):
  path, hf_model = hf_models[variant]
  expected_BTV = hf_logits(hf_model, tokens)
  config, params = hf.import_hf(path, run_config(False))
  assert config.model.moe.correction_bias == (VARIANTS[variant][0] == 'deepseek_v3')
  for field, value in SENSITIVE[variant]:
    changed = config.copy_and_resolve_references()
    assert configs_common.get_field(changed.model, field) != value, field
    configs_common.set_field(changed.model, field, value)
    p = params
    if field in ('attention.sinks', 'moe.correction_bias'):  # the switch drops a parameter
      p = _drop(params, field.split('.')[-1])
    diff = np.abs(archlab_logits(changed, p, tokens) - expected_BTV).max()
    assert diff > 1e-3, (field, value, diff)


def _drop(tree, name):
  """`tree` without leaves called `name`."""
  if not isinstance(tree, dict):
    return tree
  return {k: _drop(v, name) for k, v in tree.items() if k != name}


@pytest.mark.parametrize('variant,changes,match', [
    ('gpt_oss', dict(layer_types=['sliding_attention', 'chunked_attention'] * 2),
     "layer_types=.*'chunked_attention'"),
    ('gpt_oss', dict(sliding_window=None), 'sliding_window=None must be a positive'),
    ('gpt_oss', dict(rope_parameters={'rope_type': 'dynamic', 'rope_theta': 1e4, 'factor': 2.0}),
     'rope_parameters=.*dynamic'),
    ('deepseek_v3_full_rank_q', dict(attention_bias=True), 'attention_bias=True with q_lora_rank'),
    ('deepseek_v3', dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    ('deepseek_v3', dict(n_shared_experts=0), 'n_shared_experts=0 must be >= 1'),
])
def test_untranslatable_config_is_one_line(variant, changes, match, hf_models, tmp_path):
  path = _write_config(tmp_path, hf_models[variant][0], **changes)
  with pytest.raises(ValueError, match=match) as e:
    hf.import_hf(path)
  assert '\n' not in str(e.value) and 'config.json' in str(e.value)


def test_mtp_layer_is_ignored_and_extra_tensors_are_named(hf_models, tokens, tmp_path):
  """DeepSeek V3's multi-token-prediction layer 61 is skipped (as transformers does); any
  other stray tensor is refused by name."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  path, hf_model = hf_models['deepseek_v3']
  tensors = load_file(os.path.join(path, 'model.safetensors'))
  for name, extra, ok in (('mtp', 'model.layers.61.eh_proj.weight', True),
                          ('stray', 'model.layers.1.mlp.experts.8.up_proj.weight', False)):
    d = tmp_path / name
    d.mkdir()
    (d / 'config.json').write_text(open(os.path.join(path, 'config.json')).read())
    save_file(dict(tensors, **{extra: np.ones((2, 2), np.float32)}), str(d / 'model.safetensors'))
    if ok:
      config, params = hf.import_hf(str(d))
      np.testing.assert_allclose(archlab_logits(config, params, tokens),
                                 hf_logits(hf_model, tokens), atol=1e-4, rtol=0)
    else:
      with pytest.raises(ValueError, match='experts.8.up_proj'):
        hf.import_hf(str(d))


@pytest.mark.parametrize('preset,model_type,changes', [
    ('gpt_oss_tiny', 'gpt_oss', {}),
    # Its preset trains with capacity dispatch and the aux-loss-free bias (the moe_bias
    # collection), which export folds into e_score_correction_bias...
    ('deepseek_v3_tiny', 'deepseek_v3', {}),
    # ... added to the frozen correction bias parameter of an imported checkpoint.
    ('deepseek_v3_tiny', 'deepseek_v3', {'moe.correction_bias': True}),
])
def test_preset_exports_to_transformers(preset, model_type, changes, tokens, tmp_path):
  """The family presets are these families: random weights exported, same logits in HF."""
  config = transformer.get_config(f'preset={preset},runlocal')
  config.model.vocab_size = VOCAB
  for field, value in changes.items():
    configs_common.set_field(config.model, field, value)
  variables = archlab_init(config.model)
  rng = np.random.RandomState(0)  # every weight perturbed: biases, sinks, norms too
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(
      np.float32), variables.pop('params'))
  # A trained routing bias large enough to change which experts the sigmoid scores pick.
  collections = jax.tree.map(lambda b: 0.5 * rng.standard_normal(b.shape).astype(np.float32),
                             variables)
  assert bool(collections) == (preset == 'deepseek_v3_tiny')
  if collections:
    with pytest.raises(ValueError, match=r'bias_update_rate=0.001 .*moe_bias.*not given'):
      hf.export_hf(config, params, str(tmp_path / 'refused'))
    with pytest.raises(ValueError, match=r"the model's 'stats' collection has no place"):
      hf.export_hf(config, params, str(tmp_path / 'refused'),
                   collections=dict(collections, stats={'mean': np.zeros(3)}))
    assert not os.path.exists(tmp_path / 'refused')
  assert hf.export_hf(config, params, str(tmp_path), collections=collections) == model_type
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  config.model.moe.dispatch = 'dropless'  # transformers routes every token
  want = archlab_logits(config, params, tokens, collections)
  np.testing.assert_allclose(hf_logits(reloaded, tokens), want, atol=1e-4, rtol=0)
  if collections:  # the trained bias matters, so the parity above needs the fold
    zeroed = jax.tree.map(np.zeros_like, collections)
    assert np.abs(archlab_logits(config, params, tokens, zeroed) - want).max() > 1e-2


def test_trained_deepseek_preset_converts_with_its_routing_bias(tokens, tmp_path):
  """train.py on deepseek_v3_tiny (capacity dispatch, aux-loss-free bias) -> experiments.convert
  -> transformers: the bias trained in the checkpoint's moe_bias collection is exported."""
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  for name in ('textwrap.py', 'shlex.py', 'glob.py', 'fnmatch.py', 'bisect.py', 'getopt.py'):
    (data_dir / f'{name}.txt').write_text(open(os.path.join(os.path.dirname(os.__file__),
                                                            name)).read())
  config = transformer.get_config('preset=deepseek_v3_tiny,runlocal')
  config.data.corpus, config.data.paths = 'text', str(data_dir / '*.txt')
  config.data.val_fraction, config.data.seq_len, config.data.eval_batches = 0.3, 32, 1
  config.train.batch_size, config.train.steps = 2, 3
  config.train.eval_every = config.train.checkpoint_every = 3
  config.train.progress_bar = False
  config.model.moe.bias_update_rate = 0.05  # a bias that moves the routing within 3 steps
  config.peak_flops = 1e12
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
  trainer.train_and_evaluate(config, workdir)

  model_config, params, collections = convert.read_archlab(workdir)
  biases = jax.tree.leaves(collections)
  assert biases and all(np.abs(b).max() >= 0.05 for b in biases)  # one step moves every expert
  convert.convert(f'archlab:{workdir}', f'hf:{out}')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  model_config.moe.dispatch = 'dropless'  # transformers routes every token
  run = configs_common.base_config()
  run.model = model_config
  tokens = tokens % model_config.vocab_size
  np.testing.assert_allclose(hf_logits(reloaded, tokens),
                             archlab_logits(run, params, tokens, collections), atol=1e-4, rtol=0)


def test_trained_bias_of_a_family_without_correction_bias_is_refused(tmp_path):
  """A softmax-router MoE (qwen3_moe's kind) trained with the aux-loss-free bias has no
  tensor to hold that bias: one line that says so, and nothing written."""
  config = transformer.get_config('preset=qwen3_tiny,runlocal')
  config.model.vocab_size, config.model.pattern = VOCAB, 'AEAE'
  config.model.moe.update(num_experts=4, num_experts_per_tok=2, bias_update_rate=0.01)
  variables = archlab_init(config.model)
  params = variables.pop('params')
  with pytest.raises(ValueError, match=r'qwen3_moe: model.moe.correction_bias=True .*'
                                       r'trained with moe.bias_update_rate') as e:
    hf.export_hf(config, params, str(tmp_path / 'out'), collections=variables)
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'out')
  config.model.moe.bias_update_rate = 0.0  # the same model without the bias is qwen3_moe
  del variables
  assert hf.export_hf(config, params, str(tmp_path / 'out')) == 'qwen3_moe'
