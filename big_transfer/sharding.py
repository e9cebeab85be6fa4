"""The device mesh and the placement of batches and state on it.

One mesh axis, `data`, spans every device of every process: batches are split along it. The
training state is either replicated on every device (`replicated`, plain data parallelism) or
split along the same axis (`fsdp`: each device holds 1/n of every large parameter and its
optimizer state; XLA gathers parameters for the forward/backward pass and reduce-scatters the
gradients), which is what lets R152x4 fit next to its activations.
"""

from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from big_transfer.errors import UserError

DATA = "data"
STATE_SHARDINGS = ("replicated", "fsdp")
FSDP_MIN_SIZE = 2 ** 14  # Smaller arrays (GN scales, biases) stay replicated: not worth a gather.


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A one-axis mesh over `devices` (default: every device of every process)."""
  # Auto axes: XLA propagates the FSDP parameter shardings through the convolutions (explicit
  # axes, jax.make_mesh's default, would demand an out_sharding on every sharded op).
  auto = (jax.sharding.AxisType.Auto,)
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA,), axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices), (DATA,), axis_types=auto)


def _fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """Splits the largest axis divisible by `n`; replicates small or indivisible arrays."""
  if n == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0:
      return P(*([None] * axis + [DATA]))
  return P()


def state_shardings(abstract_state, mesh, mode: str):
  """NamedShardings for every leaf of the training state under `mode` (STATE_SHARDINGS)."""
  if mode not in STATE_SHARDINGS:
    raise UserError(f"Unknown state sharding {mode!r}; valid: {', '.join(STATE_SHARDINGS)}.")
  n = mesh.shape[DATA]
  spec = (lambda x: _fsdp_spec(x.shape, n)) if mode == "fsdp" else (lambda x: P())
  return jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), abstract_state)


def runs_on_cpu(mesh) -> bool:
  """Whether `mesh` is XLA:CPU devices: models then take their CPU form (`for_cpu`)."""
  return mesh.devices.flat[0].platform == "cpu"


# XLA:CPU runs convolutions with Eigen rather than YNNPACK (dots and reductions stay on YNNPACK,
# the rest of jaxlib 0.10.2's default): on R50x1's 3x3 convolutions Eigen took 0.82 s per step
# against YNNPACK's 1.02 (forward and both gradients; docs/performance.md).
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(mesh) -> dict | None:
  """XLA options for the programs that run the model on `mesh` (`jax.jit(compiler_options=)`):
  CPU ones on XLA:CPU, none elsewhere, so TPU and GPU compile what they always did."""
  return dict(_CPU_COMPILER_OPTIONS) if runs_on_cpu(mesh) else None


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def check_batch_size(global_batch: int, num_devices: int, key: str = "batch_size") -> None:
  """UserError unless the global batch (config `key`) splits evenly over the devices."""
  if global_batch % num_devices:
    raise UserError(f"{key} {global_batch} is not divisible by the {num_devices} devices; "
                    f"use a multiple of {num_devices} (e.g. --config.{key}="
                    f"{max(num_devices, global_batch // num_devices * num_devices)}).")


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays split over the `data` axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
