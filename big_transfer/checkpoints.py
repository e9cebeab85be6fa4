"""Training checkpoints (orbax) in `<workdir>/checkpoints/<step>`.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-write leaves the earlier checkpoints as they were, and old checkpoints are
deleted only after a newer one is finalized. A checkpoint that fails to restore (truncated or
corrupted after the fact) is moved to `<workdir>/corrupt_checkpoints/` and the previous one is
used, with a warning; nothing is deleted.
"""

import os
import shutil

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from big_transfer import metrics


class Manager:
  """Saves asynchronously, keeps the `keep` newest; the trainer saves every `every_steps`."""

  def __init__(self, workdir: str, every_steps: int, keep: int):
    self.every_steps = every_steps
    self._workdir = os.path.abspath(workdir)
    self._manager = self._open(keep)
    self._keep = keep

  def _open(self, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(self._workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, abstract_state):
    """The newest checkpoint that restores, placed like `abstract_state`; None if none."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # pylint: disable=broad-except  (any failure: try an older one)
        self._quarantine(step, e)
        continue
      metrics.log(f"Resuming from checkpoint at step {step}.")
      return state
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    """Moves an unreadable checkpoint aside (so training can write that step again)."""
    target = os.path.join(self._workdir, "corrupt_checkpoints", str(step))
    metrics.log(f"WARNING: checkpoint at step {step} does not restore "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); moved to "
                f"{target}, trying the previous one.")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self._workdir, "checkpoints", str(step)), target)
    multihost_utils.sync_global_devices("bit_quarantine_checkpoint")
    self._manager.close()
    self._manager = self._open(self._keep)

  def save(self, step: int, state) -> None:
    """Starts an asynchronous save (returns once the arrays are copied off the devices)."""
    if step not in self._manager.all_steps():
      self._manager.save(step, args=ocp.args.StandardSave(state))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
