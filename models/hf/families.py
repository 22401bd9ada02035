"""The registry: every Hugging Face family archlab translates, listed once.

A new family is a module with a `family.Family` (config translation and mapping table) and
one entry in `FAMILIES` below.
"""

from __future__ import annotations

import errors
from models.hf import deepseek_v3
from models.hf import deepseek_v32
from models.hf import family as family_lib
from models.hf import gpt2
from models.hf import gpt_oss
from models.hf import llama
from models.hf import mamba2
from models.hf import nemotron_h
from models.hf import olmo3
from models.hf import qwen3
from models.hf import qwen3_moe
from models.hf import qwen3_next


def _by_model_type(families: list[family_lib.Family]) -> dict[str, family_lib.Family]:
  """{model_type: family}; a second family for one model_type is refused."""
  registry = {}
  for family in families:
    if family.model_type in registry:
      raise errors.ConfigError(f'model_type {family.model_type!r} is already registered')
    registry[family.model_type] = family
  return registry


FAMILIES: dict[str, family_lib.Family] = _by_model_type([
    gpt2.GPT2, llama.LLAMA, qwen3.QWEN3, qwen3_moe.QWEN3_MOE, olmo3.OLMO3, gpt_oss.GPT_OSS,
    deepseek_v3.DEEPSEEK_V3, deepseek_v32.DEEPSEEK_V32, qwen3_next.QWEN3_NEXT, mamba2.MAMBA2, nemotron_h.NEMOTRON_H])

# Families of the transformer issue with no mapping table yet, and the components they use.
PENDING: dict[str, str] = {}  # model_type -> the components its mapping table waits for


def get(model_type, source: str) -> family_lib.Family:
  """The family of a config.json's `model_type`, or one line saying why there is none."""
  if model_type in FAMILIES:
    return FAMILIES[model_type]
  known = ', '.join(sorted(FAMILIES))
  if model_type in PENDING:
    raise family_lib.UnsupportedError(f'{source}: model_type={model_type!r} is not supported yet '
                                      f'(no mapping table in models/hf/ for {PENDING[model_type]});'
                                      f' supported: {known}')
  raise family_lib.UnsupportedError(f'{source}: model_type={model_type!r} is not supported '
                                    f'(supported: {known})')
