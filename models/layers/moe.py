"""Mixture-of-experts sublayer `E`: top-k routed experts, optional shared experts.

Routing, in float32 (Switch, Mixtral, Qwen-MoE, DeepSeek V2/V3):

  scores_TE  = softmax(x W_r) or sigmoid(x W_r)
  choice_TE  = scores_TE + bias_E                  (aux-loss-free or correction bias;
                                                    selection only)
               restricted to the best `topk_group` of `n_group` expert groups (DeepSeek)
  experts_TX = top-k(choice_TE)
  weights_TX = scores_TE[experts_TX], renormalised if `norm_topk_prob`, x routed_scaling_factor
  y          = sum_x weights_TX expert_{experts_TX}(x) + gate * shared(x)

Dispatch (`model.moe.dispatch`):
  dropless  routed slots sorted by expert, every expert's rows in one `jax.lax.ragged_dot`
            (XLA:CPU lowers ragged_dot to a dense product masked per group, so on a CPU it
            costs E times the useful work; TPU and GPU have grouped-matmul kernels);
  capacity  each expert takes at most ceil(capacity_factor * tokens * k / E) slots into an
            E x Q buffer (first choices before second choices, then token order); overflow is
            dropped (its output is zero) and counted in `moe/dropped_fraction` (decoding, with
            a cache, gives every expert room for all tokens: nothing drops). The tokens
            share one buffer per batch row (`moe.capacity_group='row'`, MaxText's and
            GShard's grouping: no token leaves its data shard, and which tokens drop does
            not depend on the batch or the mesh) or one for the whole batch ('batch');
  dense     the reference: every expert on every token, masked by the routing weights.

Biases (`model.use_bias` or `model.mlp_bias`, GPT-OSS) go on the router logits and on every
expert projection. `moe.correction_bias` adds a per-expert parameter to the selection scores
(a DeepSeek V3 checkpoint's e_score_correction_bias); it gets no gradient (stop_gradient) and,
being a vector, no weight decay, so training leaves it where the checkpoint put it.

Balancing: the Switch/GShard auxiliary loss `loss/moe_aux` (1 at perfect balance, summed
over layers), the router z-loss `loss/moe_router_z` (ST-MoE) and DeepSeek V3's
auxiliary-loss-free bias: a per-expert bias in the flax collection `moe_bias`, not a
parameter, which a training step (the collection mutable) moves by
`bias_update_rate * sign(mean load - load)`. It adds to `correction_bias` when both are on,
and export folds it into that parameter (models/hf/interop.fold_routing_bias). Padding tokens
(segment id 0) are not routed, counted or dropped.

Dimension letters are the key's (models/__init__.py); here `T` counts all tokens of the call
(batch x length, flattened) and `Z`, the routed slots, is X x T, choice-major.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import errors
import models
from models import sublayer
from models.layers import common
from models.layers import mlp

ROUTERS = ('softmax', 'sigmoid')
DISPATCHES = ('dropless', 'capacity', 'dense')
CAPACITY_GROUPS = ('row', 'batch')
BIAS_COLLECTION = 'moe_bias'


def expert_dim(cfg) -> int:
  return cfg.moe.expert_mlp_dim or cfg.mlp_dim


def shared_dim(cfg) -> int:
  """Width of the shared experts as one MLP (DeepSeek sums n shared experts of this width)."""
  return cfg.moe.num_shared_experts * (cfg.moe.shared_expert_mlp_dim or expert_dim(cfg))


def capacity(moe_cfg, num_tokens: int) -> int:
  """Slots per expert in capacity dispatch: ceil(capacity_factor * tokens * k / E), <= tokens."""
  c = math.ceil(moe_cfg.capacity_factor * num_tokens * moe_cfg.num_experts_per_tok
                / moe_cfg.num_experts)
  return max(1, min(c, num_tokens))


def top_k(x, k: int):
  """`jax.lax.top_k` over the last axis (ties: the lower index first) as a stable sort.

  XLA's SPMD partitioner gathers a top_k operand that is sharded on its other axes (every
  token to every device under data parallelism); a sort along the last axis stays local.
  """
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  neg, index = jax.lax.sort((-x, iota), dimension=x.ndim - 1, is_stable=True, num_keys=1)
  return -neg[..., :k], index[..., :k]


def route(logits_TE, bias_E, moe_cfg):
  """Top-k routing in float32: returns (weights_TX, experts_TX, scores_TE)."""
  m = moe_cfg
  logits_TE = logits_TE.astype(jnp.float32)
  if m.router == 'softmax':
    scores_TE = jax.nn.softmax(logits_TE, axis=-1)
  else:
    scores_TE = jax.nn.sigmoid(logits_TE)
  choice_TE = scores_TE + bias_E.astype(jnp.float32)
  if m.n_group > 1:
    # DeepSeek V3: a group's score is the sum of its two best experts' choice scores.
    t, e = choice_TE.shape
    choice_TUJ = choice_TE.reshape(t, m.n_group, e // m.n_group)
    best_TU = top_k(choice_TUJ, min(2, e // m.n_group))[0].sum(-1)
    # The best `topk_group` groups of each token, one-hot over U and merged.
    keep_TU = jnp.any(jax.nn.one_hot(top_k(best_TU, m.topk_group)[1], m.n_group, dtype=jnp.bool_),
                      axis=-2)
    choice_TE = jnp.where(keep_TU[:, :, None], choice_TUJ, -jnp.inf).reshape(t, e)
  _, experts_TX = top_k(choice_TE, m.num_experts_per_tok)
  weights_TX = jnp.take_along_axis(scores_TE, experts_TX, axis=-1)
  if m.norm_topk_prob:
    weights_TX = weights_TX / (jnp.sum(weights_TX, -1, keepdims=True) + 1e-20)
  return weights_TX * m.routed_scaling_factor, experts_TX, scores_TE


def expert_counts(experts_TX, valid_T, num_experts: int):
  """Routed (valid) slots per expert, float32."""
  one_hot_TXE = jax.nn.one_hot(experts_TX, num_experts, dtype=jnp.float32)
  return jnp.einsum('TXE,T->E', one_hot_TXE, valid_T.astype(jnp.float32))


def load_balancing_loss(scores_TE, experts_TX, valid_T):
  """Switch/GShard: E * sum_e f_e * P_e over valid tokens; 1 when routing is uniform.

  f_e is the fraction of routed slots sent to expert e, P_e the mean routing probability of
  e (scores normalised to sum to one, which only matters for the sigmoid router). Hugging
  Face's `load_balancing_loss_func` equals k times this.
  """
  e, k = scores_TE.shape[-1], experts_TX.shape[-1]
  valid_T = valid_T.astype(jnp.float32)
  tokens = jnp.maximum(jnp.sum(valid_T), 1.0)
  f_E = expert_counts(experts_TX, valid_T, e) / (tokens * k)
  probs_TE = scores_TE / jnp.sum(scores_TE, -1, keepdims=True)
  p_E = jnp.einsum('TE,T->E', probs_TE, valid_T) / tokens
  return e * jnp.sum(f_E * p_E)


def router_z_loss(logits_TE, valid_T):
  """ST-MoE: mean over valid tokens of logsumexp(router logits)^2, float32."""
  valid_T = valid_T.astype(jnp.float32)
  lse_T = jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(lse_T) * valid_T) / jnp.maximum(jnp.sum(valid_T), 1.0)


def sort_slots(expert_Z, valid_Z, num_experts: int):
  """Stable sort of routed slots by expert, invalid slots last.

  Returns `order_Z` (sorted position -> slot), `group_sizes_E` (valid slots per expert, int32)
  and `rank_Z` (each slot's index within its expert's group, in slot order).
  """
  z = expert_Z.shape[0]
  key_Z = jnp.where(valid_Z, expert_Z, num_experts).astype(jnp.int32)
  order_Z = jnp.argsort(key_Z, stable=True)
  sizes = jnp.bincount(key_Z, length=num_experts + 1).astype(jnp.int32)
  starts = jnp.cumsum(sizes) - sizes
  rank_sorted_Z = jnp.arange(z, dtype=jnp.int32) - starts[key_Z[order_Z]]
  rank_Z = jnp.zeros_like(rank_sorted_Z).at[order_Z].set(rank_sorted_Z)
  return order_Z, sizes[:num_experts], rank_Z


def expert_ffn(x, w, act, gated: bool, matmul, bias):
  """One expert MLP per row group: `matmul(x, w_E..)` applies each row's expert weights and
  `bias(b_E.)` broadcasts each row's expert bias (None when there are no biases). `act` is
  `mlp.activation(cfg)[1]`: act(gate, up) when gated."""
  def dense(name, inputs):
    y = matmul(inputs, w[name])
    if name + '_bias' in w:
      y = y + bias(w[name + '_bias'])
    return y

  h = dense('wi', x)
  h = act(h, dense('wu', x)) if gated else act(h)
  return dense('wo', h)


def dispatch_dropless(x_TD, weights_TX, experts_TX, valid_T, w, act, gated):
  """Sorts the slots by expert and runs each expert's rows through `jax.lax.ragged_dot`."""
  t, k = experts_TX.shape
  e = w['wi'].shape[0]
  expert_Z = experts_TX.T.reshape(-1)
  valid_Z = jnp.tile(valid_T, k)
  order_Z, group_sizes_E, _ = sort_slots(expert_Z, valid_Z, e)
  token_Z = order_Z % t                       # slot z = choice * t + token
  sorted_expert_Z = jnp.minimum(expert_Z[order_Z], e - 1)
  x_ZD = x_TD[token_Z]
  out_ZD = expert_ffn(x_ZD, w, act, gated,
                      lambda x, w_E: jax.lax.ragged_dot(x, w_E, group_sizes_E),
                      lambda b_E: b_E[sorted_expert_Z])
  # Slots past the groups (padding) come out of ragged_dot as zeros; mask them anyway.
  out_ZD = jnp.where(valid_Z[order_Z][:, None], out_ZD, 0.0)
  inverse_Z = jnp.zeros_like(order_Z).at[order_Z].set(jnp.arange(order_Z.shape[0]))
  out_XTD = out_ZD[inverse_Z].reshape(k, t, -1)
  y_TD = jnp.einsum('XTD,TX->TD', out_XTD, weights_TX.astype(out_XTD.dtype))
  return y_TD, jnp.zeros((), jnp.float32)


def dispatch_capacity(x_WMD, weights_WMX, experts_WMX, valid_WM, w, act, gated, slots: int):
  """In each of W groups of M tokens, each expert takes its first `slots` routed slots into a
  W x E x Q buffer; the rest drop.

  Returns (y_WMD, dropped) with `dropped` the number of valid slots that found no room. With
  several groups (a batch row each, `moe.capacity_group='row'`) the buffer's group axis keeps
  the batch sharding, so tokens stay on their device (`fsdp_ep` moves them to their experts).
  """
  groups, per_group, k = experts_WMX.shape
  e, d = w['wi'].shape[0], x_WMD.shape[-1]
  # Choice-major slots: first choices have priority.
  expert_WZ = experts_WMX.transpose(0, 2, 1).reshape(groups, k * per_group)
  valid_WZ = jnp.tile(valid_WM, (1, k))
  rank_WZ = jax.vmap(lambda ex_Z, va_Z: sort_slots(ex_Z, va_Z, e)[2])(expert_WZ, valid_WZ)
  keep_WZ = valid_WZ & (rank_WZ < slots)
  dest_WZ = jnp.where(keep_WZ, expert_WZ * slots + rank_WZ, e * slots)  # out of range: dropped
  token_Z = jnp.arange(k * per_group) % per_group
  # Per group (vmap), so the scatter and gather have a batch axis the partitioner keeps local.
  # Both index a group's buffer flattened to (E x Q) rows.
  scatter = lambda x_MD, dest_Z: jnp.zeros((e * slots, d), x_MD.dtype).at[dest_Z].set(
      x_MD[token_Z], mode='drop')
  axes = ('expert_groups' if groups > 1 else None, 'experts', None, None)
  x_WEQD = common.constrain(jax.vmap(scatter)(x_WMD, dest_WZ).reshape(groups, e, slots, d), axes)
  matmul = lambda x, w_E: jnp.einsum('WEQD,EDF->WEQF', x, w_E)
  out_WEQD = common.constrain(expert_ffn(x_WEQD, w, act, gated, matmul, lambda b_E: b_E[:, None]),
                              axes)
  gather = lambda buffer, dest_Z: buffer.at[dest_Z].get(mode='fill', fill_value=0)
  out_WZD = jax.vmap(gather)(out_WEQD.reshape(groups, e * slots, d), dest_WZ)
  out_WXMD = out_WZD.reshape(groups, k, per_group, d)
  y_WMD = jnp.einsum('WXMD,WMX->WMD', out_WXMD, weights_WMX.astype(out_WXMD.dtype))
  dropped = jnp.sum((valid_WZ & ~keep_WZ).astype(jnp.float32))
  return y_WMD, dropped


def dispatch_dense(x_TD, weights_TX, experts_TX, valid_T, w, act, gated):
  """Reference: every expert on every token, combined with the routing weights (zero for
  experts a token did not choose)."""
  t, e = x_TD.shape[0], w['wi'].shape[0]
  combine_TE = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], experts_TX].add(
      weights_TX.astype(jnp.float32))
  combine_TE = combine_TE * valid_T[:, None]
  x_ETD = jnp.broadcast_to(x_TD, (e,) + x_TD.shape)
  out_ETD = expert_ffn(x_ETD, w, act, gated, jnp.matmul, lambda b_E: b_E[:, None])
  y_TD = jnp.einsum('ETD,TE->TD', out_ETD, combine_TE.astype(out_ETD.dtype))
  return y_TD, jnp.zeros((), jnp.float32)


@models.register_sublayer('E')
class Moe(sublayer.Sublayer):
  """Routed experts (top-k of `model.moe.num_experts`) plus optional shared experts."""
  BLOCK_DIFFUSION = True  # position-wise (capacity dispatch lets a row's tokens compete)
  # Its fields of config.model: the dense MLP's (each expert is one) and the `moe` section.
  DEFAULTS = dict(**mlp.Mlp.DEFAULTS, moe=dict(
      num_experts=8,
      num_experts_per_tok=2,     # top-k
      expert_mlp_dim=0,          # 0: model.mlp_dim
      router='softmax',          # softmax | sigmoid (scores for top-k and weights, fp32)
      norm_topk_prob=True,       # renormalise the k weights to sum to one
      routed_scaling_factor=1.0,  # multiplies the routed weights (DeepSeek V3: 2.5)
      num_shared_experts=0,      # always-on experts, one MLP of n x shared_expert_mlp_dim
      shared_expert_mlp_dim=0,   # 0: expert_mlp_dim
      shared_expert_gate=False,  # sigmoid(x w) gate on the shared output (Qwen2-MoE)
      n_group=1,                 # DeepSeek group-limited routing: experts in n_group groups,
      topk_group=1,              #   top-k only within the best topk_group groups
      aux_loss_weight=0.01,      # Switch/GShard load-balancing loss, summed over layers
      router_z_loss_weight=0.0,  # ST-MoE z-loss on the router logits
      bias_update_rate=0.0,      # DeepSeek V3 aux-loss-free bias step (0: off; V3 0.001)
      correction_bias=False,     # a frozen per-expert parameter added to the scores for
                                 #   selection only (a checkpoint's e_score_correction_bias)
      dispatch='dropless',       # dropless (ragged_dot) | capacity | dense (reference)
      capacity_factor=1.25,      # capacity: slots per expert = cf * tokens * k / E
      capacity_group='row',      # capacity: a buffer per batch row (tokens stay on their
                                 #   device) | batch (one for all tokens of the step)
  ))
  # Which tokens a training step may drop, and how: a resumed run may change these.
  RESUMABLE = ('moe.dispatch', 'moe.capacity_factor', 'moe.capacity_group')
  # Training choices transformers has no field for: side-loss weights, and the bias update,
  # whose trained bias export folds into moe.correction_bias (interop.fold_routing_bias).
  TRAINING_ONLY = ('moe.aux_loss_weight', 'moe.router_z_loss_weight', 'moe.bias_update_rate')
  BIAS_SWITCHES = ('mlp_bias',)  # the router's and every expert's biases, as the dense MLP's

  @classmethod
  def validate(cls, cfg):
    mlp.Mlp.validate(cfg)
    m = cfg.moe
    if m.num_experts < 1:
      raise errors.ConfigError(f'model.moe.num_experts={m.num_experts} must be positive')
    if m.num_experts_per_tok < 1:
      raise errors.ConfigError(f'model.moe.num_experts_per_tok={m.num_experts_per_tok} must be positive')
    if m.num_experts_per_tok > m.num_experts:
      raise errors.ConfigError(f'model.moe.num_experts_per_tok={m.num_experts_per_tok} exceeds '
                       f'model.moe.num_experts={m.num_experts}')
    for field in ('expert_mlp_dim', 'num_shared_experts', 'shared_expert_mlp_dim',
                  'aux_loss_weight', 'router_z_loss_weight', 'bias_update_rate'):
      if m[field] < 0:
        raise errors.ConfigError(f'model.moe.{field}={m[field]} must be >= 0')
    if m.router not in ROUTERS:
      raise errors.ConfigError(f'model.moe.router={m.router!r} is not one of {ROUTERS}')
    if m.dispatch not in DISPATCHES:
      raise errors.ConfigError(f'model.moe.dispatch={m.dispatch!r} is not one of {DISPATCHES}')
    if m.capacity_factor <= 0:
      raise errors.ConfigError(f'model.moe.capacity_factor={m.capacity_factor} must be positive')
    if m.capacity_group not in CAPACITY_GROUPS:
      raise errors.ConfigError(f'model.moe.capacity_group={m.capacity_group!r} is not one of '
                       f'{CAPACITY_GROUPS}')
    if m.routed_scaling_factor <= 0:
      raise errors.ConfigError(f'model.moe.routed_scaling_factor={m.routed_scaling_factor} must be positive')
    if m.shared_expert_gate and not m.num_shared_experts:
      raise errors.ConfigError('model.moe.shared_expert_gate=True needs model.moe.num_shared_experts > 0')
    if m.n_group < 1 or m.num_experts % m.n_group:
      raise errors.ConfigError(f'model.moe.n_group={m.n_group} must be a positive divisor of '
                       f'model.moe.num_experts={m.num_experts}')
    if not 1 <= m.topk_group <= m.n_group:
      raise errors.ConfigError(f'model.moe.topk_group={m.topk_group} must be in [1, '
                       f'model.moe.n_group={m.n_group}]')
    if m.topk_group * (m.num_experts // m.n_group) < m.num_experts_per_tok:
      raise errors.ConfigError(f'model.moe.topk_group={m.topk_group} groups of '
                       f'{m.num_experts // m.n_group} experts hold fewer than '
                       f'model.moe.num_experts_per_tok={m.num_experts_per_tok}')

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Router, the k routed experts and the shared experts (not all E experts)."""
    del seq_len
    m, d = cfg.moe, cfg.d_model
    matrices = 3 if cfg.mlp_activation in mlp.GATED else 2
    total = 2 * d * m.num_experts
    total += m.num_experts_per_tok * 2 * matrices * d * expert_dim(cfg)
    total += 2 * matrices * d * shared_dim(cfg)
    if m.num_shared_experts and m.shared_expert_gate:
      total += 2 * d
    return float(total)

  @classmethod
  def canonical(cls, fields: dict) -> dict:
    if 'moe.expert_mlp_dim' in fields and not fields['moe.expert_mlp_dim']:
      fields = dict(fields, **{'moe.expert_mlp_dim': fields['mlp_dim']})
    return fields

  @nn.compact
  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None):
    del positions_BT
    cfg, m = self.cfg, self.cfg.moe
    b, t, d = x_BTD.shape
    e, f = m.num_experts, expert_dim(cfg)
    assert d == cfg.d_model, f'model.d_model={cfg.d_model} but input width {d}'
    dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
    std, out_std = cfg.init_std, cfg.init_std / len(cfg.pattern) ** 0.5
    gated, act = mlp.activation(cfg)
    has_bias = cfg.use_bias or cfg.mlp_bias  # as the dense MLP (GPT-OSS: router and experts)

    x_TD = common.constrain(x_BTD.reshape(b * t, d), ('batch', 'embed'))
    if segment_ids_BT is None:
      valid_T = jnp.ones((b * t,), jnp.bool_)
    else:
      valid_T = segment_ids_BT.reshape(b * t) != 0

    # The router runs in float32, weights included.
    router_DE = self.param('router', common.normal_init(std, ('embed', None)), (d, e), pdtype)
    logits_TE = common.project(x_TD.astype(jnp.float32), router_DE.astype(jnp.float32))
    if has_bias:
      logits_TE += self.param('router_bias', common.zeros_init((None,)), (e,), pdtype).astype(jnp.float32)
    logits_TE = common.constrain(logits_TE, ('batch', None))
    if m.bias_update_rate:
      bias = self.variable(BIAS_COLLECTION, 'bias',
                           nn.with_logical_partitioning(jnp.zeros, ('experts',)), (e,), jnp.float32)
      bias_E = jax.lax.stop_gradient(bias.value)
    else:
      bias, bias_E = None, jnp.zeros((e,), jnp.float32)
    if m.get('correction_bias', False):
      correction_E = self.param('correction_bias', common.zeros_init(('experts',)), (e,), pdtype)
      bias_E = bias_E + jax.lax.stop_gradient(correction_E.astype(jnp.float32))
    weights_TX, experts_TX, scores_TE = route(logits_TE, bias_E, m)

    w = {}
    shapes = {'wi': ((e, d, f), ('experts', 'embed', 'mlp'), std),
              'wu': ((e, d, f), ('experts', 'embed', 'mlp'), std),
              'wo': ((e, f, d), ('experts', 'mlp', 'embed'), out_std)}
    for name in ('wi', 'wu', 'wo') if gated else ('wi', 'wo'):
      shape, axes, s = shapes[name]
      w[name] = self.param(name, common.normal_init(s, axes), shape, pdtype).astype(dtype)
      if has_bias:
        w[name + '_bias'] = self.param(name + '_bias', common.zeros_init((axes[0], axes[2])),
                                       (shape[0], shape[2]), pdtype).astype(dtype)
    x_TD = x_TD.astype(dtype)
    if m.dispatch == 'dropless':
      y_TD, dropped = dispatch_dropless(x_TD, weights_TX, experts_TX, valid_T, w, act, gated)
    elif m.dispatch == 'capacity':
      groups, k = (b if m.capacity_group == 'row' else 1), m.num_experts_per_tok
      y_WMD, dropped = dispatch_capacity(
          x_TD.reshape(groups, -1, d), weights_TX.reshape(groups, -1, k),
          experts_TX.reshape(groups, -1, k), valid_T.reshape(groups, -1), w, act, gated,
          # Decoding (a cache given) routes every token: room for all of them.
          b * t // groups if cache is not None else capacity(m, b * t // groups))
      y_TD = y_WMD.reshape(b * t, d)
    else:
      y_TD, dropped = dispatch_dense(x_TD, weights_TX, experts_TX, valid_T, w, act, gated)
    y_BTD = y_TD.reshape(b, t, d).astype(dtype)

    if m.num_shared_experts:
      # A copy: as_configdict() hands out the frozen config's own fields, and writing them
      # changed the model config's hash and equality after its first trace.
      shared_cfg = ml_collections.ConfigDict(cfg.to_dict())
      shared_cfg.mlp_dim = shared_dim(cfg)
      shared_BTD, _, _ = mlp.Mlp(ml_collections.FrozenConfigDict(shared_cfg), name='shared')(x_BTD)
      if m.shared_expert_gate:
        gate_D1 = self.param('shared_gate', common.normal_init(std, ('embed', None)), (d, 1), pdtype)
        shared_BTD = shared_BTD * jax.nn.sigmoid(common.project(x_BTD, gate_D1.astype(dtype)))
      y_BTD = y_BTD + shared_BTD.astype(dtype)
    y_BTD = common.constrain(y_BTD, ('batch', 'length', 'embed'))

    valid = jnp.maximum(jnp.sum(valid_T.astype(jnp.float32)), 1.0)
    counts_E = expert_counts(experts_TX, valid_T, e)
    load_E = counts_E / (valid * m.num_experts_per_tok)
    aux = {
        'moe/load_E': load_E,                                 # fraction of routed slots
        'moe/max_load': jnp.max(load_E) * e,                  # 1: perfectly balanced
        'moe/min_load': jnp.min(load_E) * e,
        'moe/dropped_fraction': dropped / (valid * m.num_experts_per_tok),
    }
    if m.aux_loss_weight:
      aux['loss/moe_aux'] = m.aux_loss_weight * load_balancing_loss(scores_TE, experts_TX, valid_T)
    if m.router_z_loss_weight:
      aux['loss/moe_router_z'] = m.router_z_loss_weight * router_z_loss(logits_TE, valid_T)
    if bias is not None and self.is_mutable_collection(BIAS_COLLECTION) and not self.is_initializing():
      bias.value = update_bias(jax.lax.stop_gradient(bias.value), counts_E, m.bias_update_rate)
    return y_BTD, aux, cache


def update_bias(bias_E, counts_E, rate: float):
  """DeepSeek V3's auxiliary-loss-free balancing: raise underloaded experts' bias, lower
  overloaded ones', by `rate` each step."""
  return bias_E + rate * jnp.sign(jnp.mean(counts_E) - counts_E)
