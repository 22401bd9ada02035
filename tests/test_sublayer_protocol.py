"""The sublayer and objective interfaces, from outside: a sublayer and an objective that only
this file defines are registered, trained by the shared loop, decoded, counted and sharded,
with no other file of archlab knowing they exist.

`RunningMean` (pattern character 'R') is a causal mixer with a constant-size cache: each
position's output is W_o applied to the mean of W_v x over its document so far. Its config
section is `model.running_mean` (`width`, 0: d_model). `LabelSmoothed` is an objective that
builds its own metrics.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import models
from configs import common
from configs import transformer
from models import lm
from models import objectives
from models import schema
from models import sublayer
from models.layers import common as layers_common
from tests import sharding_worker
from tests.conftest import packed_batch
from trainer import checkpoint
from trainer import flops
from trainer import loop

CHAR = 'R'


class RunningMean(sublayer.Sublayer):
  """y_t = W_o mean(W_v x_s : s <= t in t's document): causal, and a constant-size cache (the
  running sum and count of the current document) for decoding."""
  DEFAULTS = dict(running_mean=dict(width=0))  # 0: model.d_model
  BIDIRECTIONAL = False

  @classmethod
  def width(cls, cfg) -> int:
    return cfg.running_mean.width or cfg.d_model

  @classmethod
  def validate(cls, cfg):
    if cfg.running_mean.width < 0:
      raise ValueError(f'model.running_mean.width={cfg.running_mean.width} must be >= 0')

  @classmethod
  def flops_per_token(cls, cfg, seq_len):
    del seq_len
    return 4.0 * cfg.d_model * cls.width(cfg)  # two projections

  @classmethod
  def init_cache(cls, cfg, batch, max_len):
    del max_len  # constant size
    return {'sum_BF': jnp.zeros((batch, cls.width(cfg)), jnp.float32),
            'count_B': jnp.zeros((batch,), jnp.float32)}

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, cache=None):
    del segment_ids_BT  # documents restart their positions at 0
    d, f = self.cfg.d_model, self.width(self.cfg)
    w_v = self.param('v', layers_common.normal_init(0.02, ('embed', 'mlp')), (d, f))
    w_o = self.param('o', layers_common.normal_init(0.02, ('mlp', 'embed')), (f, d))
    v_BTF = layers_common.project(x_BTD, w_v).astype(jnp.float32)
    b, t = positions_BT.shape
    index_T = jnp.arange(t)
    start_BT = index_T - positions_BT  # where this position's document starts in the chunk
    inside_BT = start_BT >= 0          # else it began before the chunk (in the cache)
    cum_BTF = jnp.cumsum(v_BTF, axis=1)
    before_BTF = jnp.take_along_axis(cum_BTF, jnp.maximum(start_BT - 1, 0)[..., None], axis=1)
    before_BTF = jnp.where((start_BT >= 1)[..., None], before_BTF, 0.0)
    prev_sum_BF = jnp.zeros((b, f)) if cache is None else cache['sum_BF']
    prev_count_B = jnp.zeros((b,)) if cache is None else cache['count_B']
    sum_BTF = cum_BTF - before_BTF + jnp.where(inside_BT[..., None], 0.0, prev_sum_BF[:, None])
    count_BT = jnp.where(inside_BT, positions_BT + 1, index_T + 1 + prev_count_B[:, None])
    mean_BTF = sum_BTF / count_BT[..., None].astype(jnp.float32)
    y_BTD = layers_common.project(mean_BTF.astype(x_BTD.dtype), w_o)
    if cache is not None:
      cache = {'sum_BF': sum_BTF[:, -1], 'count_B': count_BT[:, -1].astype(jnp.float32)}
    return y_BTD, {'running_mean/count': jnp.mean(count_BT.astype(jnp.float32))}, cache


class LabelSmoothed(objectives.Objective):
  """Next-token cross-entropy against targets smoothed towards uniform by `smoothing`; its
  own metrics dict (no MoE entries, no collections: those are the base's job)."""
  DEFAULTS = dict(smoothing=0.1)

  def loss(self, forward, batch, rng, *, train):
    del rng, train
    logits_BTV = forward(batch['inputs'], positions_BT=batch['positions'],
                         segment_ids_BT=batch['segment_ids'])
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
    w_BT = batch['weights']
    nll_BT = -jnp.take_along_axis(logp_BTV, batch['targets'][..., None], -1)[..., 0]
    smooth_BT = -jnp.mean(logp_BTV, -1)
    eps = self.cfg.smoothing
    loss = jnp.sum(((1 - eps) * nll_BT + eps * smooth_BT) * w_BT) / jnp.maximum(jnp.sum(w_BT), 1)
    return loss, {'nll_sum': jnp.sum(nll_BT * w_BT), 'weight_sum': jnp.sum(w_BT),
                  'bytes_sum': jnp.sum(self.tokens.bytes_V[batch['targets']] * w_BT)}


def register():
  """Registers 'R' and the objective; returns a family of 'R' for tests/sharding_worker.py."""
  models.register_sublayer(CHAR)(RunningMean)
  objectives.register('label_smoothed')(LabelSmoothed)
  return {'running_mean': ('llama_tiny', {'model.pattern': 'RFRF',
                                          'model.running_mean.width': 48})}


@pytest.fixture(scope='module', autouse=True)
def registered():
  register()
  yield
  del models.SUBLAYERS[CHAR]
  del objectives.OBJECTIVES['label_smoothed']


def tiny_config(pattern='RFRF', **fields):
  config = transformer.get_config('preset=llama_tiny,runlocal')
  config.model.pattern = pattern
  config.model.running_mean.width = 48
  for key, value in fields.items():
    common.set_field(config, key, value)
  return config


def test_the_schema_gains_its_section_and_nothing_else_tests_its_character():
  config = tiny_config()
  assert config.model.running_mean.width == 48
  assert 'objective' in config and config.objective.smoothing == 0.1
  # Its fields are unused by other patterns, so a llama checkpoint compares equal either way.
  llama = transformer.get_config('preset=llama_tiny').model
  other = ml_collections.ConfigDict(llama.to_dict())
  other.running_mean.width = 7
  assert schema.diff(llama, other) == []
  assert [d[0] for d in schema.diff(config.model, tiny_config(**{'model.running_mean.width': 7}).model)] == [
      'running_mean.width']
  with pytest.raises(ValueError, match=r'model.running_mean.width=-1 must be >= 0'):
    models.build(tiny_config(**{'model.running_mean.width': -1, 'model.vocab_size': 260}).model)
  with pytest.raises(ValueError, match=r"has 'R' \(RunningMean\), which is causal only"):
    models.build(tiny_config(**{'model.bidirectional': True, 'model.vocab_size': 260}).model)


def test_the_registry_refuses_what_is_not_a_sublayer():
  with pytest.raises(ValueError, match="'R' is already taken"):
    models.register_sublayer(CHAR)(type('Other', (sublayer.Sublayer,), {}))
  with pytest.raises(ValueError, match='does not derive from models.sublayer.Sublayer'):
    models.register_sublayer('Q')(type('Plain', (nn.Module,), {}))
  with pytest.raises(ValueError, match='must define flops_per_token'):
    models.register_sublayer('Q')(type('NoFlops', (sublayer.Sublayer,), {}))
  assert 'Q' not in models.SUBLAYERS


def test_prefill_then_decode_equals_the_full_forward_and_packing_resets():
  config = tiny_config(**{'model.vocab_size': 260})
  model = models.build(config.model)
  b, t = 2, 12
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(3), b, t, 260, num_segments=2)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens_BT, positions_BT=pos_BT,
                                    segment_ids_BT=seg_BT))['params']
  apply = jax.jit(lambda x, p, s, c: model.apply({'params': params}, x, positions_BT=p,
                                                 segment_ids_BT=s, cache=c))
  full_BTV, aux, none = apply(tokens_BT, pos_BT, seg_BT, None)
  assert none is None and float(aux['running_mean/count']) > 1
  cache = lm.init_cache(model.cfg, b, t)
  assert cache['block_0']['0R']['sum_BF'].shape == (b, 48)  # constant size: no length axis
  for k in (0, 3):  # prefill k tokens (none at all too), then one token a step
    outs, c = [], cache
    if k:
      out_BTV, _, c = apply(tokens_BT[:, :k], pos_BT[:, :k], seg_BT[:, :k], c)
      outs.append(out_BTV)
    for i in range(k, t):
      out_BTV, _, c = apply(tokens_BT[:, i:i + 1], pos_BT[:, i:i + 1], seg_BT[:, i:i + 1], c)
      outs.append(out_BTV)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full_BTV, atol=1e-5, rtol=1e-5)
  # The second document of each row computes what it computes alone.
  cols = np.nonzero(np.asarray(seg_BT[0]) == 2)[0]
  alone_BTV, _, _ = apply(tokens_BT[:, cols], pos_BT[:, cols], jnp.ones_like(seg_BT[:, cols]), None)
  np.testing.assert_allclose(full_BTV[:, cols], alone_BTV, atol=1e-5)


def test_its_flops_are_counted_and_agree_with_xla():
  config = tiny_config(**{'model.vocab_size': 260, 'model.scan_layers': False})
  model = models.build(config.model)
  seq = 16
  analytic = lm.flops_per_token(model.cfg, seq)
  d, f, v, mlp = 64, 48, 260, model.cfg.mlp_dim
  assert analytic == 2 * (4 * d * f) + 2 * (2 * 3 * d * mlp) + 2 * d * v  # 2 R, 2 F, the head
  assert not lm.xla_counts_loops_once(model.cfg, seq)
  dummy_BT = jnp.zeros((2, seq), jnp.int32)
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), dummy_BT, positions_BT=dummy_BT, segment_ids_BT=dummy_BT + 1)))
  compiled = jax.jit(lambda p: model.apply(p, dummy_BT, positions_BT=dummy_BT,
                                           segment_ids_BT=dummy_BT + 1)[0]).lower(params).compile()
  xla = flops.xla_flops(compiled)
  assert abs(analytic * 2 * seq / xla - 1) < 0.15, (analytic * 2 * seq, xla)


def test_trains_with_the_loop_and_an_objective_of_its_own_moves_the_routing_bias(tmp_path):
  """deepseek_v3_tiny (aux-loss-free routing bias) trained with the label-smoothed objective
  and an 'R' sublayer in its pattern: the bias moves, side statistics reach metrics.jsonl."""
  config = transformer.get_config('preset=deepseek_v3_tiny,runlocal')
  config.model.pattern = 'RFAE'
  config.model.moe.dispatch = 'dense'
  config.objective.name = 'label_smoothed'
  config.train.steps = 4
  config.train.log_every = 2
  config.train.eval_every = 4
  config.train.checkpoint_every = 4
  config.train.progress_bar = False
  config.peak_flops = 1e11
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['objective'] == 'label_smoothed'
  assert np.isfinite(summary['final_eval_bits_per_byte'])
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert 'moe/max_load' in records[-1] and 'running_mean/count' in records[-1]
  mngr = ocp.CheckpointManager(os.path.join(tmp_path, 'checkpoints'), item_names=('state',))
  state = mngr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  bias = jax.tree.leaves(state['collections']['moe_bias'])
  assert bias and max(float(np.max(np.abs(b))) for b in bias) > 0, 'the routing bias did not move'
  # A model of another width in the same workdir is refused, naming the field.
  config.model.running_mean.width = 16
  with pytest.raises(checkpoint.ConfigMismatchError, match='model.running_mean.width'):
    loop.train_and_evaluate(config, str(tmp_path))


def test_objective_interface_refuses_the_wrong_backbone_and_the_old_spelling():
  config = tiny_config(**{'model.vocab_size': 260})
  config.model.bidirectional = True
  config.model.pattern = 'AFAF'
  with pytest.raises(ValueError, match=r"objective.name='next_token' trains a causal backbone, "
                                       r'but model.bidirectional=True'):
    objectives.validate(config)
  # A config file of its own (not from configs/common.py) in the spelling before objectives
  # had fields.
  config = ml_collections.ConfigDict(dict(config.to_dict(), objective='next_token'))
  with pytest.raises(ValueError, match=r"set objective.name='next_token'"):
    objectives.validate(config)
  with pytest.raises(ValueError, match=r"objective.name='nope' is not one of"):
    objectives.validate(tiny_config(**{'objective.name': 'nope'}))


def test_sharded_step_equals_one_device():
  """One training step of an 'R' model under fsdp_tp (8 forced CPU devices, its own process,
  registered there through --setup) equals the step on one device."""
  got = sharding_worker.run('steps', '--cases=running_mean:fsdp_tp',
                            '--setup=tests.test_sublayer_protocol:register')['running_mean']
  ref, tp = got['single'], got['fsdp_tp']
  assert abs(tp['loss'] - ref['loss']) <= 1e-5 * abs(ref['loss'])
  assert tp['params'] <= 1e-5 and tp['moved'] > 1e-4
  assert any("'tensor'" in spec for name, spec in tp['specs'].items() if '0R' in name), tp['specs']
