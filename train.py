"""Trains a model: `python train.py --config=configs/transformer.py:preset=llama_tiny --workdir=DIR`.

Running the same command again resumes from the latest checkpoint in DIR.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file with arguments, e.g. '
                                          'configs/transformer.py:preset=llama_tiny,runlocal',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and summary.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
