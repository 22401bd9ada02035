"""Config files: typed arguments, presets, runlocal, and one-line errors."""

import pytest

from configs import common
from configs import transformer
from models import lm


def test_parse_arg_types_and_flags():
  args = common.parse_arg('preset=gpt2_tiny,runlocal,seq_len=128', preset='x', runlocal=False,
                          seq_len=0)
  assert (args.preset, args.runlocal, args.seq_len) == ('gpt2_tiny', True, 128)


@pytest.mark.parametrize('arg,message', [
    ('nope=1', "config argument 'nope' is not one of"),
    ('seq_len=abc', "config argument seq_len='abc' is not a int"),
    ('seq_len', "config argument 'seq_len' needs a value"),
    ('runlocal=maybe', "runlocal='maybe' is not a bool"),
])
def test_parse_arg_errors(arg, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    common.parse_arg(arg, seq_len=0, runlocal=False)


def test_unknown_preset_names_the_choices():
  with pytest.raises(ValueError, match="preset='gpt5' is not one of"):
    transformer.get_config('preset=gpt5')


def test_presets_have_the_stated_shapes():
  gpt2 = transformer.get_config('preset=gpt2_small')
  assert (gpt2.model.position, gpt2.model.norm, gpt2.model.mlp_activation,
          gpt2.model.tie_embeddings, gpt2.model.num_kv_heads) == ('learned', 'layernorm', 'gelu', True, 12)
  llama = transformer.get_config('preset=llama_small')
  m = llama.model
  assert (m.d_model, len(m.pattern) // 2, m.num_heads, m.num_kv_heads, llama.data.seq_len) == (384, 6, 6, 2, 512)
  assert (m.position, m.norm, m.mlp_activation, m.tie_embeddings) == ('rope', 'rmsnorm', 'swiglu', False)


@pytest.mark.parametrize('preset', sorted(transformer.PRESETS))
def test_runlocal_shrinks_every_preset(preset):
  config = transformer.get_config(f'preset={preset},runlocal')
  unit, _ = lm.split_pattern(transformer.get_config(f'preset={preset}').model.pattern)
  assert len(config.model.pattern) <= 2 * len(unit) and config.model.d_model <= 64
  assert config.train.steps <= 50 and config.data.seq_len <= 64
  assert config.model.num_heads % config.model.num_kv_heads == 0
