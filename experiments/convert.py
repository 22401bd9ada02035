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
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

import errors
from configs import common as configs_common
from models import hf
from models import schema
from models.hf import family as family_lib
from models.hf import files as hf_files
from models.hf import interop
from trainer import checkpoint
from trainer import state as state_lib

_FROM = flags.DEFINE_string('from', None, 'hf:/dir or archlab:/workdir to read.')
_TO = flags.DEFINE_string('to', None, 'archlab:/dir or hf:/dir to write.')
_STEP = flags.DEFINE_integer('step', None, 'archlab source: the checkpoint step (default latest).')
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


def read_archlab(workdir: str, step: int | None = None):
  """(model config, params, other collections) of a workdir's latest checkpoint (or `step`),
  as numpy; the collections (e.g. the MoE routing biases) are {} for most models."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise errors.CheckpointError(f'{workdir}: no checkpoints/ directory (not an archlab workdir)')
  mngr = ocp.CheckpointManager(directory, item_names=('state', 'data', 'config'),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise errors.CheckpointError(f'{workdir}: no checkpoint'
                                 f'{"" if step is None else f" at step {step}"} '
                                 f'(steps: {list(mngr.all_steps())})')
  saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  model_config = configs_common.model_defaults()
  for name, value in schema.leaves(saved).items():
    try:
      family_lib.set_field(model_config, name, value)
    except KeyError:
      raise errors.CheckpointError(f'{workdir}: checkpoint {step} has model.{name}, which the '
                                   'model config (models/schema.py) no longer has') from None
  shapes = interop.variable_shapes(model_config)
  abstract = {}
  for collection, paths in shapes.items():
    dtype = jnp.dtype(model_config.param_dtype) if collection == 'params' else jnp.float32
    abstract[collection] = interop.unflatten(
        {path: jax.ShapeDtypeStruct(shape, dtype) for path, shape in paths.items()})
  item = {'params': abstract.pop('params')}
  if abstract:  # the trainer keeps the other collections in state['collections']
    item['collections'] = abstract
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True)))['state']
  mngr.close()
  return model_config, restored['params'], restored.get('collections', {})


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
    print(f'wrote {dst} ({config.model.pattern.count("A")} layers, vocab '
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
