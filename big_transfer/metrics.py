"""Metrics out: TensorBoard (clu), `metrics.jsonl` in the workdir, and progress on stdout.

Only process 0 writes; every process may call these functions.
"""

import contextlib
import json
import os
import time

import jax

from big_transfer import files, native_logs
from big_transfer.errors import UserError

tf = native_logs.import_tensorflow()  # Before clu: keeps TensorFlow's import notices off stderr.

# pylint: disable=g-import-not-at-top,wrong-import-position
from clu import metric_writers  # noqa: E402


class Writer:
  """Writes scalars to TensorBoard (unless `tensorboard` is off: then to the log only) and
  appends them as one JSON object per call to `<workdir>/metrics.jsonl` (appending: a resumed
  run keeps the earlier lines)."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.is_main = jax.process_index() == 0
    self._workdir = os.fspath(files.path(workdir))
    self._tensorboard = tensorboard
    self._tb = None  # Opened on the first write: a run refused before it leaves no file.
    self.path = files.path(workdir) / "metrics.jsonl"

  def write(self, step: int, scalars: dict[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    line = json.dumps({"step": step, **scalars}) + "\n"
    if self._tb is None:
      try:
        self._tb = metric_writers.create_default_writer(
            self._workdir, just_logging=not (self.is_main and self._tensorboard),
            asynchronous=False)
      except tf.errors.OpError as e:  # TensorFlow's own file system, see config.tensorboard.
        reason = " ".join(e.message.split())[:200]
        raise UserError(f"Cannot write TensorBoard events to {self._workdir} ({reason}); pass "
                        "--config.tensorboard=False to log metrics to metrics.jsonl only, then "
                        "rerun the same command to resume.") from None
      if self.is_main and _ends_mid_line(self.path):  # Cut by a full disk: keep it, end it.
        line = "\n" + line
    self._tb.write_scalars(step, scalars)
    if self.is_main:
      files.append_text(self.path, line)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def _ends_mid_line(path) -> bool:
  try:
    with files.path(path).open("rb") as f:
      f.seek(-1, os.SEEK_END)
      return f.read(1) != b"\n"
  except OSError:  # Missing or empty.
    return False


class Progress:
  """Training throughput and ETA between successive `report` calls.

  As big_vision's chrono: time spent `paused()` (evaluation) counts in no interval, and
  `restart(step)` starts the count afresh (after the step that compiled).
  """

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.restart(start_step)

  def restart(self, step: int) -> None:
    self._step, self._time = step, time.monotonic()

  @contextlib.contextmanager
  def paused(self):
    start = time.monotonic()
    try:
      yield
    finally:
      self._time += time.monotonic() - start

  def report(self, step: int) -> dict[str, float]:
    now = time.monotonic()
    steps_per_sec = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return {"img_per_sec": steps_per_sec * self.batch_size,
            "eta_sec": (self.total_steps - step) / max(steps_per_sec, 1e-9)}


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
