"""`import_hf(path)` and `export_hf(config, params, path)`: archlab <-> Hugging Face.

Import: config.json -> the family's translation -> an archlab run config; safetensors ->
the family's mapping table -> logical parameters -> the decoder's tree (`block_{r}` unrolled
or `blocks` scanned, by `config.model.scan_layers`), checked leaf by leaf against the shapes
`model.init` would give. Export runs the same tables backwards, after checking that the
family's config.json translates back into the same archlab architecture; a routing bias
trained in the `moe_bias` collection is first folded into the parameters.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import errors
import models
from configs import common as configs_common
from models import lm
from models.hf import families
from models.hf import family as family_lib
from models.hf import files
from models.layers import common
from models.layers import moe


def translate_config(path: str) -> tuple[family_lib.Family, dict, str]:
  """(family, archlab model fields, config.json name) of checkpoint directory `path`."""
  hf_config, source = files.read_config(path)
  family = families.get(hf_config.get('model_type'), source)
  fields = family.config_to_archlab(family_lib.HfConfig(hf_config, source))
  return family, fields, source


def variable_shapes(model_config) -> dict[str, dict[tuple, tuple]]:
  """{collection: {path in the decoder's tree: shape}} from `jax.eval_shape` of `model.init`."""
  model = models.build(model_config)
  dummy_BT = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_BT, positions_BT=dummy_BT,
                                               segment_ids_BT=dummy_BT + 1))
  return {name: {tuple(k.key for k in path): tuple(leaf.shape)
                 for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
          for name, tree in _unbox(abstract).items()}


def parameter_shapes(model_config) -> dict[tuple, tuple]:
  """{path in the decoder's tree: shape} of the parameters."""
  return variable_shapes(model_config)['params']


def fold_routing_bias(model_config, params, collections):
  """(model config, params) that compute what the model does with its `collections`.

  DeepSeek V3's auxiliary-loss-free bias trains in the `moe_bias` collection
  (`moe.bias_update_rate > 0`), not as a parameter. It only shifts the expert selection, as
  a checkpoint's e_score_correction_bias does, so it is added to `correction_bias` (created
  at zero where the model has none) and the returned config has `moe.correction_bias=True`.
  Models without a `moe_bias` collection come back unchanged.
  """
  other = sorted(k for k, v in (collections or {}).items() if v and k != moe.BIAS_COLLECTION)
  if other:
    raise family_lib.UnsupportedError(f'the model\'s {other[0]!r} collection has no place in a '
                                      'Hugging Face checkpoint')
  bias = _unbox((collections or {}).get(moe.BIAS_COLLECTION))
  if not bias:
    if model_config.moe.bias_update_rate:
      raise family_lib.UnsupportedError(
          f'model.moe.bias_update_rate={model_config.moe.bias_update_rate} trains a routing bias '
          f'in the {moe.BIAS_COLLECTION!r} collection, which was not given: pass the run\'s '
          f'collections (experiments.convert reads them from the checkpoint)')
    return model_config, params
  flat = {tuple(k.key for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(params)}
  for path, value in jax.tree_util.tree_leaves_with_path(bias):
    path = tuple(k.key for k in path)
    assert path[-1] == 'bias', path
    target = path[:-1] + ('correction_bias',)
    dtype = flat[target].dtype if target in flat else np.dtype(
        common.dtype_of(model_config.param_dtype))
    flat[target] = (flat.get(target, 0.0) + np.asarray(value, np.float32)).astype(dtype)
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  model_config.moe.correction_bias = True
  return model_config, unflatten(flat)


class Layout:
  """Logical paths (pattern position first) <-> the decoder's tree, unrolled or scanned."""

  def __init__(self, model_config):
    self.unit, self.repeats = lm.split_pattern(model_config.pattern)
    self.scanned = bool(model_config.scan_layers) and self.repeats > 1

  def locate(self, logical: tuple) -> tuple[tuple, int | None]:
    """(tree path, index on the stacked layer axis or None)."""
    if not isinstance(logical[0], int):
      return logical, None
    r, j = divmod(logical[0], len(self.unit))
    name = f'{j}{self.unit[j]}'
    if self.scanned:
      return ('blocks', name) + logical[1:], r
    return (f'block_{r}', name) + logical[1:], None

  def logical_shape(self, logical: tuple, shapes: dict) -> tuple:
    path, index = self.locate(logical)
    if path not in shapes:
      raise errors.ConfigError(f'the mapping table names archlab parameter {"/".join(path)}, which this '
                       'model does not have')
    return shapes[path][1:] if index is not None else shapes[path]


def unflatten(flat: dict[tuple, object]) -> dict:
  """{path tuple: leaf} -> the nested dict tree."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _unbox(tree):
  """Values without their logical-axis boxes (no sharding constraint, unlike nn.meta.unbox)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned)
                      else x, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _strip_params(params):
  params = _unbox(params)
  if set(params) == {'params'}:
    params = params['params']
  return params


def import_hf(path: str, config: ml_collections.ConfigDict | None = None):
  """Reads the Hugging Face checkpoint directory `path` into archlab.

  Returns `(config, params)`: `config` is a full run config (`configs.common.base_config()`,
  or a copy of `config` when given) whose model fields are the checkpoint's; runtime model
  fields (scan_layers, dtype, param_dtype, remat, attention.impl, ...) come from the given
  config. `params` is the decoder's parameter tree of numpy arrays in `model.param_dtype`
  (use it as `model.apply({'params': params}, ...)`), laid out unrolled or scanned by
  `config.model.scan_layers`. Anything archlab cannot express raises `UnsupportedError`
  (a ValueError) with one line naming the config.json field or tensor.
  """
  family, fields, source = translate_config(path)
  run = ml_collections.ConfigDict((config or configs_common.base_config()).to_dict())
  run.model = family_lib.model_config(fields, runtime_from=run.model)
  model_config = run.model
  shapes = parameter_shapes(model_config)
  layout = Layout(model_config)
  dtype = np.dtype(common.dtype_of(model_config.param_dtype))

  tensors = files.read_tensors(path)
  if family.read_as:
    try:
      tensors = family.read_as(tensors)
    except family_lib.UnsupportedError as e:
      raise family_lib.UnsupportedError(f'{path}: {e}') from None
  names = {}  # the name a mapping row uses -> the name in the files (prefix optional)
  for name in tensors:
    names[name] = name
    if not name.startswith(family.prefix) and not name.startswith('lm_head.'):
      names.setdefault(family.prefix + name, name)
  used, logical, slices = set(), {}, {}
  for row in family.tensors(model_config):
    if row.hf not in names:
      raise family_lib.UnsupportedError(f'{path}: tensor {row.hf} is missing (the config.json '
                                        f'of this {family.model_type} model needs it)')
    used.add(names[row.hf])
    targets = [layout.logical_shape(p, shapes) for p in row.ours]
    if row.index is not None:  # one slice (an expert) of each parameter
      targets = [t[1:] for t in targets]
    for p, value in zip(row.ours, row.to_archlab(tensors[names[row.hf]], targets)):
      if row.index is None:
        logical[p] = value
      else:
        slices.setdefault(p, {})[row.index] = value
  for p, pieces in slices.items():
    count = layout.logical_shape(p, shapes)[0]
    assert sorted(pieces) == list(range(count)), (p, sorted(pieces), count)
    logical[p] = np.stack([pieces[i] for i in range(count)])
  ignored = [re.compile(p) for p in family.ignored]
  if model_config.tie_embeddings:
    ignored.append(re.compile(r'lm_head\.weight'))  # transformers ties it to the embedding
  extra = sorted(n for n in set(tensors) - used if not any(p.fullmatch(n) for p in ignored))
  if extra:
    raise family_lib.UnsupportedError(f'{path}: tensor {extra[0]} has no place in archlab\'s '
                                      f'{family.model_type} model ({len(extra)} unmapped)')

  stacks: dict[tuple, list] = {}
  flat = {}
  for p, value in logical.items():
    tree_path, index = layout.locate(p)
    if index is None:
      flat[tree_path] = value.astype(dtype)
    else:
      stacks.setdefault(tree_path, [None] * layout.repeats)[index] = value
  for tree_path, values in stacks.items():
    flat[tree_path] = np.stack(values).astype(dtype)
  _check_tree(flat, shapes, family.model_type)
  return run, unflatten(flat)


def _check_tree(flat: dict, shapes: dict, model_type: str) -> None:
  missing = sorted(set(shapes) - set(flat))
  if missing:
    raise family_lib.UnsupportedError(
        f'archlab parameter {"/".join(missing[0])} has no tensor in the {model_type} mapping '
        f'table (models/hf/{model_type}.py); the model config has a feature the table lacks')
  for path, shape in shapes.items():
    assert flat[path].shape == shape, (path, flat[path].shape, shape)


def hf_config_for(model_config, model_type: str | None = None):
  """(family, config.json dict) that expresses `model_config` exactly, or one line why not."""
  candidates = [families.get(model_type, 'export_hf')] if model_type else [
      families.FAMILIES[k] for k in sorted(families.FAMILIES)]
  reasons = []
  for family in candidates:
    try:
      hf_config = family.config_to_hf(model_config)
      back = family.config_to_archlab(family_lib.HfConfig(hf_config, f'{family.model_type} '
                                                          'config.json'))
    except family_lib.UnsupportedError as e:
      reasons.append(f'{family.model_type}: {e}')
      continue
    diffs = family_lib.architecture_diff(model_config,
                                         family_lib.model_config(back, runtime_from=model_config))
    if not diffs:
      return family, hf_config
    name, ours, theirs = diffs[0]
    reasons.append(f'{family.model_type}: model.{name}={ours!r} (it can express {theirs!r})')
  raise family_lib.UnsupportedError('the model cannot be written as a Hugging Face checkpoint: '
                                    + '; '.join(reasons))


def export_hf(config, params, path: str, *, tokenizer_path: str | None = None,
              model_type: str | None = None, collections: dict | None = None) -> str:
  """Writes `params` of the model in `config` (a run config or its `.model`) to directory
  `path` as config.json + model.safetensors that transformers loads. The family is
  `model_type` or the first one that expresses the model exactly. `tokenizer_path` (a
  tokenizer.json) is copied beside them and sets bos/eos/pad ids. `collections` are the
  model's other variable collections (a run's `state['collections']`); a trained `moe_bias`
  is folded into the routing correction bias (`fold_routing_bias`). Returns the model_type.
  """
  trained = config.model if 'model' in config else config
  model_config, params = fold_routing_bias(trained, _strip_params(params), collections)
  try:
    family, hf_config = hf_config_for(model_config, model_type)
  except family_lib.UnsupportedError as e:
    if model_config is trained:
      raise
    raise family_lib.UnsupportedError(f'{e} (moe.correction_bias=True holds the routing bias '
                                      'trained with moe.bias_update_rate)') from None
  shapes = parameter_shapes(model_config)
  layout = Layout(model_config)
  flat = {tuple(k.key for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(params)}
  _check_tree(flat, shapes, family.model_type)
  extra = sorted(set(flat) - set(shapes))
  if extra:
    raise errors.ConfigError(f'params has {"/".join(extra[0])}, which model {model_config.pattern!r} '
                     'does not have')

  def logical(p):
    tree_path, index = layout.locate(p)
    return flat[tree_path] if index is None else flat[tree_path][index]

  tensors, covered = {}, set()
  for row in family.tensors(model_config):
    arrays = [logical(p) for p in row.ours]
    tensors[row.hf] = row.to_hf(arrays if row.index is None else [a[row.index] for a in arrays])
    covered.update(layout.locate(p)[0] for p in row.ours)
  uncovered = sorted(set(flat) - covered)
  if uncovered:
    raise family_lib.UnsupportedError(f'archlab parameter {"/".join(uncovered[0])} has no '
                                      f'tensor in the {family.model_type} mapping table')
  dtypes = {str(v.dtype) for v in tensors.values()}
  if len(dtypes) > 1:
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
  hf_config['torch_dtype'] = hf_config['dtype'] = dtypes.pop() if len(dtypes) == 1 else 'float32'
  hf_config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
  if tokenizer_path:
    hf_config.update(files.special_token_ids(tokenizer_path))
  files.write_checkpoint(path, hf_config, tensors)
  if tokenizer_path:
    files.copy_tokenizer(tokenizer_path, path)
  return family.model_type
