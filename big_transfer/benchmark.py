"""Training-step speed: img/s, step time, FLOPs, MFU and peak memory, optionally against timm.

    python -m big_transfer.benchmark --model=R50x1 --resolution=128 --batch_size=32 \
        [--dtype=bfloat16] [--state_sharding=fsdp] [--batch_split=k] [--steps=10] \
        [--vs_timm [--timm_python=PATH] [--timm_compile]] [--json]

Times the real step (`trainer.build(...).train_step`, the one `train` runs: forward, backward,
SGD update) on one synthetic batch already on the devices, so the input pipeline is not
measured (docs/benchmarks.md measures it). Compile time is reported apart, then the median of
--steps timed steps after --warmup untimed ones. FLOPs per step: the analytic model count
(2 x 3 x conv MACs, as the planner's) and the compiler's cost analysis. MFU = model FLOPs per
second / the matmul peak this command measures on the same devices in the compute dtype.
Peak memory: the device's own peak where it reports one (GPU, TPU), else the compiler's
buffers for the step (arguments + outputs - donated + temporaries + code; CPU).

--vs_timm also times timm's same model (`resnetv2_50x1_bit`, ...) with PyTorch on the same
batch, in a worker process run by --timm_python (an interpreter with torch and timm; torch is
not a dependency of this project), alternating blocks of --block steps between the two so
that both see the same machine load, and prints the ratio ours / timm. --json ends the output
with one JSON object. Bad input ends with one `error: ...` line.

On CPU the command re-executes itself with glibc malloc tunables that keep each step's buffers
mapped (big_transfer/hostmem.py, as `train` does) and reports page faults per step for both
frameworks; timm's worker runs with the environment the command started with unless
--timm_same_malloc.
"""

import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

from big_transfer import errors, hostmem

MODEL = flags.DEFINE_string("model", "R50x1", "Model name (R50x1, R101x3, BiT-M-R50x1, ...).")
# allow_override: predict.py defines --resolution, --batch_size and --json too, and the tests
# import both modules into one process.
RESOLUTION = flags.DEFINE_integer("resolution", 128, "Image height and width in pixels.",
                                  allow_override=True)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Global batch over all devices.",
                                  allow_override=True)
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                          "Compute dtype (config.model.dtype); parameters stay float32.")
STATE_SHARDING = flags.DEFINE_enum("state_sharding", "replicated", ["replicated", "fsdp"],
                                   "config.state_sharding.")
BATCH_SPLIT = flags.DEFINE_integer("batch_split", 1, "config.batch_split (micro-batches).")
NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Head outputs.")
STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (each framework).")
WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling (each framework).")
BLOCK = flags.DEFINE_integer("block", 2, "With --vs_timm: steps per turn when alternating.")
VS_TIMM = flags.DEFINE_bool("vs_timm", False, "Also time timm's same model with PyTorch.")
TIMM_PYTHON = flags.DEFINE_string(
    "timm_python", sys.executable, "Python interpreter with torch and timm for --vs_timm.")
TIMM_CHANNELS_LAST = flags.DEFINE_bool(
    "timm_channels_last", True, "Run timm in torch.channels_last memory format (its faster "
    "layout for convolutions on CPU and GPU).")
TIMM_COMPILE = flags.DEFINE_bool(
    "timm_compile", False, "Wrap timm's model in torch.compile (compiled during the warm-up "
    "steps; give --warmup >= 2).")
TIMM_SAME_MALLOC = flags.DEFINE_bool(
    "timm_same_malloc", False, "Give the timm worker the glibc malloc tunables this command "
    "sets for itself on CPU (big_transfer/hostmem.py); by default the worker runs with the "
    "environment the command was started with, as timm runs on its own.")
CORES = flags.DEFINE_integer(
    "cores", None, "Pin this process and the timm worker to the first N CPU cores (both "
    "frameworks then size their thread pools to N); default: all cores.")
JSON = flags.DEFINE_bool("json", False, "End the output with one JSON object of the results.",
                        allow_override=True)

GiB = 2 ** 30


@dataclasses.dataclass
class Result:
  """One framework's measurement. Times in seconds; FLOPs and bytes per step."""
  framework: str
  device: str
  step_s: float
  img_per_sec: float
  step_times: list
  cpu_s: float  # Median CPU seconds of the process per step (all its threads).
  page_faults: float  # Median minor page faults of the process per step.
  compile_s: float | None = None
  flops_per_step: float | None = None  # Analytic model FLOPs (MFU's numerator).
  compiler_flops_per_step: float | None = None
  matmul_peak_flops: float | None = None  # Measured, all devices together.
  mfu: float | None = None
  peak_bytes: int | None = None
  peak_bytes_source: str = ""
  details: dict = dataclasses.field(default_factory=dict)


def make_config(model: str, batch_size: int, dtype: str, state_sharding: str,
                batch_split: int):
  """The config of the benchmarked step: the BiT upstream optimizer (SGD momentum 0.9, coupled
  weight decay 1e-4 on kernels) with the given model, batch and engine settings."""
  from big_transfer import config_common  # pylint: disable=g-import-not-at-top
  return config_common.with_overrides(config_common.base(), {
      "model.name": model, "model.dtype": dtype, "batch_size": batch_size,
      "state_sharding": state_sharding, "batch_split": batch_split, "total_steps": 10 ** 6,
      "schedule.warmup_steps": 0})


def synthetic_batch(batch_size: int, resolution: int, num_classes: int, seed: int = 0):
  """Images uniform in [-1, 1] (NHWC float32) and one-hot labels, fixed by `seed`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch_size, resolution, resolution, 3)).astype(np.float32)
  labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, batch_size)]
  return {"image": images, "labels": labels}


def describe_device() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  if device.platform != "cpu":
    return f"{jax.device_count()} x {device.device_kind}"
  cpu = platform.processor() or "CPU"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{jax.device_count()} x cpu ({cpu}, {len(os.sched_getaffinity(0))} cores)"


def matmul_peak(mesh, dtype: str, seconds: float = 1.0) -> float:
  """Best FLOP/s of square matmuls in `dtype`, one per device of `mesh` at once; the size is
  doubled until one takes 10 ms (or reaches 8192)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from big_transfer import sharding
  split = NamedSharding(mesh, P(sharding.DATA))
  matmul = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b), out_shardings=split)
  n = 512
  while True:
    a = jax.device_put(jnp.ones((mesh.size, n, n), dtype), split)
    matmul(a, a).block_until_ready()
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    if time.perf_counter() - start > 0.01 or n >= 8192:
      break
    n *= 2
  best, deadline = 0.0, time.perf_counter() + seconds
  while time.perf_counter() < deadline:
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = max(best, 2 * mesh.size * n ** 3 / (time.perf_counter() - start))
  return best


class OurStep:
  """`trainer.build`'s step on a synthetic batch, compiled ahead of time and timed."""

  def __init__(self, config, batch, num_classes: int):
    # pylint: disable=g-import-not-at-top
    import jax
    from big_transfer import sharding, trainer
    self.config = config
    self.mesh = sharding.make_mesh()
    setup = trainer.build(config, self.mesh, num_classes, num_train_examples=config.batch_size)
    rows = config.batch_size // jax.process_count()
    local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows]
             for k, v in batch.items()}
    with jax.set_mesh(self.mesh):
      self.state = setup.init(jax.random.key(config.seed))
      self.batch = sharding.to_global(local, self.mesh)
      start = time.perf_counter()
      self.compiled = setup.train_step.lower(self.state, self.batch).compile()
      self.compile_s = time.perf_counter() - start
    # XLA counts a scanned loop body once (batch_split micro-batches), per device.
    flops = self.compiled.cost_analysis().get("flops")
    self.compiler_flops = flops and flops * config.batch_split * self.mesh.size
    memory = self.compiled.memory_analysis()
    self.compiler_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                           - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                           + memory.generated_code_size_in_bytes)

  def steps(self, n: int) -> tuple[list[float], list[float], list[int]]:
    """Wall and CPU seconds and minor page faults of each of `n` steps."""
    import jax  # pylint: disable=g-import-not-at-top
    times, cpu_times, faults = [], [], []
    for _ in range(n):
      start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start, cpu = time.perf_counter(), time.process_time()
      self.state, step_metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, step_metrics))
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    return times, cpu_times, faults

  def peak_bytes(self) -> tuple[int, str]:
    import jax  # pylint: disable=g-import-not-at-top
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      return stats["peak_bytes_in_use"], "device peak, device 0"
    return self.compiler_bytes, "compiler's buffers per device"


class TimmStep:
  """timm's same step in a worker process (big_transfer/benchmarks/timm_step.py)."""

  def __init__(self, python: str, config, batch_path: str, num_classes: int,
               channels_last: bool, compile_model: bool = False, environ=None):
    from big_transfer import models  # pylint: disable=g-import-not-at-top
    from big_transfer.benchmarks import timm_step  # pylint: disable=g-import-not-at-top
    try:
      self.process = subprocess.Popen([python, timm_step.__file__], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=environ)
    except OSError as e:
      raise errors.UserError(f"--timm_python {python!r} cannot be run ({e.strerror}); pass an "
                             "interpreter with torch and timm installed.") from e
    layers, width = models.parse_name(config.model.name)
    self.info = self._call(
        op="init", layers=list(layers), width=width, num_classes=num_classes,
        batch_path=batch_path, dtype=config.model.dtype, lr=config.lr, momentum=config.momentum,
        wd=config.wd, channels_last=channels_last, compile=compile_model)

  def _call(self, **command):
    try:
      self.process.stdin.write(json.dumps(command) + "\n")
      self.process.stdin.flush()
      line = self.process.stdout.readline()
    except BrokenPipeError:
      line = ""
    if not line:
      stderr = self.process.stderr.read().strip().splitlines()
      error = stderr[-1] if stderr else f"exit status {self.process.wait()}"
    else:
      error = json.loads(line).get("error")
    if error:
      hint = ("; --vs_timm needs torch and timm importable by --timm_python (e.g. python3 -m "
              "venv V && V/bin/pip install torch torchvision timm, then --timm_python="
              "V/bin/python)" if "No module named" in error else "")
      raise errors.UserError(f"The timm worker ({self.process.args[0]}) failed: {error}{hint}.")
    return json.loads(line)

  def steps(self, n: int) -> tuple[list[float], list[float], list[int]]:
    reply = self._call(op="steps", n=n)
    return reply["times"], reply["cpu_times"], reply["page_faults"]

  def matmul_peak(self) -> float:
    return self._call(op="matmul_peak")["flops_per_sec"]

  def peak_bytes(self) -> tuple[int, str]:
    source = ("torch.cuda.max_memory_allocated" if self.info["device"].startswith("cuda")
              else "worker process peak RSS")
    return self._call(op="peak_bytes")["peak_bytes"], source

  def close(self) -> None:
    if self.process.poll() is None:
      try:
        self._call(op="exit")
      except errors.UserError:
        pass  # It exits without replying.
    self.process.wait()


def _median(values: list[float]) -> float:
  values = sorted(values)
  mid = len(values) // 2
  return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _result(framework: str, device: str, times: tuple[list[float], ...], batch_size: int,
            **fields) -> Result:
  step = _median(times[0])
  result = Result(framework, device, step, batch_size / step, times[0], _median(times[1]),
                  _median(times[2]), **fields)
  if result.flops_per_step and result.matmul_peak_flops:
    result.mfu = result.flops_per_step / step / result.matmul_peak_flops
  return result


def run(model: str, resolution: int, batch_size: int, dtype: str = "float32",
        state_sharding: str = "replicated", batch_split: int = 1, num_classes: int = 1000,
        steps: int = 10, warmup: int = 2, block: int = 2, timm_python: str | None = None,
        timm_channels_last: bool = True, timm_compile: bool = False,
        timm_same_malloc: bool = False, log=print) -> list[Result]:
  """Measures our step (and timm's when `timm_python` is given); returns [ours, (timm)]."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from big_transfer import plan
  if steps < 1 or warmup < 0 or block < 1 or resolution < 1 or batch_size < 1:
    raise errors.UserError("Need --steps >= 1, --warmup >= 0, --block >= 1, --resolution >= 1 "
                           "and --batch_size >= 1.")
  config = make_config(model, batch_size, dtype, state_sharding, batch_split)
  batch = synthetic_batch(batch_size, resolution, num_classes)
  device = describe_device()
  log(f"Benchmark: {config.model.name} at {resolution}x{resolution} px, {num_classes} classes, "
      f"batch {batch_size} over {device}, model.dtype={dtype}, state_sharding="
      f"{state_sharding}, batch_split={batch_split}; jax {jax.__version__}")
  timm_environ = None  # The worker inherits this process's environment.
  if hostmem.tuned():
    log(f"glibc malloc: GLIBC_TUNABLES={hostmem.TUNABLES} (big_transfer/hostmem.py); timm's "
        f"worker: {'the same' if timm_same_malloc else 'glibc defaults'}")
    if not timm_same_malloc:
      timm_environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  timm = None
  with tempfile.TemporaryDirectory() as tmp:
    try:
      if timm_python:  # First: a missing torch fails before the long compile.
        path = os.path.join(tmp, "batch.npz")
        np.savez(path, **batch)
        timm = TimmStep(timm_python, config, path, num_classes, timm_channels_last,
                        timm_compile, timm_environ)
        log(f"timm: {timm.info['model']} ({timm.info['params']:,} parameters) on "
            f"{timm.info['device']}, torch {timm.info['torch']}, timm {timm.info['timm']}, "
            f"{timm.info['threads']} threads, channels_last={timm.info['channels_last']}, "
            f"torch.compile={timm.info['compiled']}")
      ours = OurStep(config, batch, num_classes)
      log(f"Compiled our step in {ours.compile_s:.1f} s")
      # Peaks are measured before and after the steps, the higher kept: on a shared machine
      # one measurement may fall in a busy moment.
      peaks = [matmul_peak(ours.mesh, dtype)]
      timm_peaks = [timm.matmul_peak()] if timm else []
      ours.steps(warmup)
      if timm:
        timm.steps(warmup)
      # Alternating turns: a change in the machine's load hits both frameworks alike.
      ours_times, timm_times = ([], [], []), ([], [], [])
      while len(ours_times[0]) < steps:
        n = min(block if timm else steps, steps - len(ours_times[0]))
        for times, framework in ((ours_times, ours), (timm_times, timm)):
          if framework:
            for total, new in zip(times, framework.steps(n)):
              total += new
      peaks.append(matmul_peak(ours.mesh, dtype))
      flops = plan.analytic_train_flops(config.model.name, (resolution, resolution),
                                        num_classes) * batch_size
      peak_bytes, source = ours.peak_bytes()
      results = [_result("ours", device, ours_times, batch_size, compile_s=ours.compile_s,
                         flops_per_step=flops, compiler_flops_per_step=ours.compiler_flops,
                         matmul_peak_flops=max(peaks), peak_bytes=peak_bytes,
                         peak_bytes_source=source)]
      if timm:
        timm_peaks.append(timm.matmul_peak())
        peak_bytes, source = timm.peak_bytes()
        results.append(_result("timm", timm.info["device"], timm_times, batch_size,
                               flops_per_step=flops, matmul_peak_flops=max(timm_peaks),
                               peak_bytes=peak_bytes, peak_bytes_source=source,
                               details=timm.info))
    finally:
      if timm:
        timm.close()
  return results


def faster_steps(ours: Result, timm: Result) -> int:
  """How many of our steps were faster than timm's step of the same index: the two ran in the
  same turn of the alternation, so each pair saw the same machine. Reads a small difference
  that the machine's drift between runs hides in the medians' ratio."""
  return sum(a < b for a, b in zip(ours.step_times, timm.step_times))


def report(results: list[Result], steps: int, warmup: int) -> str:
  """Human-readable lines for `run`'s results."""
  lines = []
  for r in results:
    times = sorted(r.step_times)
    lines.append(f"{r.framework}: {r.img_per_sec:.2f} img/s, step {r.step_s:.3f} s (median of "
                 f"{len(times)} after {warmup} warm-up; min {times[0]:.3f}, max "
                 f"{times[-1]:.3f}); {r.cpu_s:.3f} CPU s and {r.page_faults:,.0f} page faults "
                 "per step")
    if r.compile_s is not None:
      lines.append(f"  compile {r.compile_s:.1f} s")
    if r.flops_per_step:
      compiler = (f", compiler {r.compiler_flops_per_step:.4g}"
                  if r.compiler_flops_per_step else "")
      lines.append(f"  FLOPs per step: model {r.flops_per_step:.4g} (2 x 3 x conv MACs)"
                   f"{compiler}; {r.flops_per_step / r.step_s / 1e9:.1f} GFLOP/s")
    if r.mfu is not None:
      library = "jax" if r.framework == "ours" else "torch"
      lines.append(f"  MFU {r.mfu:.3f} of the {library} matmul peak measured here, "
                   f"{r.matmul_peak_flops / 1e9:.1f} GFLOP/s")
    if r.peak_bytes:
      lines.append(f"  peak memory {r.peak_bytes / GiB:.2f} GiB ({r.peak_bytes_source})")
  if len(results) == 2:
    lines.append(f"Ratio ours / timm: {results[0].img_per_sec / results[1].img_per_sec:.2f}x "
                 f"(img/s); ours faster in {faster_steps(*results)} of "
                 f"{len(results[0].step_times)} steps paired by turn")
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  lines.append(f"Load average (1, 5, 15 min): {load} on {os.cpu_count()} CPUs")
  del steps
  return "\n".join(lines)


def summary(results: list[Result]) -> dict:
  """The --json object: our figures at the top level, timm's under `timm`."""
  def fields(r: Result) -> dict:
    out = dataclasses.asdict(r)
    del out["framework"]
    return out
  out = fields(results[0])
  out["load_average"] = list(os.getloadavg())
  if len(results) == 2:
    out["timm"] = fields(results[1])
    out["ratio_vs_timm"] = results[0].img_per_sec / results[1].img_per_sec
    out["faster_steps_vs_timm"] = faster_steps(*results)
  return out


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  if CORES.value:  # Before JAX starts: XLA sizes its thread pool from the affinity mask.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:CORES.value])
  try:
    results = run(MODEL.value, RESOLUTION.value, BATCH_SIZE.value, DTYPE.value,
                  STATE_SHARDING.value, BATCH_SPLIT.value, NUM_CLASSES.value, STEPS.value,
                  WARMUP.value, BLOCK.value, TIMM_PYTHON.value if VS_TIMM.value else None,
                  TIMM_CHANNELS_LAST.value, TIMM_COMPILE.value, TIMM_SAME_MALLOC.value,
                  log=lambda line: print(line, flush=True))
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  print(report(results, STEPS.value, WARMUP.value), flush=True)
  if JSON.value:
    print(json.dumps(summary(results)))


if __name__ == "__main__":
  hostmem.reexec_for_cpu()
  app.run(main)
