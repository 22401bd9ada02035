"""Trains a model: `python train.py --config=configs/transformer.py:preset=llama_tiny --workdir=DIR`.

Running the same command again resumes from the latest checkpoint in DIR. Bad input (a
config field, a data path, a workdir holding another model, a loss that turns NaN) ends the
run with one line naming what is wrong; set ARCHLAB_DEBUG=1 to see the traceback too. Any other
exception is a bug: its traceback is printed with a line asking for a report.
"""

import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import errors
from configs import common
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
  errors.run_main('train.py', trainer.train_and_evaluate, config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.flags_parser('train.py', common.MOVED_FIELDS))
