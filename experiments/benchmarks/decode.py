"""Decoding speed: archlab against transformers' `generate`, and decode cost against context.

  python -m experiments.benchmarks.decode                         # both parts
  python -m experiments.benchmarks.decode --part=hf --new_tokens=128
  python -m experiments.benchmarks.decode --part=context --contexts=1024,4096
  python -m experiments.benchmarks.decode --part=context --stacks=G,M,A

Part `hf`: `llama_small` (random weights, byte vocabulary) exported to a transformers
checkpoint and loaded there (float32, the eager PyTorch model), and the same weights in
archlab; the same left-padded prompts (batch 1 and 8), greedy, `--new_tokens` tokens each.
Both timings cover the prefill and the decoding (compilation excluded: each system runs once
before it is timed), median of `--repeats`; the tokens must agree (greedy parity), so the two
compute the same thing. Target: archlab at least 2x transformers' tokens/s.

Part `context`: one stack of each cache kind at llama_small's width (6 layers, d=384): `A`
(GQA, 2 kv heads: a cache growing with the context), `W` (window 1024: a ring of 1024 slots)
MLA (`A` with attention.kind='mla', kv rank 128 + RoPE 32: the latent cache), and the
linear-time mixers, whose cache is a convolution window and a float32 state of a size that
does not depend on the context: `G` (gated DeltaNet, 6 key and value heads of 64: a 64 x 64
state per head) and `M` (Mamba-2, 12 heads of 64, expand 2, state 128); and the sparse
attentions: `S` (DSA over that MLA, an indexer of 4 heads of 64 whose key joins the latent
cache, top 512 keys a step) and `B` (MoBA over `A`'s cache, its own and 3 earlier blocks of
128 a step, the block means remade from the cache each step); batch 1. For each
context length the prompt is prefilled and `--context_tokens` tokens are timed decoding; the
table gives tokens/s and the cache's bytes.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import models
from configs import transformer
from experiments.benchmarks import shared_flag
from models import decode
from models import hf
from models import lm

_PART = shared_flag('part', lambda: flags.DEFINE_enum('part', 'all', ['all', 'hf', 'context'],
                                                     'Which part to run.'))
_NEW = flags.DEFINE_integer('new_tokens', 128, 'hf: tokens generated per prompt.')
_REPEATS = shared_flag('repeats', lambda: flags.DEFINE_integer(
    'repeats', 3, 'hf: timed runs per system (median).'))
_CONTEXTS = flags.DEFINE_list('contexts', ['1024', '2048', '4096', '8192', '16384', '32768'],
                              'context: prompt lengths.')
_CONTEXT_TOKENS = flags.DEFINE_integer('context_tokens', 32, 'context: decoded tokens timed.')
_STACKS = flags.DEFINE_list('stacks', [], 'context: only these stacks (A, W, MLA, G, M, S, B); all '
                            'by default.')


def llama_small_config():
  config = transformer.get_config('preset=llama_small')
  config.model.vocab_size = 260
  config.model.scan_layers = True
  return config


def random_variables(model, scale: float = 1.0):
  dummy = jnp.zeros((1, 8), jnp.int32)
  variables = nn.meta.unbox(model.init(jax.random.key(0), dummy, positions_BT=dummy,
                                       segment_ids_BT=dummy + 1))
  return jax.tree.map(lambda w: w * scale if w.ndim > 1 else w, variables)


def part_hf():
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  config = llama_small_config()
  model = models.build(config.model)
  variables = random_variables(model, scale=5.0)  # spread logits: no near-ties in greedy
  new = _NEW.value
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    hf.export_hf(config, variables['params'], tmp)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, dtype=torch.float32).eval()
    for batch in (1, 8):
      rng = np.random.default_rng(batch)
      prompts = [[257] + rng.integers(0, 256, int(n)).tolist()
                 for n in rng.integers(16, 64, batch)]
      gen = decode.Generator(model, variables, max_len=64 + new,
                             sampler=decode.Sampler(temperature=0), prefill_chunk=64,
                             steps_per_call=32)
      t = max(len(p) for p in prompts)
      ids = torch.zeros((batch, t), dtype=torch.long)
      mask = torch.zeros((batch, t), dtype=torch.long)
      for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1

      def run_torch():
        with torch.no_grad():
          return torch_model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                                      eos_token_id=None)[:, t:].tolist()

      ours = gen.generate(prompts, max_new_tokens=new).tokens  # compiles
      theirs = run_torch()  # warms up
      agree = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / (batch * new)
      times = {'archlab': [], 'transformers': []}
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        out = gen.generate(prompts, max_new_tokens=new)
        times['archlab'].append(time.perf_counter() - start)
        start = time.perf_counter()
        run_torch()
        times['transformers'].append(time.perf_counter() - start)
      speed = {k: batch * new / statistics.median(v) for k, v in times.items()}
      rows.append((batch, speed['archlab'], speed['transformers'],
                   speed['archlab'] / speed['transformers'], agree, out.tokens_per_sec))
  print(f'llama_small ({sum(x.size for x in jax.tree.leaves(variables)) / 1e6:.1f}M params), '
        f'greedy, {new} new tokens per prompt, prompts of 16-64 tokens, float32, '
        f'{os.cpu_count()} CPU threads each; tokens/s over prefill + decode, median of '
        f'{_REPEATS.value}:')
  print(f'{"batch":>5} {"archlab":>10} {"transformers":>13} {"ratio":>7} {"same tokens":>12} '
        f'{"archlab decode only":>20}')
  for batch, ours, theirs, ratio, agree, decode_only in rows:
    print(f'{batch:5d} {ours:10.1f} {theirs:13.1f} {ratio:6.2f}x {agree:11.1%} '
          f'{decode_only:20.1f}')


def stacks(only=()):
  """One config per cache kind, llama_small's width and depth (`only`: these kinds)."""
  base = llama_small_config()
  a = base.model.to_dict()
  w = dict(a, pattern='WF' * 6)
  w['attention'] = dict(a['attention'], window=1024)
  mla = dict(a, num_kv_heads=6)
  mla['attention'] = dict(a['attention'], kind='mla', mla=dict(
      q_rank=0, kv_rank=128, nope_head_dim=64, rope_head_dim=32, v_head_dim=64, norm_eps=0.0))
  g = dict(a, pattern='GF' * 6, position='none')  # deltanet defaults: num_heads heads of 64
  ssm = dict(a, pattern='MF' * 6, position='none')  # mamba defaults: expand 2, 64, state 128
  dsa = dict(mla, pattern='SF' * 6)  # MLA's latent cache + an indexer key of 64 per token
  dsa['dsa'] = dict(a['dsa'], index_heads=4, index_head_dim=64, topk=512)
  block = dict(a, pattern='BF' * 6)  # A's cache; each step reads 4 blocks of 128 per head
  block['moba'] = dict(a['moba'], block=128, topk=3)
  import ml_collections  # pylint: disable=g-import-not-at-top
  return {name: ml_collections.ConfigDict(m) for name, m in
          (('A (GQA 6/2)', a), ('W (window 1024)', w), ('MLA (rank 128 + 32)', mla),
           ('G (6 heads, 64 x 64)', g), ('M (12 heads, state 128)', ssm),
           ('S (MLA + indexer, top 512)', dsa), ('B (MoBA, 4 blocks of 128)', block))
          if not only or name.split()[0] in only}


def part_context():
  rows = []
  new = _CONTEXT_TOKENS.value
  for name, model_config in stacks(_STACKS.value).items():
    model = models.build(model_config)
    variables = random_variables(model)
    for context in (int(c) for c in _CONTEXTS.value):
      max_len = context + 64 + new
      cache_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.init_cache(model.cfg, 1, max_len)))
      gen = decode.Generator(model, variables, max_len=max_len, sampler=decode.Sampler(
          temperature=0), prefill_chunk=512, steps_per_call=new)
      prompt = [[257] + np.random.default_rng(0).integers(0, 256, context - 1).tolist()]
      gen.generate(prompt, max_new_tokens=new)  # compiles
      out = gen.generate(prompt, max_new_tokens=new)
      rows.append((name, context, out.tokens_per_sec, cache_bytes, out.prefill_seconds))
      print(f'  {name:22s} {context:6d}: {out.tokens_per_sec:8.1f} tokens/s, cache '
            f'{cache_bytes / 2**20:8.1f} MiB (prefill {out.prefill_seconds:.1f} s)', flush=True)
  print(f'\ndecode tokens/s (batch 1, {new} tokens after the prefill) and cache bytes, float32:')
  contexts = [int(c) for c in _CONTEXTS.value]
  print(f'{"stack":22s} ' + ' '.join(f'{c:>14d}' for c in contexts))
  for name in stacks(_STACKS.value):
    cells = {c: (s, b) for n, c, s, b, _ in rows if n == name}
    print(f'{name:22s} ' + ' '.join(f'{cells[c][0]:6.0f}/{cells[c][1] / 2**20:6.1f}M'
                                    for c in contexts))


def main(argv):
  del argv
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}')
  if _PART.value in ('all', 'hf'):
    part_hf()
  if _PART.value in ('all', 'context'):
    part_context()


if __name__ == '__main__':
  app.run(main)
