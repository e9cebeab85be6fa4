"""Preemption, crashes, NaNs and multiple processes, through the real trainer CLI."""

import json
import os
import random
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, TINY, run_train, train_env

TOTAL = 12
FLAGS = [*TINY, f"--config.total_steps={TOTAL}", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=2"]


def _params(workdir, step=TOTAL):
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  return ocp.StandardCheckpointer().restore(path)["params"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def _run_until(workdir, data_dir, step, sig=signal.SIGKILL):
  """Starts training and sends `sig` as soon as it reports finishing `step`."""
  cmd = [sys.executable, "-u", "-m", "big_transfer.train", f"--config={ROOT}/configs/demo.py",
         f"--workdir={workdir}", *FLAGS, f"--config.data_dir={data_dir}"]
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


def test_kill_9_five_times_then_resume_is_bitwise_identical(tmp_path, data_dir):
  reference = str(tmp_path / "reference")
  run_train(reference, *FLAGS, f"--config.data_dir={data_dir}")

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
    kills += 1
    done = step - step % 2 if step - step % 2 > done else done
  run_train(workdir, *FLAGS, f"--config.data_dir={data_dir}")  # Finish.

  expected, actual = _flat(_params(reference)), _flat(_params(workdir))
  assert len(expected) == len(actual) == 45
  for a, b in zip(expected, actual):
    np.testing.assert_array_equal(a, b)
  interrupted = _losses(workdir)
  for step, loss in _losses(reference).items():
    assert interrupted[step] == loss, step  # Every logged loss, recomputed or not, is equal.


def _flat(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sigterm_saves_and_exits_zero(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  code, out, err = _run_until(workdir, data_dir, 3, sig=signal.SIGTERM)
  assert code == 0, err
  saved = int(out.split("Preempted (SIGTERM): saved step ")[1].split(";")[0])
  assert saved >= 3 and str(saved) in os.listdir(os.path.join(workdir, "checkpoints"))
  resumed = run_train(workdir, *FLAGS, f"--config.data_dir={data_dir}")
  assert f"Resuming from checkpoint at step {saved}." in resumed.stdout


def test_nan_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  run_train(workdir, *FLAGS, f"--config.data_dir={data_dir}", "--config.total_steps=2")
  before = _params(workdir, 2)
  proc = run_train(workdir, *FLAGS, f"--config.data_dir={data_dir}", "--config.lr=1e12",
                   check=False)
  assert proc.returncode == 1
  message = proc.stderr.strip()
  assert message.startswith("error: Loss or gradient became NaN/Inf at step "), message
  assert len(message.splitlines()) == 1
  bad_step = int(message.split(" at step ")[1].split(";")[0])
  intact = int(message.split("the checkpoint at step ")[1].split(" ")[0])
  assert 2 <= intact <= bad_step
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert saved[-1] == intact and 2 in saved
  assert all(np.all(np.isfinite(x)) for x in _flat(_params(workdir, intact)))
  for a, b in zip(_flat(before), _flat(_params(workdir, 2))):  # The old one is untouched.
    np.testing.assert_array_equal(a, b)


def test_truncated_latest_checkpoint_falls_back(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  run_train(workdir, *FLAGS, f"--config.data_dir={data_dir}", "--config.total_steps=4")
  latest = os.path.join(workdir, "checkpoints", "4")
  for folder, _, files in os.walk(latest):
    for name in files:
      if os.path.getsize(os.path.join(folder, name)) > 1000:
        with open(os.path.join(folder, name), "r+b") as f:
          f.truncate(100)
  proc = run_train(workdir, *FLAGS, f"--config.data_dir={data_dir}", "--config.total_steps=6")
  assert "WARNING: checkpoint at step 4 does not restore" in proc.stdout
  assert "Resuming from checkpoint at step 2." in proc.stdout
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "4"))
  assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, data_dir):
  flags = [*TINY, "--config.total_steps=6", "--config.log_every_steps=1",
           "--config.input_sharding=global", f"--config.data_dir={data_dir}",
           "--config.batch_size=16"]
  single = str(tmp_path / "single")
  run_train(single, *flags, devices=4)

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "big_transfer.train", f"--config={ROOT}/configs/demo.py",
       f"--workdir={multi}", *flags, f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=train_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
  assert "over 4 devices (2 processes)" in outs[0][0]
  # Only process 0 prints and writes metrics (Gloo's own connection lines aside).
  assert [l for l in outs[1][0].splitlines() if not l.startswith("[Gloo]")] == []
  expected, actual = _losses(single), _losses(multi)
  assert sorted(actual) == list(range(1, 7))
  np.testing.assert_allclose([actual[s] for s in sorted(actual)],
                             [expected[s] for s in sorted(expected)], rtol=1e-5)


@pytest.mark.parametrize("config", ["bit_s", "bit_m", "bit_l"])
def test_upstream_configs_run_two_steps(tmp_path, data_dir, config):
  printed = subprocess.run(
      [sys.executable, "-m", "big_transfer.train", f"--config={ROOT}/configs/{config}.py",
       "--print_config"], cwd=ROOT, env=train_env(1), capture_output=True, text=True)
  assert printed.returncode == 0 and "batch_size: 4096" in printed.stdout
  assert "warmup_steps: 5000" in printed.stdout and "wd: 0.0001" in printed.stdout
  proc = subprocess.run(
      [sys.executable, "-m", "big_transfer.train", f"--config={ROOT}/configs/{config}.py",
       f"--workdir={tmp_path}", *TINY, "--config.total_steps=2", "--config.dataset=sklearn_digits",
       f"--config.data_dir={data_dir}", "--config.num_classes=10", "--config.train_split=train",
       "--config.eval_split=test", "--config.batch_size=8", "--config.shuffle_buffer=100"],
      cwd=ROOT, env=train_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "step 2/2: loss" in proc.stdout and "Final test accuracy" in proc.stdout
