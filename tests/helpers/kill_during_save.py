"""`python -m big_transfer.train`, but SIGKILLed right after it starts writing checkpoint N.

N comes from $BIT_KILL_DURING_SAVE. The orbax write is asynchronous, so the kill lands while
the checkpoint's temporary directory is being written: the worst moment for a preemption.
"""

import os
import signal

from absl import app

from big_transfer import checkpoints, cli, train

_KILL_AT = int(os.environ["BIT_KILL_DURING_SAVE"])
_save = checkpoints.Manager.save


def _save_then_die(self, step, state, *args):
  _save(self, step, state, *args)
  if step == _KILL_AT:
    os.kill(os.getpid(), signal.SIGKILL)


checkpoints.Manager.save = _save_then_die

if __name__ == "__main__":
  app.run(train.main, flags_parser=cli.parse_flags)
