"""Plan a TPU pod before renting it: compile the exact training step ahead of time.

    python -m big_transfer.plan --config=configs/bit_l.py --topology=v3:16x16 [--find_max_batch]

The step is `trainer.build(...).train_step` (the one training runs), compiled for the devices
of `--topology` by libtpu without a TPU attached (`pip install -e '.[tpu]'`), or for the local
devices without `--topology`. It prints the compiler's per-device memory against the chip's
HBM, the per-device FLOPs against an analytic count, and the step time at peak. If the step
does not fit it searches the smallest change that does (batch_split, state_sharding=fsdp,
model.dtype=bfloat16) and confirms it by compiling again; `--find_max_batch` searches the
largest per-device batch that fits. Bad input ends with one `error: ...` line.
"""

import dataclasses
import importlib.util
import itertools
import os
import sys
import time
from typing import Callable

# Compiling ahead of time uses no TPU, so several planners may share libtpu on one machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging

from big_transfer import cli, config_common, errors, models, optim, scaling, sharding, trainer
from big_transfer.data import preprocess

flags.adopt_module_key_flags(cli)  # --help lists --config (defined in cli.py).
TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology to compile for, `GENERATION:SHAPE` (v3:16x16, v4:4x4x4, "
    "v5e:16x16, v5p:8x8x8, v6e:16x16); default: the local devices.")
FIND_MAX_BATCH = flags.DEFINE_bool(
    "find_max_batch", False, "Also search the largest per-device batch that fits.")
REQUIRE_FIT = flags.DEFINE_bool(
    "require_fit", False, "Compile the step once and exit with an error if it does not fit "
    "(no search; for launch scripts: launch/tpu_vm.py train --plan).")
SCALING = flags.DEFINE_list(
    "scaling", None, "TPU topologies to compare, comma-separated (v3:4x4,v3:8x8,v4:8x8x8): "
    "the step compiled for each at the config's global batch (strong scaling) and at the "
    "largest topology's per-device batch (weak scaling), with a step-time model per device.")
MFU = flags.DEFINE_float(
    "mfu", scaling.DEFAULT_MFU, "Model FLOPs utilization of --scaling's compute time (default: "
    "big_vision's BiT-R50x1 on a v3-128; see big_transfer/scaling.py).")
TRAIN_EXAMPLES = flags.DEFINE_integer(
    "train_examples", None, "Training images per epoch, for --scaling's time of the whole "
    "schedule when the config counts epochs (ImageNet-21k: 14197122).")
SCALING_PLOT = flags.DEFINE_string(
    "scaling_plot", "scaling.png", "Where --scaling writes its plot of img/s and efficiency.")
HBM_GIB = flags.DEFINE_float(
    "hbm_gib", None, "Memory per device to plan against, in GiB (default: the TPU table below, "
    "or the local device's own limit where JAX reports one).")

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures from Google's Cloud TPU documentation (the pages are named below)."""
  generation: str
  hbm_bytes: int
  peak_bf16_flops: float


# Keyed by `device.device_kind`. Per-chip figures; a JAX device is a TensorCore on v3 (2 per
# chip) and a whole chip elsewhere (v4/v5p "megacore"; v5e/v6e have one core), but the device
# count per chip is read from the topology, not assumed (libtpu's ahead-of-time v4 topologies
# list both cores of a chip as devices).
TPU_CHIPS = {
    "TPU v3": Chip("v3", 32 * GiB, 123e12),  # "TPU v3": 32 GiB HBM2, 123 teraflops (bf16).
    "TPU v4": Chip("v4", 32 * GiB, 275e12),  # "TPU v4": 32 GiB HBM2, 275 teraflops.
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12),  # "TPU v5e": 16 GB, 197 TFLOPs (bf16).
    "TPU v5": Chip("v5p", 95 * GiB, 459e12),  # "TPU v5p": 95 GB HBM2e, 459 TFLOPs (bf16).
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12),  # "TPU v6e" (Trillium): 32 GB, 918 TFLOPs.
}


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices to compile for, with what one device holds and computes where known."""
  description: str
  devices: list
  hbm_bytes: int | None  # Per device.
  peak_flops: float | None  # Per device, bf16.
  generation: str | None = None  # TPU_CHIPS' generation; None off TPU.
  per_chip: int = 1  # Devices per chip.


def _devices_per_chip(devices) -> int:
  chips = {tuple(getattr(d, "coords", [d.id])) for d in devices}
  return len(devices) // len(chips)


def _target(description: str, devices, hbm_bytes: int | None) -> Target:
  chip = TPU_CHIPS.get(devices[0].device_kind)
  per_chip = _devices_per_chip(devices) if chip else 1
  peak = chip.peak_bf16_flops / per_chip if chip else None
  hbm = hbm_bytes or (chip.hbm_bytes // per_chip if chip else None)
  kind = f"{devices[0].device_kind}, {per_chip} per chip" if chip else devices[0].device_kind
  return Target(f"{description}: {len(devices)} devices ({kind})", list(devices), hbm, peak,
                chip and chip.generation, per_chip)


def tpu_target(topology: str, hbm_bytes: int | None = None) -> Target:
  """The devices of a TPU topology, from libtpu without a TPU; UserError if it cannot."""
  from jax.experimental import topologies
  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if importlib.util.find_spec("libtpu") is None:
      message += " (libtpu is not installed: pip install -e '.[tpu]')"
    raise errors.UserError(f"Cannot make TPU topology {topology!r}: {message}. "
                           "Examples: v3:16x16, v4:4x4x4, v5e:16x16, v5p:8x8x8, v6e:16x16.")
  return _target(topology, devices, hbm_bytes)


def local_target(hbm_bytes: int | None = None) -> Target:
  """This machine's devices; the capacity is JAX's per-device limit when it reports one."""
  devices = jax.devices()
  stats = devices[0].memory_stats() or {}
  return _target(f"local {devices[0].platform}", devices,
                 hbm_bytes or stats.get("bytes_limit"))


@dataclasses.dataclass(frozen=True)
class Memory:
  """The compiler's per-device buffer sizes (`compiled.memory_analysis()`), bytes."""
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  live_peak: int  # The compiler's heap-simulated peak of simultaneously live buffers.

  @property
  def total(self) -> int:
    """Everything live at the step's peak. Outputs aliased to donated inputs (the new state
    written over the old) occupy the arguments' buffers, so they count once."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclasses.dataclass(frozen=True)
class Plan:
  """One compile of the step: its memory, or the compiler's out-of-memory message."""
  batch_per_device: int
  compile_seconds: float
  memory: Memory | None = None
  flops: float | None = None  # Per device per step, from the compiler.
  out_of_memory: str | None = None
  bytes_accessed: float | None = None  # Per device per step, from the compiler.
  collectives: tuple = ()  # scaling.Collective of one step, from the compiled HLO.

  def fits(self, capacity: int | None) -> bool:
    return self.memory is not None and (capacity is None or self.memory.total <= capacity)


def num_classes(config: ml_collections.ConfigDict) -> int:
  if not config.get("num_classes"):
    raise errors.UserError("The config has no num_classes; the planner needs it for the head "
                           "(set --config.num_classes=N).")
  return config.num_classes


def analytic_train_flops(model_name: str, image_size: tuple[int, int], classes: int) -> float:
  """Training FLOPs for one image: 2 per multiply-add of every convolution and of the head,
  x3 for forward + backward (input and weight gradients). Norms, ReLUs and weight
  standardization are elementwise and left out, as in the usual ResNet counts."""
  layers, width = models.parse_name(model_name)
  height, width_px = image_size
  out = lambda size, kernel, stride, pad: (size + 2 * pad - kernel) // stride + 1
  macs = 0

  def conv(size, kernel, stride, pad, c_in, c_out):
    nonlocal macs
    h, w = out(size[0], kernel, stride, pad), out(size[1], kernel, stride, pad)
    macs += h * w * kernel * kernel * c_in * c_out
    return h, w

  size = conv((height, width_px), 7, 2, 3, 3, 64 * width)  # Root conv ...
  size = out(size[0] + 2, 3, 2, 0), out(size[1] + 2, 3, 2, 0)  # ... and zero-padded max-pool.
  channels = 64 * width
  for block, units in enumerate(layers):
    mid = 64 * width * 2 ** block
    for unit in range(units):
      stride = 2 if block and not unit else 1
      if not unit:
        conv(size, 1, stride, 0, channels, 4 * mid)  # Shortcut projection.
      conv(size, 1, 1, 0, channels, mid)
      next_size = conv(size, 3, stride, 1, mid, mid)
      conv(next_size, 1, 1, 0, mid, 4 * mid)
      size, channels = next_size, 4 * mid
  macs += channels * classes  # Head.
  return 2.0 * 3 * macs


def compile_step(config: ml_collections.ConfigDict, target: Target) -> Plan:
  """Compiles the training step of `config` for `target`'s devices (no data, no TPU).

  An out-of-memory refusal by the compiler is a result (the step does not fit), not an error.
  """
  classes = num_classes(config)
  height, width = preprocess.output_image_size(config.pp_train)
  mesh = sharding.make_mesh(target.devices)
  # num_train_examples only sets schedule constants, which do not change the program's shape.
  setup = trainer.build(config, mesh, classes, num_train_examples=config.batch_size)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {
      "image": jax.ShapeDtypeStruct((config.batch_size, height, width, 3), jnp.float32,
                                    sharding=batch_sharding),
      "labels": jax.ShapeDtypeStruct((config.batch_size, classes), jnp.float32,
                                     sharding=batch_sharding),
  }
  per_device = config.batch_size // mesh.size
  start = time.perf_counter()
  try:
    compiled = setup.train_step.lower(setup.abstract_state, batch).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return Plan(per_device, time.perf_counter() - start, out_of_memory=str(e).splitlines()[0])
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  memory = Memory(stats.argument_size_in_bytes, stats.output_size_in_bytes,
                  stats.alias_size_in_bytes, stats.temp_size_in_bytes,
                  stats.generated_code_size_in_bytes, stats.peak_memory_in_bytes)
  cost = compiled.cost_analysis()
  flops, bytes_accessed = cost.get("flops"), cost.get("bytes accessed")
  # XLA's cost analysis counts a loop body once: with batch_split the step scans over
  # `batch_split` micro-batches. Scaling the whole figure slightly over-counts the per-step
  # work outside the loop (weight standardization, optimizer), negligible for big batches.
  # The collectives count loop trips themselves.
  return Plan(per_device, seconds, memory, flops and flops * config.batch_split,
              bytes_accessed=bytes_accessed and bytes_accessed * config.batch_split,
              collectives=tuple(scaling.collectives(compiled.as_text(), mesh.size)))


TIGHT_HEADROOM = 0.05


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / GiB:.2f} GiB"


def report(config: ml_collections.ConfigDict, target: Target, plan: Plan) -> str:
  """The human-readable plan: memory against capacity, FLOPs, step time at peak."""
  size = preprocess.output_image_size(config.pp_train)
  lines = [
      f"Config: {config.model.name}, {num_classes(config)} classes, batch {config.batch_size} "
      f"= {plan.batch_per_device} per device at {size[0]}x{size[1]} px, state_sharding="
      f"{config.state_sharding}, batch_split={config.batch_split}, "
      f"model.dtype={config.model.dtype}",
      f"Target: {target.description}; per device "
      + (f"{_gib(target.hbm_bytes)} memory" if target.hbm_bytes else "no known memory capacity")
      + (f", {target.peak_flops / 1e12:.1f} TFLOP/s bf16 peak" if target.peak_flops else ""),
      f"Compile time: {plan.compile_seconds:.1f} s",
  ]
  if plan.memory is None:
    lines.append(f"DOES NOT FIT: the compiler ran out of memory: {plan.out_of_memory}")
    return "\n".join(lines)
  m = plan.memory
  lines += [
      "Memory per device (compiler's buffer assignment):",
      f"  arguments    {_gib(m.arguments):>12}  state (or its shard) + batch shard",
      f"  outputs      {_gib(m.outputs):>12}  new state + metrics",
      f"  aliased      {_gib(m.aliased):>12}  outputs written into donated inputs (the state)",
      f"  temporaries  {_gib(m.temporaries):>12}  activations, gathered params, gradients",
      f"  program      {_gib(m.code):>12}  generated code",
      f"  total        {_gib(m.total):>12}  peak = arguments + outputs - aliased + "
      "temporaries + program",
      f"  (live peak   {_gib(m.live_peak):>12}  compiler's estimate of buffers live at once; "
      "the verdict uses total)",
  ]
  if target.hbm_bytes:
    headroom = target.hbm_bytes - m.total
    verdict = "FITS" if headroom >= 0 else "DOES NOT FIT"
    lines.append(f"  capacity     {_gib(target.hbm_bytes):>12}  -> {verdict}, headroom "
                 f"{_gib(headroom)} ({100 * headroom / target.hbm_bytes:.0f}%)")
    if 0 <= headroom < TIGHT_HEADROOM * target.hbm_bytes:
      lines.append(f"  TIGHT: under {TIGHT_HEADROOM:.0%} headroom; the runtime reserves part of "
                   "the HBM (a v3 core offers ~15.5 of 16 GiB), prefer a larger batch_split")
  else:
    lines.append("  capacity     unknown for this device: no fit verdict (use --hbm_gib)")
  analytic = analytic_train_flops(config.model.name, size, num_classes(config))
  analytic *= plan.batch_per_device
  lines.append(f"FLOPs per device per step: compiler {plan.flops:.4g}, analytic {analytic:.4g} "
               f"(2 x 3 x conv MACs x {plan.batch_per_device} images; ratio "
               f"{plan.flops / analytic:.2f})")
  if target.peak_flops:
    step = plan.flops / target.peak_flops
    lines.append(f"At peak ({target.peak_flops / 1e12:.1f} TFLOP/s per device): "
                 f"{1e3 * step:.3g} ms per step, {config.batch_size / step:,.0f} img/s "
                 f"({plan.batch_per_device / step:,.0f} per device); a bound, real steps are "
                 "slower")
  return "\n".join(lines)


PlanFn = Callable[[ml_collections.ConfigDict], Plan]


def find_max_batch(config: ml_collections.ConfigDict, plan_fn: PlanFn, capacity: int | None,
                   first: Plan) -> tuple[int, Plan] | None:
  """The largest per-device batch that fits, and its plan; None if not even the smallest does.

  Memory grows about linearly with the batch, so each guess extrapolates the line through
  the two largest compiled batches (bisecting until there are two), kept strictly inside the
  bracket (fits, does not fit). Usually 3-5 compiles.
  """
  n = config.batch_size // first.batch_per_device
  unit = config.batch_split  # The per-device batch must divide into the micro-batches.
  plans = {first.batch_per_device: first}
  fits = first.fits(capacity)
  lo, hi = (first.batch_per_device, None) if fits else (None, first.batch_per_device)
  while lo is None or hi is None or hi - lo > unit:
    measured = sorted((b, p.memory.total) for b, p in plans.items() if p.memory)[-2:]
    guess = None
    if capacity and len(measured) == 2 and measured[1][1] > measured[0][1]:
      (b0, m0), (b1, m1) = measured
      guess = int(b0 + (capacity - m0) * (b1 - b0) / (m1 - m0)) // unit * unit
    low = lo or 0
    if guess is None:
      guess = (low + hi) // 2 // unit * unit if hi else 2 * lo
    guess = min(max(guess, low + unit), hi - unit if hi else 4 * lo)
    if guess <= 0:
      return None
    plans[guess] = plan_fn(config_common.with_overrides(config, {"batch_size": guess * n}))
    if plans[guess].fits(capacity):
      lo = guess
    else:
      hi = guess
  return lo, plans[lo]


def candidate_changes(config: ml_collections.ConfigDict, batch_per_device: int) -> list[list]:
  """Groups of overrides that save memory, fewest changed settings first.

  Within a group only batch_split varies, from small to large; memory falls as it grows.
  fsdp and batch_split keep the step's math; bfloat16 compute changes numerics, so it comes
  after them among changes of the same size.
  """
  splits = [k for k in (2 ** i for i in range(1, 12))
            if config.batch_split < k <= batch_per_device and batch_per_device % k == 0]
  switches = []
  if config.state_sharding != "fsdp":
    switches.append({"state_sharding": "fsdp"})
  if config.model.dtype != "bfloat16":
    switches.append({"model.dtype": "bfloat16"})
  groups = []
  for count in range(len(switches) + 1):
    for chosen in itertools.combinations(switches, count):
      base = {k: v for switch in chosen for k, v in switch.items()}
      if base:
        groups.append([base])
      if splits:
        groups.append([{**base, "batch_split": k} for k in splits])
  # Fewest changes, then exact math first: fsdp < batch_split < bfloat16.
  return sorted(groups, key=lambda g: (len(g[0]), "model.dtype" in g[0], "batch_split" in g[0]))


def suggest(config: ml_collections.ConfigDict, plan_fn: PlanFn, capacity: int | None,
            batch_per_device: int) -> tuple[dict, Plan] | None:
  """The smallest change (candidate_changes) whose step fits, confirmed by compiling it.

  Per group one compile of its strongest option rules the whole group out; if it fits, a
  bisection over batch_split finds the smallest split that does.
  """
  for options in candidate_changes(config, batch_per_device):
    strongest = plan_fn(config_common.with_overrides(config, options[-1]))
    if not strongest.fits(capacity):
      continue
    lo, hi, best = -1, len(options) - 1, (options[-1], strongest)  # options[hi] fits.
    while hi - lo > 1:
      mid = (lo + hi) // 2
      plan = plan_fn(config_common.with_overrides(config, options[mid]))
      if plan.fits(capacity):
        hi, best = mid, (options[mid], plan)
      else:
        lo = mid
    return best
  return None


def _flags(overrides: dict) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def require_fit(config: ml_collections.ConfigDict, target: Target) -> Plan:
  """Compiles the step once and prints its report; UserError unless it fits `target`."""
  if not target.hbm_bytes:
    raise errors.UserError("--require_fit needs a memory capacity; this device reports none "
                           "(pass --hbm_gib=N).")
  plan = compile_step(config, target)
  print(report(config, target, plan), flush=True)
  if not plan.fits(target.hbm_bytes):
    needs = f"needs {_gib(plan.memory.total)}" if plan.memory else "runs out of memory"
    raise errors.UserError(
        f"The step {needs} per device, more than the {_gib(target.hbm_bytes)} of "
        f"{target.description}; run python -m big_transfer.plan without --require_fit for the "
        "smallest change that fits.")
  return plan


def run(config: ml_collections.ConfigDict, target: Target, find_max: bool) -> None:
  """Plans `config` on `target` and prints the report, a fix if needed, the max batch if asked."""
  if find_max and not target.hbm_bytes:
    raise errors.UserError("--find_max_batch needs a memory capacity; this device reports none "
                           "(pass --hbm_gib=N).")
  def plan_fn(cfg):
    plan = compile_step(cfg, target)
    print(f"  compiled {cfg.batch_size // len(target.devices)}/device, "
          f"batch_split={cfg.batch_split}, {cfg.state_sharding}, {cfg.model.dtype}: "
          + (_gib(plan.memory.total) if plan.memory else "out of memory")
          + f" ({plan.compile_seconds:.0f} s)", flush=True)
    return plan

  plan = compile_step(config, target)
  print(report(config, target, plan), flush=True)
  capacity = target.hbm_bytes
  if not plan.fits(capacity):
    print("Searching the smallest change that fits...", flush=True)
    found = suggest(config, plan_fn, capacity, plan.batch_per_device)
    if found is None:
      print("No combination of batch_split, state_sharding=fsdp and model.dtype=bfloat16 "
            "fits; use a smaller batch_size, model or resolution, or more devices.")
    else:
      overrides, fixed = found
      print(f"Suggestion: {_flags(overrides)}  (re-planned: "
            f"{_gib(fixed.memory.total)} of {_gib(capacity)} per device)")
      print(report(config_common.with_overrides(config, overrides), target, fixed))
  if find_max:
    print("Searching the largest per-device batch that fits...", flush=True)
    found = find_max_batch(config, plan_fn, capacity, plan)
    if found is None:
      print(f"No batch fits with batch_split={config.batch_split}.")
    else:
      batch, best = found
      print(f"Largest per-device batch that fits: {batch} (--config.batch_size="
            f"{batch * len(target.devices)}; {_gib(best.memory.total)} per device)")


def _scaling_point(config: ml_collections.ConfigDict, target: Target, topology: str,
                   mfu: float) -> scaling.Point:
  """Compiles `config` for `target` and models its step."""
  plan = compile_step(config, target)
  devices = len(target.devices)
  point = scaling.Point(topology, target.generation, devices, devices // target.per_chip,
                        plan.batch_per_device, plan.memory and plan.memory.total,
                        target.hbm_bytes)
  print(f"  compiled {topology} at {plan.batch_per_device}/device: "
        + (_gib(plan.memory.total) if plan.memory else "out of memory")
        + f" ({plan.compile_seconds:.0f} s)", flush=True)
  if plan.memory is None:
    return point
  link = scaling.TPU_LINKS[target.generation]
  traffic = tuple(scaling.summarize(list(plan.collectives)))
  time = scaling.step_time(plan.flops, plan.bytes_accessed, sum(t.ring_bytes for t in traffic),
                           target.peak_flops, link.hbm_bytes_per_s / target.per_chip,
                           link.ici_bytes_per_s / target.per_chip, mfu)
  return dataclasses.replace(point, flops=plan.flops, bytes_accessed=plan.bytes_accessed,
                             traffic=traffic, time=time)


def schedule_images(config: ml_collections.ConfigDict, train_examples: int | None):
  """Training images of the config's whole schedule; None if it counts epochs of an unknown
  dataset size."""
  if train_examples is None and config.get("total_epochs") is not None and all(
      config.get(f"total_{unit}") is None for unit in ("steps", "examples")):
    return None
  return optim.Durations(train_examples or 0, config.batch_size)(config, "total") * (
      config.batch_size)


def run_scaling(config: ml_collections.ConfigDict, topologies: list[str], mfu: float,
                train_examples: int | None, plot_path: str, hbm_bytes: int | None) -> None:
  """Prints a strong- and a weak-scaling table over `topologies` and writes their plot."""
  if not 0 < mfu <= 1:
    raise errors.UserError(f"--mfu must be in (0, 1], got {mfu}.")
  targets = {t: tpu_target(t, hbm_bytes) for t in topologies}
  for topology, target in targets.items():
    if target.generation not in scaling.TPU_LINKS:
      raise errors.UserError(f"No bandwidth figures for {topology!r} "
                             f"({target.devices[0].device_kind}); known generations: "
                             f"{', '.join(scaling.TPU_LINKS)}.")
    sharding.check_batch_size(config.batch_size, len(target.devices))
  order = sorted(topologies, key=lambda t: (targets[t].generation, len(targets[t].devices)))
  weak_batch = config.batch_size // max(len(t.devices) for t in targets.values())
  if weak_batch % config.batch_split:
    raise errors.UserError(f"batch_split {config.batch_split} must divide the weak-scaling "
                           f"per-device batch {weak_batch} (batch_size {config.batch_size} over "
                           "the largest topology's devices).")
  images = schedule_images(config, train_examples)
  size = preprocess.output_image_size(config.pp_train)
  print(f"Scaling {config.model.name} at {size[0]}x{size[1]} px, {num_classes(config)} classes, "
        f"state_sharding={config.state_sharding}, batch_split={config.batch_split}, "
        f"model.dtype={config.model.dtype}; MFU {mfu:.3f}", flush=True)
  compiled = {}

  def point(topology: str, batch: int) -> scaling.Point:
    if (topology, batch) not in compiled:  # Weak and strong share the largest topology.
      compiled[topology, batch] = _scaling_point(
          config_common.with_overrides(config, {"batch_size": batch}), targets[topology],
          topology, mfu)
    return compiled[topology, batch]

  curves = {}
  for label, per_device in ((f"strong scaling (global batch {config.batch_size})", None),
                            (f"weak scaling ({weak_batch} per device)", weak_batch)):
    print(f"{label}:", flush=True)
    points = [point(t, per_device * len(targets[t].devices) if per_device
                    else config.batch_size) for t in order]
    curves[label] = scaling.scaling_rows(points, images)
  for label, rows in curves.items():
    print(f"\n{label.capitalize()}:\n{scaling.table(rows)}")
  print("\nPer device: memory = the compiler's total against the HBM; TFLOPs and HBM GB = "
        "the compiler's FLOPs and bytes accessed per step; collectives per step (bytes, "
        "replica-group size) from the compiled HLO. Times: compute at the MFU, HBM bytes at "
        "the chip's bandwidth, collectives as ring traffic over the chip's ICI bandwidth "
        "(big_transfer/scaling.py); step = the largest (communication overlapped), in "
        "parentheses compute-or-HBM plus communication. Efficiency: per-device img/s against "
        "the generation's smallest topology.")
  if images is None:
    print("days, chip-hours: the config counts epochs; pass --train_examples=N (images per "
          "epoch) for the schedule's time.")
  else:
    print(f"days, chip-hours: the schedule's {images:,.0f} images at the overlapped step time.")
  scaling.plot(curves, plot_path, f"{config.model.name} {size[0]}px, "
               f"{config.state_sharding}, MFU {mfu:.3f}")
  print(f"Plot: {plot_path}")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  hbm = int(HBM_GIB.value * GiB) if HBM_GIB.value else None
  try:
    if SCALING.value:
      run_scaling(cli.CONFIG.value, SCALING.value, MFU.value, TRAIN_EXAMPLES.value,
                  SCALING_PLOT.value, hbm)
      return
    target = tpu_target(TOPOLOGY.value, hbm) if TOPOLOGY.value else local_target(hbm)
    if REQUIRE_FIT.value:
      require_fit(cli.CONFIG.value, target)
    else:
      run(cli.CONFIG.value, target, FIND_MAX_BATCH.value)
  except errors.UserError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
