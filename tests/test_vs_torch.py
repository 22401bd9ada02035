"""experiments/benchmarks/vs_torch.py compares the same computation: its PyTorch decoder with
archlab's weights copied in gives archlab's logits, loss and optimizer trajectory.

Tiny models (d_model 32, 2 layers, seq 16, batch 2); skipped without torch. 35 s on 2 cores shared
with other jobs, 2 minutes at load average 10; most of it start-up and compilation.
"""

import functools
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from configs import transformer  # noqa: E402
from experiments.benchmarks import vs_torch  # noqa: E402
import models  # noqa: E402
from tests.conftest import tiny_model_config  # noqa: E402
from trainer import loop  # noqa: E402
from trainer import optim  # noqa: E402

TINY = dict(d_model=32, pattern='AFAF', num_heads=4, num_kv_heads=2, mlp_dim=64)


def random_params(cfg, seed=0):
  """archlab's parameter tree with weights large enough that logits are far from uniform:
  normal / sqrt(fan-in) matrices (embedding rows of unit scale), norm scales around 1."""
  model = models.build(cfg)
  dummy_BT = np.zeros((1, 8), np.int32)
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(  # only the shapes are used
      jax.random.key(seed), dummy_BT, positions_BT=dummy_BT, segment_ids_BT=dummy_BT + 1)[
          'params']))
  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat.items():
    shape = leaf.shape
    if path[-1] == 'scale':
      out[path] = 1.0 + 0.2 * rng.standard_normal(shape)
    elif path[-1] == 'embed':
      out[path] = rng.standard_normal(shape)
    else:
      layer_axes = 1 if path[0] == 'blocks' else 0
      fan_in = shape[layer_axes] * (shape[layer_axes + 1] if path[-1] == 'o' else 1)
      out[path] = rng.standard_normal(shape) / np.sqrt(fan_in)
  return model, flax.traverse_util.unflatten_dict(
      {k: np.asarray(v, np.float32) for k, v in out.items()})


@pytest.mark.parametrize('tie,scan,kv_heads', [(False, False, 2), (True, True, 1)])
def test_torch_decoder_logits_match_archlab(tie, scan, kv_heads):
  cfg = tiny_model_config(**{**TINY, "num_kv_heads": kv_heads}, tie_embeddings=tie, scan_layers=scan)
  model, params = random_params(cfg)
  rng = np.random.default_rng(1)
  tokens_BT = rng.integers(0, cfg.vocab_size, (2, 16))
  positions_BT = np.broadcast_to(np.arange(16), (2, 16))
  # Jitted: run op by op, the forward compiles some 100 primitives.
  logits_BTV, _, _ = jax.jit(lambda v, x, p, s: model.apply(
      v, x, positions_BT=p, segment_ids_BT=s))({'params': params}, tokens_BT, positions_BT,
                                               np.ones((2, 16), np.int32))
  torch_model = vs_torch.TorchDecoder(model.cfg)
  vs_torch.copy_params(torch_model, params, model.cfg)
  with torch.no_grad():
    got = torch_model.logits(torch.from_numpy(tokens_BT)).numpy()
  want = np.asarray(logits_BTV)
  assert want.std() > 1.0  # the check means something: logits far from uniform
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_unsupported_config_names_the_field():
  cfg = tiny_model_config(**TINY, norm='layernorm')
  with pytest.raises(ValueError, match=r'model\.norm=.layernorm.'):
    vs_torch.TorchDecoder(cfg)


def write_corpus(directory):
  directory.mkdir()
  for name in ('textwrap.py', 'shlex.py', 'glob.py', 'fnmatch.py', 'bisect.py', 'getopt.py'):
    source = os.path.join(os.path.dirname(os.__file__), name)
    (directory / (name + '.txt')).write_text(open(source).read())
  return str(directory / '*.txt')


def tiny_config(tmp_path, **optim_fields):
  config = transformer.get_config('preset=llama_small')
  config.model.update(TINY)
  config.data.corpus, config.data.paths = 'text', write_corpus(tmp_path / 'corpus')
  config.data.val_fraction, config.data.eval_batches = 0.3, 1
  config.data.seq_len, config.train.batch_size = 16, 2
  config.optim.warmup_steps = 0
  config.optim.update(optim_fields)
  return config


def test_training_steps_match_archlab(tmp_path):
  """Four steps of the trainer's jitted step and of the benchmark's torch step, same losses.

  A large learning rate and weight decay and a small clip norm make the decay mask, the
  schedule and the clipping visible in the loss.
  """
  config = tiny_config(tmp_path, lr=2e-2, weight_decay=2.0, grad_clip=0.3)
  run = loop.setup(config, workdir=None)
  batches = [vs_torch.one_document_rows(next(run.data.train_iter)) for _ in range(2)]
  _, schedule = optim.make_optimizer(config.optim, run.total_steps)
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    state = run.fns.init_state(jax.random.key(0))
    torch_model = vs_torch.TorchDecoder(run.model.cfg)
    vs_torch.copy_params(torch_model, state['params'], run.model.cfg)
    opt, sched = vs_torch.make_torch_optimizer(torch_model, config.optim, schedule, run.total_steps)
    want, got = [], []
    for i in range(4):
      state, metrics = run.train_step(state, loop.to_global(run, batches[i % 2]))
      want.append(float(metrics['loss']))
      batch = {k: torch.from_numpy(batches[i % 2][k].astype(np.int64)) for k in ('inputs', 'targets')}
      got.append(vs_torch.torch_step(torch_model, opt, sched, batch, config.optim.grad_clip))
  assert float(metrics['grad_norm']) > config.optim.grad_clip  # clipping was active
  assert abs(want[2] - want[0]) > 0.1  # the updates changed the loss
  assert vs_torch.relative(got[0], want[0]) < 1e-5, (got, want)
  for g, w in zip(got[1:], want[1:]):
    assert vs_torch.relative(g, w) < 1e-4, (got, want)


def test_benchmark_runs_and_reports(tmp_path, monkeypatch):
  """The benchmark's whole path at tiny size; torch.compile is made to fail (compiling takes
  minutes here), which the report must say instead of crashing."""
  def failing_compile(model, **kwargs):
    def call(*args, **kw):
      raise RuntimeError('inductor is unavailable in this test')
    return call
  monkeypatch.setattr(torch, 'compile', failing_compile)
  config = tiny_config(tmp_path)
  results = vs_torch.benchmark(config, [16], 64, repeats=1, steps=1, use_compile=True)
  assert [(r['seq_len'], r['batch_size']) for r in results['by_seq_len']] == [(16, 4)]
  for r in results['by_seq_len']:
    assert set(r['tokens_per_sec']) == {'archlab', 'torch eager'}
    assert all(v > 0 for v in r['tokens_per_sec'].values())
    assert r['ratio'] == pytest.approx(r['tokens_per_sec']['archlab'] / r['tokens_per_sec']['torch eager'])
    assert 'inductor is unavailable' in r['compile_error']
  report = vs_torch.format_report(results)
  assert 'torch.compile failed at seq 16' in report and 'target 1.25x' in report
  assert f'{results["by_seq_len"][0]["tokens_per_sec"]["archlab"]:,.0f}' in report


def test_parity_check_stops_on_a_mismatch():
  vs_torch.check_close('loss', 5.0, 5.0 + 4e-4, 1e-4)
  with pytest.raises(vs_torch.ParityError, match=r'loss: torch 5 vs archlab 5.0006 .* > 0.0001'):
    vs_torch.check_close('loss', 5.0, 5.0 + 6e-4, 1e-4)


@pytest.mark.parametrize('tie', [True, False])
def test_step_bound_lists_every_dense_matmul(tie):
  """The bound's matmuls plus the attention scores are the model's whole analytic forward count."""
  from experiments.benchmarks import step_bound
  from models import lm
  cfg = tiny_model_config(**{**TINY, 'mlp_dim': 48}, tie_embeddings=tie)
  seq_len, tokens = 16, 64
  dense = sum(2 * m * k * n * count for _, m, k, n, count in step_bound.dense_matmuls(cfg, tokens))
  scores = cfg.pattern.count('A') * 4 * seq_len * cfg.num_heads * vs_torch.head_dim(cfg)
  assert dense / tokens + scores == pytest.approx(lm.flops_per_token(cfg, seq_len), rel=1e-9)


def test_step_bound_runs_and_reports():
  from experiments.benchmarks import step_bound
  cfg = tiny_model_config(**TINY, **{'attention.causal_block': 8})
  result = step_bound.bound(cfg, seq_len=16, batch_tokens=32, repeats=1)
  assert set(result['attention_seconds']) == {'archlab flash', 'archlab xla', 'torch sdpa'}
  pieces = result['dense_seconds'] + result['attention_layers_seconds']
  assert pieces > 0 and result['bound_tokens_per_sec'] == pytest.approx(32 / pieces)
  report = step_bound.format_report([result], {16: result['bound_tokens_per_sec'] / 2})
  assert 'at most 2.00x torch.compile' in report and 'weight grad' in report


def test_mixers_benchmark_runs_and_reports():
  """experiments/benchmarks/mixers.py at its smallest: each torch pair agrees (compare_torch
  raises otherwise) and is timed; G, M and A are timed at one length (the crossover arithmetic is tested below); both reports
  print."""
  from experiments.benchmarks import mixers
  rows = mixers.compare_torch(1, 40, 2, 8, 8, 16, repeats=1, rtol=1e-4)
  assert [(r['name'], r['checked']) for r in rows] == [('G core', 6), ('M core', 7),
                                                       ('M layer', 10)]
  for r in rows:
    assert r['archlab'] > 0 and r['transformers'] > 0 and r['max_error'] <= 1e-4
    assert r['ratio'] == pytest.approx(r['archlab'] / r['transformers'])
  text = mixers.format_torch(rows, 1, 40, 2, 8, 8, 16, 1)
  assert 'batch 1 x 40, 2 heads of 8, state 8' in text and f'{rows[2]["ratio"]:.2f}x' in text
  seconds = mixers.time_vs_length([16], 1, 2, 8, 8, 16, repeats=1, log=lambda *_: None)
  assert set(seconds) == {'G', 'M', 'A'} and all(len(v) == 1 and min(v) > 0
                                                 for v in seconds.values())
  text = mixers.format_lengths([16], seconds, 1, 2, 8, 8)
  assert 'G overtakes A: ' in text and 'M overtakes A: ' in text and 'd_model 16' in text


def test_mixers_crossover_and_mismatch():
  from experiments.benchmarks import mixers
  lengths = [512, 1024, 2048]
  # mixer / attention = 4, 2, 0.5: log ratio crosses 0 halfway (in log length) to 2048.
  assert mixers.crossover(lengths, [4.0, 2.0, 1.0], [1.0, 1.0, 2.0]) == pytest.approx(
      1024 * 2 ** 0.5)
  assert mixers.crossover(lengths, [1.0, 1.0, 1.0], [2.0, 3.0, 4.0]) == 512
  assert mixers.crossover(lengths, [2.0, 2.0, 1.0], [1.0, 1.0, 1.0]) is None
  mixers.check_close('o', np.ones(3), np.ones(3) + 5e-5, 1e-4)
  with pytest.raises(mixers.MismatchError, match=r'G core dq: max \|difference\| 2.00e-04'):
    mixers.check_close('G core dq', np.ones(3), np.ones(3) + 2e-4, 1e-4)


def test_decode_benchmark_mixer_rows_keep_a_constant_cache():
  """The decode benchmark's rows: G's and M's caches are the same size at any context,
  attention's grows with it."""
  from experiments.benchmarks import decode
  from models import lm
  sizes = {}
  for name, cfg in decode.stacks().items():
    cfg = models.build(cfg).cfg
    # Shapes only: allocating the caches runs init_cache op by op (some 60 compiles).
    caches = [jax.eval_shape(functools.partial(lm.init_cache, cfg, 1, n)) for n in (1024, 32768)]
    sizes[name.split()[0]] = [sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(c))
                              for c in caches]
  assert set(sizes) == {'A', 'W', 'MLA', 'S', 'B', 'G', 'M'}
  assert sizes['G'][0] == sizes['G'][1] > 0 and sizes['M'][0] == sizes['M'][1] > 0
  assert sizes['A'][1] > 20 * sizes['A'][0]
  # DSA keeps MLA's latent cache plus one indexer key per token; MoBA keeps A's whole cache
  # and a float32 key sum per block of 512 (A's key cache is float32 here: 1/512 of it).
  assert sizes['MLA'][1] < sizes['S'][1] < 2 * sizes['MLA'][1]
  assert all(0 < b - a < a / 512 for a, b in zip(sizes['A'], sizes['B'])), sizes
  assert list(decode.stacks(['G', 'M'])) == ['G (6 heads, 64 x 64)', 'M (12 heads, state 128)']
