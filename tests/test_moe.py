"""MoE tests: dispatch against an every-expert reference, capacity drops, balancing, losses,
validation, FLOPs, and a tiny MoE model trained end to end and resumed."""

import json
import math
import os
import shutil
import sysconfig

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import models
from models import lm
from models.layers import moe
from tests.conftest import tiny_model_config

D = 64  # the runlocal width


def moe_config(**overrides):
  """A frozen model config for one `E` sublayer: 8 experts, top-2, expert width 32."""
  fields = {'pattern': 'E', 'moe.num_experts': 8, 'moe.num_experts_per_tok': 2,
            'moe.expert_mlp_dim': 32, 'moe.bias_update_rate': 0.01}
  fields.update(overrides)
  cfg = ml_collections.FrozenConfigDict(tiny_model_config(**fields))
  moe.Moe.validate(cfg)
  return cfg


def inputs(b=2, t=12, pad=3, seed=0):
  """x_BTD ~ N(0, 1); the last `pad` tokens of the last row are padding (segment 0)."""
  x_BTD = jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)
  seg_BT = np.ones((b, t), np.int32)
  seg_BT[-1, t - pad:] = 0
  return x_BTD, jnp.asarray(seg_BT)


def init_layer(cfg, x_BTD, seg_BT, seed=1):
  """The layer and variables of unit scale (std 1/sqrt(fan-in)) so outputs are O(1), with a
  random routing bias. Jitted: op by op, init and the redraw compile some hundred primitives."""
  layer = moe.Moe(cfg)

  @jax.jit
  def init(x_BTD, seg_BT):
    variables = nn.meta.unbox(layer.init(jax.random.key(seed), x_BTD, segment_ids_BT=seg_BT))
    leaves, treedef = jax.tree.flatten(variables['params'])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves) + 1)
    leaves = [jax.random.normal(k, a.shape) * (a.shape[-2] ** -0.5 if a.ndim >= 2 else 0.3)
              for k, a in zip(keys[1:], leaves)]
    variables['params'] = jax.tree.unflatten(treedef, leaves)
    if 'moe_bias' in variables:
      variables['moe_bias'] = {'bias': 0.3 * jax.random.normal(keys[0], (cfg.moe.num_experts,))}
    return variables

  return layer, init(x_BTD, seg_BT)


def jit_apply(layer, **kwargs):
  """`layer.apply(variables, x_BTD, segment_ids_BT=seg_BT, **kwargs)` compiled once per shape."""
  return jax.jit(lambda v, x, s: layer.apply(v, x, segment_ids_BT=s, **kwargs))


ACTS = {
    'silu': lambda x: x / (1 + np.exp(-x)),
    'gelu': lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    'relu2': lambda x: np.maximum(x, 0) ** 2,
}


def reference(cfg, variables, x_BTD, seg_BT):
  """Numpy float64, independent of moe.py: routing, every expert on every token, shared MLP.

  Returns (top_TX, weights_TX, out_ETD, shared_TD, valid_T).
  """
  m = cfg.moe
  p = {'/'.join(k): np.asarray(v, np.float64)
       for k, v in flax.traverse_util.flatten_dict(variables['params']).items()}
  bias_E = np.asarray(variables.get('moe_bias', {}).get('bias', np.zeros(m.num_experts)), np.float64)
  x = np.asarray(x_BTD, np.float64).reshape(-1, D)
  valid_T = np.asarray(seg_BT).reshape(-1) != 0
  logits = x @ p['router'] + p.get('router_bias', 0.0)
  if m.router == 'softmax':
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
  else:
    scores = 1 / (1 + np.exp(-logits))
  choice = scores + bias_E
  if m.n_group > 1:
    grouped = choice.reshape(len(x), m.n_group, -1)
    group_score = np.sort(grouped, -1)[..., -2:].sum(-1)
    worst = np.argsort(-group_score, -1)[:, m.topk_group:]
    for t, groups in enumerate(worst):
      grouped[t, groups] = -np.inf
    choice = grouped.reshape(len(x), -1)
  top_TX = np.argsort(-choice, -1, kind='stable')[:, :m.num_experts_per_tok]
  weights_TX = np.take_along_axis(scores, top_TX, -1)
  if m.norm_topk_prob:
    weights_TX /= weights_TX.sum(-1, keepdims=True)
  weights_TX *= m.routed_scaling_factor
  gated = cfg.mlp_activation in ('swiglu', 'geglu')
  act = ACTS[{'swiglu': 'silu', 'geglu': 'gelu'}.get(cfg.mlp_activation, cfg.mlp_activation)]

  def ffn(prefix, e=None):
    get = lambda name: (p[prefix + name][e] if e is not None else p[prefix + name])
    bias = lambda name: (get(name + '_bias') if prefix + name + '_bias' in p else 0.0)
    h = act(x @ get('wi') + bias('wi'))
    if gated:
      h = h * (x @ get('wu') + bias('wu'))
    return h @ get('wo') + bias('wo')

  out_ETD = np.stack([ffn('', e) for e in range(m.num_experts)])
  shared_TD = np.zeros_like(x)
  if m.num_shared_experts:
    shared_TD = ffn('shared/')
    if m.shared_expert_gate:
      shared_TD = shared_TD / (1 + np.exp(-(x @ p['shared_gate'])))
  return top_TX, weights_TX, out_ETD, shared_TD, valid_T


def combine(top_TX, weights_TX, out_ETD, keep_TX):
  t = np.arange(len(top_TX))[:, None]
  return np.sum(out_ETD[top_TX, t] * (weights_TX * keep_TX)[..., None], axis=1)


CASES = {
    'softmax': {},
    'sigmoid_shared_gate_groups': {'moe.router': 'sigmoid', 'moe.num_shared_experts': 2,
                                   'moe.shared_expert_gate': True, 'moe.n_group': 4,
                                   'moe.topk_group': 2, 'moe.routed_scaling_factor': 2.5},
    'softmax_shared_groups_gelu': {'moe.num_shared_experts': 1, 'moe.n_group': 2,
                                   'moe.topk_group': 1, 'moe.norm_topk_prob': False,
                                   'mlp_activation': 'gelu'},
    'sigmoid_biases_relu2_top3': {'moe.router': 'sigmoid', 'use_bias': True,
                                  'mlp_activation': 'relu2', 'moe.num_experts_per_tok': 3},
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_dispatch_equals_every_expert_reference(case):
  x_BTD, seg_BT = inputs()
  cfg = moe_config(**CASES[case])
  m = cfg.moe
  _, variables = init_layer(cfg, x_BTD, seg_BT)
  top_TX, weights_TX, out_ETD, shared_TD, valid_T = reference(cfg, variables, x_BTD, seg_BT)
  keep_TX = np.broadcast_to(valid_T[:, None], top_TX.shape)
  expected_TD = combine(top_TX, weights_TX, out_ETD, keep_TX) + shared_TD
  assert np.abs(expected_TD).max() > 0.5  # unit-scale outputs: the tolerance means something
  # capacity_factor E/k gives every expert room for every token: nothing drops.
  for dispatch, factor in (('dropless', 1.0), ('dense', 1.0), ('capacity', m.num_experts / m.num_experts_per_tok)):
    run_cfg = moe_config(**CASES[case], **{'moe.dispatch': dispatch, 'moe.capacity_factor': factor})
    y_BTD, aux, _ = jit_apply(moe.Moe(run_cfg))(variables, x_BTD, seg_BT)
    np.testing.assert_allclose(np.asarray(y_BTD).reshape(-1, D), expected_TD, atol=1e-5, rtol=1e-5,
                               err_msg=dispatch)
    assert float(aux['moe/dropped_fraction']) == 0.0
    counts_E = np.bincount(top_TX[valid_T].ravel(), minlength=m.num_experts)
    np.testing.assert_allclose(aux['moe/load_E'], counts_E / counts_E.sum(), atol=1e-6)


@pytest.mark.parametrize('group', ['batch', 'row'])
def test_capacity_drops_exactly_the_overflow_when_one_expert_takes_everything(group):
  # The routing bias only picks experts: +10 on expert 0 sends every token's first choice there.
  x_BTD, seg_BT = inputs()                                  # 2 rows of 12 tokens, 21 valid
  cfg = moe_config(**{'moe.num_experts': 4, 'moe.num_experts_per_tok': 1,
                      'moe.dispatch': 'capacity', 'moe.capacity_factor': 1.0,
                      'moe.capacity_group': group})
  layer, variables = init_layer(cfg, x_BTD, seg_BT)
  variables['moe_bias'] = {'bias': jnp.array([10.0, 0.0, 0.0, 0.0])}
  # One queue of 6 slots for the 24 tokens, or one of 3 slots for each row of 12.
  fits_T = np.arange(24) < 6 if group == 'batch' else np.arange(24) % 12 < 3
  slots = moe.capacity(cfg.moe, 24 if group == 'batch' else 12)
  assert slots == {'batch': math.ceil(1.0 * 24 * 1 / 4), 'row': math.ceil(1.0 * 12 * 1 / 4)}[group]
  y_BTD, aux, _ = jit_apply(layer)(variables, x_BTD, seg_BT)
  assert float(aux['moe/dropped_fraction']) == pytest.approx((21 - fits_T.sum()) / 21)
  np.testing.assert_allclose(aux['moe/load_E'], [1.0, 0.0, 0.0, 0.0])
  assert float(aux['moe/max_load']) == pytest.approx(4.0)
  dropless = moe_config(**{'moe.num_experts': 4, 'moe.num_experts_per_tok': 1})
  full_BTD, _, _ = jit_apply(moe.Moe(dropless))(variables, x_BTD, seg_BT)
  y_TD, full_TD = np.asarray(y_BTD).reshape(-1, D), np.asarray(full_BTD).reshape(-1, D)
  np.testing.assert_allclose(y_TD[fits_T], full_TD[fits_T], atol=1e-6)  # the first tokens fit
  valid_T = np.asarray(seg_BT).reshape(-1) != 0
  assert np.all(y_TD[~fits_T] == 0) and np.all(np.abs(full_TD[~fits_T & valid_T]).max(-1) > 0)


@pytest.mark.parametrize('group', ['batch', 'row'])
def test_capacity_keeps_each_experts_first_slots_first_choices_first(group):
  x_BTD, seg_BT = inputs(b=3, t=16, pad=5, seed=3)
  cfg = moe_config(**{'moe.dispatch': 'capacity', 'moe.capacity_factor': 0.5,
                      'moe.num_shared_experts': 1, 'moe.capacity_group': group})
  layer, variables = init_layer(cfg, x_BTD, seg_BT, seed=4)
  top_TX, weights_TX, out_ETD, shared_TD, valid_T = reference(cfg, variables, x_BTD, seg_BT)
  queues = [np.arange(48)] if group == 'batch' else np.arange(48).reshape(3, 16)
  slots = moe.capacity(cfg.moe, len(queues[0]))
  assert slots == {'batch': 6, 'row': 2}[group]
  keep_TX = np.zeros(top_TX.shape, bool)
  for tokens in queues:  # a queue per expert: first choices, then token order
    used = np.zeros(8, int)
    for choice in range(top_TX.shape[1]):
      for t in tokens[valid_T[tokens]]:
        e = top_TX[t, choice]
        keep_TX[t, choice] = used[e] < slots
        used[e] += 1
  dropped = np.sum(~keep_TX[valid_T])
  assert dropped > 0
  y_BTD, aux, _ = jit_apply(layer)(variables, x_BTD, seg_BT)
  expected_TD = combine(top_TX, weights_TX, out_ETD, keep_TX) + shared_TD
  np.testing.assert_allclose(np.asarray(y_BTD).reshape(-1, D), expected_TD, atol=1e-5, rtol=1e-5)
  assert float(aux['moe/dropped_fraction']) == pytest.approx(dropped / (2 * valid_T.sum()))


def test_row_capacity_does_not_depend_on_the_other_rows():
  """With a buffer per row, each row's output is the one it gets alone in the batch."""
  x_BTD, seg_BT = inputs(b=3, t=16, pad=5, seed=6)
  cfg = moe_config(**{'moe.dispatch': 'capacity', 'moe.capacity_factor': 0.5,
                      'moe.capacity_group': 'row'})
  layer, variables = init_layer(cfg, x_BTD, seg_BT, seed=7)
  apply = jit_apply(layer)
  y_BTD, aux, _ = apply(variables, x_BTD, seg_BT)
  assert float(aux['moe/dropped_fraction']) > 0
  for i in range(3):
    alone_BTD, _, _ = apply(variables, x_BTD[i:i + 1], seg_BT[i:i + 1])
    np.testing.assert_allclose(y_BTD[i], alone_BTD[0], atol=1e-6, err_msg=f'row {i}')


def test_bias_update_moves_loads_toward_balance_on_a_skewed_router():
  x_BTD, seg_BT = inputs(b=4, t=32, pad=0, seed=5)
  rate = 0.05
  cfg = moe_config(use_bias=True, **{'moe.num_experts': 4, 'moe.num_experts_per_tok': 1,
                                     'moe.bias_update_rate': rate})
  layer, variables = init_layer(cfg, x_BTD, seg_BT, seed=6)
  variables['params']['router_bias'] = jnp.array([2.0, 0.0, 0.0, 0.0])  # skewed to expert 0
  variables['moe_bias'] = {'bias': jnp.zeros(4)}

  @jax.jit
  def steps(bias):
    def body(b, _):
      (_, aux, _), new = layer.apply({**variables, 'moe_bias': b}, x_BTD, segment_ids_BT=seg_BT,
                                  mutable=['moe_bias'])
      return new['moe_bias'], (aux['moe/load_E'], b['bias'])
    return jax.lax.scan(body, bias, None, length=80)

  _, (load_SE, bias_SE) = steps(variables['moe_bias'])
  load_SE, bias_SE = np.asarray(load_SE), np.asarray(bias_SE)
  # One step is rate * sign(mean load - load): down for the overloaded, up for the rest.
  np.testing.assert_allclose(bias_SE[1], rate * np.sign(0.25 - load_SE[0]), atol=1e-7)
  assert load_SE[0].max() > 0.5 and load_SE[0].argmax() == 0
  assert load_SE[-10:].max() < 0.35, load_SE[-10:]
  # Read-only (evaluation, decoding): the bias routes but does not move.
  (_, aux, _), new = jit_apply(layer, mutable=[])({**variables, 'moe_bias': {'bias': bias_SE[-1]}},
                                                  x_BTD, seg_BT)
  assert not new and float(aux['moe/max_load']) < 1.4


@pytest.mark.parametrize('router,aux_value', [('softmax', 9.5 / 9), ('sigmoid', 9.2 / 9)])
def test_aux_and_z_losses_equal_hand_computed_values(router, aux_value):
  # Two experts, top-1. Tokens 0, 1 score (0.75, 0.25) with softmax or (0.75, 0.5) -> (0.6, 0.4)
  # normalised with sigmoid, and pick expert 0; token 2 mirrors them; token 3 is padding.
  # f = (2/3, 1/3); softmax: P = (1.75/3, 1.25/3), aux = 2 (2/3 1.75/3 + 1/3 1.25/3) = 9.5/9;
  # sigmoid: P = (1.6/3, 1.4/3), aux = 9.2/9. Every valid token has logsumexp = ln 4.
  ln3 = math.log(3.0)
  logits_TE = jnp.array([[ln3, 0.0], [ln3, 0.0], [0.0, ln3], [5.0, 0.0]])
  valid_T = jnp.array([True, True, True, False])
  cfg = moe_config(**{'moe.num_experts': 2, 'moe.num_experts_per_tok': 1, 'moe.router': router,
                      'moe.aux_loss_weight': 0.01, 'moe.router_z_loss_weight': 0.001,
                      'moe.bias_update_rate': 0.0})

  @jax.jit
  def losses(logits_TE, valid_T):
    _, experts_TX, scores_TE = moe.route(logits_TE, jnp.zeros(2), cfg.moe)
    return (experts_TX, moe.load_balancing_loss(scores_TE, experts_TX, valid_T),
            moe.router_z_loss(logits_TE, valid_T))

  experts_TX, aux_loss, z_loss = losses(logits_TE, valid_T)
  assert experts_TX[:, 0].tolist() == [0, 0, 1, 0]
  assert float(aux_loss) == pytest.approx(aux_value, rel=1e-6)
  assert float(z_loss) == pytest.approx(math.log(4) ** 2, rel=1e-6)
  # Through the layer: one-hot tokens pick rows of the router, and the weights apply.
  layer = moe.Moe(cfg)
  x_BTD = np.eye(4, D, dtype=np.float32)[None]
  variables = jax.jit(lambda x: nn.meta.unbox(layer.init(jax.random.key(0), x)))(x_BTD)
  router_DE = np.zeros((D, 2), np.float32)
  router_DE[:4] = logits_TE
  variables['params']['router'] = router_DE
  _, aux, _ = jit_apply(layer)(variables, x_BTD, np.array([[1, 1, 2, 0]], np.int32))
  assert float(aux['loss/moe_aux']) == pytest.approx(0.01 * aux_value, rel=1e-5)
  assert float(aux['loss/moe_router_z']) == pytest.approx(0.001 * math.log(4) ** 2, rel=1e-5)


@pytest.mark.parametrize('field,value,message', [
    ('num_experts_per_tok', 5, 'model.moe.num_experts_per_tok=5 exceeds model.moe.num_experts=4'),
    ('router', 'relu', "model.moe.router='relu' is not one of"),
    ('dispatch', 'megablocks', "model.moe.dispatch='megablocks' is not one of"),
    ('n_group', 3, 'model.moe.n_group=3 must be a positive divisor of model.moe.num_experts=4'),
    ('topk_group', 3, 'model.moe.topk_group=3 must be in [1, model.moe.n_group=1]'),
    ('capacity_factor', 0.0, 'model.moe.capacity_factor=0.0 must be positive'),
    ('capacity_group', 'token', "model.moe.capacity_group='token' is not one of ('row', 'batch')"),
    ('shared_expert_gate', True, 'model.moe.shared_expert_gate=True needs model.moe.num_shared_experts > 0'),
    ('bias_update_rate', -1.0, 'model.moe.bias_update_rate=-1.0 must be >= 0'),
])
def test_bad_moe_config_is_one_clear_line(field, value, message):
  config = tiny_model_config(pattern='AE', **{'moe.num_experts': 4, f'moe.{field}': value})
  with pytest.raises(ValueError) as err:
    models.build(config)
  assert message in str(err.value) and '\n' not in str(err.value)


def test_analytic_flops_count_k_experts_and_match_xla():
  # Capacity dispatch with capacity_factor 1 computes exactly k slots a token, like the count.
  cfg = moe_config(**{'moe.num_experts': 4, 'moe.expert_mlp_dim': 128, 'moe.dispatch': 'capacity',
                      'moe.capacity_factor': 1.0, 'moe.num_shared_experts': 1,
                      'moe.shared_expert_gate': True, 'moe.bias_update_rate': 0.0})
  x_BTD, seg_BT = inputs(b=4, t=64, pad=0)
  layer = moe.Moe(cfg)
  params = jax.eval_shape(lambda: nn.meta.unbox(layer.init(jax.random.key(0), x_BTD)))
  compiled = jax.jit(lambda v, x: layer.apply(v, x, segment_ids_BT=seg_BT)).lower(params, x_BTD).compile()
  xla = compiled.cost_analysis()
  xla = (xla[0] if isinstance(xla, (list, tuple)) else xla)['flops']
  analytic = moe.Moe.flops_per_token(cfg, 64) * 4 * 64
  assert analytic == 4 * 64 * (2 * D * 4 + 2 * 2 * 3 * D * 128 + 2 * 3 * D * 128 + 2 * D)
  assert abs(xla - analytic) / analytic < 0.15, (xla, analytic)


def test_expert_weights_carry_the_experts_axis_and_biases_are_not_params():
  config = tiny_model_config(pattern='AEAE', scan_layers=True, **{'moe.bias_update_rate': 0.01})
  model = models.build(config)
  dummy = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, positions_BT=dummy,
                                            segment_ids_BT=dummy + 1))
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(boxed))
  P = jax.sharding.PartitionSpec
  assert specs[('params', 'blocks', '1E', 'op', 'wi')] == P('layers', 'experts', 'embed', 'mlp')
  assert specs[('params', 'blocks', '1E', 'op', 'wo')] == P('layers', 'experts', 'mlp', 'embed')
  assert specs[('moe_bias', 'blocks', '1E', 'op', 'bias')] == P('layers', 'experts')
  assert all(spec for spec in specs.values()), specs


def test_prefill_plus_decode_equals_full_forward():
  config = tiny_model_config(pattern='AEAE', scan_layers=True, **{'moe.num_experts': 4,
                                                                  'moe.bias_update_rate': 0.01})
  b, t = 2, 10
  tokens_BT = jax.random.randint(jax.random.key(3), (b, t), 0, 260)
  pos_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg_BT = jnp.ones((b, t), jnp.int32)
  model = models.build(config)

  @jax.jit
  def init(x, p, s):
    variables = nn.meta.unbox(model.init(jax.random.key(0), x, positions_BT=p, segment_ids_BT=s))
    variables['moe_bias'] = jax.tree.map(lambda a: a + jnp.arange(4) * 0.01, variables['moe_bias'])
    return variables

  variables = init(tokens_BT, pos_BT, seg_BT)
  full_BTV, _, _ = jax.jit(model.apply)(variables, tokens_BT, positions_BT=pos_BT,
                                     segment_ids_BT=seg_BT)
  apply = jax.jit(lambda c, x, p, s: model.apply(variables, x, positions_BT=p, segment_ids_BT=s,
                                                 cache=c))
  cache = jax.jit(lambda: lm.init_cache(model.cfg, b, t))()
  out_BTV, _, cache = apply(cache, tokens_BT[:, :4], pos_BT[:, :4], seg_BT[:, :4])
  outs = [out_BTV]
  for i in range(4, t):
    out_BTV, _, cache = apply(cache, tokens_BT[:, i:i + 1], pos_BT[:, i:i + 1], seg_BT[:, i:i + 1])
    outs.append(out_BTV)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full_BTV, atol=1e-5, rtol=1e-5)


def test_tiny_moe_model_trains_end_to_end_and_resumes_bitwise(tmp_path):
  from configs import transformer
  from trainer import loop
  config = transformer.get_config('preset=llama_tiny,runlocal')
  config.model.pattern = 'AEAE'
  config.model.scan_layers = True
  config.model.moe.num_experts = 4
  config.model.moe.bias_update_rate = 0.01
  config.model.moe.router_z_loss_weight = 1e-3
  config.data.corpus = 'text'
  config.data.paths = os.path.join(sysconfig.get_paths()['stdlib'], 'email', '*.py')
  config.data.val_fraction = 0.3
  config.data.seq_len = 32
  config.train.batch_size = 4
  config.train.steps, config.train.log_every, config.train.eval_every = 8, 4, 8
  config.train.checkpoint_every = 4
  config.train.progress_bar = False
  config.peak_flops = 1e11
  workdir = str(tmp_path / 'run')
  summary = loop.train_and_evaluate(config, workdir)
  assert np.isfinite(summary['final_eval_loss'])
  lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [line['step'] for line in lines] == [4, 8]
  for key in ('loss/moe_aux', 'loss/moe_router_z', 'moe/max_load', 'moe/dropped_fraction',
              'moe/load_E/0', 'moe/load_E/3'):
    assert np.isfinite(lines[-1][key]), key
  assert sum(lines[-1][f'moe/load_E/{e}'] for e in range(4)) == pytest.approx(1.0)

  def final_state():
    mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state',))
    state = mngr.restore(8, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
    return flax.traverse_util.flatten_dict({k: state[k] for k in ('params', 'collections')})

  straight = final_state()
  bias_L4 = straight[('collections', 'moe_bias', 'blocks', '1E', 'op', 'bias')]
  assert bias_L4.shape == (2, 4) and np.abs(bias_L4).max() > 0  # the step moved the biases
  # Resume from step 4: the same final parameters and biases, bit for bit.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '8'))
  loop.train_and_evaluate(config, workdir)
  resumed = final_state()
  assert straight.keys() == resumed.keys()
  for key in straight:
    assert np.asarray(straight[key]).tobytes() == np.asarray(resumed[key]).tobytes(), key
  # The dispatch is a runtime choice: resumed with capacity dispatch that has room for every
  # token (capacity_factor E / k), the run ends where the dropless one did.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '8'))
  config.model.moe.dispatch, config.model.moe.capacity_factor = 'capacity', 4 / 2
  loop.train_and_evaluate(config, workdir)
  switched = final_state()
  for key in straight:
    np.testing.assert_allclose(switched[key], straight[key], atol=1e-5, rtol=1e-5, err_msg=key)


def test_top_k_is_lax_top_k_ties_included():
  """The sort-based top-k (which XLA partitions without gathering) picks what lax.top_k does."""
  x = np.random.default_rng(0).normal(size=(64, 3, 8)).astype(np.float32)
  x[:, :, 5] = x[:, :, 2]  # ties: the lower index first
  x[0, 0, :4] = -np.inf
  both = jax.jit(lambda x, k: (moe.top_k(x, k), jax.lax.top_k(x, k)), static_argnums=1)
  for k in (1, 2, 5):
    for got, want in zip(*both(x, k)):
      np.testing.assert_array_equal(got, want)


def test_a_shared_expert_leaves_the_model_config_as_it_was():
  """The shared expert's MLP gets its own width in a copy of the config: the model's config
  hashes and compares as before the trace (jit caches keyed on it stay valid)."""
  cfg = tiny_model_config('deepseek_v3_tiny')
  model = models.build(cfg)
  before, width = hash(model.cfg), model.cfg.mlp_dim
  x_BT = jnp.zeros((1, 4), jnp.int32)
  jax.eval_shape(lambda: model.init(jax.random.key(0), x_BT, positions_BT=x_BT,
                                    segment_ids_BT=x_BT + 1))
  assert hash(model.cfg) == before and model.cfg.mlp_dim == width
  assert model.cfg == models.build(cfg).cfg
