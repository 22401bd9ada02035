"""Hugging Face checkpoints (config.json + safetensors) in and out of archlab.

  config, params = models.hf.import_hf('/path/to/hf_dir')        # params: numpy tree
  models.hf.export_hf(config, params, '/path/to/out_dir')        # transformers loads it

Each supported `model_type` is one module here with a config translation and a mapping table
(`family.Family`), built from the shared rows (rows.py) and layer-pattern parser
(pattern.py); families.py lists them in `FAMILIES`. See interop.py for the details.
"""

from models.hf.families import FAMILIES
from models.hf.family import UnsupportedError
from models.hf.interop import export_hf, import_hf

__all__ = ['FAMILIES', 'UnsupportedError', 'export_hf', 'import_hf']
