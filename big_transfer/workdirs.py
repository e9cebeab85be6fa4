"""One run per workdir, resumed only by a config that continues it.

`Lock(workdir)` writes `<workdir>/workdir.lock`, a JSON record of the owner (host, pid, the
process's start time, a random token) and a heartbeat refreshed every minute, and removes it
when the run ends. A second run on the same workdir is refused with one line naming the owner,
so two runs never interleave checkpoints. A lock is stale, and taken over with a log line, when
its owner is no longer running (same host: the pid is gone, a zombie or a reused pid; another
host: no heartbeat for `STALE_AFTER_S`). A plain file rather than `flock`, so that the same code
serves workdirs on Cloud Storage (`etils.epath` paths): there a new lock is written and read
back, since object stores offer no create-if-absent through epath; two runs started within the
same moment on one bucket path could both pass. Only process 0 takes the lock; the other
processes of a multi-process run learn the outcome from it.

`check_resumable` compares a config with `<workdir>/config.json`, the config of the run that
wrote the checkpoints, and refuses a change that would make the resumed run another run.
"""

import json
import os
import socket
import threading
import time
import uuid
from typing import Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from big_transfer import files, metrics
from big_transfer.errors import UserError

LOCK_NAME = "workdir.lock"
CONFIG_NAME = "config.json"
CLASS_NAMES_NAME = "class_names.json"
HEARTBEAT_S = 60
STALE_AFTER_S = 600  # A heartbeat this old means the owner on another host is gone.

# Keys whose change makes resuming a different run, and why.
RESUME_KEYS = {
    "model.name": "the checkpoints hold another network",
    "dataset": "the head and the input stream belong to another dataset",
    "num_classes": "the head has another class count",
    "train_split": "the input position counts examples of another split",
    "batch_size": "the input position and the schedule are counted in steps of the old batch",
    "seed": "the input order and the augmentation would change mid-run",
}


def _process_start(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks since boot) of a Linux process; None without /proc."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()  # After "pid (command)".
    return fields[0], int(fields[19])
  except (OSError, IndexError, ValueError):
    return None


def _running(record: dict) -> bool:
  """Whether the owner of a lock record is still running (see the module docstring)."""
  if record.get("host") != socket.gethostname():
    return time.time() - record.get("heartbeat", 0) < STALE_AFTER_S
  pid = record.get("pid", -1)
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by another user.
    pass
  status = _process_start(pid)
  if status is None:  # No /proc: trust the pid.
    return True
  state, start = status
  return state != "Z" and record.get("start") in (None, start)


def _describe(record: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
  age = int(time.time() - record.get("heartbeat", 0))
  return (f"pid {record.get('pid')} on host {record.get('host')} (started {started}, "
          f"heartbeat {age} s ago)")


class Lock:
  """Context manager holding `<workdir>/workdir.lock` for the duration of a run."""

  def __init__(self, workdir: str):
    self._workdir = files.path(workdir)
    self._path = self._workdir / LOCK_NAME
    own = _process_start(os.getpid())
    self._record = {"host": socket.gethostname(), "pid": os.getpid(),
                    "start": own and own[1], "started": time.time(), "heartbeat": time.time(),
                    "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._heartbeat = None

  def __enter__(self):
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except UserError as e:
        error = e
    if jax.process_count() > 1:
      failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
      if failed and error is None:
        error = UserError(f"Process 0 could not lock the workdir {self._workdir}; see its "
                          "error.")
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc_info):
    if self._heartbeat is not None:
      self._stop.set()
      self._heartbeat.join()
      try:
        if self._read() == self._record:
          self._path.unlink()
      except OSError as e:  # The run's own error matters more; the lock is now stale anyway.
        metrics.log(f"WARNING: could not remove {self._path} ({e}).")

  def _read(self) -> dict | None:
    """The lock's record; None when there is none or it is unreadable (half-written)."""
    try:
      return json.loads(self._path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _acquire(self) -> None:
    files.check_bucket(self._workdir)  # Creating the folder would create a mistyped bucket.
    try:
      self._workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UserError(f"Cannot create the workdir {self._workdir} "
                      f"({e.strerror or e}); pass a writable --workdir.") from None
    for _ in range(3):
      if self._create():
        self._heartbeat = threading.Thread(target=self._beat, daemon=True,
                                           name="workdir_lock_heartbeat")
        self._heartbeat.start()
        return
      other = self._read()
      if other == {}:  # Being written right now, or left half-written by a crash.
        time.sleep(1)
        other = self._read()
      if other and _running(other):
        raise UserError(f"Workdir {self._workdir} is in use by {_describe(other)}; a second run "
                        "would interleave its checkpoints. Wait for that run to end or stop it, "
                        "or pass another --workdir.")
      what = _describe(other) if other else "unreadable"
      metrics.log(f"Taking over the stale workdir lock {self._path}: {what}, not running.")
      try:
        self._path.unlink()
      except FileNotFoundError:  # Another run took it over first; look again.
        pass
    raise UserError(f"Could not lock the workdir {self._workdir}: other runs keep taking it; "
                    "start one run per workdir.")

  def _create(self) -> bool:
    """Writes the record unless a lock exists: atomically on local disks, else read back."""
    text = json.dumps(self._record)
    try:
      if not files.is_remote(self._path):
        fd = os.open(os.fspath(self._path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
          f.write(text)
        return True
      if self._path.exists():
        return False
      self._path.write_text(text)
      return self._read() == self._record
    except FileExistsError:
      return False
    except OSError as e:
      raise UserError(f"Cannot write to the workdir {self._workdir} ({e.strerror or e}); pass a "
                      "writable --workdir.") from None

  def _beat(self) -> None:
    """Refreshes the heartbeat (replacing the lock atomically) while we own it."""
    warned = False
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if self._read() != self._record:
          return
        record = {**self._record, "heartbeat": time.time()}
        files.write_atomic(self._path, json.dumps(record))
        self._record = record
      except OSError as e:
        if not warned:
          metrics.log(f"WARNING: cannot refresh the workdir lock {self._path} ({e}).")
          warned = True


def finalized_steps(workdir: epath.PathLike) -> list[int]:
  """Steps of the complete checkpoints in `workdir`: orbax renames a local checkpoint to its
  step when it is complete, and on Cloud Storage (no rename) marks it with a commit file."""
  directory = files.path(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """UserError when `workdir` holds checkpoints written with another value of a RESUME_KEYS
  key (read from its config.json; a workdir without one is not checked here)."""
  path = files.path(workdir) / CONFIG_NAME
  if not finalized_steps(workdir) or not path.exists():
    return
  try:
    stored = traverse_util.flatten_dict(json.loads(path.read_text()), sep=".")
  except (OSError, ValueError) as e:
    metrics.log(f"WARNING: cannot read {path} ({e}); not checking the config against it.")
    return
  current = traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")
  for key, reason in RESUME_KEYS.items():
    if key in stored and stored[key] != current.get(key):
      raise UserError(f"Workdir {workdir} holds a run with {key}={stored[key]!r}, this config "
                      f"has {current.get(key)!r}: resuming would mix two runs ({reason}). Rerun "
                      f"with --config.{key}={stored[key]} or pass a new --workdir.")


def record_config(config: ml_collections.ConfigDict, class_names: Sequence[str],
                  workdir: str) -> None:
  """Writes, for a run starting afresh (process 0), `<workdir>/config.json` (the resolved
  config) and `<workdir>/class_names.json` (label order; tools such as predict name the
  classes without the dataset)."""
  if jax.process_index() == 0:
    workdir = files.path(workdir)
    files.write_atomic(workdir / CONFIG_NAME, config.to_json(indent=2, sort_keys=True) + "\n")
    files.write_atomic(workdir / CLASS_NAMES_NAME, json.dumps(list(class_names), indent=0) + "\n")
