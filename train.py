"""Trains a model: `python train.py --config=configs/transformer.py:preset=llama_tiny --workdir=DIR`.

Running the same command again resumes from the latest checkpoint in DIR. Bad input (a
config field, a data path, a workdir holding another model, a loss that turns NaN) ends the
run with one line naming what is wrong; set ARCHLAB_DEBUG=1 to see the traceback too.
"""

import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file with arguments, e.g. '
                                          'configs/transformer.py:preset=llama_tiny,runlocal',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and summary.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(py_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the log; its warnings still show."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or 'orbax' not in record.pathname


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag or config field reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing field
    if os.environ.get('ARCHLAB_DEBUG'):
      raise
    field = str(e).strip('"\'')
    flag = next((a.split('=')[0] for a in argv[1:] if a.startswith('--config.') and field in a),
                field)
    sys.exit(f'train.py: error: {flag}: the config has no field {field!r} '
             f'(the fields are in configs/common.py)')
  except (flags.Error, TypeError, ValueError) as e:
    if os.environ.get('ARCHLAB_DEBUG'):
      raise
    # absl spreads a config file's error over lines (with its traceback): keep the flag and
    # the error itself.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = lines[0] if len(lines) == 1 else f'{lines[0].split(": ")[0]}: {lines[-1]}'
    sys.exit(f'train.py: error: {message}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    config = _CONFIG.value
    config.to_dict()  # touches the lazily loaded file
  except OSError as e:  # ml_collections loads the file lazily and reports a failure here
    if os.environ.get('ARCHLAB_DEBUG'):
      raise
    sys.exit(f'train.py: error: --config: {str(e).strip().splitlines()[-1].strip()}')
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FloatingPointError) as e:
    if os.environ.get('ARCHLAB_DEBUG'):
      raise
    sys.exit(f'train.py: error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
