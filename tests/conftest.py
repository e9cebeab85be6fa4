"""Shared test fixtures. Tests run on the CPU; trainer runs go through subprocesses so each
can choose its own fake device count (XLA_FLAGS must be set before JAX starts)."""

import atexit
import contextlib
import importlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import types
import unittest.mock

import pytest

from big_transfer import native_logs


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for `devices` fake CPU devices. LLVM at -O1 rather than XLA's default -O2: the
  tests' tiny programs compile in less CPU time (R14x1's train step ~85%, its random init, all
  threefry, ~55%) and run as fast (docs/testing.md); every process of the suite uses the same
  flags, so compiled programs and results agree between them."""
  return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=1"


# In-process tests see 8 fake CPU devices (set before JAX initialises its backend).
os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling dominates these tiny runs (~10 s per program on XLA:CPU, threefry init included), and
# many trainer subprocesses compile the same programs: a persistent compilation cache, one per
# pytest process (jax's cache files are not written atomically) and inherited by its subprocesses.
_CACHE = tempfile.mkdtemp(prefix="bit_jax_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR10 = pathlib.Path(os.environ.get("BIT_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10"))


def require_data(path: pathlib.Path, what: str) -> pathlib.Path:
  """`path` if it exists. Otherwise a skip that names it, and in CI (`CI=true`, set by .ci/run)
  a failure: test data that CI expects is never skipped silently."""
  if path.is_dir():
    return path
  message = f"{what} not found at {path}"
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(f"{message}; CI expects it (set BIT_CIFAR10 to its path)", pytrace=False)
  pytest.skip(f"{message} (set BIT_CIFAR10 to its path)")


@pytest.fixture(scope="session")
def cifar10_dir():
  return require_data(CIFAR10, "CIFAR-10 image folder")

# A tiny model and run for trainer tests: R14x1 at 16 px, 4 steps of 16 images; evaluation in
# batches of 64 (360 test images: the last batch is padded).
TINY_CONFIG = {
    "model.name": "R14x1",
    "pp_train": "decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)",
    "pp_eval": "decode|resize(16)|value_range(-1, 1)",
    "batch_size": 16,
    "eval_batch_size": 64,
    "total_steps": 4,
    "schedule.warmup_steps": 2,
    "schedule.decay_epochs": (1,),
    "log_every_steps": 2,
    "checkpoint_every_steps": 2,
    "eval_every_steps": 0,
}
TINY = [f"--config.{key}={value}" for key, value in TINY_CONFIG.items()]  # The same as flags.


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir with the embedded digits dataset prepared once per session."""
  path = tmp_path_factory.mktemp("tfds")
  from big_transfer.data import datasets  # pylint: disable=g-import-not-at-top
  datasets.get("sklearn_digits", str(path))
  return str(path)


@contextlib.contextmanager
def on_devices(count: int):
  """`sharding.make_mesh()` (trainer.run's, the few-shot evaluation's) over only the first
  `count` of this process's 8 fake devices. Where the device count is not what a test is
  about, one device compiles a trainer run in ~60% of the CPU time that eight take."""
  import jax  # pylint: disable=g-import-not-at-top
  from big_transfer import sharding  # pylint: disable=g-import-not-at-top
  make_mesh = sharding.make_mesh
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sharding, "make_mesh",
                  lambda devices=None: make_mesh(jax.devices()[:count] if devices is None
                                                 else devices))
    yield


@pytest.fixture
def one_device():
  """The test's trainer runs and few-shot evaluations on one device (see on_devices)."""
  with on_devices(1):
    yield


@pytest.fixture(scope="session")
def r14x1_npz(tmp_path_factory):
  """timm's BiT-R14x1 reference weights (tests/fixtures) written once per session in the released
  .npz layout, with a 10-class head. Tests only read it."""
  sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
  import compact_npz  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("npz") / "BiT-R14x1.npz")
  compact_npz.write_official_npz(
      compact_npz.load_fixture(compact_npz.fixture_path("timm_bit_r14x1.npz"))["params"], path)
  return path


def train_env(devices: int) -> dict[str, str]:
  """The environment of a trainer subprocess with `devices` fake CPU devices.

  TF_ENABLE_ONEDNN_OPTS=1 makes TensorFlow print its oneDNN import notice on every x86 CPU
  (by default only some CPUs do), so the output checks below see it whatever the machine.
  An empty GLIBC_TUNABLES keeps the trainer from re-executing itself with the CPU malloc
  tunables (big_transfer/hostmem.py): they pay off over many big steps, while these runs are a
  few tiny steps whose start-up they slow (2-3 s more system time each, for huge pages);
  test_hostmem.py and test_benchmark.py check them.
  """
  return {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu",
          "TF_ENABLE_ONEDNN_OPTS": "1", "GLIBC_TUNABLES": ""}


def error_line(proc) -> str:
  """The one-line error a failed CLI run ends with, checked: a non-zero exit, stderr ending in
  the only `error: ` line, no traceback, none of TensorFlow's import notices. Other lines a
  library may print on some machine are not the test's business."""
  assert proc.returncode != 0, proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert lines and lines[-1].startswith("error: "), proc.stderr
  assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert not any(native_logs.is_notice(line) for line in lines), proc.stderr
  return lines[-1]


def run_cli(*argv, module: str = "train"):
  """`python -m big_transfer.MODULE ARGV` (train, plan) run in this process (no imports or
  compiles to pay): an object with `returncode` and `stderr` as a subprocess would give, for
  `error_line`. The `error: ...` message is what sys.exit would print; the exit code is 1 for
  a message."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  from big_transfer import cli  # pylint: disable=g-import-not-at-top
  main = importlib.import_module(f"big_transfer.{module}").main
  flags.FLAGS.unparse_flags()
  stderr = io.StringIO()
  code = 0
  argv = [module, *argv]
  saved_argv, sys.argv = sys.argv, argv  # ml_collections reads the overrides from sys.argv.
  verbosity = logging.get_verbosity()  # The planner lowers it.
  try:
    # The CLI ends a TrainingError with os._exit (see train.main): here, a SystemExit.
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), \
         unittest.mock.patch.object(os, "_exit", sys.exit):
      main(cli.parse_flags(argv))
  except SystemExit as e:
    if isinstance(e.code, str):
      stderr.write(e.code + "\n")
      code = 1
    else:
      code = e.code or 0
  finally:
    sys.argv = saved_argv
    logging.set_verbosity(verbosity)
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # Defined per parse.
      delattr(flags.FLAGS, name)
  return types.SimpleNamespace(returncode=code, stderr=stderr.getvalue(), stdout="")


def logged_losses(workdir) -> dict[int, float]:
  """{step: train loss} from a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def run_train(workdir, *flags, devices: int = 1, check: bool = True):
  """Runs `python -m big_transfer.train` with the demo config; returns the CompletedProcess."""
  env = train_env(devices)
  cmd = [sys.executable, "-m", "big_transfer.train", f"--config={ROOT}/configs/demo.py",
         f"--workdir={workdir}", *flags]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


# The files by their wall time in CI (2 workers), the longest first (CI's --durations, scaled by
# the #19 trims): `--dist loadfile` hands a worker its next file when it has two tests left, and
# a simulation of that rule on those durations ends both workers within seconds of each other.
# The files not listed take seconds.
_SLOWEST_FIRST = ("test_resilience.py", "test_upstream.py", "test_hpt.py", "test_recipes.py",
                  "test_train.py", "test_engine.py", "test_cloud_storage.py",
                  "test_input_position.py", "test_transfer.py", "test_scaling.py",
                  "test_reliability.py", "test_fewshot.py", "test_plan.py", "test_tools.py",
                  "test_notebook.py", "test_bad_input.py", "test_checkpoints.py",
                  "test_models.py", "test_benchmark.py", "test_tasks.py")


def pytest_collection_modifyitems(config, items):
  if not hasattr(config, "workerinput"):  # Not an xdist worker: keep the order asked for.
    return

  def rank(item):
    name = item.path.name
    return _SLOWEST_FIRST.index(name) if name in _SLOWEST_FIRST else len(_SLOWEST_FIRST)
  items.sort(key=rank)  # Stable: the order within each file is kept.
