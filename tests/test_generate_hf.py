"""Greedy decoding against transformers' `generate`, for every Hugging Face family.

Tier 3 (parity with a reference written elsewhere): a tiny random transformers model of each
family (float32, CPU) is imported through models/hf; from two prompts of unequal lengths
(left-padded, as transformers pads decoder-only models) both systems decode 64 tokens
greedily and must produce the same tokens. The windows of olmo3 and gpt_oss (5 and 3) wrap
around many times in 64 tokens; gpt_oss has sinks, deepseek_v3 MLA (the latent cache and its
absorbed decode path) and group-limited routing; the MoE families route every token while
decoding. Also the sampling command on an imported checkpoint (`--hf`).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import models  # noqa: E402
from input_pipeline import tokenizer as tokenizer_lib  # noqa: E402
from models import decode  # noqa: E402
from models import hf  # noqa: E402
from tests import test_hf  # noqa: E402
from tests import test_hf_families_a  # noqa: E402
from tests import test_hf_families_b  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 64
PROMPT_LENGTHS = (5, 11)


def variant(module, name, **changes):
  model_type, fields = module.VARIANTS[name]
  return model_type, dict(fields, **changes)


# One model per family; positions for the prompt plus 64 tokens (gpt2's table must hold them).
FAMILIES = {
    'gpt2': variant(test_hf, 'gpt2', n_positions=128),
    'llama': variant(test_hf, 'llama', max_position_embeddings=128),
    'qwen3': variant(test_hf, 'qwen3', max_position_embeddings=128),
    'qwen3_moe': variant(test_hf_families_a, 'qwen3_moe', max_position_embeddings=128),
    'olmo3': variant(test_hf_families_a, 'olmo3', max_position_embeddings=128),
    'gpt_oss': variant(test_hf_families_b, 'gpt_oss_layer_types', max_position_embeddings=128),
    'deepseek_v3': variant(test_hf_families_b, 'deepseek_v3', max_position_embeddings=128),
}


def prompts(vocab):
  rng = np.random.RandomState(7)
  return [rng.randint(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


def hf_generate(model, prompts_):
  """transformers' greedy generate from left-padded prompts (pad id 0, masked)."""
  t = max(len(p) for p in prompts_)
  ids = torch.zeros((len(prompts_), t), dtype=torch.long)
  mask = torch.zeros((len(prompts_), t), dtype=torch.long)
  for i, p in enumerate(prompts_):
    ids[i, t - len(p):] = torch.tensor(p)
    mask[i, t - len(p):] = 1
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0,
                         eos_token_id=None)
  return out[:, t:].tolist()


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_greedy_decoding_equals_transformers_generate(family, tmp_path):
  model_type, fields = FAMILIES[family]
  make = test_hf_families_b.make_model if model_type in ('gpt_oss', 'deepseek_v3') else None
  path = str(tmp_path / family)
  if make:
    test_hf_families_b.VARIANTS[f'_{family}'] = (model_type, fields)
    try:
      hf_model = make(f'_{family}', path)
    finally:
      del test_hf_families_b.VARIANTS[f'_{family}']
  else:
    hf_model = test_hf.make_hf_model(model_type, path, **fields)
  config, params = hf.import_hf(path, test_hf.run_config(scan_layers=True))
  model = models.build(config.model)
  ps = prompts(config.model.vocab_size)
  want = hf_generate(hf_model, ps)
  gen = decode.Generator(model, {'params': jax.tree.map(jnp.asarray, params)},
                         max_len=16 + NEW_TOKENS, sampler=decode.Sampler(temperature=0),
                         prefill_chunk=16, steps_per_call=16)
  got = gen.generate(ps, max_new_tokens=NEW_TOKENS).tokens
  for row, (g, w) in enumerate(zip(got, want)):
    first = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
    assert first is None, f'{family} row {row}: token {first} differs ({g[first]} vs {w[first]})'


def test_sample_command_on_a_hugging_face_checkpoint(tmp_path):
  """`python -m experiments.sample --hf=DIR` (bytes tokenizer saved beside the checkpoint):
  greedy text is the Generator's, --output holds it, a prompt too long is one line."""
  model_type, fields = FAMILIES['llama']
  path = str(tmp_path / 'llama')
  test_hf.make_hf_model(model_type, path, seed=3, **fields)
  tokenizer_lib.ByteTokenizer().save(os.path.join(path, 'tokenizer.json'))
  out = str(tmp_path / 'out.jsonl')
  cmd = [sys.executable, '-m', 'experiments.sample', f'--hf={path}', '--prompt=def f(x):',
         '--max_new_tokens=12', '--temperature=0', f'--output={out}']
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(open(out).read())
  assert row['prompt'] == 'def f(x):' and proc.stdout.startswith('def f(x):')
  tok = tokenizer_lib.ByteTokenizer()
  assert (len(row['tokens']), row['finish']) == (12, 'length') or (
      row['tokens'][-1] == tok.eos_id and row['finish'] == 'stop'), row
  config, params = hf.import_hf(path)
  gen = decode.Generator(models.build(config.model), {'params': params}, max_len=76,
                         sampler=decode.Sampler(temperature=0), stop_ids=(tok.eos_id,),
                         pad_id=tok.pad_id, prefill_chunk=64)
  assert gen.generate([[tok.bos_id] + tok.encode('def f(x):')], max_new_tokens=12).tokens[0] == (
      row['tokens'])
  proc = subprocess.run(cmd[:5] + ['--max_new_tokens=100', '--max_len=64'], capture_output=True,
                        text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      'sample: error: a prompt of 10 tokens (padded to 64) plus max_new_tokens=100 exceeds the '
      'maximum length 64')
