"""Train a BiT model: `python -m big_transfer.train --config=configs/demo.py --workdir=DIR`.

Override any config field with `--config.key=value`; rerunning with the same workdir resumes
from its latest checkpoint. Bad input ends with one `error: ...` line and exit status 1.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow loads: quiet C++ logs.

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from big_transfer import cli, errors  # pylint: disable=wrong-import-position

WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.",
                              required=True)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Library INFO logs would drown the progress lines.
  from big_transfer import trainer  # pylint: disable=g-import-not-at-top (after flag errors)
  try:
    trainer.run(cli.CONFIG.value, WORKDIR.value)
  except (errors.UserError, errors.TrainingError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
