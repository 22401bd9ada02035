"""DSA's two-stage training (models/layers/dsa.py, trainer/optim.py `optim.trainable`).

The dense warm-up (`dsa.stage=warmup`, `optim.trainable=indexer`) through the trainer's own
step: the parameters outside the indexer stay bitwise equal, the indexer's change, and the
share of the main attention's mass inside the indexer's top-k rises well above chance
(tier 2: chance is known, min(k, t+1) / (t+1) averaged over the queries). The optimizer
state has the same shapes whatever `optim.trainable` is, so stage 2 resumes from stage 1.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import errors
import models
from configs import transformer
from trainer import optim
from trainer import step as step_lib
from tests.conftest import next_token_objective
from tests.conftest import packed_batch
from tests.conftest import tiny_model_config

T, TOPK, STEPS = 32, 4, 30


def _config(trainable='indexer', pattern='SF'):
  config = transformer.get_config('preset=deepseek_v3_tiny,runlocal')
  config.model = tiny_model_config('deepseek_v3_tiny', pattern=pattern, **{
      'dsa.stage': 'warmup', 'dsa.topk': TOPK, 'dsa.index_heads': 4, 'dsa.index_head_dim': 16,
      'dsa.block': T})
  config.optim.update(trainable=trainable, lr=1e-2, warmup_steps=0, schedule='constant',
                      weight_decay=0.1)
  return config


@pytest.fixture(scope='module')
def warmup_run():
  """(initial params, params after STEPS warm-up steps, metrics of each step) of one `SF`
  model on one batch of 8 rows of 32 tokens. The main attention's query and key expansions
  are scaled up at init so its distribution is far from uniform (a trained model's is)."""
  config = _config()
  model = models.build(config.model)
  tx, schedule = optim.make_optimizer(config.optim, STEPS)
  init = step_lib.make_init_fn(model, tx, T)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(0))
  state['params'] = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 10 if jax.tree_util.keystr(path).endswith(("'q_b']", "'k_b']")) else v,
      state['params'])
  step, _ = step_lib.make_step_fns(model, tx, schedule, next_token_objective(260), config.train,
                                   freeze_collections=True)
  step = jax.jit(step)
  tokens_BT, pos_BT, seg_BT = packed_batch(jax.random.key(1), 8, T, 260, num_segments=1)
  batch = {'inputs': tokens_BT, 'targets': jnp.roll(tokens_BT, -1, 1), 'positions': pos_BT,
           'segment_ids': seg_BT, 'weights': jnp.ones((8, T), jnp.float32)}
  initial, history = state['params'], []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return initial, state['params'], history


def test_warmup_trains_the_indexer_alone(warmup_run):
  """After the warm-up, every parameter outside the indexer is bitwise what it was (weight
  decay 0.1 included) and every indexer parameter changed."""
  before, after, _ = warmup_run
  frozen = trained = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
    name = jax.tree_util.keystr(path)
    if "'indexer'" in name:
      assert not np.array_equal(a, b), f'{name} did not train'
      trained += 1
    else:
      assert np.array_equal(a, b), f'{name} changed in the warm-up'
      frozen += 1
  assert trained == 5 and frozen > 10, (trained, frozen)


def test_warmup_raises_the_attention_mass_inside_the_selection_above_chance(warmup_run):
  """`dsa/attention_mass` (the share of the head-summed main attention inside the indexer's
  top-4) starts near chance and ends at least 0.12 above it; the indexer KL falls."""
  _, _, history = warmup_run
  chance = np.mean([min(TOPK, t + 1) / (t + 1) for t in range(T)])
  first, last = history[0], history[-1]
  assert abs(float(first['dsa/attention_mass']) - chance) < 0.05, (first, chance)
  assert float(last['dsa/attention_mass']) > chance + 0.12, (last, chance)
  assert float(last['dsa/kl']) < 0.5 * float(first['dsa/kl'])


def test_optimizer_state_has_the_same_shapes_whatever_trains():
  """A stage-1 (`indexer`) checkpoint's optimizer state restores into stage 2 (`all`)."""
  config = _config()
  model = models.build(config.model)
  shapes = []
  for trainable in ('indexer', 'all'):
    config.optim.trainable = trainable
    tx, _ = optim.make_optimizer(config.optim, 10)
    state = jax.eval_shape(lambda r: nn.meta.unbox(step_lib.make_init_fn(model, tx, 8)(r)),
                           jax.random.key(0))
    shapes.append(jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), state['opt_state']))
  assert jax.tree_util.tree_structure(shapes[0]) == jax.tree_util.tree_structure(shapes[1])
  assert jax.tree.leaves(shapes[0]) == jax.tree.leaves(shapes[1])


def test_bad_trainable_values_are_one_line():
  with pytest.raises(errors.ConfigError, match=r"optim.trainable='router' is not one of"):
    optim.make_optimizer(_config(trainable='router').optim, 10)
  config = _config(pattern='AF')
  model = models.build(config.model)
  tx, _ = optim.make_optimizer(config.optim, 10)
  with pytest.raises(errors.ConfigError, match=r"optim.trainable='indexer' but the model has no"):
    jax.eval_shape(lambda r: step_lib.make_init_fn(model, tx, 8)(r), jax.random.key(0))
