"""One run per workdir, resumption only of the same run, checkpoints verified on restore, and
the fault matrix's CI subset (the full matrix: docs/reliability.md)."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_transfer import checkpoints, config_common, trainer, workdirs
from big_transfer.errors import TrainingError, UserError
from big_transfer.tools import fault_matrix
from configs import demo
from conftest import ROOT, TINY_CONFIG, error_line, run_cli, xla_flags

# ---- The workdir lock -----------------------------------------------------------------------


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write_lock(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  record = {"host": socket.gethostname(), "pid": os.getpid(), "start": None,
            "started": time.time(), "heartbeat": time.time(), "token": "t", **record}
  with open(os.path.join(workdir, workdirs.LOCK_NAME), "w") as f:
    json.dump(record, f)


def test_a_live_lock_refuses_a_second_run_naming_the_owner(tmp_path):
  with workdirs.Lock(str(tmp_path)):
    with open(tmp_path / workdirs.LOCK_NAME) as f:
      held = json.load(f)
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(UserError, match=rf"^Workdir {tmp_path} is in use by pid {os.getpid()} on "
                                        rf"host {socket.gethostname()} \(started .*, heartbeat "
                                        r"\d+ s ago\); a second run would interleave its "
                                        r"checkpoints\. Wait for that run to end or stop it, or "
                                        r"pass another --workdir\.$"):
      with workdirs.Lock(str(tmp_path)):
        pass
    assert json.loads((tmp_path / workdirs.LOCK_NAME).read_text()) == held  # Untouched.
  assert not (tmp_path / workdirs.LOCK_NAME).exists()  # Released at the end.


@pytest.mark.parametrize("owner", [
    {"pid": None},  # Replaced by a pid that has exited.
    {"start": -1},  # This pid, but a process started at another time: the pid was reused.
    {"host": "another-host", "heartbeat": time.time() - workdirs.STALE_AFTER_S - 1},
])
def test_a_stale_lock_is_taken_over(tmp_path, capsys, owner):
  if owner.get("pid", 0) is None:
    owner = {"pid": _dead_pid()}
  if owner.get("start") == -1 and workdirs._process_start(os.getpid()) is None:
    pytest.skip("no /proc: process start times unknown")
  _write_lock(tmp_path, **owner)
  with workdirs.Lock(str(tmp_path)):
    assert json.loads((tmp_path / workdirs.LOCK_NAME).read_text())["token"] != "t"
  assert "Taking over the stale workdir lock" in capsys.readouterr().out


def test_a_lock_of_another_host_with_a_recent_heartbeat_is_live(tmp_path):
  _write_lock(tmp_path, host="another-host", pid=1, heartbeat=time.time() - 30)
  with pytest.raises(UserError, match="in use by pid 1 on host another-host"):
    with workdirs.Lock(str(tmp_path)):
      pass


def test_the_heartbeat_is_refreshed(tmp_path, monkeypatch):
  monkeypatch.setattr(workdirs, "HEARTBEAT_S", 0.05)
  with workdirs.Lock(str(tmp_path)):
    first = json.loads((tmp_path / workdirs.LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / workdirs.LOCK_NAME).read_text())["heartbeat"] > first
  assert os.listdir(tmp_path) == []  # No lock and no temporary heartbeat file left.


# ---- Resuming only the same run ---------------------------------------------------------------


def _config(**changes):
  config = ml_collections.ConfigDict({"dataset": "sklearn_digits", "num_classes": 10, "seed": 0,
                                      "train_split": "train", "batch_size": 16,
                                      "log_every_steps": 2, "model": {"name": "R14x1"}})
  config.update_from_flattened_dict(changes)
  return config


def test_a_config_change_that_breaks_resumption_is_refused(tmp_path):
  workdirs.record_config(_config(), ["a", "b"], str(tmp_path))
  workdirs.check_resumable(_config(**{"model.name": "R26x1"}), str(tmp_path))  # No checkpoint.
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()
  workdirs.check_resumable(_config(log_every_steps=1), str(tmp_path))
  with pytest.raises(UserError, match=rf"^Workdir {tmp_path} holds a run with batch_size=16, this "
                                      r"config has 32: resuming would mix two runs \(the input "
                                      r"position and the schedule are counted in steps of the old "
                                      r"batch\)\. Rerun with --config\.batch_size=16 or pass a new "
                                      r"--workdir\.$"):
    workdirs.check_resumable(_config(batch_size=32), str(tmp_path))
  with pytest.raises(UserError, match=r"model\.name='R14x1', this config has 'R26x1'"):
    workdirs.check_resumable(_config(**{"model.name": "R26x1"}), str(tmp_path))
  assert workdirs.finalized_steps(str(tmp_path)) == [4]


def test_run_refuses_to_resume_another_run_and_writes_nothing(tmp_path, data_dir):
  """trainer.run checks a workdir's config.json before it restores or writes anything."""
  config = config_common.with_overrides(demo.get_config(), {**TINY_CONFIG, "data_dir": data_dir})
  workdirs.record_config(config, ["a", "b"], str(tmp_path))
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)  # The step a killed run had reached.
  before = fault_matrix.snapshot(str(tmp_path))
  with pytest.raises(UserError, match=r"holds a run with batch_size=16, this config has 32: "):
    trainer.run(config_common.with_overrides(config, {"batch_size": 32}), str(tmp_path))
  assert fault_matrix.snapshot(str(tmp_path)).files == before.files
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "class_names.json", "config.json"]


# ---- Checkpoints: verified on restore, another model's refused --------------------------------


def _state(shape=(256, 64), value=1):
  w = jax.random.normal(jax.random.key(value), shape)
  return {"step": jnp.array(value, jnp.int32),
          "params": {"w": w, "b": jnp.arange(3, dtype=jnp.float32)}}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _saved(workdir, steps=(2, 4)):
  manager = checkpoints.Manager(str(workdir), every_steps=2, keep=5)
  for step in steps:
    manager.save(step, _state(value=step))
  manager.close()
  return checkpoints.Manager(str(workdir), every_steps=2, keep=5)


def test_checksums_see_any_single_bit_flip():
  state = _state((5, 7))
  reference = checkpoints.checksums(state)
  for index in [0, 17, 34]:
    for bit in [0, 13, 31]:
      words = np.asarray(state["params"]["w"]).view(np.uint32).copy()
      words.flat[index] ^= np.uint32(1 << bit)
      flipped = {**state, "params": {**state["params"], "w": jnp.asarray(words.view(np.float32))}}
      assert checkpoints.checksums(flipped) != reference


def test_a_bit_flipped_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, capsys):
  manager = _saved(tmp_path)
  # Random floats do not compress: the largest file is mostly `w`'s raw bytes, which orbax
  # stores without a checksum of its own.
  files = [os.path.join(d, n) for d, _, names in os.walk(tmp_path / "checkpoints" / "4")
           for n in names]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))
  state = manager.restore(_abstract(_state()))
  manager.close()
  np.testing.assert_array_equal(state["params"]["w"], _state(value=2)["params"]["w"])  # Step 2.
  out = capsys.readouterr().out
  assert "WARNING: checkpoint at step 4 does not restore (ValueError: 1 array(s) differ " in out
  moved = path.replace(os.path.join("checkpoints", "4"), os.path.join("corrupt_checkpoints", "4"))
  assert open(moved, "rb").read() == bytes(data)  # Kept as found.


def test_a_checkpoint_of_another_model_is_refused_and_left_in_place(tmp_path):
  manager = _saved(tmp_path)
  before = fault_matrix.snapshot(str(tmp_path))
  with pytest.raises(UserError, match=rf"^Workdir {tmp_path} holds checkpoints of another model "
                                      r"or optimizer: step 4 has shape \(256, 64\) for params/w, "
                                      r"this config needs shape \(4, 5\)\. Resume with the config "
                                      r"that wrote them"):
    manager.restore(_abstract(_state((4, 5))))
  manager.close()
  assert fault_matrix.snapshot(str(tmp_path)).files == before.files


def test_a_failed_write_is_one_line_naming_the_intact_checkpoint(tmp_path, monkeypatch):
  manager = _saved(tmp_path, steps=(2,))
  (tmp_path / "checkpoints").chmod(0o500)
  if os.access(tmp_path / "checkpoints", os.W_OK):  # Root writes through permissions.
    def fail(*args, **kwargs):
      raise ValueError("OUT_OF_RANGE: Failed writing: \"x\": [os_error_code='28']")
    monkeypatch.setattr(manager._manager, "save", fail)
  try:
    with pytest.raises(Exception) as error:
      manager.save(4, _state())
      manager.close()
  finally:
    (tmp_path / "checkpoints").chmod(0o700)
  assert type(error.value).__name__ == "TrainingError"
  assert str(error.value).startswith(f"Saving a checkpoint to {tmp_path}/checkpoints failed (")
  assert str(error.value).endswith("); the newest complete checkpoint, step 2, is intact. Free "
                                   "disk space or make the workdir writable, then rerun the same "
                                   "command to resume.")


# ---- The fault matrix's CI subset ---------------------------------------------------------------


def test_fault_matrix_subset(tmp_path, data_dir, monkeypatch):
  """A second run on a live workdir is refused naming the first, which finishes untouched
  (nothing written before lost, byte for byte). The killed run's lock: test_resilience's kill
  test, whose resumes take it over; the rest of the matrix: docs/reliability.md."""
  # The matrix's trainer runs inherit this environment: one device, not this process's eight
  # (the lock does not depend on the device count; one compiles in ~60% of the CPU time).
  monkeypatch.setenv("XLA_FLAGS", xla_flags(1))
  [row] = fault_matrix.run_matrix(["second_run"], repeats=1, seed=0, scratch=str(tmp_path),
                                  data_dir=data_dir, reference=False)
  print(fault_matrix.table([row], str(tmp_path)))
  assert row.outcome.startswith(f"second run: exit 1: Workdir {tmp_path}/second_run_0/run is "
                                "in use by pid "), row
  assert row.outcome.endswith("the first run finished untouched"), row
  assert re.fullmatch(r"yes: 2 checkpoints \(\d+ files\) hashed, 6 metrics lines kept",
                      row.nothing_lost), row


@pytest.mark.parametrize("error, line", [
    (TrainingError("Loss or gradient became NaN/Inf at step 7; lower --config.lr."),
     "error: Loss or gradient became NaN/Inf at step 7; lower --config.lr."),
    (OSError(28, "No space left on device", "/w/metrics.jsonl"),
     "error: Cannot write /w/metrics.jsonl (No space left on device); free disk space or make the "
     "workdir writable, then rerun the same command to resume from its newest checkpoint."),
])
def test_a_failing_machine_ends_in_one_line(monkeypatch, tmp_path, error, line):
  def fail(config, workdir):
    raise error

  monkeypatch.setattr(trainer, "run", fail)
  proc = run_cli(f"--config={ROOT}/configs/demo.py", f"--workdir={tmp_path}")
  assert proc.returncode == 1 and error_line(proc) == line
