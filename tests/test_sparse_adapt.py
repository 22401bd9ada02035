"""Adaptation of a dense run into sparse attention (trainer/init_from.py): DeepSeek V3.2's
path, a trained dense MLA run whose `A`s become DSA `S`s with a fresh indexer, then the
indexer's warm-up; and MoBA `B`s from GQA `A`s.

Tier 2 (a property with a known answer): with top-k covering the row, `S` is MLA and `B` is
GQA attention exactly, so the adapted model's logits equal the dense run's; the warm-up from
the dense run leaves every parameter outside the indexer bitwise the run's.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import errors
import models
from configs import transformer
from trainer import checkpoint
from trainer import init_from
from trainer import loop
from trainer import step as step_lib
from tests.conftest import packed_batch

T = 32


def tiny(preset, pattern, steps, **model):
  config = transformer.get_config(f'preset={preset},runlocal')
  config.model.update(dict(d_model=32, num_heads=2, num_kv_heads=2, mlp_dim=64, pattern=pattern))
  for key, value in model.items():
    config.model[key].update(value) if isinstance(value, dict) else config.model.update(
        {key: value})
  config.data.seq_len, config.train.batch_size = T, 8
  config.train.steps, config.train.eval_every, config.train.log_every = steps, steps, steps
  config.train.checkpoint_every = steps
  config.train.progress_bar, config.peak_flops = False, 1e11
  return config


@pytest.fixture(scope='module')
def dense_runs(tmp_path_factory):
  """{'mla': workdir, 'gqa': workdir} of two 4-step dense runs: deepseek_v3's MLA `AF`, and
  llama's GQA `AF`."""
  runs = {}
  for name, preset in (('mla', 'deepseek_v3_tiny'), ('gqa', 'llama_tiny')):
    workdir = tmp_path_factory.mktemp(name)
    loop.train_and_evaluate(tiny(preset, 'AF', 4), str(workdir))
    runs[name] = workdir
  return runs


def _logits(config, params, tokens_BT, pos_BT, seg_BT):
  model = models.build(config.model)
  apply = jax.jit(lambda p, *batch: model.apply({'params': p}, batch[0], positions_BT=batch[1],
                                                  segment_ids_BT=batch[2])[0])
  return np.asarray(apply(params, tokens_BT, pos_BT, seg_BT))


def _by_name(params):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize('kind', ['S', 'B'])
def test_a_dense_run_starts_a_sparse_model_with_its_logits_at_full_coverage(dense_runs, kind):
  source = dense_runs['mla' if kind == 'S' else 'gqa']
  if kind == 'S':  # top-k covering the row: DSA is MLA
    config = tiny('deepseek_v32_tiny', 'SF', 10, dsa=dict(topk=T, stage='sparse'))
  else:  # own block + 3 earlier of 8: MoBA is attention
    config = tiny('moba_tiny', 'BF', 10, moba=dict(block=8, topk=3))
  config.init_from = f'run:{source}'
  prepared = init_from.prepare(config.copy_and_resolve_references())
  source_config, source_params, _ = checkpoint.read_model(str(source))
  init = step_lib.make_init_fn(models.build(prepared.model), optax.identity(), T)
  fresh = jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(3))['params']
  params = init_from.load_params(prepared, fresh)
  source_leaves = _by_name(source_params)
  fresh_leaves = _by_name(fresh)
  indexer = 0
  for name, value in _by_name(params).items():
    if "'indexer'" in name:  # DSA's indexer: fresh
      indexer += 1
      np.testing.assert_array_equal(value, fresh_leaves[name])
    else:  # the source's sublayer 0A is 0S or 0B here
      np.testing.assert_array_equal(value, source_leaves[name.replace(f"'0{kind}'", "'0A'")],
                                    err_msg=name)
  assert indexer == (5 if kind == 'S' else 0), indexer
  batch = packed_batch(jax.random.key(1), 2, T, 260, num_segments=2)
  source_run = tiny('deepseek_v3_tiny' if kind == 'S' else 'llama_tiny', 'AF', 10)
  source_run.model = source_config
  np.testing.assert_allclose(_logits(prepared, params, *batch),
                             _logits(source_run, source_params, *batch), atol=2e-5, rtol=0)


def test_the_indexer_warmup_from_a_dense_run_trains_the_indexer_alone(dense_runs, tmp_path):
  """`python train.py --config=...deepseek_v32_tiny... --config.init_from=run:DENSE
  --config.model.dsa.stage=warmup --config.optim.trainable=indexer`, through the trainer."""
  config = tiny('deepseek_v32_tiny', 'SF', 6, dsa=dict(topk=8, stage='warmup'))
  config.optim.trainable = 'indexer'
  config.init_from = f'run:{dense_runs["mla"]}'
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(summary['final_eval_loss'])
  _, source, _ = checkpoint.read_model(str(dense_runs['mla']))
  _, adapted, _ = checkpoint.read_model(str(tmp_path))
  source, checked = _by_name(source), 0
  for name, value in _by_name(adapted).items():
    if "'indexer'" not in name:
      np.testing.assert_array_equal(value, source[name.replace("'0S'", "'0A'")], err_msg=name)
      checked += 1
  assert checked == len(source)


def test_only_sparse_attention_may_stand_where_the_source_has_attention(dense_runs):
  config = tiny('deepseek_v32_tiny', 'SE', 10)
  config.init_from = f'run:{dense_runs["mla"]}'
  with pytest.raises(errors.ConfigError, match=r"model.pattern='SE' but the source has 'AF'"):
    init_from.prepare(config)
  config = tiny('deepseek_v32_tiny', 'SF', 10)
  config.model.d_model = 64
  config.init_from = f'run:{dense_runs["mla"]}'
  with pytest.raises(errors.ConfigError, match=r'model.d_model=64 but the run has 32'):
    init_from.prepare(config)
  # A sparse run's `S`s do not go back to `A`s: the source's indexer would be left over.
  with pytest.raises(errors.ConfigError, match=r"model.pattern='AF' but the source has 'SF'"):
    init_from.sparse_adaptation('AF', 'SF', 'run:x')
  with pytest.raises(errors.ConfigError, match=r'the source has .*indexer'):
    init_from.merge_fresh({'op': {'indexer': {'w': jnp.zeros(2)}, 'q': jnp.zeros(2)}},
                          {'op': {'q': jnp.zeros(2)}}, 'run:x')
  with pytest.raises(errors.ConfigError, match=r"parameter \['q'\] has shape \(3,\) in the source"):
    init_from.merge_fresh({'q': jnp.zeros(3)}, {'q': jnp.zeros(2)}, 'run:x')
  assert init_from.sublayer_names('SFSF', 'AFAF', 'run:x') == {'0A': '0S'}
  with pytest.raises(errors.ConfigError, match=r"repeats 'SFAF' 1 times, the source's 'AFAF'"):
    init_from.sublayer_names('SFAF', 'AFAF', 'run:x')
