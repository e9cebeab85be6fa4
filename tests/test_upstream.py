"""The upstream recipes (BiT-S/M/L configs) and training over several processes, through the
real trainer CLI on fake CPU devices."""

import importlib
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from big_transfer import config_common, trainer
from configs import demo
from conftest import ROOT, TINY_CONFIG, logged_losses, on_devices, train_env


_GLOO_CONNECTED = (r"\[Gloo\] Rank|is connected to|peer ranks\.|"
                   r"Expected number of connected peer ranks is :")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, data_dir):
  overrides = {**TINY_CONFIG, "total_steps": 6, "log_every_steps": 1, "input_sharding": "global",
               "data_dir": data_dir}
  single = str(tmp_path / "single")
  with on_devices(4):  # One process (this one) on the two processes' 4 devices.
    trainer.run(config_common.with_overrides(demo.get_config(), overrides), single)
  flags = [f"--config.{key}={value}" for key, value in overrides.items()]

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
  # Only process 0 prints and writes metrics. Gloo's connection message is written in pieces that
  # its threads can interleave across lines, so drop its pieces and require that no words remain.
  assert not re.search(r"[A-Za-z]", re.sub(_GLOO_CONNECTED, "", outs[1][0])), outs[1][0]
  expected, actual = logged_losses(single), logged_losses(multi)
  assert sorted(actual) == list(range(1, 7))
  np.testing.assert_allclose([actual[s] for s in sorted(actual)],
                             [expected[s] for s in sorted(expected)], rtol=1e-5)


@pytest.mark.parametrize("config, devices", [("bit_s", 1), ("bit_m", 1), ("bit_l", 2)])
def test_upstream_configs_run_two_steps(tmp_path, data_dir, config, devices, capsys):
  """Each recipe, scaled down to digits, through `trainer.run`: BiT-L's FSDP state split over
  2 devices (test_engine compares FSDP with replicated state on 8); BiT-S and BiT-M (softmax;
  sigmoid with the head bias at -10) on one."""
  recipe = importlib.import_module(f"configs.{config}").get_config()
  assert (recipe.batch_size, recipe.schedule.warmup_steps, recipe.wd) == (4096, 5000, 1e-4)
  config = config_common.with_overrides(recipe, {
      **TINY_CONFIG, "total_steps": 2, "dataset": "sklearn_digits", "data_dir": data_dir,
      "num_classes": 10, "train_split": "train", "eval_split": "test", "batch_size": 8,
      "shuffle_buffer": 100})
  handler = signal.getsignal(signal.SIGTERM)
  with on_devices(devices):
    result = trainer.run(config, str(tmp_path / "run"))
  assert result["count"] == 360
  assert signal.getsignal(signal.SIGTERM) is handler  # The preemption handler is uninstalled.
  out = capsys.readouterr().out
  assert "step 2/2: loss" in out and "Final test accuracy" in out


def test_print_config_shows_the_resolved_config():
  printed = subprocess.run(
      [sys.executable, "-m", "big_transfer.train", f"--config={ROOT}/configs/bit_l.py:R101x3",
       "--print_config", "--config.lr=0.1"], cwd=ROOT, env=train_env(1), capture_output=True,
      text=True)
  assert printed.returncode == 0, printed.stderr
  for line in ("batch_size: 4096", "lr: 0.1", "  name: R101x3", "  warmup_steps: 5000",
               "state_sharding: fsdp", "wd: 0.0001"):
    assert line in printed.stdout.splitlines(), line
