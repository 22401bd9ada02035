"""Converts checkpoints between Hugging Face and archlab, both ways.

  python -m experiments.convert --from=hf:/path/to/hf_dir --to=archlab:/path/to/dir
  python -m experiments.convert --from=archlab:/path/to/workdir --to=hf:/path/to/hf_dir

`hf:` is a transformers checkpoint directory (config.json + safetensors, tokenizer.json if
any). `archlab:` is a training workdir: reading takes the parameters and model config of its
latest checkpoint (or `--step`); writing makes a workdir holding one checkpoint (step 0) of
the parameters and model config, plus the tokenizer.json. That checkpoint has no optimizer
or data state, so it is read back by this tool, not resumed by train.py; to train from a
Hugging Face checkpoint use `train.py ... --config.init_from=hf:/path`.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

import errors
from configs import common as configs_common
from models import hf
from models.hf import files as hf_files
from trainer import checkpoint
from trainer import state as state_lib

_FROM = flags.DEFINE_string('from', None, 'hf:/dir or archlab:/workdir to read.')
_TO = flags.DEFINE_string('to', None, 'archlab:/dir or hf:/dir to write.')
# experiments.sample defines the same --step; a process importing both (tests) shares it.
_STEP = (flags.FLAGS['step'] if 'step' in flags.FLAGS else
         flags.DEFINE_integer('step', None, 'archlab source: the checkpoint step (default latest).'))
_SCAN = flags.DEFINE_bool('scan_layers', True, 'archlab destination: store layers stacked '
                          '(model.scan_layers), as the trainer does for that config.')
_MODEL_TYPE = flags.DEFINE_string('model_type', None, 'hf destination: the family (default: '
                                  'the first that expresses the model exactly).')
SCHEMES = ('hf', 'archlab')


def parse(spec: str, flag: str) -> tuple[str, str]:
  scheme, sep, path = spec.partition(':')
  if not sep or scheme not in SCHEMES or not path:
    raise errors.ConfigError(f'--{flag}={spec!r} is not hf:/path or archlab:/path')
  return scheme, path


def _is_bpe(tokenizer_path: str) -> bool:
  """True for a tokenizers-library tokenizer.json (not archlab's bytes marker file)."""
  with open(tokenizer_path, encoding='utf-8') as f:
    return 'archlab_tokenizer' not in json.load(f)


read_archlab = checkpoint.read_model  # (model config, params, collections) of a workdir


def write_archlab(workdir: str, config, params) -> None:
  """A workdir with one step-0 checkpoint of `params` and the model config."""
  if os.path.exists(os.path.join(workdir, 'checkpoints')):
    raise errors.CheckpointError(f'{workdir} already holds checkpoints/; give a new directory')
  mngr = checkpoint.manager(workdir, keep=1)
  state = {'step': np.zeros((), np.int32), 'params': params}
  checkpoint.save(mngr, 0, state, {}, state_lib.saved_model_config(config.model))
  mngr.wait_until_finished()
  mngr.close()


def convert(source: str, destination: str, *, step: int | None = None, scan_layers: bool = True,
            model_type: str | None = None) -> None:
  """Converts `source` (hf:/dir or archlab:/workdir) to `destination` of the other kind."""
  src_kind, src = parse(source, 'from')
  dst_kind, dst = parse(destination, 'to')
  if src_kind == dst_kind:
    raise errors.ConfigError(f'--from and --to are both {src_kind}: convert between hf and archlab')
  if src_kind == 'hf':
    base = configs_common.base_config()
    base.model.scan_layers = scan_layers
    config, params = hf.import_hf(src, base)
    write_archlab(dst, config, params)
    tokenizer = hf_files.tokenizer_file(src)
    if tokenizer:  # the trainer reloads workdir/tokenizer.json
      shutil.copyfile(tokenizer, os.path.join(dst, 'tokenizer.json'))
    print(f'wrote {dst} ({len(config.model.pattern)} sublayers, vocab '
          f'{config.model.vocab_size}) from {src}')
  else:
    model_config, params, collections = read_archlab(src, step)
    tokenizer = os.path.join(src, 'tokenizer.json')
    tokenizer = tokenizer if os.path.isfile(tokenizer) and _is_bpe(tokenizer) else None
    written = hf.export_hf(ml_collections.ConfigDict({'model': model_config}), params, dst,
                           tokenizer_path=tokenizer, model_type=model_type,
                           collections=collections)
    note = '' if tokenizer else ' (no tokenizer.json: the run used archlab\'s byte tokenizer)'
    print(f'wrote {dst} as model_type={written!r} from {src}{note}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _FROM.value or not _TO.value:
    raise app.UsageError('give --from and --to')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
  errors.run_main('convert', convert, _FROM.value, _TO.value, step=_STEP.value,
                  scan_layers=_SCAN.value, model_type=_MODEL_TYPE.value)


if __name__ == '__main__':
  app.run(main)
