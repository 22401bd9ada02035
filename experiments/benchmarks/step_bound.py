"""How fast can a training step of the preset be on this machine? Its matmuls and attention, timed.

  python -m experiments.benchmarks.step_bound --seq_lens=512,2048 --batch_tokens=4096

vs_torch.py compares whole steps; this says what bounds them. For each sequence length it
times, side by side in one process, every dense matmul of the preset's training step at its
real shape (projections, MLP, head: forward, input gradient and weight gradient, in JAX and in
PyTorch) and one attention layer forward + backward (archlab's `flash` and `xla`
implementations, and PyTorch's fused `scaled_dot_product_attention`). The sum over the step of
the faster system's time for each piece is a lower bound on any step of this model here: norms,
activations, the loss and the optimizer are taken as free. It prints that bound as tokens/s,
and with `--torch_tokens_per_sec` (vs_torch's torch.compile throughput, per sequence length)
the best ratio to torch any implementation could reach on these kernels.
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from configs import transformer
from experiments.benchmarks import vs_torch
from input_pipeline import tokenizer
from models.layers import attention

# --preset, --seq_lens, --batch_tokens and --repeats (timed calls of each piece, median) are
# vs_torch.py's flags, defined when it is imported.
_PRESET, _SEQ_LENS, _BATCH_TOKENS, _REPEATS = (vs_torch._PRESET, vs_torch._SEQ_LENS,  # pylint: disable=protected-access
                                               vs_torch._BATCH_TOKENS, vs_torch._REPEATS)
_TORCH_TPS = flags.DEFINE_list('torch_tokens_per_sec', [], 'torch.compile tokens/s per seq len, '
                               'from vs_torch.py, to print the reachable ratio.')


def median_seconds(fn, repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def dense_matmuls(cfg, tokens: int) -> list[tuple[str, int, int, int, int]]:
  """(name, m, k, n, count per step) of the step's dense forward matmuls (tokens x k @ k x n).

  A vocabulary of 0 (set from the tokenizer at run time) is the byte tokenizer's.
  """
  vs_torch.check_supported(cfg)
  d, h = cfg.d_model, vs_torch.head_dim(cfg)
  n_attn, n_mlp = cfg.pattern.count('A'), cfg.pattern.count('F')
  return [('q', tokens, d, cfg.num_heads * h, n_attn),
          ('k, v', tokens, d, cfg.num_kv_heads * h, 2 * n_attn),
          ('o', tokens, cfg.num_heads * h, d, n_attn),
          ('mlp in (gate, up)', tokens, d, cfg.mlp_dim, 2 * n_mlp),
          ('mlp out', tokens, cfg.mlp_dim, d, n_mlp),
          ('head', tokens, d, cfg.vocab_size or tokenizer.ByteTokenizer.vocab_size, 1)]


def time_matmul(m: int, k: int, n: int, repeats: int) -> dict[str, dict[str, float]]:
  """Seconds of forward, input-gradient and weight-gradient products, JAX and torch."""
  rng = np.random.default_rng(0)
  a, b, g = (rng.normal(size=s).astype(np.float32) for s in ((m, k), (k, n), (m, n)))
  ja, jb, jg = map(jnp.asarray, (a, b, g))
  ta, tb, tg = map(torch.from_numpy, (a, b, g))
  jit = {'forward': jax.jit(lambda a, b: a @ b), 'input grad': jax.jit(lambda g, b: g @ b.T),
         'weight grad': jax.jit(lambda a, g: a.T @ g)}
  jax_args = {'forward': (ja, jb), 'input grad': (jg, jb), 'weight grad': (ja, jg)}
  torch_fns = {'forward': lambda: ta @ tb, 'input grad': lambda: tg @ tb.T,
               'weight grad': lambda: ta.T @ tg}
  return {kind: {'jax': median_seconds(lambda: jax.block_until_ready(jit[kind](*jax_args[kind])),
                                       repeats),
                 'torch': median_seconds(torch_fns[kind], repeats)}
          for kind in jit}


def time_attention(cfg, batch: int, seq_len: int, repeats: int) -> dict[str, float]:
  """Seconds of one causal attention layer, forward + backward, per implementation."""
  n, k, h = cfg.num_heads, cfg.num_kv_heads, vs_torch.head_dim(cfg)
  rng = np.random.default_rng(0)
  q, kk, v = (rng.normal(size=(batch, seq_len, heads, h)).astype(np.float32)
              for heads in (n, k, k))
  pos = np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))
  seg = np.ones((batch, seq_len), np.int32)

  def archlab(impl):
    impl_cfg = cfg.copy_and_resolve_references()
    impl_cfg.attention.impl = impl

    def loss(q, k, v):
      out = attention.attend(impl_cfg, q, k, v, q_pos_BT=pos, q_seg_BT=seg, k_pos_BS=pos,
                             k_seg_BS=seg, scale=h ** -0.5, blocked=True)
      return jnp.sum(out * out)
    grad = jax.jit(jax.grad(loss, (0, 1, 2)))
    args = tuple(map(jnp.asarray, (q, kk, v)))
    return lambda: jax.block_until_ready(grad(*args))

  tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, kk, v))

  def torch_sdpa():
    out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=n != k)
    (out * out).sum().backward()

  return {'archlab flash': median_seconds(archlab('flash'), repeats),
          'archlab xla': median_seconds(archlab('xla'), repeats),
          'torch sdpa': median_seconds(torch_sdpa, repeats)}


def bound(cfg, seq_len: int, batch_tokens: int, repeats: int) -> dict:
  """The pieces' times and the step-time lower bound at one sequence length."""
  matmuls = []
  for name, m, k, n, count in dense_matmuls(cfg, batch_tokens):
    times = time_matmul(m, k, n, repeats)
    matmuls.append({'name': name, 'shape': (m, k, n), 'count': count, 'seconds': times,
                    'gflops': {kind: {s: 2 * m * k * n / t / 1e9 for s, t in per.items()}
                               for kind, per in times.items()}})
  attn = time_attention(cfg, batch_tokens // seq_len, seq_len, repeats)
  layers = cfg.pattern.count('A')
  best = lambda d: min(d.values())
  dense = sum(mm['count'] * sum(best(per) for per in mm['seconds'].values()) for mm in matmuls)
  return {'seq_len': seq_len, 'batch_size': batch_tokens // seq_len, 'matmuls': matmuls,
          'attention_seconds': attn, 'dense_seconds': dense,
          'attention_layers_seconds': layers * best(attn),
          'bound_tokens_per_sec': batch_tokens / (dense + layers * best(attn))}


def format_report(results: list[dict], torch_tps: dict[int, float]) -> str:
  lines = []
  for r in results:
    lines.append(f'seq {r["seq_len"]} x {r["batch_size"]}:')
    for mm in r['matmuls']:
      m, k, n = mm['shape']
      rates = ', '.join(f'{kind} jax {g["jax"]:.0f} torch {g["torch"]:.0f}'
                        for kind, g in mm['gflops'].items())
      lines.append(f'  {mm["name"]:<18} {m}x{k}x{n} (x{mm["count"]}): {rates} GFLOP/s')
    attn = ', '.join(f'{name} {1e3 * s:.0f} ms' for name, s in r['attention_seconds'].items())
    lines.append(f'  attention layer forward + backward: {attn}')
    lines.append(f'  lower bound: dense matmuls {r["dense_seconds"]:.2f} s + attention '
                 f'{r["attention_layers_seconds"]:.2f} s per step (the faster system each) -> '
                 f'at most {r["bound_tokens_per_sec"]:,.0f} tokens/s')
    if r['seq_len'] in torch_tps:
      lines.append(f'  at most {r["bound_tokens_per_sec"] / torch_tps[r["seq_len"]]:.2f}x '
                   f'torch.compile\'s {torch_tps[r["seq_len"]]:,.0f} tokens/s, with every other '
                   f'op free')
  return '\n'.join(lines)


def main(argv):
  del argv
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  cfg = transformer.get_config(f'preset={_PRESET.value}').model
  seq_lens = [int(s) for s in _SEQ_LENS.value]
  if _TORCH_TPS.value and len(_TORCH_TPS.value) != len(seq_lens):
    raise SystemExit(f'--torch_tokens_per_sec has {len(_TORCH_TPS.value)} values for '
                     f'{len(seq_lens)} --seq_lens')
  for s in seq_lens:
    if s <= 0 or _BATCH_TOKENS.value % s:
      raise SystemExit(f'--batch_tokens={_BATCH_TOKENS.value} is not a positive multiple of '
                       f'sequence length {s} (--seq_lens)')
  torch_tps = {s: float(t) for s, t in zip(seq_lens, _TORCH_TPS.value)}
  results = [bound(cfg, s, _BATCH_TOKENS.value, _REPEATS.value) for s in seq_lens]
  print(format_report(results, torch_tps))


if __name__ == '__main__':
  app.run(main)
