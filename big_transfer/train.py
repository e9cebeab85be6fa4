"""Train a BiT model: `python -m big_transfer.train --config=configs/demo.py --workdir=DIR`.

Override any config field with `--config.key=value`; rerunning with the same workdir resumes
from its latest checkpoint. Bad input ends with one `error: ...` line and exit status 1.

Multi-host: on a TPU pod pass `--distributed` on every host (JAX finds the coordinator);
elsewhere give `--coordinator_address=host:port --num_processes=N --process_id=i`.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging

from big_transfer import hostmem

if __name__ == "__main__":  # Before cli loads JAX (through flax), so it loads once.
  hostmem.reexec_for_cpu()

# pylint: disable=g-import-not-at-top,wrong-import-position
from big_transfer import cli, errors  # noqa: E402

flags.adopt_module_key_flags(cli)  # --help lists --config (defined in cli.py).
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                "Call jax.distributed.initialize() (TPU pods, SLURM).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _print_config(config) -> None:
  """The config as a run would resolve it: a transfer config's HyperRule choices (which read
  the dataset's size and image size), preceded by why they were chosen."""
  if "hyperrule" in config:
    from big_transfer import transfer
    try:
      resolved = transfer.resolve(config)
    except errors.UserError as e:
      sys.exit(f"error: {e}")
    config = resolved.config
    print("".join(f"# {note}\n" for note in resolved.notes), end="")
  print(config)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs and TF deprecation warnings would drown the progress lines.
    logging.set_verbosity(logging.ERROR)
    std_logging.getLogger("absl").addFilter(_OneLineLibraryErrors())
  if PRINT_CONFIG.value:
    _print_config(cli.CONFIG.value)
    return
  if not WORKDIR.value:
    sys.exit("error: --workdir=DIR is required (checkpoints and metrics go there).")
  import jax
  if COORDINATOR.value:
    jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
  elif DISTRIBUTED.value:
    jax.distributed.initialize()
  from big_transfer import trainer
  try:
    trainer.run(cli.CONFIG.value, WORKDIR.value)
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  except (errors.TrainingError, OSError) as e:
    if isinstance(e, OSError):  # The machine's, not the program's: a full disk, a read-only
      e = (f"Cannot write {e.filename or 'to the workdir'} ({e.strerror or e}); free disk "
           "space or make the workdir writable, then rerun the same command to resume from its "
           "newest checkpoint.")
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # After a failed checkpoint write orbax's writer threads may wait forever for a signal
    # (seen with a read-only workdir) and keep the interpreter from exiting; the trainer has
    # already closed what it opened.
    os._exit(1)  # pylint: disable=protected-access


class _OneLineLibraryErrors(std_logging.Filter):
  """Drops the tracebacks that orbax logs for a failed background save: the trainer reports
  the failure itself, as one line."""

  def filter(self, record):
    if "orbax" in record.pathname:
      record.exc_info = record.exc_text = record.stack_info = None
    return True


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
