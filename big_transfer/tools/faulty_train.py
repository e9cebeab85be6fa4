"""`python -m big_transfer.train` with one injected fault, for the fault matrix.

$BIT_FAULT is JSON {"kind": ..., "at": N, "delay": seconds[, "limit": bytes]}:
  kill_train  SIGKILL `delay` s after the N-th train step of this process starts
  term_train  SIGTERM (a preemption notice) at the same moment
  hold_train  at the N-th train step, wait until the file `until` exists (a run kept alive)
  kill_eval   SIGKILL `delay` s after batch N of the first evaluation is handed out
  kill_save   SIGKILL `delay` s after the save of step N starts (its files are being written)
  fsize       from the save of step N on, files may not grow past `limit` bytes
              (RLIMIT_FSIZE, with SIGXFSZ ignored: writes fail with EFBIG, as on a full disk)
  readonly    at the save of step N the workdir turns read-only: the file system of its
              checkpoints/ when that is a mount point and we are root (root writes through
              permissions), else the write permissions of every file and folder
The faults hook the trainer's own functions, so the trainer itself carries no test code.
"""

import dataclasses
import json
import os
import resource
import signal
import stat
import subprocess
import threading
import time

from absl import app

from big_transfer import checkpoints, cli, evaluate, train, trainer

FAULT = json.loads(os.environ["BIT_FAULT"])


def _signal_later(sig: int) -> None:
  timer = threading.Timer(FAULT["delay"], os.kill, (os.getpid(), sig))
  timer.daemon = True
  timer.start()


def _make_readonly(workdir: str) -> None:
  checkpoints_dir = os.path.join(workdir, "checkpoints")
  if os.geteuid() == 0 and os.path.ismount(checkpoints_dir):
    subprocess.run(["mount", "-o", "remount,ro", checkpoints_dir], check=True)
    return
  for folder, dirs, files in os.walk(workdir):
    for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
      os.chmod(name, os.stat(name).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _hook_train_steps(sig: int) -> None:
  build = trainer.build

  def build_then_count(*args, **kwargs):
    setup = build(*args, **kwargs)
    calls = [0]

    def train_step(state, batch):
      calls[0] += 1
      if calls[0] == FAULT["at"] and sig:
        _signal_later(sig)
      while calls[0] == FAULT["at"] and FAULT.get("until") and not os.path.exists(FAULT["until"]):
        time.sleep(0.1)
      return setup.train_step(state, batch)

    return dataclasses.replace(setup, train_step=train_step)

  trainer.build = build_then_count


def _hook_eval() -> None:
  classification = evaluate.classification

  def classification_then_kill(step, params, batches, mesh):
    def counted():
      for index, batch in enumerate(batches):
        if index == FAULT["at"]:
          _signal_later(signal.SIGKILL)
        yield batch
    return classification(step, params, counted(), mesh)

  evaluate.classification = classification_then_kill


def _hook_save() -> None:
  save = checkpoints.Manager.save

  def faulty_save(self, step, state):
    if step == FAULT["at"]:
      if FAULT["kind"] == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FAULT["limit"], resource.RLIM_INFINITY))
      elif FAULT["kind"] == "readonly":
        _make_readonly(self._workdir)
    save(self, step, state)
    if step == FAULT["at"] and FAULT["kind"] == "kill_save":
      _signal_later(signal.SIGKILL)

  checkpoints.Manager.save = faulty_save


def main():
  kind = FAULT["kind"]
  if kind in ("kill_train", "term_train", "hold_train"):
    _hook_train_steps({"kill_train": signal.SIGKILL, "term_train": signal.SIGTERM}.get(kind))
  elif kind == "kill_eval":
    _hook_eval()
  elif kind in ("kill_save", "fsize", "readonly"):
    _hook_save()
  else:
    raise ValueError(f"Unknown fault {kind!r}")
  app.run(train.main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  main()
