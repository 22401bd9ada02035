"""archlab against PyTorch: training tokens/s of the same model, weights and optimizer, side by side.

  python -m experiments.benchmarks.vs_torch --seq_lens=512,2048 --batch_tokens=4096 --repeats=5

Builds the preset (default llama_small) with the trainer (`trainer.loop.setup`: the jitted,
donating step users get) and the same decoder written here in plain PyTorch, copies archlab's
initial parameters into it, and checks that both give the same loss on the first batch
(relative 1e-4, float32) and after one AdamW step (relative `--update_rtol`); a mismatch stops
the run. Then it times training steps (forward, backward, global-norm clipping, AdamW with
the preset's hyperparameters and schedule) of archlab, torch eager and `torch.compile`,
`--steps` steps each in rotation, `--repeats` times, and prints the median tokens/s and
archlab / max(torch eager, torch.compile). Target (the performance issue): >= 1.25x.

Every row is one document (positions 0..T-1, one segment, every target weighted) so
archlab's masked attention and torch's `is_causal` attention compute the same function.
The optimizer's warmup is set to 0 so the first update moves the weights (lr > 0 at step 0)
and the update check compares something; the learning rate does not change the step's cost.

Measured on this project's 2-core AMD EPYC machine, idle, 2026-11-30, defaults (llama_small,
attention.impl=auto, i.e. flash; 4,096 tokens per step; 5 rotations of 2 steps): seq 512 x 8
archlab 1,709 tokens/s, torch eager 1,940, torch.compile 2,141 -> 0.80x; seq 2048 x 2 archlab
1,356, eager 1,560, compile 1,639 -> 0.83x (not met; step_bound.py shows why: with these
matmul and attention kernels no step could exceed 1.03x / 1.18x). Under load
from other jobs the ratios rise (1.55x / 1.02x once): torch slows down more than archlab on a
busy machine, so only idle runs count. The whole run takes about 4 minutes idle.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import flax
import flax.linen as nn
import jax
import numpy as np
import torch
import torch.nn.functional as F

from configs import common
from configs import transformer
from experiments.benchmarks import shared_flag
from models import lm
from trainer import flops as flops_lib
from trainer import loop
from trainer import optim

_PRESET = flags.DEFINE_string('preset', 'llama_small', 'Preset of configs/transformer.py.')
_SEQ_LENS = flags.DEFINE_list('seq_lens', ['512', '2048'], 'Sequence lengths to time.')
_BATCH_TOKENS = flags.DEFINE_integer('batch_tokens', 4096, 'Tokens per step (rows = this / seq).')
_REPEATS = shared_flag('repeats', lambda: flags.DEFINE_integer(
    'repeats', 5, 'Rotations of the three systems after warm-up.'))
# experiments.sample has a --steps of its own (diffusion steps) and tests import both.
_STEPS = shared_flag('steps', lambda: flags.DEFINE_integer(
    'steps', 2, 'Timed training steps per system per rotation.'))
_COMPILE = flags.DEFINE_bool('compile', True, 'Also time torch.compile (mode default).')
_UPDATE_RTOL = flags.DEFINE_float('update_rtol', 1e-3, 'Relative tolerance, loss after one step.')
_JSON = flags.DEFINE_string('json', '', 'Also write the results to this JSON file.')
_OVERRIDES = flags.DEFINE_multi_string('set', [], 'Config overrides FIELD=VALUE, e.g. model.d_model=256.')

TARGET = 1.25          # archlab / max(torch eager, torch.compile), the performance issue's
LOSS_RTOL = 1e-4       # forward loss at the copied initial weights, float32
SYSTEMS = ('archlab', 'torch eager', 'torch.compile')


class ParityError(RuntimeError):
  """archlab and the torch model disagree: the timings would compare different computations."""


# -- The model in plain PyTorch -------------------------------------------------------------

def check_supported(cfg) -> None:
  """The torch model below is a Llama-style decoder; other configs fail with the field named."""
  unit, _ = lm.split_pattern(cfg.pattern)
  wanted = {
      'pattern': (set(cfg.pattern) <= set('AF'), "only 'A' and 'F' sublayers"),
      'position': (cfg.position in ('rope', 'none'), "'rope' or 'none'"),
      'norm': (cfg.norm == 'rmsnorm', "'rmsnorm'"),
      'norm_placement': (cfg.norm_placement == 'pre', "'pre'"),
      'norm_zero_centred': (not cfg.norm_zero_centred, 'False'),
      'mlp_activation': (cfg.mlp_activation == 'swiglu', "'swiglu'"),
      'use_bias': (not (cfg.use_bias or cfg.mlp_bias), 'False (and mlp_bias False)'),
      'rope_fraction': (cfg.rope_fraction == 1.0, '1.0'),
      'rope_interleaved': (not cfg.rope_interleaved, 'False'),
      'rope_scaling.kind': (cfg.rope_scaling.kind == 'none', "'none'"),
      'embed_scale': (cfg.embed_scale == 1.0, '1.0'),
      'logit_softcap': (cfg.logit_softcap == 0.0, '0'),
      'bidirectional': (not cfg.bidirectional, 'False'),
      'dtype': (cfg.dtype == cfg.param_dtype == 'float32', "'float32' (and param_dtype)"),
      'attention.kind': (cfg.attention.kind == 'mha', "'mha'"),
      'attention.qk_norm': (cfg.attention.qk_norm == 'none', "'none'"),
      'attention.output_gate': (cfg.attention.output_gate == 'none', "'none'"),
      'attention.sinks': (not cfg.attention.sinks, 'False'),
      'attention.window': (cfg.attention.window == 0 or 'W' not in unit, '0'),
      'attention.qkv_bias': (not (cfg.attention.qkv_bias or cfg.attention.o_bias), 'False'),
      'attention.softmax_scale': (cfg.attention.softmax_scale in (0.0, head_dim(cfg) ** -0.5),
                                  '0 (1/sqrt(head_dim))'),
  }
  for field, (ok, allowed) in wanted.items():
    if not ok:
      raise ValueError(f'model.{field}={common.get_field(cfg, field)!r}: the torch model of '
                       f'vs_torch.py supports only {allowed}')


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.d_model // cfg.num_heads


def rope_cos_sin(seq_len: int, dim: int, theta: float):
  """cos and sin (T, dim) for rotate-half RoPE, float32, as Llama / transformers compute them."""
  inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
  angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
  angles = torch.cat([angles, angles], dim=-1)
  return angles.cos(), angles.sin()


def rotate_half(x):
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([-x2, x1], dim=-1)


class TorchAttention(torch.nn.Module):
  """GQA with RoPE and causal `F.scaled_dot_product_attention` (query head i reads kv head i // G)."""

  def __init__(self, d, n, k, h, rope: bool):
    super().__init__()
    self.n, self.k, self.h, self.rope = n, k, h, rope
    self.q = torch.nn.Linear(d, n * h, bias=False)
    self.k_proj = torch.nn.Linear(d, k * h, bias=False)
    self.v = torch.nn.Linear(d, k * h, bias=False)
    self.o = torch.nn.Linear(n * h, d, bias=False)

  def forward(self, x, cos, sin):
    b, t, _ = x.shape
    q = self.q(x).view(b, t, self.n, self.h).transpose(1, 2)
    k = self.k_proj(x).view(b, t, self.k, self.h).transpose(1, 2)
    v = self.v(x).view(b, t, self.k, self.h).transpose(1, 2)
    if self.rope:
      q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n != self.k)
    return self.o(y.transpose(1, 2).reshape(b, t, self.n * self.h))


class TorchSwiGLU(torch.nn.Module):
  def __init__(self, d, f):
    super().__init__()
    self.wi = torch.nn.Linear(d, f, bias=False)
    self.wu = torch.nn.Linear(d, f, bias=False)
    self.wo = torch.nn.Linear(f, d, bias=False)

  def forward(self, x, cos=None, sin=None):
    return self.wo(F.silu(self.wi(x)) * self.wu(x))


class TorchDecoder(torch.nn.Module):
  """Embedding, pre-norm residual sublayers in pattern order, final RMSNorm, head; mean CE loss."""

  def __init__(self, cfg):
    super().__init__()
    check_supported(cfg)
    d, h = cfg.d_model, head_dim(cfg)
    self.pattern, self.tie, self.theta, self.h = cfg.pattern, cfg.tie_embeddings, cfg.rope_theta, h
    self.rope = cfg.position == 'rope'
    self.embed = torch.nn.Embedding(cfg.vocab_size, d)
    self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(d, eps=cfg.norm_eps) for _ in cfg.pattern)
    self.ops = torch.nn.ModuleList(
        TorchAttention(d, cfg.num_heads, cfg.num_kv_heads, h, self.rope) if c == 'A'
        else TorchSwiGLU(d, cfg.mlp_dim) for c in cfg.pattern)
    self.final_norm = torch.nn.RMSNorm(d, eps=cfg.norm_eps)
    self.head = None if self.tie else torch.nn.Linear(d, cfg.vocab_size, bias=False)

  def logits(self, inputs):
    x = self.embed(inputs)
    cos, sin = rope_cos_sin(inputs.shape[1], self.h, self.theta) if self.rope else (None, None)
    for norm, op in zip(self.norms, self.ops):
      x = x + op(norm(x), cos, sin)
    x = self.final_norm(x)
    return F.linear(x, self.embed.weight) if self.tie else self.head(x)

  def forward(self, inputs, targets):
    return F.cross_entropy(self.logits(inputs).flatten(0, 1), targets.flatten())


def copy_params(torch_model: TorchDecoder, params, cfg) -> None:
  """Copies archlab's parameter tree into the torch model.

  archlab stores projections as (in, out) with heads split ((D, N, H), o as (N, H, D)) and
  per-layer parameters under `block_r/{i}{char}` (or stacked on axis 0 under `blocks` when
  scanned); nn.Linear's weight is (out, in).
  """
  flat = flax.traverse_util.flatten_dict(jax.device_get(nn.meta.unbox(params)))
  unit, _ = lm.split_pattern(cfg.pattern)
  scanned = any(path[0] == 'blocks' for path in flat)

  def get(*path):
    return np.asarray(flat[path])

  def sub(j, *rest):  # pattern index j -> its parameter
    r, i = divmod(j, len(unit))
    name = f'{i}{unit[i]}'
    return get('blocks', name, *rest)[r] if scanned else get(f'block_{r}', name, *rest)

  def put(dst, value):
    assert dst.shape == value.shape, (dst.shape, value.shape)
    dst.copy_(torch.from_numpy(np.array(value, np.float32)))

  with torch.no_grad():
    put(torch_model.embed.weight, get('embed'))
    if not cfg.tie_embeddings:
      put(torch_model.head.weight, get('head').T)
    put(torch_model.final_norm.weight, get('final_norm', 'scale'))
    for j, (norm, op) in enumerate(zip(torch_model.norms, torch_model.ops)):
      put(norm.weight, sub(j, 'norm', 'scale'))
      if cfg.pattern[j] == 'A':
        for name, linear in (('q', op.q), ('k', op.k_proj), ('v', op.v)):
          w_DNH = sub(j, 'op', name)
          put(linear.weight, w_DNH.reshape(w_DNH.shape[0], -1).T)
        w_NHD = sub(j, 'op', 'o')
        put(op.o.weight, w_NHD.reshape(-1, w_NHD.shape[-1]).T)
      else:
        for name in ('wi', 'wu', 'wo'):
          put(getattr(op, name).weight, sub(j, 'op', name).T)


def make_torch_optimizer(torch_model: TorchDecoder, optim_config, schedule, total_steps: int):
  """AdamW as trainer/optim.py builds it: decay on the sublayers' matrices only (not the
  embedding, head or norm scales), the same schedule, fused when this torch has it."""
  o = optim_config
  decay = [p for name, p in torch_model.named_parameters()
           if p.ndim == 2 and name.startswith('ops.')]
  no_decay = [p for name, p in torch_model.named_parameters()
              if not (p.ndim == 2 and name.startswith('ops.'))]
  groups = [{'params': decay, 'weight_decay': o.weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]
  kwargs = dict(lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  try:
    opt = torch.optim.AdamW(groups, fused=True, **kwargs)
  except (RuntimeError, ValueError):
    opt = torch.optim.AdamW(groups, foreach=True, **kwargs)
  factors = np.asarray(jax.vmap(schedule)(np.arange(total_steps))) / o.lr
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(factors[min(s, total_steps - 1)]))
  return opt, sched


def torch_step(model, opt, sched, batch, grad_clip: float) -> float:
  """One training step: forward, backward, global-norm clip, AdamW, schedule; returns the loss."""
  loss = model(batch['inputs'], batch['targets'])
  loss.backward()
  if grad_clip:
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
  opt.step()
  sched.step()
  opt.zero_grad(set_to_none=True)
  return float(loss.detach())


# -- The benchmark --------------------------------------------------------------------------

def machine() -> dict:
  cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
              if line.startswith('model name')), platform.processor())
  return {'cores': len(os.sched_getaffinity(0)), 'cpu': cpu, 'python': platform.python_version(),
          'jax': jax.__version__, 'jax_backend': jax.default_backend(), 'flax': flax.__version__,
          'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
          'loadavg_1min': os.getloadavg()[0]}


def one_document_rows(batch: dict) -> dict:
  """The batch's tokens as whole documents: positions 0..T-1, one segment, all weighted."""
  b, t = batch['inputs'].shape
  return {'inputs': batch['inputs'], 'targets': batch['targets'],
          'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          'segment_ids': np.ones((b, t), np.int32), 'weights': np.ones((b, t), np.float32)}


def relative(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-12)


def check_close(what: str, got: float, want: float, rtol: float) -> None:
  if not relative(got, want) <= rtol:
    raise ParityError(f'{what}: torch {got:.7g} vs archlab {want:.7g} (relative '
                      f'{relative(got, want):.2g} > {rtol:g}); the models differ, not timing them')


def measure_seq_len(config, *, repeats: int, steps: int, use_compile: bool,
                    update_rtol: float) -> dict:
  """Parity checks, warm-up and alternating timed steps at `config.data.seq_len`."""
  run = loop.setup(config, workdir=None)
  cfg, t = run.model.cfg, config.train
  batches_np = [one_document_rows(next(run.data.train_iter)) for _ in range(2)]
  batches_torch = [{k: torch.from_numpy(np.asarray(b[k], np.int64)) for k in ('inputs', 'targets')}
                   for b in batches_np]
  _, schedule = optim.make_optimizer(config.optim, run.total_steps)
  grad_clip = config.optim.grad_clip

  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    batches_jax = [loop.to_global(run, b) for b in batches_np]
    state = run.fns.init_state(jax.random.key(t.seed))

    def make_torch():
      model = TorchDecoder(cfg)
      copy_params(model, state['params'], cfg)
      return (model, *make_torch_optimizer(model, config.optim, schedule, run.total_steps))

    torch_models = {'torch eager': make_torch()}
    if use_compile:
      model, opt, sched = make_torch()
      torch_models['torch.compile'] = (torch.compile(model), opt, sched)

    # Parity: archlab's first step reports the loss at the initial weights, its second the
    # loss after one update, both on the first batch.
    state, metrics = run.train_step(state, batches_jax[0])
    loss_init = float(metrics['loss'])
    state, metrics = run.train_step(state, batches_jax[0])
    loss_updated = float(metrics['loss'])
    parity = {'archlab_loss_init': loss_init, 'archlab_loss_after_step': loss_updated}
    compile_error = None
    for name, (model, opt, sched) in list(torch_models.items()):
      start = time.perf_counter()
      try:
        got_init = torch_step(model, opt, sched, batches_torch[0], grad_clip)
        with torch.no_grad():
          got_updated = float(model(**batches_torch[0]))
      except Exception as e:  # noqa: BLE001  (torch.compile can fail in many ways)
        if name != 'torch.compile':
          raise
        compile_error = f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'
        del torch_models[name]
        continue
      check_close(f'{name} loss at the initial weights', got_init, loss_init, LOSS_RTOL)
      check_close(f'{name} loss after one AdamW step', got_updated, loss_updated, update_rtol)
      parity[f'{name}_loss_init'] = got_init
      parity[f'{name}_loss_after_step'] = got_updated
      parity[f'{name}_first_step_sec'] = time.perf_counter() - start
      logging.info('seq %d: %s matches archlab (first step %.1f s)', config.data.seq_len, name,
                   parity[f'{name}_first_step_sec'])
    if compile_error:
      logging.warning('seq %d: torch.compile failed: %s', config.data.seq_len, compile_error)

    systems = {'archlab': None, **torch_models}

    def timed(name: str) -> float:
      """tokens/s of `steps` training steps of one system."""
      start = time.perf_counter()
      nonlocal state
      for i in range(steps):
        if name == 'archlab':
          state, metrics = run.train_step(state, batches_jax[i % 2])
        else:
          torch_step(*systems[name], batches_torch[i % 2], grad_clip)
      if name == 'archlab':
        jax.block_until_ready((state, metrics))
      return steps * run.tokens_per_step / (time.perf_counter() - start)

    for name in systems:  # warm-up on the second batch too
      timed(name)
    samples = {name: [] for name in systems}
    for i in range(repeats):
      for name in systems:
        samples[name].append(timed(name))
      logging.info('seq %d, rotation %d/%d: %s', config.data.seq_len, i + 1, repeats,
                   ', '.join(f'{k} {v[-1]:,.0f}' for k, v in samples.items()))

  tokens_per_sec = {name: statistics.median(v) for name, v in samples.items()}
  best_torch = max(v for k, v in tokens_per_sec.items() if k != 'archlab')
  ratio = tokens_per_sec['archlab'] / best_torch
  return {'seq_len': config.data.seq_len, 'batch_size': t.batch_size,
          'tokens_per_step': run.tokens_per_step, 'train_flops_per_step': run.train_flops_per_step,
          'tokens_per_sec': tokens_per_sec, 'samples': samples, 'ratio': ratio,
          'target_met': ratio >= TARGET, 'compile_error': compile_error, 'parity': parity,
          'params': flops_lib.count_params(jax.device_get(state['params']))['params']}


def benchmark(config, seq_lens, batch_tokens: int, *, repeats: int, steps: int,
              use_compile: bool = True, update_rtol: float = 1e-3) -> dict:
  """Runs `measure_seq_len` for each sequence length with `batch_tokens` tokens per step."""
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  config.optim.warmup_steps = 0
  results = {'machine': machine(), 'model': config.model.to_dict(), 'repeats': repeats,
             'steps_per_repeat': steps, 'target': TARGET, 'by_seq_len': []}
  peaks = [flops_lib.measure_matmul_peak()]
  for seq_len in seq_lens:
    if seq_len <= 0 or batch_tokens % seq_len:
      raise ValueError(f'--batch_tokens={batch_tokens} is not a positive multiple of '
                       f'sequence length {seq_len} (--seq_lens)')
    c = config.copy_and_resolve_references()
    c.data.seq_len, c.train.batch_size = seq_len, batch_tokens // seq_len
    c.model.max_len = max(c.model.max_len, seq_len)
    results['by_seq_len'].append(measure_seq_len(c, repeats=repeats, steps=steps,
                                                 use_compile=use_compile, update_rtol=update_rtol))
  peaks.append(flops_lib.measure_matmul_peak())
  results['matmul_peak_flops'] = max(peaks)
  return results


def format_report(results: dict, command: str = '') -> str:
  m = results['machine']
  first = results['by_seq_len'][0]
  lines = [
      f'machine: {m["cores"]} cores, {m["cpu"]}, load average {m["loadavg_1min"]:.1f} at start; '
      f'python {m["python"]}, jax {m["jax"]} ({m["jax_backend"]}), flax {m["flax"]}, '
      f'torch {m["torch"]} ({m["torch_threads"]} threads)',
      f'model: {first["params"]:,} parameters, float32; {first["tokens_per_step"]:,} tokens per '
      f'step; median over {results["repeats"]} rotations of {results["steps_per_repeat"]} '
      f'steps each; fp32 matmul peak {results["matmul_peak_flops"] / 1e9:.1f} GFLOP/s',
  ]
  if command:
    lines.append(f'command: {command}')
  for r in results['by_seq_len']:
    p = r['parity']
    lines.append(f'parity at seq {r["seq_len"]}: loss at init archlab {p["archlab_loss_init"]:.6f}, '
                 + ', '.join(f'{s} {p[s + "_loss_init"]:.6f}' for s in SYSTEMS[1:] if s + '_loss_init' in p)
                 + f'; after one AdamW step archlab {p["archlab_loss_after_step"]:.6f}, '
                 + ', '.join(f'{s} {p[s + "_loss_after_step"]:.6f}' for s in SYSTEMS[1:]
                             if s + '_loss_after_step' in p))
  header = (f'{"seq x batch":<13}{"archlab tok/s":>15}{"torch eager":>13}{"torch.compile":>15}'
            f'{"archlab MFU":>13}{"ratio":>8}  target {TARGET}x')
  lines += ['', header]
  for r in results['by_seq_len']:
    tps = r['tokens_per_sec']
    compiled = f'{tps["torch.compile"]:,.0f}' if 'torch.compile' in tps else 'failed' if r['compile_error'] else 'skipped'
    mfu = tps['archlab'] * r['train_flops_per_step'] / r['tokens_per_step'] / results['matmul_peak_flops']
    shape = f'{r["seq_len"]} x {r["batch_size"]}'
    lines.append(f'{shape:<13}{tps["archlab"]:>15,.0f}'
                 f'{tps["torch eager"]:>13,.0f}{compiled:>15}{100 * mfu:>12.1f}%{r["ratio"]:>7.2f}x  '
                 f'{"met" if r["target_met"] else "not met"}')
  for r in results['by_seq_len']:
    if r['compile_error']:
      lines.append(f'torch.compile failed at seq {r["seq_len"]}: {r["compile_error"]}')
  lines.append('ratio = archlab tokens/s / max(torch eager, torch.compile); MFU uses analytic '
               'training FLOPs (3x forward, full attention scores) over the measured matmul peak')
  return '\n'.join(lines)


def main(argv):
  del argv
  config = transformer.get_config(f'preset={_PRESET.value}')
  for item in _OVERRIDES.value:
    field, _, value = item.partition('=')
    old = common.get_field(config, field)
    common.set_field(config, field, value == 'True' if isinstance(old, bool) else type(old)(value))
  try:
    results = benchmark(config, [int(s) for s in _SEQ_LENS.value], _BATCH_TOKENS.value,
                        repeats=_REPEATS.value, steps=_STEPS.value, use_compile=_COMPILE.value,
                        update_rtol=_UPDATE_RTOL.value)
  except ParityError as e:
    raise SystemExit(f'vs_torch: {e}') from None
  print(format_report(results))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=2, default=str)


if __name__ == '__main__':
  app.run(main)
