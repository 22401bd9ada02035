"""`config.init_from='hf:/path'`: a run that starts from a Hugging Face checkpoint.

The trainer calls `prepare(config)` before it builds data and model, and `load_params(config)`
where it would initialise fresh parameters (a resumed run reads its own checkpoint instead).
The run's model config must describe the checkpoint's model (runtime fields such as
scan_layers, dtype or remat may differ); `model.vocab_size=0` takes the checkpoint's. The data
uses the checkpoint's tokenizer.json when it has one and `data.tokenizer_path` is unset.
"""

from __future__ import annotations

from absl import logging

import errors
from models.hf import family as family_lib
from models.hf import files
from models.hf import interop

SCHEME = 'hf:'


def checkpoint_path(init_from: str) -> str:
  if not init_from.startswith(SCHEME) or len(init_from) == len(SCHEME):
    raise errors.ConfigError(f'init_from={init_from!r} is not hf:/path/to/checkpoint_dir')
  return init_from[len(SCHEME):]


def prepare(config, skip=lambda source_pattern: ()):
  """Checks `config.model` against the checkpoint and points the data at its tokenizer.
  Fields `skip(the checkpoint's pattern)` names may differ (an adaptation's:
  trainer/init_from.py).

  Changes `config` in place (the trainer passes its own copy) and returns it.
  """
  path = checkpoint_path(config.init_from)
  _, fields, source = interop.translate_config(path)
  if not config.model.vocab_size:
    config.model.vocab_size = fields['vocab_size']
  theirs = family_lib.model_config(fields, runtime_from=config.model)
  diffs = family_lib.architecture_diff(config.model, theirs, skip=skip(theirs.pattern))
  if diffs:
    shown = '; '.join(f'model.{k}={a!r} but the checkpoint has {b!r}' for k, a, b in diffs[:3])
    more = f' (and {len(diffs) - 3} more)' if len(diffs) > 3 else ''
    raise errors.ConfigError(f'init_from={config.init_from}: the model config differs from {source}: '
                     f'{shown}{more}; set those fields to the checkpoint\'s')
  tokenizer = files.tokenizer_file(path)
  if tokenizer and not config.data.tokenizer_path:
    config.data.tokenizer = 'bpe'
    config.data.tokenizer_path = tokenizer
    logging.info('init_from: the data uses the checkpoint\'s tokenizer %s', tokenizer)
  return config


def load_params(config, skip=lambda source_pattern: ()):
  """(the checkpoint's parameters (numpy) laid out for `config.model`, its pattern)."""
  imported, params = interop.import_hf(checkpoint_path(config.init_from), config)
  diffs = family_lib.architecture_diff(config.model, imported.model,
                                       skip=skip(imported.model.pattern))
  assert not diffs, diffs  # prepare() checked this before the data and model were built
  logging.info('init_from: parameters from %s', config.init_from)
  return params, imported.model.pattern
