"""MoCo steps on synthetic two-view batches, run by several processes (tests/test_hpt.py).

    python -m helpers.moco_processes PORT NUM_PROCESSES PROCESS_ID OUT

Each process joins jax.distributed on localhost, builds the tiny MoCo run of `config()` on the
global mesh and feeds its rows of each global batch (drawn from the step's number alone) for
STEPS steps; process 0 writes the final queue, pointer, key encoder and params, and the queue
after the first step, to OUT (.npz).
`run()` is the same in the calling process (the test, on 4 of its 8 devices: `conftest.on_devices`).
"""

import sys

import jax
import numpy as np
from flax import traverse_util

from big_transfer import config_common, sharding, trainer
from configs import hpt

GLOBAL_BATCH = 16
STEPS = 3  # With a queue of 2 batches: the third step's keys wrap around to row 0.


def config():
  return config_common.with_overrides(hpt.get_config("cpu"), {
      "dataset": "sklearn_digits", "batch_size": GLOBAL_BATCH, "total_steps": STEPS,
      "moco.queue_size": 2 * GLOBAL_BATCH, "moco.proj_hidden": 32, "moco.proj_dim": 8,
      "moco.momentum": 0.9, "lr": 0.5})


def run() -> dict[str, np.ndarray]:
  """{"moco/queue": ..., "params/...": ..., "first_step/queue": ...} as host arrays."""
  mesh = sharding.make_mesh()
  setup = trainer.build(config(), mesh, num_classes=10, num_train_examples=100)
  local_batch = GLOBAL_BATCH // jax.process_count()
  rows = slice(jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch)
  with jax.set_mesh(mesh):
    state = setup.init(jax.random.key(0))
    for step in range(STEPS):
      rng = np.random.default_rng(step)
      batch = {"image": rng.uniform(-1, 1, (GLOBAL_BATCH, 2, 16, 16, 3)).astype(np.float32),
               "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, GLOBAL_BATCH)]}
      state, _ = setup.train_step(state, sharding.to_global(
          {k: v[rows] for k, v in batch.items()}, mesh))
      if step == 0:  # Keys of the initial encoder, before any gradient was all-reduced.
        first_queue = _host(state["moco"]["queue"])
  flat = traverse_util.flatten_dict({"moco": state["moco"], "params": state["params"]}, sep="/")
  return {"first_step/queue": first_queue, **{k: _host(v) for k, v in flat.items()}}


def _host(x: jax.Array) -> np.ndarray:
  """A replicated array on the host: every device holds all of it, also on several processes."""
  return np.asarray(x.addressable_data(0))


def main(port, num_processes, process_id, out):
  jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id))
  arrays = run()
  if jax.process_index() == 0:
    np.savez(out, **arrays)


if __name__ == "__main__":
  main(*sys.argv[1:])
