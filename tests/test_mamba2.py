"""Mamba-2 (`M`, models/layers/mamba2.py): the SSD scan and the sublayer.

Tier 3 (parity with a reference): the chunked scan equals the token-by-token recurrence
(outputs and final state, a length that is not a multiple of the chunk, a non-zero initial
state, groups > 1, packed documents); its gradients equal central differences. Tier 2
(oracle): with the strongest decay at length 8192 each output is its own position's input
(nothing overflows or turns NaN, gradients included). Tier 4 (consistency): a packed row
equals each document alone; prefill + one token a step equals the full forward (float32 and
bfloat16), through a scanned model; the cache does not grow with the generated length;
bfloat16 compute stays near float32; the analytic FLOPs are within 15% of XLA's.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import lm
from models.layers import mamba2
from tests.conftest import tiny_model_config
from trainer import flops


def scan_inputs(rng, b, t, n, h, k, p, strong=False):
  """Random scan inputs (x, dt, a, b, c) in float32; `strong`: dt a = -1e6 in every head."""
  x_BTNH = rng.normal(size=(b, t, n, h)).astype(np.float32)
  dt_BTN = (0.5 * np.exp(rng.normal(size=(b, t, n)))).astype(np.float32)
  a_N = -np.exp(rng.normal(size=(n,))).astype(np.float32)
  if strong:
    dt_BTN, a_N = np.full_like(dt_BTN, 1e3), np.full_like(a_N, -1e3)
  b_BTKP = rng.normal(size=(b, t, k, p)).astype(np.float32)
  c_BTKP = rng.normal(size=(b, t, k, p)).astype(np.float32)
  return x_BTNH, dt_BTN, a_N, b_BTKP, c_BTKP


# Row 0: documents of 5 and 8 tokens, the first continuing the initial state's document 1;
# row 1: 3 padding tokens (segment 0) then a document of 10 (the initial state, segment 0,
# reaches the padding only).
SEGMENTS = np.array([[1] * 5 + [2] * 8, [0] * 3 + [1] * 10], np.int32)


@pytest.fixture(scope='module')
def problem():
  rng = np.random.default_rng(0)
  inputs = scan_inputs(rng, 2, 13, 4, 3, 2, 5)  # 4 heads in 2 groups
  state = {'ssm_BNHP': jnp.asarray(rng.normal(size=(2, 4, 3, 5)), jnp.float32),
           'segment_B': jnp.array([1, 0], jnp.int32)}
  return inputs, state


@pytest.fixture(scope='module')
def recurrence(problem):
  """The recurrence's outputs and final state from the initial state, and its outputs from
  none (computed once for every chunk length)."""
  inputs, state = problem
  want_BTNH, want = jax.jit(lambda *a: mamba2.ssd_recurrent(*a, SEGMENTS, state=state))(*inputs)
  zero_BTNH, _ = jax.jit(lambda *a: mamba2.ssd_recurrent(*a, SEGMENTS))(*inputs)
  return want_BTNH, want, zero_BTNH


@pytest.mark.parametrize('chunk', [4, 16])  # 13 = 3 x 4 + 1; one chunk longer than the row
def test_chunked_equals_the_recurrence(problem, recurrence, chunk):
  inputs, state = problem
  want_BTNH, want, zero_BTNH = recurrence
  got_BTNH, got = jax.jit(lambda *a: mamba2.ssd_chunked(*a, SEGMENTS, state=state, chunk=chunk))(
      *inputs)
  np.testing.assert_allclose(got_BTNH, want_BTNH, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got['ssm_BNHP'], want['ssm_BNHP'], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got['segment_B'], [2, 1])
  np.testing.assert_array_equal(want['segment_B'], [2, 1])
  # The initial state matters where its segment continues (row 0's first document) only.
  moved_BT = np.abs(np.asarray(want_BTNH - zero_BTNH)).max(axis=(2, 3)) > 1e-6
  np.testing.assert_array_equal(moved_BT, SEGMENTS == np.array([[1], [0]]))


def test_gradients_equal_central_differences(problem):
  inputs, state = problem
  rng = np.random.default_rng(1)
  w_BTNH = rng.normal(size=inputs[0].shape).astype(np.float32)
  w_BNHP = rng.normal(size=state['ssm_BNHP'].shape).astype(np.float32)

  def loss(x, dt, a, b, c, s):
    y_BTNH, final = mamba2.ssd_chunked(x, dt, a, b, c, SEGMENTS, chunk=4,
                                       state={'ssm_BNHP': s, 'segment_B': state['segment_B']})
    return jnp.sum(y_BTNH * w_BTNH) + jnp.sum(final['ssm_BNHP'] * w_BNHP)

  args = (*inputs, state['ssm_BNHP'])
  # One compile of the loss and its gradients, for the gradients and the differences.
  chunked = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
  _, grads = chunked(*args)
  eps = 1e-2
  for i, g in enumerate(grads):  # along a random direction of each input
    v = rng.normal(size=np.shape(args[i])).astype(np.float32)
    plus = [a + eps * v if j == i else a for j, a in enumerate(args)]
    minus = [a - eps * v if j == i else a for j, a in enumerate(args)]
    numeric = (float(chunked(*plus)[0]) - float(chunked(*minus)[0])) / (2 * eps)
    analytic = float(jnp.sum(g * v))
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (i, numeric, analytic)


def test_strongest_decay_at_length_8192_neither_overflows_nor_turns_nan():
  """dt a = -1e6 per position: the cumulative decay reaches -8e9 over the row and -6.4e7 in
  a chunk, so exp of any undifferenced sum overflows. The state then holds only the current
  position's input, so y_t = dt_t x_t (c_t . b_t) exactly."""
  rng = np.random.default_rng(2)
  x_BTNH, dt_BTN, a_N, b_BTKP, c_BTKP = scan_inputs(rng, 1, 8192, 2, 2, 1, 2, strong=True)
  seg_BT = np.ones((1, 8192), np.int32)

  def loss(x, dt, a):
    y_BTNH, final = mamba2.ssd_chunked(x, dt, a, b_BTKP, c_BTKP, seg_BT, chunk=64)
    return jnp.sum(y_BTNH) + jnp.sum(final['ssm_BNHP']), (y_BTNH, final['ssm_BNHP'])

  (_, (y_BTNH, ssm_BNHP)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                              has_aux=True))(x_BTNH, dt_BTN, a_N)
  cb_BT1 = np.einsum('BTKP,BTKP->BT', b_BTKP, c_BTKP)[..., None]
  want_BTNH = dt_BTN[..., None] * x_BTNH * cb_BT1[..., None]
  np.testing.assert_allclose(y_BTNH, want_BTNH, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(ssm_BNHP[0], (1e3 * x_BTNH[0, -1])[..., None] * b_BTKP[0, -1],
                             rtol=1e-5, atol=1e-3)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# The sublayer in a model.

FIELDS = {'pattern': 'MFMF', 'scan_layers': True, 'mamba.head_dim': 8, 'mamba.state_dim': 4,
          'mamba.groups': 2, 'mamba.chunk': 4, 'num_heads': 2, 'num_kv_heads': 1}


def config(**changes):
  return tiny_model_config('nemotron_h_tiny', **dict(FIELDS, **changes))


def random_params(model, rng):
  """Parameters of `model`'s shapes drawn near what training sees (no init compilation):
  decay rates and step sizes in mamba_ssm's initial ranges, norms, skips and weights
  perturbed away from their initial values."""
  dummy_BT = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), dummy_BT, positions_BT=dummy_BT, segment_ids_BT=dummy_BT + 1)))

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'A_log':
      value = np.log(rng.uniform(1, 16, shape))
    elif name == 'dt_bias':  # softplus: dt from 0.02 to 0.3
      value = rng.uniform(-4, -1, shape)
    elif name in ('scale', 'norm', 'D'):
      value = 1 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.2 * rng.normal(size=shape) / np.sqrt(shape[-2] if len(shape) > 1 else 4)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def forward(cfg, variables, tokens_BT, positions_BT, segment_ids_BT, cache=None):
  return models.build(cfg).apply(variables, tokens_BT, positions_BT=positions_BT,
                                 segment_ids_BT=segment_ids_BT, cache=cache)


@pytest.fixture(scope='module')
def rows():
  """A scanned 'MF' x 2 model (16 Mamba heads in 2 groups), random variables, and 4 rows of 13
  tokens: row 0 packs documents of 7 and 6 tokens (the boundary inside a chunk of 4); row 1
  is the first alone after 6 padding tokens (segment 0, as the Generator left-pads), row 2 the
  second alone before padding; row 3 is row 0 as one document. Their full-forward logits in
  float32 and bfloat16 compute (the same float32 parameters)."""
  cfg = config()
  variables = random_params(models.build(cfg), np.random.default_rng(5))
  tokens = np.random.default_rng(3).integers(0, 260, 13)
  first, second = tokens[:7], tokens[7:]
  tokens_BT = np.stack([tokens, np.pad(first, (6, 0)), np.pad(second, (0, 7)), tokens])
  seg_BT = np.array([[1] * 7 + [2] * 6, [0] * 6 + [1] * 7, [1] * 6 + [0] * 7, [1] * 13])
  pos_BT = np.array([list(range(7)) + list(range(6)), [0] * 6 + list(range(7)),
                     list(range(13)), list(range(13))])
  logits = {dtype: jax.jit(lambda v, c=config(dtype=dtype): forward(
      c, v, tokens_BT, pos_BT, seg_BT)[0])(variables) for dtype in ('float32', 'bfloat16')}
  return variables, (tokens_BT, pos_BT, seg_BT), logits


def test_packed_documents_equal_each_alone_and_bfloat16_stays_near_float32(rows):
  """Mamba sees only its own document: the packed row's logits are each
  document's alone, and not those of the row as one document. bfloat16 compute: logits
  within 2e-2 of float32 (relative)."""
  _, _, logits = rows
  logits_BTV = logits['float32']
  np.testing.assert_allclose(logits_BTV[0, :7], logits_BTV[1, 6:], atol=1e-5)
  np.testing.assert_allclose(logits_BTV[0, 7:], logits_BTV[2, :6], atol=1e-5)
  assert np.abs(np.asarray(logits_BTV[0, 7:] - logits_BTV[3, 7:])).max() > 1e-3
  relative = float(jnp.linalg.norm(logits['bfloat16'] - logits_BTV) / jnp.linalg.norm(logits_BTV))
  assert relative <= 2e-2, relative


@pytest.mark.parametrize('dtype,tolerance', [('float32', 1e-4), ('bfloat16', 2e-3)])
def test_prefill_then_decode_equals_the_full_forward(rows, dtype, tolerance):
  """Prefill of 5 tokens (two chunks of 4, the second padded), then one token a step through
  the scanned model's caches (row 0 crosses its document boundary while decoding; row 1
  prefills padding first): the full forward's logits within 1e-4 (float32; bfloat16: 0.2%
  of the largest logit)."""
  variables, (tokens_BT, pos_BT, seg_BT), logits = rows
  cfg, full_BTV, k = config(dtype=dtype), logits[dtype], 5
  step = jax.jit(lambda v, x, p, s, c: forward(cfg, v, x, p, s, c)[::2])
  cache = lm.init_cache(cfg, tokens_BT.shape[0], tokens_BT.shape[1])
  logits_BTV, cache = step(variables, tokens_BT[:, :k], pos_BT[:, :k], seg_BT[:, :k], cache)
  outs = [logits_BTV]
  for i in range(k, tokens_BT.shape[1]):
    logits_BTV, cache = step(variables, tokens_BT[:, i:i + 1], pos_BT[:, i:i + 1],
                             seg_BT[:, i:i + 1], cache)
    outs.append(logits_BTV)
  got_BTV = jnp.concatenate(outs, 1)
  scale = 1.0 if dtype == 'float32' else float(jnp.abs(full_BTV).max())
  err = float(jnp.abs(got_BTV - full_BTV).max())
  assert err <= tolerance * scale, (dtype, err, scale)


def test_the_cache_does_not_grow_with_the_generated_length():
  cfg = config()
  short, long = lm.init_cache(cfg, 2, 16), lm.init_cache(cfg, 2, 65536)
  mamba_caches = lambda c: jax.tree.map(lambda x: x.shape, c['blocks']['0M'])
  assert mamba_caches(short) == mamba_caches(long)
  ssm = short['blocks']['0M']['ssm_BNHP']
  assert ssm.dtype == jnp.float32 and ssm.shape == (2, 2, 16, 8, 4)  # layers, batch, N, H, P


def test_analytic_flops_within_15_percent_of_xla():
  """A loop-free configuration: one chunk (the chunk-to-chunk scan runs once), layers
  unrolled, widths where the SSD core is a fair part of the count."""
  cfg = tiny_model_config('mamba2_tiny', **{
      'pattern': 'MM', 'd_model': 256, 'scan_layers': False, 'mamba.head_dim': 64,
      'mamba.state_dim': 64, 'mamba.chunk': 64})
  model = models.build(cfg)
  shape = (2, 64)
  assert not lm.xla_counts_loops_once(cfg, shape[1])
  tokens = jax.ShapeDtypeStruct(shape, jnp.int32)
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), jnp.zeros(shape, jnp.int32), positions_BT=jnp.zeros(shape, jnp.int32),
      segment_ids_BT=jnp.ones(shape, jnp.int32))))
  # XLA's count of the lowered program (compiling it counts the same here, 0.3% apart)
  xla = flops.xla_flops(jax.jit(lambda v, x: model.apply(
      v, x, positions_BT=x, segment_ids_BT=x)[0]).lower(params, tokens))
  analytic = lm.flops_per_token(cfg, shape[1]) * shape[0] * shape[1]
  assert abs(analytic / xla - 1) < 0.15, (analytic, xla)


@pytest.mark.parametrize('field,value,match', [
    ('mamba.groups', 3, r'model.mamba.groups=3 must divide the 4 heads'),
    ('mamba.precision', 'fast', r"model.mamba.precision='fast' is not one of"),
    ('mamba.head_dim', 48, r'model.mamba.expand=2 x model.d_model=64 is not a positive '
                           r'multiple of model.mamba.head_dim=48'),
    ('mamba.dt_limit_min', -1.0, r'model.mamba.dt_limit_min=-1.0 must be >= 0 and below'),
    ('bidirectional', True, r"has 'M' \(Mamba2\), which is causal only"),
])
def test_bad_fields_are_one_line(field, value, match):
  with pytest.raises(ValueError, match=match) as e:
    models.build(tiny_model_config('mamba2_tiny', **{field: value}))
  assert '\n' not in str(e.value)
