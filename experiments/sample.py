"""Samples text from a trained run or a Hugging Face checkpoint (models/decode.py).

  python -m experiments.sample --workdir=RUN --prompt="def fib(n):" --max_new_tokens=200
  python -m experiments.sample --hf=/path/to/hf_dir --prompt="The capital of France is" \
      --temperature=0 --max_new_tokens=20
  python -m experiments.sample --workdir=RUN --prompts_file=prompts.txt --output=out.jsonl

`--workdir` reads the run's latest checkpoint (or `--step`) and its tokenizer (the run's
config.json says which; a BPE run keeps its tokenizer.json in the workdir); `--hf` imports a
transformers checkpoint through models/hf, with the tokenizer.json beside it. Each prompt is
encoded after the bos token (as training documents start) and one prompt streams its text to
the terminal as it is generated; several (a `--prompts_file`: one per line, or JSONL with a
"prompt" field) are decoded as one batch. `--output` writes one JSON line per prompt: prompt,
completion, tokens, why it stopped, tokens/s. Sampling: `--temperature` (0: greedy),
`--top_k`, `--top_p`, `--min_p`, `--repetition_penalty`, `--seed`; generation stops at the eos
token, at `--stop` strings or after `--max_new_tokens`. Bad input is one line.

A diffusion run (`model.bidirectional`, models/diffusion.py) is sampled by
models/diffusion_sampling.py: `--max_new_tokens` MASKs after the prompt are filled in `--steps`
model evaluations (default: one per token) by `--sampler` (ancestral, low_confidence,
random_order, confidence_threshold with `--threshold`), semi-autoregressively in blocks of
`--block_length`; a block diffusion run goes block by block with its KV cache. The completion
is cut at the first eos token (or stop string); tokens/s and the model evaluations are
reported. `--top_k`, `--top_p`, `--min_p` and `--repetition_penalty` are refused there.

  python -m experiments.sample --workdir=MDLM_RUN --prompt="def " --max_new_tokens=64 \
      --steps=32 --sampler=low_confidence --block_length=16
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

import errors
import models
from input_pipeline import tokenizer as tokenizer_lib
from models import decode
from models import diffusion_sampling
from models import hf
from models.hf import files as hf_files
from trainer import checkpoint

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run\'s directory.')
# experiments.convert defines the same --step; a process importing both (tests) shares it.
_STEP = (flags.FLAGS['step'] if 'step' in flags.FLAGS else
         flags.DEFINE_integer('step', None, 'The checkpoint step (default: the latest).'))
_HF = flags.DEFINE_string('hf', None, 'A Hugging Face checkpoint directory (instead of --workdir).')
_PROMPT = flags.DEFINE_string('prompt', None, 'One prompt.')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'Prompts: one per line, or JSONL with '
                                    'a "prompt" field.')
_OUTPUT = flags.DEFINE_string('output', None, 'A .jsonl file for prompts, completions, tokens/s.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate at most.')
_MAX_LEN = flags.DEFINE_integer('max_len', 0, 'Cache length (0: the padded prompt plus '
                                'max_new_tokens).')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0: greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, '0: off.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, '1: off.')
_MIN_P = flags.DEFINE_float('min_p', 0.0, '0: off.')
_PENALTY = flags.DEFINE_float('repetition_penalty', 1.0, '1: off.')
_STOP = flags.DEFINE_multi_string('stop', [], 'Stop strings (repeat the flag for several).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed gives the same text.')
_STEPS_PER_CALL = flags.DEFINE_integer('steps_per_call', 8, 'Tokens decoded per compiled call.')
_SAMPLER = flags.DEFINE_enum('sampler', None, list(diffusion_sampling.SAMPLERS),
                             'Diffusion runs: how MASKs are filled (default low_confidence).')
_STEPS = flags.DEFINE_integer('steps', None, 'Diffusion runs: model evaluations for the '
                              'generated span (default: --max_new_tokens).')
_BLOCK_LENGTH = flags.DEFINE_integer('block_length', 0, 'Diffusion runs: semi-autoregressive '
                                     'blocks of this many tokens (0: one block).')
_THRESHOLD = flags.DEFINE_float('threshold', 0.9, 'Diffusion runs: confidence_threshold\'s.')
_CACHE_DTYPE = flags.DEFINE_enum('cache_dtype', '', ['', 'float32', 'bfloat16'],
                                 'Decode cache storage ("": the model\'s compute dtype).')


def load_run(workdir: str, step: int | None = None):
  """(model config, variables, tokenizer) of a run's checkpoint, numpy variables."""
  model_config, params, collections = checkpoint.read_model(workdir, step)
  return model_config, {'params': params, **collections}, run_tokenizer(workdir, model_config)


def run_tokenizer(workdir: str, model_config):
  """The run's tokenizer: what its config.json names, else its tokenizer.json, else bytes."""
  in_workdir = os.path.join(workdir, 'tokenizer.json')
  config_path = os.path.join(workdir, 'config.json')
  data = {}
  if os.path.isfile(config_path):
    with open(config_path) as f:
      data = json.load(f).get('data', {})
  if os.path.isfile(in_workdir):
    return tokenizer_lib.load_tokenizer(in_workdir)
  if data.get('tokenizer_path'):
    if not os.path.isfile(data['tokenizer_path']):
      raise errors.DataError(f'{config_path}: data.tokenizer_path={data["tokenizer_path"]!r}: '
                             'no such file')
    return tokenizer_lib.load_tokenizer(data['tokenizer_path'])
  tokenizer = tokenizer_lib.ByteTokenizer()
  if data.get('tokenizer', 'bytes') != 'bytes' or model_config.vocab_size < tokenizer.vocab_size:
    raise errors.DataError(f'{workdir}: no tokenizer.json, and the model (vocabulary '
                           f'{model_config.vocab_size}) was not trained on bytes')
  return tokenizer


def load_hf(path: str):
  """(model config, variables, tokenizer) of a Hugging Face checkpoint directory."""
  config, params = hf.import_hf(path)
  tokenizer = hf_files.tokenizer_file(path)
  if tokenizer is None:
    raise errors.DataError(f'{path}: no tokenizer.json beside the checkpoint')
  return config.model, {'params': params}, tokenizer_lib.load_tokenizer(tokenizer)


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
  if bool(prompt is not None) == bool(prompts_file):
    raise errors.ConfigError('give one of --prompt and --prompts_file')
  if prompt is not None:
    return [prompt]
  if not os.path.isfile(prompts_file):
    raise errors.DataError(f'--prompts_file={prompts_file}: no such file')
  with open(prompts_file, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f if line.strip()]
  if prompts_file.endswith('.jsonl'):
    try:
      lines = [json.loads(line)['prompt'] for line in lines]
    except (json.JSONDecodeError, KeyError, TypeError):
      raise errors.DataError(f'--prompts_file={prompts_file}: every line must be a JSON object '
                             'with a "prompt" field') from None
  if not lines:
    raise errors.DataError(f'--prompts_file={prompts_file} holds no prompt')
  return lines


class _Stream:
  """Prints row 0's text as it is generated (complete UTF-8 characters only)."""

  def __init__(self, tokenizer, out=sys.stdout):
    self.tokenizer, self.out = tokenizer, out
    self.tokens, self.printed = [], ''

  def __call__(self, tokens_BN, live_BN):
    self.tokens += tokens_BN[0][live_BN[0]].tolist()
    text = self.tokenizer.decode(self.tokens)
    if text.startswith(self.printed) and not text.endswith('\ufffd'):
      self.out.write(text[len(self.printed):])
      self.out.flush()
      self.printed = text


def sample(model_config, variables, tokenizer, prompts: list[str], *, max_new_tokens: int,
           sampler: decode.Sampler, stop: list[str], seed: int, max_len: int = 0,
           steps_per_call: int = 8, stream=None) -> list[dict]:
  """Completions of `prompts` as dicts (prompt, completion, tokens, finish, tokens_per_sec)."""
  if model_config.vocab_size < tokenizer.vocab_size:
    raise errors.ConfigError(f'the tokenizer has {tokenizer.vocab_size} tokens, the model '
                             f'{model_config.vocab_size}')
  model = models.build(model_config)
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  chunk = 64  # prefill chunk: prompts are padded to a multiple of it
  padded = chunk * -(-max(len(i) for i in ids) // chunk)
  max_len = max_len or padded + max_new_tokens
  variables = jax.tree.map(jnp.asarray, variables)
  gen = decode.Generator(model, variables, max_len=max_len, sampler=sampler,
                         stop_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id,
                         steps_per_call=steps_per_call, prefill_chunk=chunk)
  strings = decode.StopStrings(tokenizer.decode, stop, len(prompts))

  def on_tokens(tokens_BN, live_BN):
    if stream is not None:
      stream(tokens_BN, live_BN)
    return strings(tokens_BN, live_BN)

  out = gen.generate(ids, max_new_tokens=max_new_tokens, seed=seed, on_tokens=on_tokens)
  rows = []
  for prompt, tokens, finish in zip(prompts, out.tokens, out.finish):
    text = strings.cut(tokenizer.decode(tokens))
    rows.append({'prompt': prompt, 'completion': text, 'tokens': tokens, 'finish': finish,
                 'tokens_per_sec': out.tokens_per_sec, 'prefill_seconds': out.prefill_seconds,
                 'compile_seconds': gen.compile_seconds})
  return rows


def run_mask_id(workdir: str | None, tokenizer) -> int:
  """The MASK id a diffusion run trained with: the tokenizer's, else its objective.mask_id."""
  config_path = os.path.join(workdir or '', 'config.json')
  configured = -1
  if workdir and os.path.isfile(config_path):
    with open(config_path) as f:
      objective = json.load(f).get('objective', {})
    configured = objective.get('mask_id', -1) if isinstance(objective, dict) else -1
  mask_id = configured if configured >= 0 else getattr(tokenizer, 'mask_id', None)
  if mask_id is None:
    raise errors.ConfigError(f'{workdir}: no MASK id (the tokenizer has none and '
                             'objective.mask_id is not set)')
  return int(mask_id)


def sample_diffusion(model_config, variables, tokenizer, prompts: list[str], *,
                     max_new_tokens: int, spec: diffusion_sampling.Spec, mask_id: int,
                     stop: list[str], seed: int) -> list[dict]:
  """Completions of `prompts` from a diffusion model (prompt, completion, tokens, finish,
  tokens_per_sec, model_evals)."""
  if model_config.vocab_size < tokenizer.vocab_size:
    raise errors.ConfigError(f'the tokenizer has {tokenizer.vocab_size} tokens, the model '
                             f'{model_config.vocab_size}')
  model = models.build(model_config)
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  variables = jax.tree.map(jnp.asarray, variables)
  out = diffusion_sampling.generate(model, variables, ids, gen_len=max_new_tokens, spec=spec,
                                    mask_id=mask_id, pad_id=tokenizer.pad_id, seed=seed)
  strings = decode.StopStrings(tokenizer.decode, stop, len(prompts))
  rows = []
  for prompt, tokens in zip(prompts, out.tokens):
    finish = 'length'
    if tokenizer.eos_id in tokens:
      tokens, finish = tokens[:tokens.index(tokenizer.eos_id) + 1], 'stop'
    text = strings.cut(tokenizer.decode(tokens))
    finish = 'stop' if len(text) < len(tokenizer.decode(tokens)) else finish
    rows.append({'prompt': prompt, 'completion': text, 'tokens': tokens, 'finish': finish,
                 'tokens_per_sec': out.tokens_per_sec, 'model_evals': out.model_evals,
                 'sampler': spec.name, 'steps': spec.steps})
  return rows


def _main():
  if bool(_WORKDIR.value) == bool(_HF.value):
    raise errors.ConfigError('give one of --workdir and --hf')
  prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
  sampler = decode.Sampler(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                           top_p=_TOP_P.value, min_p=_MIN_P.value,
                           repetition_penalty=_PENALTY.value)
  if _WORKDIR.value:
    model_config, variables, tokenizer = load_run(_WORKDIR.value, _STEP.value)
  else:
    model_config, variables, tokenizer = load_hf(_HF.value)
  if _CACHE_DTYPE.value:
    model_config.cache_dtype = _CACHE_DTYPE.value
  if model_config.get('bidirectional', False):
    _main_diffusion(model_config, variables, tokenizer, prompts)
    return
  if _SAMPLER.value is not None or _STEPS.value is not None or _BLOCK_LENGTH.value:
    raise errors.ConfigError('--sampler, --steps and --block_length apply to diffusion runs '
                             '(model.bidirectional=True); this run is autoregressive')
  single = len(prompts) == 1
  if single:
    print(prompts[0], end='', flush=True)
  rows = sample(model_config, variables, tokenizer, prompts, max_new_tokens=_MAX_NEW.value,
                sampler=sampler, stop=_STOP.value, seed=_SEED.value, max_len=_MAX_LEN.value,
                steps_per_call=_STEPS_PER_CALL.value,
                stream=_Stream(tokenizer) if single else None)
  if single:
    print()
  else:
    for row in rows:
      print(f'--- {row["prompt"]}\n{row["prompt"]}{row["completion"]}')
  print(f'[{sum(len(r["tokens"]) for r in rows)} tokens, {rows[0]["tokens_per_sec"]:.1f} '
        f'tokens/s decoding, batch {len(rows)}]', file=sys.stderr)
  _write_output(rows)


def _main_diffusion(model_config, variables, tokenizer, prompts):
  for name in ('top_k', 'top_p', 'min_p', 'repetition_penalty'):
    if flags.FLAGS[name].present:
      raise errors.ConfigError(f'--{name} is for autoregressive runs; a diffusion run is sampled '
                               'with --sampler, --steps, --temperature, --block_length')
  spec = diffusion_sampling.Spec(name=_SAMPLER.value or 'low_confidence',
                                 steps=_STEPS.value or _MAX_NEW.value,
                                 temperature=_TEMPERATURE.value, block_length=_BLOCK_LENGTH.value,
                                 threshold=_THRESHOLD.value)
  rows = sample_diffusion(model_config, variables, tokenizer, prompts,
                          max_new_tokens=_MAX_NEW.value, spec=spec,
                          mask_id=run_mask_id(_WORKDIR.value, tokenizer), stop=_STOP.value,
                          seed=_SEED.value)
  for row in rows:
    print(row['prompt'] + row['completion'] if len(rows) == 1 else
          f'--- {row["prompt"]}\n{row["prompt"]}{row["completion"]}')
  print(f'[{sum(len(r["tokens"]) for r in rows)} tokens, {rows[0]["tokens_per_sec"]:.1f} '
        f'tokens/s, {rows[0]["model_evals"]} model evaluations ({spec.name}, {spec.steps} '
        f'steps), batch {len(rows)}]', file=sys.stderr)
  _write_output(rows)


def _write_output(rows):
  if _OUTPUT.value:
    tmp = _OUTPUT.value + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      for row in rows:
        f.write(json.dumps(row) + '\n')
    os.replace(tmp, _OUTPUT.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only checkpoint is read-only
  errors.run_main('sample', _main)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.flags_parser('sample'))
