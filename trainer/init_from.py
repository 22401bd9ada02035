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
"""

from __future__ import annotations

import json
import os

from absl import logging

import errors
from configs import common as configs_common
from models import objectives
from models import schema
from models.hf import init_from as hf_init_from
from trainer import checkpoint

RUN_SCHEME = 'run:'
ADAPTED = ('bidirectional', 'diffusion_block')


def adapted_fields(config) -> tuple[str, ...]:
  """The model fields the source may differ in: `ADAPTED` for a bidirectional objective."""
  backbone = objectives.get(config.objective.name).BACKBONE
  return ADAPTED if backbone == 'bidirectional' else ()


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
    return hf_init_from.prepare(config, skip=adapted_fields(config))
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
  diffs = schema.diff(config.model, theirs,
                      skip=tuple(schema.resumable_fields()) + adapted_fields(config))
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


def load_params(config):
  """The source's parameters (numpy), laid out for `config.model`."""
  if config.init_from.startswith(hf_init_from.SCHEME):
    return hf_init_from.load_params(config, skip=adapted_fields(config))
  _, params, _ = checkpoint.read_model(run_dir(config.init_from))
  logging.info('init_from: parameters from %s', config.init_from)
  return params
