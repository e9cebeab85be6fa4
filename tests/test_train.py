"""End-to-end: the real trainer CLI for a few steps on a tiny model and the digits data."""

import json
import os
import platform
import subprocess
import sys

import pytest

from big_transfer import native_logs
from conftest import ROOT, TINY, error_line, run_cli, run_train, train_env


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_trains_logs_checkpoints_and_resumes_on_another_device_count(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  flags = [*TINY, f"--config.data_dir={data_dir}"]
  first = run_train(workdir, *flags, "--config.total_steps=2", devices=1)
  assert "over 1 devices" in first.stdout
  assert "step 2/2: loss" in first.stdout and "img/s" in first.stdout and "ETA" in first.stdout
  assert "Final test accuracy" in first.stdout
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))

  # A longer schedule on the same workdir resumes at the saved step instead of restarting,
  # here on 2 devices: the checkpoint is resharded onto the new mesh (2, not 8: it compiles in
  # less time, and test_engine compares 1 and 8 devices step by step).
  second = run_train(workdir, *flags, devices=2)
  assert "over 2 devices" in second.stdout
  assert "Resuming from checkpoint at step 2." in second.stdout
  assert "step 2/4" not in second.stdout and "step 4/4: loss" in second.stdout
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

  # A finished run is not trained again.
  third = run_train(workdir, *flags, devices=1)
  assert "Run already finished (4/4 steps); not retraining." in third.stdout
  assert "loss" not in third.stdout.split("not retraining.")[1].split("eval")[0]

  records = _metrics(workdir)
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == [2, 4]
  evals = [r for r in records if "eval/accuracy" in r]
  assert len(evals) == 3 and all(r["eval/count"] == 360 for r in evals)
  # The same evaluation on 1 and 2 devices (batches of 64, the last one padded).
  assert evals[1]["eval/accuracy"] == evals[2]["eval/accuracy"]
  assert all(r["train/lr"] > 0 for r in records if "train/lr" in r)


@pytest.mark.parametrize("flag, expected", [
    ("--config.no_such_key=1", "Unknown config key 'no_such_key'; valid: batch_size, batch_split,"),
    ("--config.model.name=R51x1", "Unknown model 'R51x1'; valid: R14x1,"),
    ("--config.dataset=no_such_dataset",
     "Unknown dataset 'no_such_dataset'; valid: sklearn_digits"),
])
def test_bad_input_is_one_line(tmp_path, data_dir, flag, expected):
  """In this process (conftest.run_cli): test_bad_input.py shows the same line from a real one."""
  proc = run_cli(f"--config={ROOT}/configs/demo.py", f"--workdir={tmp_path / 'run'}",
                 f"--config.data_dir={data_dir}", flag)
  assert expected in error_line(proc)


def test_batch_not_divisible_by_devices(tmp_path, data_dir):
  proc = run_cli(f"--config={ROOT}/configs/demo.py", f"--workdir={tmp_path / 'run'}", *TINY,
                 f"--config.data_dir={data_dir}", "--config.batch_size=12")  # On 8 devices.
  assert error_line(proc) == ("error: batch_size 12 is not divisible by the 8 devices; use a "
                              "multiple of 8 (e.g. --config.batch_size=8).")


_IMPORT_TF = "import tensorflow; import sys; print('after import', file=sys.stderr)"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="TF_ENABLE_ONEDNN_OPTS forces oneDNN (and its notice) on x86 only")
def test_tensorflow_import_notices_stay_off_stderr():
  """Plain `import tensorflow` prints the notices in the tests' environment (so the CLI tests
  above really see them); the package's import drops them and keeps everything else."""
  run = lambda code: subprocess.run([sys.executable, "-c", code], env=train_env(1),
                                    capture_output=True, text=True, check=True).stderr
  plain = run(_IMPORT_TF).splitlines()
  assert any(native_logs.is_notice(line) for line in plain), plain
  quiet = run("from big_transfer import native_logs; native_logs.import_tensorflow(); "
              + _IMPORT_TF.split("; ", 1)[1])
  assert quiet == "after import\n"
  assert not native_logs.is_notice("W0000 00:00:1.2  51 port.cc:153] a real warning")
  assert not native_logs.is_notice("error: batch_size 12 is not divisible by the 8 devices")
