"""The device mesh and the placement of batches and state on it.

One mesh axis, `data`, spans every device of every process: batches are split along it and
the training state is replicated (FSDP-style state sharding is an option of the engine).
"""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from big_transfer.errors import UserError

DATA = "data"


def make_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), (DATA,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def local_batch_size(global_batch: int) -> int:
  """The per-process share of `global_batch`; UserError when it does not divide evenly."""
  devices, processes = jax.device_count(), jax.process_count()
  if global_batch % devices:
    raise UserError(f"batch_size {global_batch} is not divisible by the {devices} devices; "
                     f"use a multiple of {devices} (e.g. --config.batch_size="
                     f"{max(devices, global_batch // devices * devices)}).")
  return global_batch // processes


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays split over the `data` axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
