"""Hugging Face interop: logit parity with transformers on tiny random models, both ways.

Tier 3 (parity with a reference) and tier 5 (init_from through the training loop, the
conversion tool). transformers and torch are test-only requirements; without them the file
is skipped. About 60 s on 2 CPU cores.
"""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import models  # noqa: E402
import trainer  # noqa: E402
from configs import common as configs_common  # noqa: E402
from configs import transformer  # noqa: E402
from experiments import convert  # noqa: E402
from input_pipeline import tokenizer as tokenizer_lib  # noqa: E402
from models import hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, LENGTH = 300, 24
# Tiny models; eps, theta and head_dim differ from archlab's defaults so a field that is not
# translated shows in the logits.
VARIANTS = {
    'gpt2': ('gpt2', dict(n_positions=64, n_embd=64, n_layer=2, n_head=4)),
    'gpt2_untied_exact_gelu': ('gpt2', dict(
        n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=96, tie_word_embeddings=False,
        activation_function='gelu', layer_norm_epsilon=1e-3, scale_attn_weights=False)),
    'llama': ('llama', dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-3,
                            rope_theta=500.0, max_position_embeddings=64)),
    'llama_tied_bias_geglu': ('llama', dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, hidden_act='gelu_pytorch_tanh', max_position_embeddings=64)),
    'llama_rope_llama3': ('llama', dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_parameters={
            'rope_type': 'llama3', 'rope_theta': 500.0, 'factor': 8.0, 'low_freq_factor': 1.0,
            'high_freq_factor': 4.0, 'original_max_position_embeddings': 8})),
    'llama_rope_yarn': ('llama', dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_parameters={
            'rope_type': 'yarn', 'rope_theta': 500.0, 'factor': 4.0,
            'original_max_position_embeddings': 16})),
    'qwen3': ('qwen3', dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-4,
                            max_position_embeddings=64)),
}


def make_hf_model(model_type, path, seed=0, **fields):
  """A random float32 model in eval mode, every weight perturbed (biases and norms too)."""
  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(model_type, vocab_size=fields.pop('vocab_size', VOCAB),
                                             bos_token_id=None, eos_token_id=None, **fields)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def hf_logits(model, tokens_BT):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens_BT))).logits.numpy()


# One jitted program per model config (a FrozenConfigDict: hashable, and models.build copies
# it, so what the model does to its own copy leaves the key equal to the next call's): run op
# by op, a tiny model's forward compiles some 100-300 primitives.
@functools.partial(jax.jit, static_argnums=0)
def _forward(model_config, variables, tokens_BT):
  b, t = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
  logits_BTV, _, _ = models.build(model_config).apply(
      variables, tokens_BT, positions_BT=positions_BT, segment_ids_BT=jnp.ones_like(positions_BT))
  return logits_BTV


def archlab_logits(config, params, tokens_BT, collections=None):
  variables = {'params': params, **(collections or {})}
  return np.asarray(_forward(ml_collections.FrozenConfigDict(config.model), variables,
                             np.asarray(tokens_BT)))


def archlab_init(model_config, length=1, seed=0):
  """Every variable collection of `models.build(model_config)`'s init on a (1, length) row,
  unboxed. lazy_init runs only the initializers (op by op, the values init gives), not the
  forward: each initializer shape compiles once per process, where one jitted init (every
  initializer inlined) compiles for seconds per config."""
  row_BT = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return nn.meta.unbox(models.build(model_config).lazy_init(
      jax.random.key(seed), row_BT, positions_BT=row_BT, segment_ids_BT=row_BT))


def run_config(scan_layers):
  config = configs_common.base_config()
  config.model.scan_layers = scan_layers
  return config


@pytest.fixture(scope='module')
def tokens():
  return np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH))


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
  scanned = {}
  for scan_layers in (False, True):
    config, params = hf.import_hf(path, run_config(scan_layers))
    assert ('blocks' in params) == scan_layers
    got_BTV = archlab_logits(config, params, tokens)
    np.testing.assert_allclose(got_BTV, expected_BTV, atol=1e-4, rtol=0)
    scanned[scan_layers] = (config, params)

  config, params = scanned[True]
  hf_config = json.load(open(os.path.join(path, 'config.json')))
  m = config.model
  if hf_config['model_type'] == 'gpt2':
    assert m.norm_eps == hf_config['layer_norm_epsilon']
    assert m.mlp_activation == {'gelu_new': 'gelu', 'gelu': 'gelu_exact'}[
        hf_config['activation_function']]
  else:
    assert m.norm_eps == hf_config['rms_norm_eps']

  out = str(tmp_path / 'exported')
  assert hf.export_hf(config, params, out) == hf_config['model_type']
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(hf_logits(reloaded, tokens), expected_BTV, atol=1e-5, rtol=0)
  # The export of the unrolled layout writes the same tensors.
  unrolled_out = str(tmp_path / 'exported_unrolled')
  hf.export_hf(scanned[False][0], scanned[False][1], unrolled_out)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  a = load_file(os.path.join(out, 'model.safetensors'))
  b = load_file(os.path.join(unrolled_out, 'model.safetensors'))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


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
    ('llama', dict(model_type='mamba'), "model_type='mamba' is not supported"),
    ('llama', dict(rope_parameters={'rope_type': 'dynamic', 'rope_theta': 1e4, 'factor': 2.0}),
     'rope_parameters=.*dynamic'),
    ('llama', dict(rope_parameters=None, rope_theta=1e4,
                   rope_scaling={'type': 'dynamic', 'factor': 2.0}), 'rope_scaling=.*dynamic'),
    ('llama', dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    ('gpt2', dict(scale_attn_by_inverse_layer_idx=True), 'scale_attn_by_inverse_layer_idx=True'),
    ('gpt2', dict(activation_function='quick_gelu'), "activation_function='quick_gelu'"),
])
def test_untranslatable_config_is_one_line(variant, changes, match, hf_models, tmp_path):
  path = _write_config(tmp_path, hf_models[variant][0], **changes)
  with pytest.raises(ValueError, match=match) as e:
    hf.import_hf(path)
  assert '\n' not in str(e.value) and 'config.json' in str(e.value)


def test_missing_or_extra_tensor_is_named(hf_models, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  path, _ = hf_models['llama']
  tensors = load_file(os.path.join(path, 'model.safetensors'))
  missing = {k: v for k, v in tensors.items() if 'layers.1.mlp.up' not in k}
  extra = dict(tensors, **{'model.layers.0.mlp.extra.weight': np.ones(2)})
  for name, changed in (('missing', missing), ('extra', extra)):
    d = tmp_path / name
    d.mkdir()
    (d / 'config.json').write_text(open(os.path.join(path, 'config.json')).read())
    save_file(changed, str(d / 'model.safetensors'))
    with pytest.raises(ValueError, match='model.layers.(1.mlp.up_proj|0.mlp.extra).weight'):
      hf.import_hf(str(d))


def test_export_refuses_what_no_family_expresses(tmp_path):
  config = transformer.get_config('preset=llama_tiny,runlocal')
  config.model.vocab_size = VOCAB
  config.model.position = 'none'
  with pytest.raises(ValueError, match="model.position='none'") as e:
    hf.export_hf(config, {}, str(tmp_path / 'out'))
  assert '\n' not in str(e.value)


def test_sharded_checkpoint(hf_models, tokens, tmp_path):
  _, hf_model = hf_models['llama']
  hf_model.save_pretrained(str(tmp_path), max_shard_size='20KB')
  assert os.path.exists(tmp_path / 'model.safetensors.index.json')
  config, params = hf.import_hf(str(tmp_path))
  np.testing.assert_allclose(archlab_logits(config, params, tokens), hf_logits(hf_model, tokens),
                             atol=1e-4, rtol=0)


def _train_config(data_dir, **model):
  """llama_tiny,runlocal on a small text corpus, 2 steps at lr 0: parameters do not move."""
  config = transformer.get_config('preset=llama_tiny,runlocal')
  for key, value in model.items():
    config.model[key] = value
  config.data.corpus, config.data.paths = 'text', os.path.join(data_dir, '*.txt')
  config.data.val_fraction, config.data.seq_len, config.data.eval_batches = 0.3, 32, 1
  config.train.batch_size, config.train.steps = 2, 2
  config.train.eval_every = config.train.checkpoint_every = 2
  config.train.progress_bar = False
  config.optim.lr = 0.0
  config.peak_flops = 1e12
  return config


def test_init_from_then_convert_back(tmp_path, tokens):
  """HF -> train.py init_from (its tokenizer.json) -> archlab checkpoint -> HF, same logits."""
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  for name in ('json/decoder.py', 'textwrap.py', 'shlex.py', 'glob.py', 'fnmatch.py',
               'bisect.py', 'colorsys.py', 'keyword.py', 'this.py', 'getopt.py'):
    source = os.path.join(os.path.dirname(os.__file__), name)
    (data_dir / (name.replace('/', '_') + '.txt')).write_text(open(source).read())
  texts = [p.read_text() for p in data_dir.iterdir()]
  bpe = tokenizer_lib.BpeTokenizer.train(texts, vocab_size=VOCAB)
  # The runlocal llama_tiny shapes, so the preset's model fields describe the checkpoint.
  m = _train_config(str(data_dir)).model
  hf_dir = str(tmp_path / 'hf')
  hf_model = make_hf_model(
      'llama', hf_dir, vocab_size=bpe.vocab_size, hidden_size=m.d_model,
      intermediate_size=m.mlp_dim, num_hidden_layers=len(m.pattern) // 2,
      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
      rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta)
  bpe.save(os.path.join(hf_dir, 'tokenizer.json'))

  mismatched = _train_config(str(data_dir), d_model=2 * m.d_model)
  mismatched.init_from = f'hf:{hf_dir}'
  with pytest.raises(ValueError, match=r'model.d_model=128 but the checkpoint has 64'):
    trainer.train_and_evaluate(mismatched, str(tmp_path / 'refused'))
  assert not os.path.exists(tmp_path / 'refused' / 'checkpoints')

  config = _train_config(str(data_dir))
  config.init_from = f'hf:{hf_dir}'
  workdir = str(tmp_path / 'run')
  summary = trainer.train_and_evaluate(config, workdir)
  assert summary['config']['data']['tokenizer_path'] == os.path.join(hf_dir, 'tokenizer.json')
  assert tokenizer_lib.load_tokenizer(os.path.join(workdir, 'tokenizer.json')).fingerprint == (
      bpe.fingerprint)
  _, imported = hf.import_hf(hf_dir, config)
  model_config, trained, collections = convert.read_archlab(workdir)
  assert collections == {}  # a dense model has no other variable collections
  assert not model_config.scan_layers  # llama_tiny unrolls
  imported, trained = dict(_leaves(imported)), dict(_leaves(trained))
  assert sorted(imported) == sorted(trained)
  for path, value in imported.items():
    np.testing.assert_array_equal(value, trained[path], err_msg=path)
  assert np.isfinite(summary['final_eval_loss'])

  out = str(tmp_path / 'hf_again')
  convert.convert(f'archlab:{workdir}', f'hf:{out}')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(hf_logits(reloaded, tokens % bpe.vocab_size),
                             hf_logits(hf_model, tokens % bpe.vocab_size), atol=1e-5, rtol=0)
  written = json.load(open(os.path.join(out, 'config.json')))
  assert written['bos_token_id'] == bpe.bos_id
  assert os.path.exists(os.path.join(out, 'tokenizer.json'))


def _leaves(tree, prefix=''):
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in _leaves(tree[k], f'{prefix}/{k}')]
  return [(prefix, np.asarray(tree))]


def test_convert_command_line_round_trip(hf_models, tokens, tmp_path):
  """`python -m experiments.convert` hf -> archlab (scanned) -> hf gives the same model."""
  path, hf_model = hf_models['gpt2']
  archlab_dir, out = str(tmp_path / 'archlab'), str(tmp_path / 'hf')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  result = subprocess.run([sys.executable, '-m', 'experiments.convert', f'--from=hf:{path}',
                           f'--to=archlab:{archlab_dir}'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  model_config, _, _ = convert.read_archlab(archlab_dir)
  assert model_config.scan_layers
  convert.convert(f'archlab:{archlab_dir}', f'hf:{out}')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens), atol=1e-5,
                             rtol=0)
  with pytest.raises(ValueError, match='--from and --to are both hf'):
    convert.convert(f'hf:{path}', f'hf:{out}')
