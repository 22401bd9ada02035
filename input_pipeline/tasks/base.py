"""The task interface: options, seeds, splits, one instance at a time, and task specs.

A task is a class registered with `@register(name)`. Its `DEFAULTS` are its options with the
reference's defaults (every task has `seq_len`, `seed`, `num_train`, `num_test`); a spec
string names a task and changes options the way config arguments do:

  'mqar'                                   the reference defaults
  'mqar:seq_len=128,num_kv_pairs=8'        options changed (typed by their defaults)
  'mqar:seq_len=64,num_kv_pairs=4;mqar:seq_len=256,num_kv_pairs=16'   a mixture (`;`)

Instance `index` of split `split` is generated from its own generator,
`np.random.default_rng([seed, SPLITS[split], index, crc32(name)])`, so any instance can be read in any
order (a grain source), the same seed gives the same data on every machine, and the three
splits never share a generator: `train` is what a run trains on, `val` what the trainer's
evaluation reads, `test` the held-out instances `experiments.evaluate` scores.

`generate(rng, split)` returns (inputs, targets, answer): the token ids the model reads, the
token it should predict at each position, and which of those predictions are the task's
answers (only they are scored). `instance(split, index)` adds the training weights: the
answer positions, except for the tasks whose reference trains on every next token
(`TRAIN_ALL_TOKENS`: MAD's recall tasks), which weight every position in the train split.

Symbolic tasks (MQAR, MAD) emit ids 0..vocab_size-1 (`num_symbols`); text tasks (`TEXT`,
needle retrieval) are built with a text tokenizer and the corpus.
"""

from __future__ import annotations

from typing import Any, ClassVar
import zlib

import numpy as np

import errors

SPLITS = {'train': 0, 'val': 1, 'test': 2}
TASKS: dict[str, type] = {}


def register(name: str):
  """Registers a `Task` subclass under `name`; a second class under one name is refused."""
  def wrap(cls):
    if name in TASKS and TASKS[name] is not cls:
      raise errors.ConfigError(f'task {name!r} is already registered')
    cls.NAME = name
    TASKS[name] = cls
    return cls
  return wrap


class Task:
  """One task at fixed options. Subclasses define DEFAULTS, `check()` and `generate()`."""
  NAME: ClassVar[str] = ''
  DEFAULTS: ClassVar[dict] = {}
  TEXT: ClassVar[bool] = False          # built from a text tokenizer (needle retrieval)
  TRAIN_ALL_TOKENS: ClassVar[bool] = False
  CAUSAL: ClassVar[bool] = True         # a causal decoder can be trained and scored on it
  SOURCE: ClassVar[str] = ''            # the reference definition it follows

  def __init__(self, options: dict[str, Any], *, tokenizer=None, text_source=None):
    self.options = dict(options)
    self.tokenizer = tokenizer
    self.text_source = text_source      # split -> text, for a haystack of real text
    self.check()

  def __getattr__(self, name):
    options = self.__dict__.get('options', {})
    if name in options:
      return options[name]
    raise AttributeError(name)

  @property
  def spec(self) -> str:
    """The canonical spec: the name and the options that differ from the defaults."""
    return spec_of(type(self), self.options)

  @property
  def setting(self) -> str:
    """The spec without the dataset sizes: what the instances depend on."""
    return spec_of(type(self), self.options, dataset=False)

  @property
  def num_symbols(self) -> int:
    """Ids 0..num_symbols-1 are the task's tokens (symbolic tasks)."""
    return int(self.options['vocab_size'])

  def check(self) -> None:
    """One-line errors naming the option (`self.error`)."""
    if self.seq_len < 2:
      self.error('seq_len', 'must be at least 2')
    for name in ('num_train', 'num_test'):
      if self.options[name] < 1:
        self.error(name, 'must be positive')

  def error(self, option: str, message: str):
    raise errors.DataError(f'task {self.NAME}: {option}={_format(self.options[option])} {message}')

  def rng(self, split: str, index: int) -> np.random.Generator:
    name = zlib.crc32(self.NAME.encode('utf-8'))  # tasks of one seed draw different streams
    return np.random.default_rng([int(self.seed), SPLITS[split], int(index), name])

  def generate(self, rng: np.random.Generator, split: str):
    """(inputs, targets, answer) of one instance: int arrays and a bool array, one length."""
    raise NotImplementedError

  def instance(self, split: str, index: int) -> dict[str, np.ndarray]:
    """inputs, targets, weights (float32: what the loss weights) and answer (bool: what is
    scored) of instance `index` of `split`, at most `seq_len` long."""
    if split not in SPLITS:
      raise errors.DataError(f'split {split!r} is not one of {list(SPLITS)}')
    inputs, targets, answer = self.generate(self.rng(split, index), split)
    inputs = np.asarray(inputs, np.int32)
    targets = np.asarray(targets, np.int32)
    answer = np.asarray(answer, bool)
    assert inputs.shape == targets.shape == answer.shape, (self.spec, inputs.shape,
                                                           targets.shape, answer.shape)
    assert inputs.shape[0] <= self.seq_len, (self.spec, inputs.shape)
    train_all = self.TRAIN_ALL_TOKENS and split == 'train'
    weights = np.ones_like(answer, np.float32) if train_all else answer.astype(np.float32)
    return {'inputs': inputs, 'targets': targets, 'weights': weights, 'answer': answer}


def spec_of(cls: type, options: dict, dataset: bool = True) -> str:
  """`name:key=value,...` with the options that differ from the class's defaults, sorted;
  without the dataset sizes (`num_train`, `num_test`) unless `dataset`: the setting, which is
  what evaluation results are keyed by."""
  skip = () if dataset else ('num_train', 'num_test')
  changed = [f'{k}={_format(v)}' for k, v in sorted(options.items())
             if v != cls.DEFAULTS[k] and k not in skip]
  return cls.NAME + (':' + ','.join(changed) if changed else '')


def _format(value) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def _convert(task: str, key: str, value: str, default):
  try:
    if isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(value)
      return value.lower() in ('true', '1')
    return type(default)(value)
  except ValueError:
    raise errors.DataError(f'task {task}: option {key}={value!r} is not a '
                           f'{type(default).__name__}') from None


def parse_one(spec: str, overrides: dict | None = None) -> tuple[type, dict]:
  """(task class, options) of `'name:key=value,...'`; `overrides` (key -> string) apply
  after the spec's own options, to the keys this task has."""
  name, _, arg = spec.strip().partition(':')
  name = name.strip()
  if name not in TASKS:
    raise errors.DataError(f'unknown task {name!r}; the tasks are {sorted(TASKS)}')
  cls = TASKS[name]
  options = dict(cls.DEFAULTS)
  items = [item.partition('=') for item in filter(None, arg.split(','))]
  items += [(k, '=', v) for k, v in (overrides or {}).items() if k in cls.DEFAULTS]
  for key, has_value, value in items:
    key = key.strip()
    if key not in cls.DEFAULTS:
      raise errors.DataError(f'task {name}: unknown option {key!r}; its options are '
                             f'{sorted(cls.DEFAULTS)}')
    if not has_value:
      raise errors.DataError(f'task {name}: option {key!r} needs a value ({key}=...)')
    options[key] = _convert(name, key, value.strip(), cls.DEFAULTS[key])
  return cls, options


def parse_specs(text: str) -> list[tuple[type, dict]]:
  """The (class, options) of each `;`-separated spec of `text`."""
  specs = [s for s in (text or '').split(';') if s.strip()]
  if not specs:
    raise errors.DataError(f'no task in {text!r}; the tasks are {sorted(TASKS)}')
  return [parse_one(s) for s in specs]
