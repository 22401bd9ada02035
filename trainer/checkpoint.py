"""Checkpoints with orbax: train state, data iterator state and the model config, atomically.

Each checkpoint holds three items: `state` (step, params, optimizer state), `data` (the
grain iterator state and the data's fingerprint, JSON) and `config` (the run's model config,
JSON). A workdir whose latest checkpoint was written for a different model config is refused
before anything is written, so a run is never overwritten by mistake.

Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` when every
item is written, then writes its commit marker; a step being written is never listed.
`restore_latest` goes further back when the newest step does not read (data files truncated
or overwritten, metadata missing, no commit marker, a config that does not parse): each such
step is reported in one line and renamed `<step>.damaged-<reason>` (never deleted), and the
run resumes from the newest step that reads. A save that fails on the file system (a full
disk, a file size limit, a read-only mount) is one line naming the step and the OS error.
"""

from __future__ import annotations

import json
import os
import re

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import errors
from configs import common as configs_common
from models import schema
from models.hf import interop


COMMIT_MARKER = 'commit_success.txt'  # orbax writes it last into a finished step directory
FINGERPRINT_KEY = 'archlab_data_fingerprint'  # beside the grain iterator state in `data`


class ConfigMismatchError(errors.CheckpointError):
  pass


class WriteError(errors.CheckpointError):
  """A checkpoint could not be written (full disk, size limit, read-only file system)."""


def manager(workdir: str, keep: int, async_checkpoint: bool = True) -> ocp.CheckpointManager:
  """The workdir's CheckpointManager; `async_checkpoint` writes in a background thread
  (`wait_until_finished` joins it), else `save` returns once the step is on disk."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_checkpoint,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options, item_names=('state', 'data', 'config'))


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, model_config: dict):
  """Starts writing checkpoint `step` (and returns once it is written when the manager is
  synchronous). An asynchronous save of an earlier step is waited for first, so that its
  failure names its own step."""
  wait(mngr, mngr.latest_step())
  with write_errors(mngr, step):
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(model_config)))


def wait(mngr: ocp.CheckpointManager, step: int | None) -> None:
  """Waits for an asynchronous save (of `step`) to be on disk; its failure is a WriteError."""
  with write_errors(mngr, step):
    mngr.wait_until_finished()


class write_errors:  # pylint: disable=invalid-name
  """Turns a file-system failure while a checkpoint is written into one line (WriteError)."""

  def __init__(self, mngr: ocp.CheckpointManager, step: int | None):
    self.mngr, self.step = mngr, step

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if error is None or not isinstance(error, Exception):
      return False
    reason = os_error(error)
    if reason is None:
      return False
    steps = [s for s in self.mngr.all_steps() if s != self.step]
    kept = (f'the checkpoint at step {max(steps)} is kept' if steps else
            'no checkpoint was written')
    raise WriteError(f'could not write the checkpoint{"" if self.step is None else f" at step {self.step}"} '
                     f'in {self.mngr.directory}: {reason}; {kept} (the partial write stays in a '
                     f'*.orbax-checkpoint-tmp* directory that is never read)') from error


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def os_error(error: BaseException) -> str | None:
  """'Strerror (errno N)' when `error` (or what caused it) is an OS error, else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno:
      return f'{os.strerror(error.errno)} (errno {error.errno})'
    code = _OS_ERROR_CODE.search(str(error))  # TensorStore's errors carry the code as text
    if code:
      return f'{os.strerror(int(code.group(1)))} (errno {code.group(1)})'
    error = error.__cause__ or error.__context__
  return None


def check_config(mngr: ocp.CheckpointManager, workdir: str, model_config: dict,
                 skip=()) -> int | None:
  """Returns the latest step, after checking it was written for `model_config`: the model
  fields must mean the same (`models.schema.diff`), except those under `skip`."""
  step = mngr.latest_step()
  if step is None:
    return None
  saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  _check_saved_config(saved, step, workdir, model_config, skip)
  return step


def _check_saved_config(saved: dict, step: int, workdir: str, model_config: dict, skip) -> None:
  diffs = schema.diff(saved, json.loads(json.dumps(model_config)), skip=skip)
  if diffs:
    shown = '; '.join(f'model.{k}: {a!r} in the checkpoint, {b!r} now' for k, a, b in diffs[:3])
    raise ConfigMismatchError(
        f'workdir {workdir} holds a checkpoint (step {step}) of a different model config '
        f'({shown}); nothing was written: use a new --workdir, or delete '
        f'{os.path.join(workdir, "checkpoints")} to start fresh')


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


class _Damaged(Exception):
  """A step that does not read: `reason` (a word for the directory name) and `detail`."""

  def __init__(self, reason: str, detail: str):
    super().__init__(reason, detail)
    self.reason, self.detail = reason, detail


def _first_line(error: BaseException, limit: int = 160) -> str:
  text = str(error).strip().splitlines()
  line = f'{type(error).__name__}: {text[0] if text else "(no message)"}'
  return line if len(line) <= limit else line[:limit - 3] + '...'


def _read_step(mngr, step: int, workdir: str, abstract_state, model_config: dict, skip):
  """(state, data state) of `step`; a step that does not read raises _Damaged."""
  step_dir = os.path.join(str(mngr.directory), str(step))
  if not os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
    raise _Damaged('uncommitted', f'no {COMMIT_MARKER}: the save did not finish')
  try:
    saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  except Exception as e:  # pylint: disable=broad-except
    raise _Damaged('config', f'the model config does not parse ({_first_line(e)})') from e
  if not isinstance(saved, dict):
    raise _Damaged('config', f'the model config is {type(saved).__name__}, not a JSON object')
  _check_saved_config(saved, step, workdir, model_config, skip)  # another model: refused
  for name in ('state/_METADATA', 'state/manifest.ocdbt'):
    if not os.path.isfile(os.path.join(step_dir, name)):
      raise _Damaged('metadata', f'{name} is missing')
  try:
    return restore(mngr, step, abstract_state)
  except FileNotFoundError as e:
    raise _Damaged('metadata', f'a metadata file is missing ({_first_line(e)})') from e
  except Exception as e:  # pylint: disable=broad-except
    raise _Damaged('data', f'the arrays do not read ({_first_line(e)})') from e


def restore_latest(mngr: ocp.CheckpointManager, workdir: str, abstract_state,
                   model_config: dict, skip=()):
  """(step, state, data state) of the newest checkpoint that reads, or None without any.

  Newer steps that do not read are logged in one line each and renamed
  `<step>.damaged-<reason>` (by process 0); when no step reads, a CheckpointError says so
  and nothing is renamed. A step of another model config raises ConfigMismatchError.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  damaged, found = [], None
  for step in steps:
    try:
      found = (step, *_read_step(mngr, step, workdir, abstract_state, model_config, skip))
      break
    except _Damaged as e:
      damaged.append((step, e))
  directory = str(mngr.directory)
  if found is None:
    listed = '; '.join(f'step {s}: {e.reason} ({e.detail})' for s, e in damaged)
    raise errors.CheckpointError(
        f'{directory}: no checkpoint reads ({listed}); nothing was moved: move the damaged '
        f'steps away, or use a new --workdir')
  for step, e in damaged:
    aside = _aside_name(directory, step, e.reason)
    logging.warning('checkpoint step %d in %s is damaged (%s: %s); moved it aside to %s and '
                    'resuming from step %d', step, directory, e.reason, e.detail, aside, found[0])
    if jax.process_index() == 0:
      os.rename(os.path.join(directory, str(step)), aside)
  if damaged:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('archlab: damaged checkpoints moved aside')
    mngr.reload()
  return found


def _aside_name(directory: str, step: int, reason: str) -> str:
  """`<step>.damaged-<reason>`, with `-2`, `-3`... when that name is taken already."""
  base = os.path.join(directory, f'{step}.damaged-{reason}')
  path, n = base, 1
  while os.path.exists(path):
    n += 1
    path = f'{base}-{n}'
  return path


def read_model(workdir: str, step: int | None = None):
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
  model_config = schema.model_defaults()
  for name, value in schema.leaves(saved).items():
    try:
      configs_common.set_field(model_config, name, value)
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
