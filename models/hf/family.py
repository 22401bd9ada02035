"""What a Hugging Face family is: a config translation and a mapping table.

A family (one `model_type` of transformers) is
  * `config_to_archlab(hf) -> {model field: value}`: reads config.json through `HfConfig`,
    refusing what archlab cannot express with one line naming the config.json field;
  * `config_to_hf(model_config) -> dict`: the config.json for an archlab model;
  * `tensors(model_config) -> [Tensor]`: the mapping table, one row per HF tensor.

Archlab parameters are named by logical paths: `('embed',)`, `('final_norm', 'scale')`, or a
path whose first element is an int, the sublayer's position in `model.pattern`:
`(2, 'op', 'q')` is the query projection of the third sublayer. `interop.Layout` turns
those into the decoder's real tree (`block_{r}` unrolled, or `blocks` with a leading layer
axis). A family module builds its table from rows.py's pieces and reads `model.pattern`
through pattern.py; families.py lists the families.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import numpy as np

import errors
from configs import common as configs_common
from models import schema

Path = tuple  # a logical archlab parameter path (see the module docstring)

class UnsupportedError(errors.ConfigError):
  """A checkpoint or config archlab cannot translate; the message is one line."""


class HfConfig:
  """A config.json's fields, with one-line refusals that name the file and the field."""

  def __init__(self, fields: dict, source: str):
    self.fields = dict(fields)
    self.source = source

  def get(self, key: str, default: Any = None) -> Any:
    value = self.fields.get(key)
    return default if value is None else value

  def refuse(self, key: str, why: str):
    value = self.fields.get(key)
    raise UnsupportedError(f'{self.source}: {key}={value!r} {why}')

  def require(self, key: str, allowed, default: Any = None) -> Any:
    """The field's value (or `default` when absent), which must be one of `allowed`."""
    value = self.get(key, default)
    if value not in allowed:
      self.refuse(key, f'is not supported by archlab (supported: {list(allowed)})')
    return value


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One row of a mapping table: a HF tensor and the archlab parameter(s) it holds.

  kind:
    'copy'   the same numbers in the same order (reshaped): norms, embeddings, biases,
             GPT-2's Conv1D weights, which are stored (in, out) like archlab's;
    'linear' a torch `nn.Linear` weight (out, in): transposed, then reshaped;
    'fused'  several archlab parameters concatenated along HF's last axis (GPT-2's c_attn);
    'fused_linear'  a torch `nn.Linear` weight (out, in), or its bias (out,), whose out axis
             is `groups` groups in turn, each holding its slice of every archlab parameter in
             order (Qwen3-Next's q_proj: per head, the query then its gate; with `groups=1`,
             Mamba-2's in_proj: z, then x, B, C, then dt); the archlab parameters' output
             axes must lead with the group axis (heads);
    'conv'   a torch depthwise `Conv1d` weight (channels, 1, taps) <-> archlab's (taps,
             channels...) kernels (models/layers/short_conv.py), several concatenated along
             the channels in order (Qwen3-Next's conv over q, k and v).
  `contract` is how many leading axes of the archlab parameter(s) are the input side
  (as in `models.layers.common.project`): 1 for `q` (D, N, H), 2 for `o` (N, H, D), 0 for
  vectors.
  `index`, when set, says the row holds one slice of the archlab parameter's leading axis
  (one expert of an (E, D, F) weight stored per expert, `experts.{e}.gate_proj.weight`);
  the table then has a row for every index, and shapes here are the slice's.
  """
  hf: str
  ours: tuple[Path, ...]
  kind: str = 'copy'
  contract: int = 1
  index: int | None = None
  groups: int = 1

  def __post_init__(self):
    assert self.kind in ('copy', 'linear', 'fused', 'fused_linear', 'conv'), self.kind
    assert self.kind in ('fused', 'fused_linear', 'conv') or len(self.ours) == 1, self

  def to_archlab(self, array: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The archlab arrays (with `shapes`) that HF's `array` holds."""
    self.check_shape(array, shapes)
    if self.kind == 'copy':
      return [array.reshape(shapes[0])]
    if self.kind == 'linear':
      return [array.T.reshape(shapes[0])]
    if self.kind == 'conv':
      sizes = np.cumsum([math.prod(s[1:]) for s in shapes])[:-1]
      taps_channels = array[:, 0, :].T
      return [piece.reshape(s) for piece, s in zip(np.split(taps_channels, sizes, axis=1), shapes)]
    if self.kind == 'fused_linear':
      grouped = array.T.reshape(-1, self.groups, array.shape[0] // self.groups)
      sizes = np.cumsum([self._group_size(s) for s in shapes])[:-1]
      return [piece.reshape(s) for piece, s in zip(np.split(grouped, sizes, axis=-1), shapes)]
    sizes = np.cumsum([math.prod(s[self.contract:]) for s in shapes])[:-1]
    return [piece.reshape(s) for piece, s in zip(np.split(array, sizes, axis=-1), shapes)]

  def check_shape(self, array: np.ndarray, shapes: list[tuple[int, ...]]) -> None:
    """Refuses, in one line, an HF `array` that does not hold archlab arrays of `shapes`."""
    expected = self.hf_shape(shapes)
    if tuple(array.shape) != expected:
      raise UnsupportedError(f'tensor {self.hf} has shape {tuple(array.shape)}, but the '
                             f'config gives {expected}')

  def _group_size(self, shape) -> int:
    """How many of one group's outputs (`fused_linear`) an archlab parameter holds."""
    return math.prod(shape[self.contract:]) // self.groups

  def to_hf(self, arrays: list[np.ndarray]) -> np.ndarray:
    if self.kind == 'conv':
      return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1).T[:, None, :]
    if self.kind == 'fused_linear':
      grouped = [a.reshape(-1, self.groups, self._group_size(a.shape)) for a in arrays]
      out_in = np.concatenate(grouped, axis=-1).reshape(grouped[0].shape[0], -1).T
      return out_in[:, 0] if self.contract == 0 else out_in  # a bias: one input row
    flat = [a.reshape(_matrix_shape(a.shape, self.contract)) for a in arrays]
    if self.kind == 'copy':
      return flat[0]
    if self.kind == 'linear':
      return flat[0].T
    return np.concatenate(flat, axis=-1)

  def hf_shape(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if self.kind == 'conv':
      return (sum(math.prod(s[1:]) for s in shapes), 1, shapes[0][0])
    if self.kind == 'fused_linear':
      out = self.groups * sum(self._group_size(s) for s in shapes)
      return (out,) if self.contract == 0 else (out, math.prod(shapes[0][:self.contract]))
    flat = [_matrix_shape(s, self.contract) for s in shapes]
    if self.kind == 'copy':
      return flat[0]
    if self.kind == 'linear':
      return flat[0][::-1]
    return flat[0][:-1] + (sum(f[-1] for f in flat),)


def _matrix_shape(shape, contract: int) -> tuple[int, ...]:
  """(in, out) with the first `contract` axes as `in`; a vector when `contract` is 0."""
  if contract == 0:
    return (math.prod(shape),)
  return (math.prod(shape[:contract]), math.prod(shape[contract:]))


@dataclasses.dataclass(frozen=True)
class Family:
  """One transformers `model_type`: config translation both ways and the mapping table."""
  model_type: str
  architecture: str                     # config.json "architectures", e.g. LlamaForCausalLM
  prefix: str                           # backbone prefix of tensor names, optional in files
  config_to_archlab: Callable[[HfConfig], dict]
  config_to_hf: Callable[[Any], dict]
  tensors: Callable[[Any], list[Tensor]]
  ignored: tuple[str, ...] = ()         # regexes of HF tensors that are buffers, not weights
  # Rewrites a checkpoint's {name: array} into the names the table reads (another storage
  # of the same weights, e.g. stacked experts), or None.
  read_as: Callable[[dict], dict] | None = None


STACKED_EXPERTS = re.compile(r'(.*\.mlp\.experts)\.(gate_up_proj|down_proj)')


def split_stacked_experts(tensors: dict) -> dict:
  """Per-expert tensors (`experts.{e}.gate_proj.weight`, ...) from experts stored stacked, as
  transformers 5 holds them in memory and a saved state_dict has them: `experts.gate_up_proj`
  (E, 2F, D) is each expert's gate_proj weight then its up_proj weight, `experts.down_proj`
  (E, D, F) its down_proj weight. Other tensors pass through."""
  out = {}
  for name, value in tensors.items():
    match = STACKED_EXPERTS.fullmatch(name)
    if not match:
      out.setdefault(name, value)
      continue
    prefix, kind = match.groups()
    if value.ndim != 3 or (kind == 'gate_up_proj' and value.shape[1] % 2):
      layout = '2 x width, hidden' if kind == 'gate_up_proj' else 'hidden, width'
      raise UnsupportedError(f'tensor {name} has shape {tuple(value.shape)}; stacked experts '
                             f'are (experts, {layout})')
    for e, w in enumerate(value):
      if kind == 'gate_up_proj':
        half = w.shape[0] // 2
        pieces = {'gate_proj': w[:half], 'up_proj': w[half:]}
      else:
        pieces = {'down_proj': w}
      for proj, piece in pieces.items():
        key = f'{prefix}.{e}.{proj}.weight'
        if key in tensors:
          raise UnsupportedError(f'tensor {key} is stored both on its own and in {name}')
        out[key] = piece
  return out


# ---------------------------------------------------------------------------------------------
# Model configs: applying translated fields, comparing architectures.


get_field = configs_common.get_field
set_field = configs_common.set_field


def model_config(fields: dict, runtime_from=None):
  """`configs.common.model_defaults()` with `fields` set; the fields interop ignores
  (`schema.interop_ignored_fields`: dtype, scan_layers, side-loss weights, ...) come from
  `runtime_from`."""
  cfg = configs_common.model_defaults()
  if runtime_from is not None:
    for name in schema.interop_ignored_fields():
      try:
        set_field(cfg, name, get_field(runtime_from, name))
      except KeyError:
        pass
  for name, value in fields.items():
    try:
      get_field(cfg, name)
    except KeyError:
      raise errors.ConfigError(f'model.{name} is not a field of the model config '
                               '(models/schema.py)') from None
    set_field(cfg, name, value)
  return cfg


def architecture_diff(ours, theirs, skip=()) -> list[tuple[str, Any, Any]]:
  """(field, ours, theirs) for each model field that changes the function or the parameters:
  `models.schema.diff` without the fields interop ignores (`schema.interop_ignored_fields`)
  and those in `skip`."""
  return schema.diff(ours, theirs, skip=tuple(schema.interop_ignored_fields()) + tuple(skip))


# ---------------------------------------------------------------------------------------------
# Shared pieces of config translation.


def bias_fields(hf: HfConfig, attention_key: str, mlp_key: str) -> dict:
  """Biases on q/k/v/o (`attention_key`) and on the MLP (`mlp_key`) as model fields."""
  attention, mlp = bool(hf.get(attention_key, False)), bool(hf.get(mlp_key, False))
  if attention == mlp:
    return {'use_bias': attention}
  if 'qkv_bias' not in configs_common.model_defaults().attention:
    hf.refuse(attention_key, f'differs from {mlp_key}={mlp}: archlab has one model.use_bias '
              'for attention and MLP')
  return {'use_bias': False, 'attention.qkv_bias': attention, 'attention.o_bias': attention,
          'mlp_bias': mlp}


def qkv_bias(cfg) -> bool:
  return bool(cfg.use_bias or cfg.attention.get('qkv_bias', False))


def o_bias(cfg) -> bool:
  return bool(cfg.use_bias or cfg.attention.get('o_bias', False))


def mlp_bias(cfg) -> bool:
  return bool(cfg.use_bias or cfg.get('mlp_bias', False))


# config.json rope_parameters keys of each rope_type archlab translates (those also in
# REQUIRED_ROPE_KEYS must be present) and the model.rope_scaling field of each.
ROPE_SCALING_KEYS = {
    'linear': ('factor',),
    'llama3': ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'),
    'yarn': ('factor', 'original_max_position_embeddings', 'beta_fast', 'beta_slow', 'mscale',
             'mscale_all_dim', 'attention_factor', 'truncate'),
}
REQUIRED_ROPE_KEYS = ('factor', 'low_freq_factor', 'high_freq_factor',
                      'original_max_position_embeddings')
_ROPE_FIELD = {'original_max_position_embeddings': 'original_max_len'}


def rope_fields(hf: HfConfig) -> dict:
  """RoPE theta and scaling from `rope_parameters` (transformers 5) or `rope_theta` /
  `rope_scaling` (transformers 4), translated where archlab's config has the fields."""
  if hf.get('rope_parameters') is not None:
    key, params = 'rope_parameters', dict(hf.get('rope_parameters'))
  else:
    key, params = 'rope_scaling', dict(hf.get('rope_scaling', {}))
    params.setdefault('rope_theta', hf.get('rope_theta', 10000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  fields = {'rope_theta': float(params['rope_theta'])}
  defaults = configs_common.model_defaults()
  fraction = params.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if fraction != 1.0:
    if 'rope_fraction' not in defaults:
      hf.refuse(key, f'has partial_rotary_factor={fraction}; archlab RoPE rotates whole heads')
    fields['rope_fraction'] = float(fraction)
  if kind == 'default':
    return fields
  if 'rope_scaling' not in defaults or kind not in ROPE_SCALING_KEYS:
    supported = ['default'] + (sorted(ROPE_SCALING_KEYS) if 'rope_scaling' in defaults else [])
    hf.refuse(key, f'has rope_type={kind!r}; archlab supports {supported}')
  ours = defaults.rope_scaling
  fields['rope_scaling.kind'] = kind
  for name, value in params.items():
    if name in ('rope_type', 'type', 'rope_theta', 'partial_rotary_factor'):
      continue
    field = _ROPE_FIELD.get(name, name)
    if field not in ours:
      hf.refuse(key, f'has {name}={value!r}, which archlab\'s model.rope_scaling cannot express')
    if value is not None:
      fields[f'rope_scaling.{field}'] = type(ours[field])(value)
  for name in ROPE_SCALING_KEYS[kind]:
    if name in REQUIRED_ROPE_KEYS and name not in params:
      hf.refuse(key, f'has rope_type={kind!r} without {name}')
  return fields


def rope_to_hf(cfg) -> dict:
  """config.json RoPE fields in both spellings (transformers 4 and 5 read one each)."""
  params = {'rope_type': 'default', 'rope_theta': float(cfg.rope_theta)}
  scaling = cfg.get('rope_scaling')
  if scaling is not None and scaling.kind != 'none':
    params['rope_type'] = scaling.kind
    for name in ROPE_SCALING_KEYS.get(scaling.kind, ()):
      value = scaling[_ROPE_FIELD.get(name, name)]
      if isinstance(value, bool) or value:  # 0 is archlab's 'unset' (mscale, attention_factor)
        params[name] = value
  if cfg.get('rope_fraction', 1.0) != 1.0:
    params['partial_rotary_factor'] = float(cfg.rope_fraction)
  legacy = {k: v for k, v in params.items() if k != 'rope_theta'}
  return {'rope_theta': float(cfg.rope_theta),
          'rope_scaling': None if legacy['rope_type'] == 'default' else legacy,
          'rope_parameters': params}
