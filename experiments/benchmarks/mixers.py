"""Speed of the linear-time mixers: `G` (gated DeltaNet) and `M` (Mamba-2) against transformers'
PyTorch implementations, and against attention as the row grows.

  python -m experiments.benchmarks.mixers                           # both parts
  python -m experiments.benchmarks.mixers --part=torch              # batch 2 x 2048
  python -m experiments.benchmarks.mixers --part=length --max_len=8192
  python -m experiments.benchmarks.mixers --part=length --chars=G,M --lengths=2048,16384

Part `torch`: forward + backward, float32, on the CPU, of the same computation on identical
shapes (`--batch` 2, `--seq_len` 2048, `--heads` 8 of `--head_dim` 64, state `--state` 64,
chunks of 64), archlab (jitted, compilation excluded) beside transformers (eager PyTorch,
`os.cpu_count()` threads), timed alternately, median of `--repeats`:

  G core   deltanet.chunked against transformers' torch_chunk_gated_delta_rule (Qwen3-Next):
           L2-normalised q, k; v; log-decay g; beta; gradients of all five
  M core   mamba2.ssd_chunked (+ the D skip) against the SSD chunk scan of Mamba2Mixer's
           PyTorch path (`mamba2_chunk_scan`): x, dt, A, B, C, D; gradients of all of them
  M layer  the whole `M` sublayer (input projection, convolution, SSD, gated norm, output
           projection; d_model = heads x head_dim, expand 1) against Mamba2Mixer.forward with
           archlab's weights copied in; gradients of the input and every weight

Before timing, each pair's outputs and gradients must agree (`--rtol` of the largest entry),
so the ratio compares the same computation. The ratio printed is archlab's time over
transformers' (below 1: archlab is faster; the issue's target is <= 0.5).

Part `length`: forward + backward of one sublayer at d_model = heads x head_dim (512) for
`G` (8 key and value heads), `M` (8 heads, state 64, expand 1) and `A` (8 heads, MHA,
RoPE, `attention.impl=auto`: the blocked flash path), batch `--batch`, at `--lengths` up to
`--max_len`; prints each time, the ratios to attention, time(L) / time(2048) (the issue's
target for G and M: <= 10 at 16384) and the length where G and M overtake attention
(interpolated in log length between the measured lengths where the ratio crosses 1).
"""

from __future__ import annotations

import math
import os
import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import transformer
from experiments.benchmarks import shared_flag
from models import lm
from models.layers import deltanet
from models.layers import mamba2
from models.layers import short_conv

_PART = shared_flag('part', lambda: flags.DEFINE_enum(
    'part', 'all', ['all', 'torch', 'length'], 'Which part to run.'))
_BATCH = shared_flag('batch', lambda: flags.DEFINE_integer('batch', 2, 'Rows per call.'))
_SEQ_LEN = shared_flag('seq_len', lambda: flags.DEFINE_integer(
    'seq_len', 2048, 'torch: the row length.'))
_HEADS = shared_flag('heads', lambda: flags.DEFINE_integer('heads', 8, 'Heads of every mixer.'))
_HEAD_DIM = shared_flag('head_dim', lambda: flags.DEFINE_integer(
    'head_dim', 64, 'Head dim (G: key and value head dim).'))
_STATE = shared_flag('state', lambda: flags.DEFINE_integer(
    'state', 64, "M: state dim (G's state is head_dim x head_dim)."))
_CHUNK = shared_flag('chunk', lambda: flags.DEFINE_integer(
    'chunk', 64, 'Chunk length of both chunked forms.'))
_REPEATS = shared_flag('repeats', lambda: flags.DEFINE_integer(
    'repeats', 3, 'Timed calls per system (median).'))
_RTOL = shared_flag('rtol', lambda: flags.DEFINE_float(
    'rtol', 1e-4, 'torch: agreement required, of the largest entry.'))
_LENGTHS = shared_flag('lengths', lambda: flags.DEFINE_list(
    'lengths', ['512', '1024', '2048', '4096', '8192', '16384'], 'length: row lengths.'))
_CHARS = shared_flag('chars', lambda: flags.DEFINE_list(
    'chars', ['G', 'M', 'A'], 'length: the sublayers timed (A alone is the slow one at 16384).'))
_MAX_LEN = shared_flag('max_len', lambda: flags.DEFINE_integer(
    'max_len', 16384, 'length: skip lengths above this (CPU time).'))

TARGET_RATIO = 0.5   # issue 17: ours at least 2x faster than transformers
TARGET_GROWTH = 10   # issue 17: time at 16384 / time at 2048 <= 10 for G and M


class MismatchError(AssertionError):
  """archlab and transformers did not compute the same thing; the message names the tensor."""


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def alternate(fns: dict, repeats: int) -> dict:
  """Median seconds of each callable, called in turn `repeats` times (load hits all alike)."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def check_close(name: str, theirs, ours, rtol: float) -> float:
  """Largest |theirs - ours| over the largest |theirs|; raises MismatchError above `rtol`."""
  theirs, ours = np.asarray(theirs, np.float64), np.asarray(ours, np.float64)
  if theirs.shape != ours.shape:
    raise MismatchError(f'{name}: shapes {theirs.shape} (transformers) vs {ours.shape} (archlab)')
  scale = float(np.abs(theirs).max())
  err = float(np.abs(theirs - ours).max()) / max(scale, 1e-30)
  if not (scale > 0 and err <= rtol):
    raise MismatchError(f'{name}: max |difference| {err:.2e} of the largest entry {scale:.3g} '
                        f'> {rtol:g}')
  return err


# ---------------------------------------------------------------------------------------------
# Part `torch`.


def _jax_fwd_bwd(fn, n_args: int):
  """jit of (inputs, cotangent) -> (outputs, gradients of sum(outputs * cotangent))."""

  def run(args, cot):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cot)

  del n_args
  return jax.jit(run)


def _torch_fwd_bwd(torch, fn, args, cot):
  """Forward, backward of sum(out * cot); returns (out, grads of args) as numpy."""
  leaves = [torch.from_numpy(np.array(a)).requires_grad_(True) for a in args]
  out = fn(*leaves)
  (out * cot).sum().backward()
  return out.detach().numpy(), [x.grad.numpy() for x in leaves]


def g_core_pair(torch, b, t, heads, dim, chunk, seed=0):
  """(archlab step, transformers step, names): gated delta rule cores on the same inputs."""
  from transformers.models.qwen3_next import modeling_qwen3_next as qn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)
  unit = lambda x: x / np.sqrt((x * x).sum(-1, keepdims=True) + deltanet.L2_EPS)
  args = [unit(normal(b, t, heads, dim)), unit(normal(b, t, heads, dim)), normal(b, t, heads, dim),
          -rng.uniform(0.0, 0.5, (b, t, heads)).astype(np.float32),  # g: log-decay <= 0
          rng.uniform(0.0, 1.0, (b, t, heads)).astype(np.float32)]  # beta
  cot = normal(b, t, heads, dim)
  seg = jnp.ones((b, t), jnp.int32)
  state = jnp.zeros((b, heads, dim, dim), jnp.float32)
  none = jnp.full((b,), short_conv.NO_SEGMENT, jnp.int32)

  def ours_fn(q, k, v, g, beta):
    return deltanet.chunked(q, k, v, g, beta, segment_ids_BT=seg, state_BYPH=state,
                            state_segment_B=none, chunk=chunk)[0]

  step = _jax_fwd_bwd(ours_fn, 5)
  jargs, jcot = [jnp.asarray(a) for a in args], jnp.asarray(cot)
  tcot = torch.from_numpy(cot)
  theirs_fn = lambda q, k, v, g, beta: qn.torch_chunk_gated_delta_rule(
      q, k, v, g, beta, chunk_size=chunk, use_qk_l2norm_in_kernel=False)[0]
  return (lambda: jax.block_until_ready(step(jargs, jcot)),
          lambda: _torch_fwd_bwd(torch, theirs_fn, args, tcot),
          ['o', 'dq', 'dk', 'dv', 'dg', 'dbeta'])


def m_core_pair(torch, b, t, heads, head_dim, state_dim, chunk, seed=0):
  """SSD cores (with the D skip) on the same x, dt, A, B, C, D; one group."""
  from transformers.models.mamba2 import modeling_mamba2 as mm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)
  args = [normal(b, t, heads, head_dim),
          np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), (b, t, heads))).astype(np.float32),
          -rng.uniform(1.0, 16.0, heads).astype(np.float32),
          normal(b, t, 1, state_dim), normal(b, t, 1, state_dim),
          rng.uniform(0.5, 1.5, heads).astype(np.float32)]
  cot = normal(b, t, heads, head_dim)
  seg = jnp.ones((b, t), jnp.int32)

  def ours_fn(x, dt, a, bb, cc, d):
    y = mamba2.ssd_chunked(x, dt, a, bb, cc, seg, chunk=chunk)[0]
    return y + d[:, None] * x

  step = _jax_fwd_bwd(ours_fn, 6)
  jargs, jcot = [jnp.asarray(a) for a in args], jnp.asarray(cot)
  tcot = torch.from_numpy(cot)
  theirs_fn = lambda x, dt, a, bb, cc, d: mm.mamba2_chunk_scan(x, dt, a, bb, cc, chunk_size=chunk,
                                                               D=d)
  return (lambda: jax.block_until_ready(step(jargs, jcot)),
          lambda: _torch_fwd_bwd(torch, theirs_fn, args, tcot),
          ['y', 'dx', 'ddt', 'dA', 'dB', 'dC', 'dD'])


def mamba_layer_config(heads: int, head_dim: int, state_dim: int, chunk: int, pattern='MF'):
  """A model config whose `M` sublayer has `heads` x `head_dim` inner channels at
  d_model = heads x head_dim (expand 1), one group."""
  cfg = transformer.get_config('preset=llama_tiny').model
  cfg.vocab_size = 260
  cfg.update(dict(d_model=heads * head_dim, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
                  pattern=pattern))
  cfg.mamba.update(dict(num_heads=heads, head_dim=head_dim, state_dim=state_dim, groups=1,
                        chunk=chunk))
  cfg.deltanet.update(dict(key_heads=heads, value_heads=heads, key_head_dim=head_dim,
                           value_head_dim=head_dim, chunk=chunk))
  lm.validate(cfg)
  return cfg


def copy_into_mamba2_mixer(torch, mixer, params, cfg):
  """archlab's `M` parameters into transformers' Mamba2Mixer (in_proj = z | x | B | C | dt)."""
  d = cfg.d_model
  cat = np.concatenate([np.asarray(params[n]).reshape(d, -1) for n in ('z', 'x', 'b', 'c', 'dt')],
                       axis=1)
  tensors = {'in_proj.weight': cat.T,
             'conv1d.weight': np.asarray(params['conv']).T[:, None, :],
             'conv1d.bias': np.asarray(params['conv_bias']),
             'dt_bias': np.asarray(params['dt_bias']), 'A_log': np.asarray(params['A_log']),
             'D': np.asarray(params['D']), 'norm.weight': np.asarray(params['norm']).reshape(-1),
             'out_proj.weight': np.asarray(params['o']).reshape(-1, d).T}
  state = mixer.state_dict()
  assert set(state) == set(tensors), sorted(set(state) ^ set(tensors))
  mixer.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                         for k, v in tensors.items()})


def m_layer_pair(torch, b, t, heads, head_dim, state_dim, chunk, seed=0):
  """The whole `M` sublayer against Mamba2Mixer.forward (its PyTorch path), same weights."""
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.mamba2 import modeling_mamba2 as mm  # pylint: disable=g-import-not-at-top
  cfg = mamba_layer_config(heads, head_dim, state_dim, chunk)
  layer = mamba2.Mamba2(cfg)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, t, cfg.d_model)).astype(np.float32)
  cot = rng.standard_normal((b, t, cfg.d_model)).astype(np.float32)
  seg = jnp.ones((b, t), jnp.int32)
  params = nn.meta.unbox(jax.jit(lambda r, x_BTD: layer.init(
      r, x_BTD, positions_BT=seg[:, :8], segment_ids_BT=seg[:, :8]))(
          jax.random.key(seed), jnp.asarray(x[:, :8]))['params'])  # one compile, not ~100
  # Weights of unit scale (the initialisation's are too small to exercise the norm and gate).
  unit = 1.0 / (cfg.init_std * cfg.d_model ** 0.5)
  params = {k: v * unit if v.ndim > 1 and k != 'conv' else v for k, v in params.items()}

  def ours_fn(p, x_BTD):
    return layer.apply({'params': p}, x_BTD, positions_BT=seg, segment_ids_BT=seg)[0]

  step = _jax_fwd_bwd(ours_fn, 2)
  jx, jcot = jnp.asarray(x), jnp.asarray(cot)
  hf_config = transformers.Mamba2Config(
      hidden_size=cfg.d_model, num_heads=heads, head_dim=head_dim, expand=1, state_size=state_dim,
      n_groups=1, conv_kernel=cfg.mamba.conv_taps, use_conv_bias=True, use_bias=False,
      chunk_size=chunk, layer_norm_epsilon=cfg.norm_eps, num_hidden_layers=1,
      time_step_limit=(0.0, float('inf')))
  mixer = mm.Mamba2Mixer(hf_config, layer_idx=0).float()
  copy_into_mamba2_mixer(torch, mixer, params, cfg)
  tcot = torch.from_numpy(cot)
  names = list(dict(mixer.named_parameters()))

  def theirs():
    mixer.zero_grad()
    tx = torch.from_numpy(x).requires_grad_(True)
    out = mixer(tx)
    (out * tcot).sum().backward()
    grads = dict(mixer.named_parameters())
    return out.detach().numpy(), [tx.grad.numpy()] + [grads[n].grad.numpy() for n in names]

  def ours():
    out, (dp, dx) = jax.block_until_ready(step((params, jx), jcot))
    cat = np.concatenate([np.asarray(dp[n]).reshape(cfg.d_model, -1)
                          for n in ('z', 'x', 'b', 'c', 'dt')], 1).T
    ours_grads = {'in_proj.weight': cat, 'conv1d.weight': np.asarray(dp['conv']).T[:, None, :],
                  'conv1d.bias': dp['conv_bias'], 'dt_bias': dp['dt_bias'], 'A_log': dp['A_log'],
                  'D': dp['D'], 'norm.weight': np.asarray(dp['norm']).reshape(-1),
                  'out_proj.weight': np.asarray(dp['o']).reshape(-1, cfg.d_model).T}
    return out, [dx] + [ours_grads[n] for n in names]

  return ours, theirs, ['y', 'dx'] + ['d ' + n for n in names]


def compare_torch(b: int, t: int, heads: int, head_dim: int, state_dim: int, chunk: int,
                  repeats: int, rtol: float) -> list[dict]:
  """Each pair checked equal, then timed alternately: rows of name, seconds, ratio, error."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  pairs = {
      'G core': g_core_pair(torch, b, t, heads, head_dim, chunk),
      'M core': m_core_pair(torch, b, t, heads, head_dim, state_dim, chunk),
      'M layer': m_layer_pair(torch, b, t, heads, head_dim, state_dim, chunk),
  }
  rows = []
  for name, (ours, theirs, names) in pairs.items():
    want_out, want_grads = theirs()
    got_out, got_grads = ours()
    errors = [check_close(f'{name} {n}', w, g, rtol)
              for n, w, g in zip(names, [want_out] + list(want_grads),
                                 [got_out] + list(got_grads))]
    seconds = alternate({'archlab': ours, 'transformers': theirs}, repeats)
    rows.append(dict(name=name, archlab=seconds['archlab'], transformers=seconds['transformers'],
                     ratio=seconds['archlab'] / seconds['transformers'], max_error=max(errors),
                     checked=len(errors)))
  return rows


def format_torch(rows: list[dict], b: int, t: int, heads: int, head_dim: int, state_dim: int,
                 chunk: int, repeats: int) -> str:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  lines = [f'forward + backward, float32, batch {b} x {t}, {heads} heads of {head_dim}, state '
           f'{state_dim} (G: {head_dim} x {head_dim}), chunk {chunk}; jax {jax.__version__}, '
           f'torch {torch.__version__} on {torch.get_num_threads()} threads, transformers '
           f'{transformers.__version__}; median of {repeats}, alternating:',
           f'{"":8s} {"archlab":>10s} {"transformers":>13s} {"ours/theirs":>12s} '
           f'{"agree (max rel err, n tensors)":>32s}']
  for r in rows:
    lines.append(f'{r["name"]:8s} {r["archlab"] * 1e3:8.0f}ms {r["transformers"] * 1e3:11.0f}ms '
                 f'{r["ratio"]:11.2f}x {r["max_error"]:20.1e} ({r["checked"]})')
  met = [r['name'] for r in rows if r['ratio'] <= TARGET_RATIO]
  lines.append(f'target ours/theirs <= {TARGET_RATIO} (2x faster): met by '
               f'{", ".join(met) if met else "none"}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Part `length`.


def sublayer_step(char: str, cfg, b: int, t: int, seed: int = 0):
  """A jitted forward + backward (parameters and input) of one sublayer; returns a callable
  that runs it once to completion (the first call compiles)."""
  layer = lm.sublayer_class(cfg, char)(cfg)
  seg = jnp.ones((b, t), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = jax.random.normal(jax.random.key(seed), (b, t, cfg.d_model), jnp.float32)
  params = nn.meta.unbox(jax.jit(lambda r, x_BTD: layer.init(
      r, x_BTD, positions_BT=pos[:, :8], segment_ids_BT=seg[:, :8]))(
          jax.random.key(seed), x[:, :8])['params'])  # one compile, not ~100

  @jax.jit
  def step(p, x_BTD):
    def loss(p, x_BTD):
      y_BTD = layer.apply({'params': p}, x_BTD, positions_BT=pos, segment_ids_BT=seg)[0]
      return jnp.sum(y_BTD * y_BTD)
    return jax.grad(loss, argnums=(0, 1))(p, x_BTD)

  return lambda: jax.block_until_ready(step(params, x))


def time_vs_length(lengths: list[int], b: int, heads: int, head_dim: int, state_dim: int,
                   chunk: int, repeats: int, chars=('G', 'M', 'A'), log=print) -> dict:
  """{char: [seconds at each length]} of forward + backward at d_model = heads x head_dim."""
  cfg = mamba_layer_config(heads, head_dim, state_dim, chunk)
  out = {c: [] for c in chars}
  for t in lengths:
    for c in chars:
      run = sublayer_step(c, cfg, b, t)
      run()  # compiles
      out[c].append(median_seconds(run, repeats))
      log(f'  {c} {t:6d}: {out[c][-1] * 1e3:9.1f} ms')
  return out


def crossover(lengths: list[int], mixer: list[float], attention: list[float]):
  """The length from which the mixer is faster than attention: log-linear interpolation of
  log(mixer / attention) between the last measured length where it is >= 0 and the next;
  None if it never gets faster, lengths[0] if it is faster throughout."""
  logs = [math.log(m / a) for m, a in zip(mixer, attention)]
  if logs[-1] >= 0:
    return None
  last_slower = max((i for i, v in enumerate(logs) if v >= 0), default=None)
  if last_slower is None:
    return float(lengths[0])
  i = last_slower
  x0, x1 = math.log(lengths[i]), math.log(lengths[i + 1])
  frac = logs[i] / (logs[i] - logs[i + 1])
  return math.exp(x0 + frac * (x1 - x0))


def format_lengths(lengths: list[int], seconds: dict, b: int, heads: int, head_dim: int,
                   state_dim: int) -> str:
  d = heads * head_dim
  lines = [f'one sublayer, forward + backward, float32, batch {b}, d_model {d}, {heads} heads of '
           f'{head_dim} (M: state {state_dim}; A: flash path, RoPE); ms (x attention):',
           f'{"length":>6s} ' + ' '.join(f'{c:>18s}' for c in seconds)]
  for i, t in enumerate(lengths):
    cells = [f'{seconds[c][i] * 1e3:9.1f}' + (f' ({seconds[c][i] / seconds["A"][i]:5.2f}x)'
                                              if c != 'A' and 'A' in seconds else ' ' * 9)
             for c in seconds]
    lines.append(f'{t:6d} ' + ' '.join(f'{x:>18s}' for x in cells))
  if 2048 in lengths:
    ref = lengths.index(2048)
    growth = {c: [s / seconds[c][ref] for s in seconds[c]] for c in seconds}
    lines.append(f'time(L) / time(2048) at L = {lengths[-1]}: ' + ', '.join(
        f'{c} {growth[c][-1]:.1f}' for c in seconds)
        + (f' (target for G and M at 16384: <= {TARGET_GROWTH})' if lengths[-1] == 16384 else ''))
  if 'A' in seconds:
    for c in seconds:
      if c == 'A':
        continue
      cross = crossover(lengths, seconds[c], seconds['A'])
      lines.append(f'{c} overtakes A: ' + (
          f'not up to {lengths[-1]}' if cross is None else
          f'already at {lengths[0]}' if cross == lengths[0] else f'at about {cross:,.0f} tokens'))
  return '\n'.join(lines)


def main(argv):
  del argv
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs')
  b, heads, hd, st, chunk, rep = (_BATCH.value, _HEADS.value, _HEAD_DIM.value, _STATE.value,
                                  _CHUNK.value, _REPEATS.value)
  if _PART.value in ('all', 'torch'):
    rows = compare_torch(b, _SEQ_LEN.value, heads, hd, st, chunk, rep, _RTOL.value)
    print(format_torch(rows, b, _SEQ_LEN.value, heads, hd, st, chunk, rep), flush=True)
  if _PART.value in ('all', 'length'):
    lengths = [int(x) for x in _LENGTHS.value if int(x) <= _MAX_LEN.value]
    if not set(_CHARS.value) <= {'G', 'M', 'A'}:
      raise app.UsageError(f'--chars={",".join(_CHARS.value)}: each must be G, M or A')
    seconds = time_vs_length(lengths, b, heads, hd, st, chunk, rep, chars=tuple(_CHARS.value))
    print(format_lengths(lengths, seconds, b, heads, hd, st))


if __name__ == '__main__':
  app.run(main)
