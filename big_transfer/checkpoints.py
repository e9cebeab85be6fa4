"""Training checkpoints (orbax) in `<workdir>/checkpoints/<step>`.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
process killed mid-write leaves the previous checkpoints untouched. The official BiT `.npz`
interop lives in this module too (see the model zoo issue).
"""

import os

import jax
import orbax.checkpoint as ocp

from big_transfer import metrics


class Manager:
  """Saves every `every_steps` steps (asynchronously) and keeps the `keep` newest."""

  def __init__(self, workdir: str, every_steps: int, keep: int):
    self.every_steps = every_steps
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, abstract_state):
    """The newest checkpoint placed like `abstract_state`, or None when there is none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    metrics.log(f"Resuming from checkpoint at step {step}.")
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def save(self, step: int, state, force: bool = False) -> None:
    if force or step % self.every_steps == 0:
      if step not in self._manager.all_steps():
        self._manager.save(step, args=ocp.args.StandardSave(state))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract(tree):
  """Shapes, dtypes and shardings of `tree`, what orbax needs to restore in place."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
