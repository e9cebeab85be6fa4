"""Preemption, crashes and NaNs, through the real trainer CLI."""

import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, TINY, error_line, logged_losses, run_train, train_env

TOTAL = 12
FLAGS = [*TINY, f"--config.total_steps={TOTAL}", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=2"]


def _params(workdir, step=TOTAL):
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  return ocp.StandardCheckpointer().restore(path)["params"]


def _run_until(workdir, data_dir, step, sig=signal.SIGKILL, flags=FLAGS):
  """Starts training and sends `sig` as soon as it reports finishing `step`."""
  cmd = [sys.executable, "-u", "-m", "big_transfer.train", f"--config={ROOT}/configs/demo.py",
         f"--workdir={workdir}", *flags, f"--config.data_dir={data_dir}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  out = []
  for line in proc.stdout:
    out.append(line)
    if line.startswith(f"step {step}/{TOTAL}:"):
      proc.send_signal(sig)
      break
  rest, err = proc.communicate(timeout=300)
  return proc.returncode, "".join(out) + rest, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted run of TOTAL steps (checkpoints 10 and 12 kept); tests copy it to modify."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  run_train(workdir, *FLAGS, f"--config.data_dir={data_dir}")
  return workdir


def _copy(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  return workdir


def test_kill_9_five_times_then_resume_is_bitwise_identical(tmp_path, data_dir, reference):
  workdir = str(tmp_path / "interrupted")
  rng = random.Random(0)
  # One kill while checkpoint 4 is being written, four at random steps after a resume point.
  env = {**train_env(1), "BIT_KILL_DURING_SAVE": "4"}
  proc = subprocess.run(
      [sys.executable, "-m", "helpers.kill_during_save", f"--config={ROOT}/configs/demo.py",
       f"--workdir={workdir}", *FLAGS, f"--config.data_dir={data_dir}"],
      cwd=ROOT / "tests", env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  kills = 1
  done = 2  # Checkpoint 2 finished before the kill at 4; 4 may or may not have completed.
  while kills < 5:
    step = rng.randint(done + 1, TOTAL - 1)
    code, out, err = _run_until(workdir, data_dir, step)
    assert code == -signal.SIGKILL, err
    assert "Resuming from checkpoint at step" in out
    assert "Taking over the stale workdir lock" in out  # The killed run's lock blocks nothing.
    kills += 1
    done = step - step % 2 if step - step % 2 > done else done
  run_train(workdir, *FLAGS, f"--config.data_dir={data_dir}")  # Finish.

  expected, actual = _flat(_params(reference)), _flat(_params(workdir))
  assert len(expected) == len(actual) == 45
  for a, b in zip(expected, actual):
    np.testing.assert_array_equal(a, b)
  interrupted = logged_losses(workdir)
  for step, loss in logged_losses(reference).items():
    assert interrupted[step] == loss, step  # Every logged loss, recomputed or not, is equal.


def _flat(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sigterm_saves_and_exits_zero(tmp_path, data_dir):
  # No periodic checkpoint before the end: the preempted step is saved by the preemption alone
  # (with checkpoints every 2 steps, a SIGTERM noticed at an even step is saved either way).
  workdir = str(tmp_path / "run")
  flags = [f for f in FLAGS if not f.startswith("--config.checkpoint_every_steps=")]
  code, out, err = _run_until(workdir, data_dir, 3, sig=signal.SIGTERM,
                              flags=[*flags, "--config.checkpoint_every_steps=1000"])
  assert code == 0, err
  saved = int(out.split("Preempted (SIGTERM): saved step ")[1].split(";")[0])
  assert 3 <= saved < TOTAL
  assert str(saved) in os.listdir(os.path.join(workdir, "checkpoints"))
  # Complete and restorable (resuming from a checkpoint is shown by the kill -9 test).
  assert all(np.all(np.isfinite(x)) for x in _flat(_params(workdir, saved)))


def test_nan_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, data_dir, reference):
  workdir = _copy(reference, tmp_path)
  before = _params(workdir)
  proc = run_train(workdir, *FLAGS, f"--config.data_dir={data_dir}", "--config.lr=1e12",
                   f"--config.total_steps={TOTAL + 6}", "--config.keep_checkpoints=10",
                   check=False)
  assert proc.returncode == 1
  message = error_line(proc)
  assert message.startswith("error: Loss or gradient became NaN/Inf at step "), message
  bad_step = int(message.split(" at step ")[1].split(";")[0])
  intact = int(message.split("the checkpoint at step ")[1].split(" ")[0])
  assert TOTAL <= intact <= bad_step
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert saved[-1] == intact and TOTAL in saved  # keep_checkpoints=10: nothing rotated out.
  assert all(np.all(np.isfinite(x)) for x in _flat(_params(workdir, intact)))
  for a, b in zip(_flat(before), _flat(_params(workdir))):  # The old one is untouched.
    np.testing.assert_array_equal(a, b)
  logged = logged_losses(workdir)  # The metrics written before are kept; no NaN was logged.
  assert all(logged[step] == loss for step, loss in logged_losses(reference).items())
  assert np.all(np.isfinite(list(logged.values())))


def test_truncated_latest_checkpoint_falls_back(tmp_path, data_dir, reference):
  workdir = _copy(reference, tmp_path)
  latest = os.path.join(workdir, "checkpoints", str(TOTAL))
  for folder, _, files in os.walk(latest):
    for name in files:
      if os.path.getsize(os.path.join(folder, name)) > 1000:
        with open(os.path.join(folder, name), "r+b") as f:
          f.truncate(100)
  proc = run_train(workdir, *FLAGS, f"--config.data_dir={data_dir}",
                   f"--config.total_steps={TOTAL + 2}")
  assert f"WARNING: checkpoint at step {TOTAL} does not restore" in proc.stdout
  assert f"Resuming from checkpoint at step {TOTAL - 2}." in proc.stdout
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", str(TOTAL)))
  assert str(TOTAL + 2) in os.listdir(os.path.join(workdir, "checkpoints"))
