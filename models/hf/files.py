"""A Hugging Face checkpoint directory on disk: config.json and safetensors, read and written.

Reads a single `model.safetensors`, a sharded set through `model.safetensors.index.json`, or
whatever `*.safetensors` the directory holds; writes config.json and one model.safetensors.
Tensors come back as numpy arrays (bfloat16 through `ml_dtypes`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can read it)
import numpy as np
from safetensors import numpy as st_numpy

from models.hf import family as family_lib

INDEX = 'model.safetensors.index.json'
WEIGHTS = 'model.safetensors'


def read_config(path: str) -> tuple[dict, str]:
  """(the config.json of checkpoint directory `path`, its file name for error messages)."""
  source = os.path.join(path, 'config.json')
  if not os.path.isfile(source):
    raise family_lib.UnsupportedError(f'{path}: no config.json (not a Hugging Face checkpoint '
                                      'directory)')
  with open(source, encoding='utf-8') as f:
    return json.load(f), source


def safetensors_files(path: str) -> list[str]:
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    with open(index, encoding='utf-8') as f:
      weight_map = json.load(f)['weight_map']
    return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
  files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
  if not files:
    others = [n for n in ('pytorch_model.bin', 'model.pt') if os.path.exists(os.path.join(path, n))]
    hint = f' ({others[0]} is not read: re-save with safe_serialization=True)' if others else ''
    raise family_lib.UnsupportedError(f'{path}: no *.safetensors files{hint}')
  return files


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint directory, by name."""
  tensors = {}
  for name in safetensors_files(path):
    for key, value in st_numpy.load_file(name).items():
      if key in tensors:
        raise family_lib.UnsupportedError(f'{path}: tensor {key} is in two safetensors files')
      tensors[key] = value
  return tensors


def write_checkpoint(path: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
  """Writes `config.json` and `model.safetensors` into directory `path`."""
  os.makedirs(path, exist_ok=True)
  for stale in glob.glob(os.path.join(path, '*.safetensors')) + [os.path.join(path, INDEX)]:
    if os.path.exists(stale):  # a re-export must not leave shards of an older one behind
      os.remove(stale)
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                     os.path.join(path, WEIGHTS), metadata={'format': 'pt'})
  with open(os.path.join(path, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')


def tokenizer_file(path: str) -> str | None:
  """`path/tokenizer.json` if the checkpoint has one."""
  candidate = os.path.join(path, 'tokenizer.json')
  return candidate if os.path.isfile(candidate) else None


def special_token_ids(tokenizer_path: str) -> dict:
  """bos/eos/pad ids for config.json: the special tokens the tokenizer resolves (archlab's own,
  or those its tokenizer_config.json names)."""
  from input_pipeline import tokenizer as tokenizer_lib  # the data side; only export needs it
  tokenizer = tokenizer_lib.BpeTokenizer.from_file(tokenizer_path)
  return {'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id,
          'pad_token_id': tokenizer.pad_id}


def copy_tokenizer(tokenizer_path: str, path: str) -> None:
  """The tokenizer.json and, when beside it, the tokenizer_config.json naming its tokens."""
  shutil.copyfile(tokenizer_path, os.path.join(path, 'tokenizer.json'))
  sidecar = os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), 'tokenizer_config.json')
  if os.path.isfile(sidecar):
    shutil.copyfile(sidecar, os.path.join(path, 'tokenizer_config.json'))
