"""The model config's schema, assembled from the decoder and every registered sublayer.

`model_defaults()` is config.model with its defaults: the decoder's own fields
(`lm.DEFAULTS`) and each sublayer class's `DEFAULTS`, declared beside its module
(models/sublayer.py). Two lists come from the same declarations:

  resumable_fields()        fields a resumed run may change: they change how a step computes,
                            not the parameters or the function (dtype, remat, attention.impl,
                            moe.dispatch, ...); every other field refuses the resume
  interop_ignored_fields()  fields Hugging Face interop neither translates nor compares: the
                            resumable ones and the training-only ones (side-loss weights,
                            init_std, scan_layers, ...); the caller's values are kept

`diff(a, b, skip=...)` is the one comparison of two model configs (checkpoints on resume,
`init_from`, HF export): it compares what the fields mean, not how they are spelled
(`canonical`), and a field one side lacks (a checkpoint written before the field existed)
counts as its default.
"""

from __future__ import annotations

from typing import Any

import ml_collections

import models
from models import sublayer

_MISSING = object()


def _classes() -> list[type]:
  """Every registered sublayer class and the classes its `select` may return, in order."""
  seen: list[type] = []
  for cls in models.SUBLAYERS.values():
    for c in (cls, *cls.variants()):
      if c not in seen:
        seen.append(c)
  return seen


def model_defaults() -> ml_collections.ConfigDict:
  """config.model's fields and defaults: the decoder's, then each sublayer's (registry order).

  Two classes may declare the same field (a section they share) only with the same default.
  """
  from models import lm  # pylint: disable=g-import-not-at-top  (lm imports this module's users)
  merged: dict = {}
  owner: dict[str, str] = {}

  def add(defaults: dict, who: str, node: dict, prefix: str = ''):
    for key, value in defaults.items():
      name = prefix + key
      if isinstance(value, dict):
        if key in node and not isinstance(node[key], dict):
          raise ValueError(f'model field {name!r} of {who} is a section, but {owner[name]} '
                           'declares a value')
        add(value, who, node.setdefault(key, {}), name + '.')
      elif key in node and (isinstance(node[key], dict) or node[key] != value):
        raise ValueError(f'model field {name!r} is declared by {owner[name]} and by {who} with '
                         'different defaults')
      else:
        node[key] = value
        owner.setdefault(name, who)

  add(lm.DEFAULTS, 'the decoder (models/lm.py)', merged)
  for cls in _classes():
    add(cls.DEFAULTS, f'{cls.__name__} ({cls.__module__})', merged)
  return ml_collections.ConfigDict(merged)


def resumable_fields() -> tuple[str, ...]:
  """Model fields a resumed run may change (see the module docstring)."""
  from models import lm  # pylint: disable=g-import-not-at-top
  return _union([lm.RESUMABLE] + [c.RESUMABLE for c in _classes()])


def interop_ignored_fields() -> tuple[str, ...]:
  """Model fields Hugging Face interop ignores (see the module docstring)."""
  from models import lm  # pylint: disable=g-import-not-at-top
  return _union([resumable_fields(), lm.TRAINING_ONLY] + [c.TRAINING_ONLY for c in _classes()])


def _union(lists) -> tuple[str, ...]:
  out: list[str] = []
  for names in lists:
    out += [n for n in names if n not in out]
  return tuple(out)


def leaves(node, prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} for every leaf of a (Frozen)ConfigDict or dict."""
  out = {}
  for key in node.keys():
    value = node[key]
    name = f'{prefix}{key}'
    if hasattr(value, 'keys'):
      out.update(leaves(value, name + '.'))
    else:
      out[name] = value
  return out


def unflatten(fields: dict[str, Any]) -> ml_collections.ConfigDict:
  """The ConfigDict with these dotted fields."""
  tree: dict = {}
  for name, value in fields.items():
    *parents, leaf = name.split('.')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return ml_collections.ConfigDict(tree)


def canonical(fields: dict[str, Any]) -> dict[str, Any]:
  """`fields` (dotted model fields) as what they mean rather than how they are spelled.

  The decoder's equivalences (`head_dim=0` is d_model // num_heads; `max_len` only sizes a
  learned position table) and each sublayer's (`Sublayer.canonical`); fields declared only
  by sublayers that the pattern does not use (or that ignore them) are dropped; and where every
  sublayer of the pattern says what `use_bias` stands for (`BIAS_SWITCHES`), use_bias=True
  is those switches.
  """
  from models import lm  # pylint: disable=g-import-not-at-top
  fields = dict(fields)
  if not fields.get('head_dim') and fields.get('num_heads'):
    fields['head_dim'] = fields['d_model'] // fields['num_heads']
  if fields.get('position') != 'learned':
    fields.pop('max_len', None)
  try:
    cfg = unflatten(fields)
    used = {lm.sublayer_class(cfg, c) for c in set(fields.get('pattern', ''))}
  except (KeyError, AttributeError, ValueError):
    return fields  # a pattern or kind this registry lacks: compare the fields as they are
  for cls in used:
    fields = cls.canonical(fields)
  declared = {name for c in _classes() for name in sublayer.fields_of(c.DEFAULTS)}
  declared -= set(sublayer.fields_of(lm.DEFAULTS))
  read = {name for c in used for name in sublayer.fields_of(c.DEFAULTS)
          if not sublayer.covers(c.IGNORES, name)}
  fields = {k: v for k, v in fields.items() if k not in declared or k in read}
  switches = [c.BIAS_SWITCHES for c in used]
  if fields.get('use_bias') and used and all(s is not None for s in switches):
    fields['use_bias'] = False
    for name in _union(switches):
      fields[name] = True
  return fields


def diff(ours, theirs, skip=()) -> list[tuple[str, Any, Any]]:
  """(field, ours, theirs) for each model field whose meaning differs between two configs
  (ConfigDicts or dicts), in schema order; fields under a name in `skip` are not compared.
  A field one side lacks is its default on that side."""
  defaults = leaves(model_defaults())
  a = canonical({**defaults, **leaves(ours)})
  b = canonical({**defaults, **leaves(theirs)})
  out = []
  for name in list(a) + [n for n in b if n not in a]:
    if sublayer.covers(skip, name):
      continue
    x, y = a.get(name, _MISSING), b.get(name, _MISSING)
    if not _same(x, y):
      out.append((name, None if x is _MISSING else x, None if y is _MISSING else y))
  return out


def _same(x, y) -> bool:
  """Equal values; numbers by value (a config.json's 10000 is archlab's 10000.0)."""
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  if number(x) and number(y):
    return float(x) == float(y)
  return x == y
