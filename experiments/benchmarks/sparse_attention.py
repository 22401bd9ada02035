"""Sparse attention against dense attention as the row grows: DSA `S`, its core alone, and
MoBA `B` against `A`, forward and forward + backward, time and memory, on the CPU.

  python -m experiments.benchmarks.sparse_attention                       # 2k .. 16k
  python -m experiments.benchmarks.sparse_attention --lengths=2048,4096 --repeats=2

One sublayer each, float32, batch `--batch`, d_model 512, 8 heads, every one keeping
`--topk` keys a query (512, the issue's k):
  A       GQA-free MHA of 8 heads of 64, RoPE, `attention.impl=flash` (blocked, causal blocks
          skipped): the dense baseline
  S       DSA over MLA (kv_rank 256, nope 64, rope 32, v 64, no query bottleneck), an indexer of
          4 heads of 64, topk `--topk`, `dsa.impl=gather`, query blocks of 128: the indexer's
          O(T^2 H_I d_I) scores included
  S core  the O(T k) part alone: each query's `--topk` latent keys gathered (indices fixed,
          drawn at random among its visible keys), softmax and values, 8 heads, blocks of 128
  B       MoBA, `A`'s projections, blocks of 128, `--topk` / 128 - 1 earlier blocks beside the
          own one, `moba.impl=gather`
Times are medians of `--repeats` calls of the jitted function (compilation excluded); memory
is XLA's buffer assignment of the compiled function (`memory_analysis`: temporaries plus
outputs), which is what a device would have to hold. Ratios are against `A` at the same
length; the issue's target: `S` forward at 16k at most half of `A`'s time and memory.
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from configs import common
from configs import transformer
from models.layers import attention
from models.layers import dsa
from models.layers import moba

_LENGTHS = flags.DEFINE_list('lengths', ['2048', '4096', '8192', '16384'], 'Row lengths.')
_TOPK = flags.DEFINE_integer('topk', 512, 'Keys per query of every sparse system.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Rows per call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per measurement (median).')
_SYSTEMS = flags.DEFINE_list('systems', ['A', 'S', 'S core', 'B'], 'Systems to time.')

D, HEADS, BLOCK = 512, 8, 128


def model_config(pattern: str, topk: int):
  config = transformer.get_config('preset=llama_tiny').model
  for key, value in {'pattern': pattern + 'F', 'd_model': D, 'num_heads': HEADS,
                     'num_kv_heads': HEADS, 'vocab_size': 260, 'attention.impl': 'flash',
                     'attention.mla.q_rank': 0, 'attention.mla.kv_rank': 256,
                     'attention.mla.nope_head_dim': 64, 'attention.mla.rope_head_dim': 32,
                     'attention.mla.v_head_dim': 64, 'dsa.index_heads': 4,
                     'dsa.index_head_dim': 64, 'dsa.topk': topk, 'dsa.block': BLOCK,
                     'moba.block': BLOCK, 'moba.topk': max(topk // BLOCK - 1, 1),
                     'moba.query_block': BLOCK}.items():
    common.set_field(config, key, value)
  if pattern == 'S':
    config.attention.kind = 'mla'
  return ml_collections.FrozenConfigDict(config)


def layer_fn(char: str, t: int, topk: int):
  """(fn(params, x) -> y, params) of one sublayer on rows of t tokens."""
  cls = {'A': attention.Attention, 'S': dsa.DSAttention, 'B': moba.BlockSparseAttention}[char]
  layer = cls(model_config(char, topk))
  pos_BT = jnp.broadcast_to(jnp.arange(t), (_BATCH.value, t))
  seg_BT = jnp.ones_like(pos_BT)
  x_BTD = jax.random.normal(jax.random.key(0), (_BATCH.value, t, D))
  params = jax.jit(lambda x: nn.meta.unbox(layer.init(
      jax.random.key(1), x, positions_BT=pos_BT, segment_ids_BT=seg_BT)))(x_BTD)
  return (lambda p, x: layer.apply(p, x, positions_BT=pos_BT, segment_ids_BT=seg_BT)[0]), params, x_BTD


def core_fn(t: int, topk: int):
  """(fn(params, x) -> y, inputs) of S's gathered core alone: queries (B, T, N, R + rope),
  shared latent keys and values, fixed indices of `topk` visible keys per query."""
  b, h = _BATCH.value, 256 + 32
  keys = jax.random.split(jax.random.key(2), 4)
  q_BTNH = jax.random.normal(keys[0], (b, t, HEADS, h))
  k_BSH = jax.random.normal(keys[1], (b, t, h))
  v_BSH = jax.random.normal(keys[2], (b, t, 256))
  row_BT1 = jnp.arange(t)[None, :, None]
  idx_BTX = jax.random.randint(keys[3], (b, t, topk), 0, t) % (row_BT1 + 1)
  valid_BTX = jnp.arange(topk) <= row_BT1
  pos_BT = jnp.broadcast_to(jnp.arange(t), (b, t))

  def fn(kv, q_BTNH):
    k_BSH, v_BSH = kv

    def block(q_BTNH, idx_BTX, valid_BTX, q_pos_BT, q_seg_BT):
      del q_pos_BT, q_seg_BT
      k_BTXH, v_BTXH = dsa.gather_keys(k_BSH, idx_BTX), dsa.gather_keys(v_BSH, idx_BTX)
      logits_BTNX = jnp.einsum('BTNH,BTXH->BTNX', q_BTNH, k_BTXH) * h ** -0.5
      probs_BTNX = dsa.softmax_masked(logits_BTNX, valid_BTX)
      return (jnp.einsum('BTNX,BTXH->BTNH', probs_BTNX, v_BTXH),)

    return dsa.blockwise(block, BLOCK, (q_BTNH, idx_BTX, valid_BTX), pos_BT, jnp.ones_like(pos_BT))[0]

  return fn, (k_BSH, v_BSH), q_BTNH


def measure(fn, params, x):
  """{'fwd': s, 'fwd+bwd': s, 'fwd mem': bytes, 'fwd+bwd mem': bytes}."""
  r = jax.random.normal(jax.random.key(3), jax.eval_shape(fn, params, x).shape)
  forward = jax.jit(fn)
  backward = jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) * r), argnums=(0, 1)))
  out = {}
  for name, f in (('fwd', forward), ('fwd+bwd', backward)):
    compiled = f.lower(params, x).compile()
    mem = compiled.memory_analysis()
    out[name + ' mem'] = (mem.temp_size_in_bytes + mem.output_size_in_bytes) if mem else float('nan')
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, x))
      times.append(time.perf_counter() - start)
    out[name] = statistics.median(times)
  return out


def benchmark(lengths, systems, topk):
  """{(system, length): measure(...)}."""
  results = {}
  for t in lengths:
    for system in systems:
      if system == 'S core':
        fn, params, x = core_fn(t, topk)
      else:
        fn, params, x = layer_fn(system, t, topk)
      results[system, t] = measure(fn, params, x)
      m = results[system, t]
      print(f'{system:>6} T={t:>5}: fwd {m["fwd"] * 1e3:9.1f} ms {m["fwd mem"] / 2**20:8.1f} MiB   '
            f'fwd+bwd {m["fwd+bwd"] * 1e3:9.1f} ms {m["fwd+bwd mem"] / 2**20:8.1f} MiB', flush=True)
  return results


def table(results, lengths, systems) -> str:
  """Markdown: each system's time and memory over A's at each length."""
  lines = ['| length | system | fwd ms | fwd / A | fwd MiB | mem / A | fwd+bwd ms | / A | fwd+bwd MiB | mem / A |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for t in lengths:
    base = results.get(('A', t))
    for system in systems:
      m = results[system, t]
      ratio = lambda key: f'{m[key] / base[key]:.2f}' if base else '-'
      lines.append(f'| {t} | `{system}` | {m["fwd"] * 1e3:.0f} | {ratio("fwd")} | '
                   f'{m["fwd mem"] / 2**20:.0f} | {ratio("fwd mem")} | {m["fwd+bwd"] * 1e3:.0f} | '
                   f'{ratio("fwd+bwd")} | {m["fwd+bwd mem"] / 2**20:.0f} | {ratio("fwd+bwd mem")} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  lengths = [int(x) for x in _LENGTHS.value]
  results = benchmark(lengths, _SYSTEMS.value, _TOPK.value)
  print(table(results, lengths, _SYSTEMS.value))
  if ('S', 16384) in results and ('A', 16384) in results:
    s, a = results['S', 16384], results['A', 16384]
    print(f'target (S fwd at 16k <= 0.5 of A): time {s["fwd"] / a["fwd"]:.2f}, '
          f'memory {s["fwd mem"] / a["fwd mem"]:.2f}')


if __name__ == '__main__':
  app.run(main)
