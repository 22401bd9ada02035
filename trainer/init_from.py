"""`config.init_from`: a run that starts from another model's parameters.

  hf:/dir    a Hugging Face checkpoint (models/hf/init_from.py)
  run:/dir   an archlab run's workdir: its latest checkpoint's parameters, its tokenizer

`prepare(config)` runs before the data and the model are built: it checks the model config
against the source (a field that changes the function or the parameters must match; runtime
fields such as dtype or remat may differ; `model.vocab_size=0` takes the source's) and points
the data at the source's tokenizer. `load_params(config)` gives the parameters where a fresh
run would initialise them (a resumed run reads its own checkpoint instead).

Adaptation from an autoregressive model (as Dream and LLaDA's AR-initialised variants do): a
run whose objective trains a bidirectional backbone (masked or block diffusion) may start
from a causal model. `ADAPTED` fields are the ones that adaptation changes: the same weights
with the causal mask dropped (`model.bidirectional=True`) and, for block diffusion, the
block mask (`model.diffusion_block`). The prediction is not shifted: position l's output
predicts token l (MDLM/LLaDA), so the AR head's meaning (position l predicts l + 1) is
relearned; Dream's shifted prediction is not done yet.

Adaptation into sparse attention (DeepSeek V3.2's recipe: a dense checkpoint, then the
indexer's warm-up): a model whose pattern has `S` (DSA) or `B` (MoBA) where the source has
`A` starts from the source's parameters. `S` holds `A`'s MLA parameters plus an `indexer`,
which a source without one cannot give: `load_params(config, fresh)` takes those from the
fresh initialisation `fresh` and every other parameter from the source (`B` adds none). The
fields under `SPARSE_FIELDS` and the pattern may then differ; anything else must match.
"""

from __future__ import annotations

import json
import os

from absl import logging
import jax

import errors
from configs import common as configs_common
from models import lm
from models import objectives
from models import schema
from models.hf import init_from as hf_init_from
from trainer import checkpoint

RUN_SCHEME = 'run:'
ADAPTED = ('bidirectional', 'diffusion_block')
# pattern character of the adapted model -> the source's character it starts from
SPARSE_FROM = {'S': 'A', 'B': 'A'}
SPARSE_FIELDS = ('dsa', 'moba')
# parameters a sparse sublayer has beyond its source's, initialised fresh
FRESH_MODULES = ('indexer',)


def sparse_adaptation(pattern: str, source_pattern: str, init_from: str) -> bool:
  """Whether `pattern` is `source_pattern` with some `A`s made sparse (`SPARSE_FROM`); False
  when the two are equal; a ConfigError naming both for any other difference."""
  if pattern == source_pattern:
    return False
  if len(pattern) == len(source_pattern) and all(
      a == b or SPARSE_FROM.get(a) == b for a, b in zip(pattern, source_pattern)):
    return True
  raise errors.ConfigError(
      f'init_from={init_from}: model.pattern={pattern!r} but the source has {source_pattern!r}; '
      'a pattern may differ from its source only by sparse attention (S or B) where the source '
      'has A')


def adapted_fields(config, source_pattern: str | None = None) -> tuple[str, ...]:
  """The model fields the source may differ in: `ADAPTED` for a bidirectional objective, the
  pattern and `SPARSE_FIELDS` for a sparse adaptation of `source_pattern`."""
  backbone = objectives.get(config.objective.name).BACKBONE
  fields = ADAPTED if backbone == 'bidirectional' else ()
  if source_pattern is not None and sparse_adaptation(config.model.pattern, source_pattern,
                                                      config.init_from):
    fields += ('pattern',) + SPARSE_FIELDS
  return fields


def merge_fresh(loaded, fresh, init_from: str, renamed=None):
  """`loaded` with the parameters it lacks under a `FRESH_MODULES` module taken from `fresh`
  (a sparse adaptation's new indexer), its sublayers' names changed by `renamed` ({'0A':
  '0S'}); a ConfigError for any other parameter either side lacks or a shape that differs."""
  def rename(key):
    for old, new in (renamed or {}).items():
      key = key.replace(f"['{old}']", f"['{new}']")
    return key

  ours = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(fresh)}
  theirs = {rename(jax.tree_util.keystr(k)): v
            for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
  fresh_key = lambda key: any(f"['{m}']" in key for m in FRESH_MODULES)
  extra = sorted(set(theirs) - set(ours))
  missing = sorted(k for k in set(ours) - set(theirs) if not fresh_key(k))
  if extra or missing:
    which = f'the source has {extra[0]}' if extra else f'the model has {missing[0]}'
    raise errors.ConfigError(f'init_from={init_from}: the source\'s parameters do not fit the '
                             f'model: {which} and the other side does not')
  for key, value in theirs.items():
    if tuple(value.shape) != tuple(ours[key].shape):
      raise errors.ConfigError(f'init_from={init_from}: parameter {key} has shape '
                               f'{tuple(value.shape)} in the source, {tuple(ours[key].shape)} here')
  taken = [k for k in ours if k not in theirs]
  if taken:
    logging.info('init_from: %d parameters initialised fresh (%s ...)', len(taken), taken[0])
  return jax.tree_util.tree_map_with_path(
      lambda k, v: theirs.get(jax.tree_util.keystr(k), v), fresh)


def sublayer_names(pattern: str, source_pattern: str, init_from: str) -> dict[str, str]:
  """{source sublayer name: name here} (models/lm.py names them index-in-unit + character)
  for the sublayers a sparse adaptation changes; the two patterns must repeat alike."""
  unit, repeats = lm.split_pattern(pattern)
  source_unit, source_repeats = lm.split_pattern(source_pattern)
  if repeats != source_repeats:
    raise errors.ConfigError(
        f'init_from={init_from}: model.pattern={pattern!r} repeats {unit!r} {repeats} times, '
        f'the source\'s {source_pattern!r} repeats {source_unit!r} {source_repeats} times; make '
        'every repeat sparse alike')
  return {f'{i}{b}': f'{i}{a}' for i, (a, b) in enumerate(zip(unit, source_unit)) if a != b}


def run_dir(init_from: str) -> str:
  path = init_from[len(RUN_SCHEME):]
  if not path or not os.path.isfile(os.path.join(path, 'config.json')):
    raise errors.ConfigError(f'init_from={init_from!r}: {path or "(empty)"} is not an archlab '
                             'run\'s workdir (no config.json)')
  return path


def _saved(path: str) -> dict:
  with open(os.path.join(path, 'config.json')) as f:
    return json.load(f)


def prepare(config):
  """Checks the model against the source and takes its tokenizer (module docstring);
  changes `config` in place and returns it."""
  init_from = config.init_from
  if init_from.startswith(hf_init_from.SCHEME):
    return hf_init_from.prepare(config, skip=lambda source_pattern: adapted_fields(
        config, source_pattern))
  if not init_from.startswith(RUN_SCHEME):
    raise errors.ConfigError(f'init_from={init_from!r} is neither hf:/checkpoint_dir nor '
                             'run:/workdir')
  path = run_dir(init_from)
  saved = _saved(path)
  if not config.model.vocab_size:
    config.model.vocab_size = saved['model']['vocab_size']
  theirs = schema.model_defaults()
  for name, value in schema.leaves(saved['model']).items():
    configs_common.set_field(theirs, name, value)
  diffs = schema.diff(config.model, theirs, skip=tuple(schema.resumable_fields()) +
                      adapted_fields(config, theirs.pattern))
  if diffs:
    shown = '; '.join(f'model.{k}={a!r} but the run has {b!r}' for k, a, b in diffs[:3])
    more = f' (and {len(diffs) - 3} more)' if len(diffs) > 3 else ''
    raise errors.ConfigError(f'init_from={init_from}: the model config differs from {path}: '
                             f'{shown}{more}; set those fields to the run\'s')
  data = saved.get('data', {})
  tokenizer = os.path.join(path, 'tokenizer.json')
  if not config.data.tokenizer_path:
    if os.path.isfile(tokenizer):
      config.data.tokenizer, config.data.tokenizer_path = 'bpe', tokenizer
    else:
      config.data.tokenizer = data.get('tokenizer', config.data.tokenizer)
      config.data.tokenizer_path = data.get('tokenizer_path', '')
  return config


def load_params(config, fresh=None):
  """The source's parameters (numpy), laid out for `config.model`; a sparse adaptation's new
  parameters come from `fresh` (the model's initialisation), which it then needs."""
  if config.init_from.startswith(hf_init_from.SCHEME):
    params, source_pattern = hf_init_from.load_params(
        config, skip=lambda source_pattern: adapted_fields(config, source_pattern))
  else:
    source, params, _ = checkpoint.read_model(run_dir(config.init_from))
    source_pattern = source.pattern
    logging.info('init_from: parameters from %s', config.init_from)
  if not sparse_adaptation(config.model.pattern, source_pattern, config.init_from):
    return params
  if fresh is None:
    raise ValueError('load_params: a sparse adaptation needs the fresh parameters (fresh=)')
  return merge_fresh(params, fresh, config.init_from, renamed=sublayer_names(
      config.model.pattern, source_pattern, config.init_from))
