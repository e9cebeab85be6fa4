"""Shared test fixtures. Tests run on the CPU; trainer runs go through subprocesses so each
can choose its own fake device count (XLA_FLAGS must be set before JAX starts)."""

import os
import pathlib
import subprocess
import sys

import pytest

# In-process tests see 8 fake CPU devices (set before JAX initialises its backend).
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR10 = pathlib.Path(os.environ.get("BIT_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10"))

# A tiny model and run for trainer tests: R14x1 at 16 px, 4 steps of 16 images.
TINY = [
    "--config.model.name=R14x1",
    "--config.pp_train=decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)",
    "--config.pp_eval=decode|resize(16)|value_range(-1, 1)",
    "--config.batch_size=16",
    "--config.total_steps=4",
    "--config.schedule.warmup_steps=2",
    "--config.schedule.decay_epochs=(1,)",
    "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.eval_every_steps=0",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir with the embedded digits dataset prepared once per session."""
  path = tmp_path_factory.mktemp("tfds")
  from big_transfer.data import datasets  # pylint: disable=g-import-not-at-top
  datasets.get("sklearn_digits", str(path))
  return str(path)


def train_env(devices: int) -> dict[str, str]:
  """The environment of a trainer subprocess with `devices` fake CPU devices."""
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_PLATFORMS": "cpu"}


def run_train(workdir, *flags, devices: int = 1, check: bool = True):
  """Runs `python -m big_transfer.train` with the demo config; returns the CompletedProcess."""
  env = train_env(devices)
  cmd = [sys.executable, "-m", "big_transfer.train", f"--config={ROOT}/configs/demo.py",
         f"--workdir={workdir}", *flags]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc
