"""Hugging Face checkpoints (config.json + safetensors) in and out of archlab.

  config, params = models.hf.import_hf('/path/to/hf_dir')        # params: numpy tree
  models.hf.export_hf(config, params, '/path/to/out_dir')        # transformers loads it

Each supported `model_type` is one module here with a config translation and a mapping table
(`family.Family`); `FAMILIES` lists them. See interop.py for the details.
"""

from models.hf.family import FAMILIES, UnsupportedError
from models.hf.interop import export_hf, import_hf
from models.hf import olmo3  # noqa: F401  (registers the family)
from models.hf import qwen3_moe  # noqa: F401  (registers the family)
from models.hf import gpt_oss  # noqa: F401  (registers the family)
from models.hf import deepseek_v3  # noqa: F401  (registers the family)

__all__ = ['FAMILIES', 'UnsupportedError', 'export_hf', 'import_hf']
