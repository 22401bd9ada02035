"""Optimizer schedules, weight-decay mask, budgets, and analytic FLOPs against XLA."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

import models
from configs import common
from configs import transformer
from trainer import flops
from trainer import optim
from trainer import step as step_lib
from tests.conftest import next_token_objective


def optim_config(**kw):
  config = common.base_config().optim
  config.update(kw)
  return config


@pytest.mark.parametrize('schedule', ['cosine', 'linear', 'wsd'])
def test_schedules_warm_up_and_end_exactly_at_the_budget(schedule):
  config = optim_config(schedule=schedule, lr=1.0, warmup_steps=10, final_lr_fraction=0.1)
  fn = optim.make_schedule(config, 100)
  assert float(fn(0)) == 0.0
  assert float(fn(5)) == pytest.approx(0.5)
  assert float(fn(10)) == pytest.approx(1.0)
  assert float(fn(100)) == pytest.approx(0.1, abs=1e-6)
  lrs = [float(fn(s)) for s in range(10, 101)]
  assert all(a >= b - 1e-7 for a, b in zip(lrs, lrs[1:]))  # non-increasing after warmup


def test_wsd_is_stable_then_decays_in_the_last_fraction():
  fn = optim.make_schedule(optim_config(schedule='wsd', lr=1.0, warmup_steps=10,
                                        decay_fraction=0.2), 100)
  assert float(fn(79)) == pytest.approx(1.0)
  assert float(fn(90)) == pytest.approx(0.55, abs=1e-6)


def test_unknown_schedule_names_the_field():
  with pytest.raises(ValueError, match="optim.schedule='step'"):
    optim.make_schedule(optim_config(schedule='step'), 10)


def test_decay_mask_skips_norms_biases_and_embeddings():
  params = {'embed': jnp.ones((4, 2)), 'head': jnp.ones((2, 4)), 'final_norm': {'scale': jnp.ones(2)},
            'blocks': {'0A': {'norm': {'scale': jnp.ones((3, 2))},
                              'op': {'q': jnp.ones((3, 2, 1, 2)), 'q_bias': jnp.ones((3, 1, 2))}}}}
  mask = flax.traverse_util.flatten_dict(optim.decay_mask(params, decay_embeddings=False))
  assert mask == {('embed',): False, ('head',): False, ('final_norm', 'scale'): False,
                  ('blocks', '0A', 'norm', 'scale'): False, ('blocks', '0A', 'op', 'q'): True,
                  ('blocks', '0A', 'op', 'q_bias'): False}
  mask = flax.traverse_util.flatten_dict(optim.decay_mask(params, decay_embeddings=True))
  assert mask[('embed',)] and mask[('head',)]


def test_budget_in_steps_tokens_or_flops():
  train = ml_collections.ConfigDict(dict(steps=7, tokens=0, flops=0.0))
  assert step_lib.total_steps_for(train, 100, 10.0) == 7
  train.tokens = 1050
  assert step_lib.total_steps_for(train, 100, 10.0) == 11
  train.tokens, train.flops = 0, 10.0 * 100 * 30
  assert step_lib.total_steps_for(train, 100, 10.0) == 30
  train.tokens = 5
  with pytest.raises(ValueError, match='give one budget'):
    step_lib.total_steps_for(train, 100, 10.0)
  with pytest.raises(ValueError, match='no budget'):
    step_lib.total_steps_for(ml_collections.ConfigDict(dict(steps=0, tokens=0, flops=0.0)), 100, 10.0)


@pytest.mark.parametrize('preset', ['gpt2_small', 'llama_small'])
def test_analytic_flops_within_15_percent_of_xla(preset):
  # XLA's cost analysis counts a while-loop body once, so compare the unrolled model with the
  # loop-free attention (flash loops over blocks).
  config = transformer.get_config(f'preset={preset}')
  config.model.vocab_size, config.model.scan_layers = 260, False
  config.model.attention.impl = 'xla'
  config.train.batch_size = 2
  model = models.build(config.model)
  tx, schedule = optim.make_optimizer(config.optim, 10)
  step, _ = step_lib.make_step_fns(model, tx, schedule, next_token_objective(260), config.train)
  state = jax.eval_shape(lambda r: nn.meta.unbox(step_lib.make_init_fn(model, tx, 8)(r)),
                         jax.random.key(0))
  shape = (2, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == 'weights' else jnp.int32)
           for k in ('inputs', 'targets', 'positions', 'segment_ids', 'weights')}
  xla = flops.xla_flops(jax.jit(step).lower(state, batch).compile())
  analytic = flops.train_flops_per_token(model.cfg, config.data.seq_len) * shape[0] * shape[1]
  assert xla is not None
  assert abs(analytic / xla - 1) < 0.15, (analytic, xla)


def test_parameter_counts_separate_embeddings():
  params = {'embed': jnp.ones((10, 4)), 'pos_embed': jnp.ones((8, 4)), 'head': jnp.ones((4, 10)),
            'blocks': {'w': jnp.ones((2, 4, 4))}}
  assert flops.count_params(params) == {'params': 40 + 32 + 40 + 32, 'params_non_embedding': 72}


def test_measured_matmul_peak_is_positive():
  assert flops.measure_matmul_peak(seconds=0.2, n=256) > 1e6


def test_gradient_accumulation_equals_one_big_batch():
  from tests.conftest import packed_batch, tiny_model_config
  config = transformer.get_config('preset=llama_tiny,runlocal')
  config.model = tiny_model_config()
  model = models.build(config.model)
  tx, schedule = optim.make_optimizer(config.optim, 10)
  init = step_lib.make_init_fn(model, tx, 16)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(0))
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(1), 4, 16, 260)
  batch = {'inputs': tokens_BT, 'targets': jnp.roll(tokens_BT, -1, 1), 'positions': pos_BT,
           'segment_ids': seg_BT, 'weights': jnp.ones((4, 16), jnp.float32)}
  results = []
  for accum in (1, 2):
    config.train.grad_accum = accum
    step, _ = step_lib.make_step_fns(model, tx, schedule, next_token_objective(260), config.train)
    results.append(jax.jit(step)(state, batch))
  (one, m1), (two, m2) = results
  assert float(m1['loss']) == pytest.approx(float(m2['loss']), rel=1e-5)
  assert float(m1['nll_sum']) == pytest.approx(float(m2['nll_sum']), rel=1e-5)
  for a, b in zip(jax.tree.leaves(one['params']), jax.tree.leaves(two['params'])):
    assert jnp.allclose(a, b, atol=1e-6, rtol=1e-5)
