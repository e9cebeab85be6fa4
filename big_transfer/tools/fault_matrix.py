"""The fault matrix: what a machine does when it fails, and what a user does by mistake, to a
run in progress; each case checked to end in a documented recovery or a one-line refusal, with
nothing written before lost.

    python -m big_transfer.tools.fault_matrix --full --seed=0      # docs/reliability.md's table
    python -m big_transfer.tools.fault_matrix --cases=bitflip,config_batch

Every case starts from a copy of one healthy run of the tiny demo (R14x1 at 16 px on the
embedded digits, checkpoints at steps 2 and 4), runs the trainer CLI on to step 8 with the fault
injected (`faulty_train`, seeded random moments), then reruns the plain command as a user
would. "Nothing lost" is checked byte for byte: every file of every checkpoint complete before
the fault hashed before and after (still in `checkpoints/`, or moved whole to
`corrupt_checkpoints/`), `metrics.jsonl` before the fault a prefix of the file after, and for a
refused run every file of the workdir unchanged. With `--reference` (on with --full) the state
the recovered run ends with is compared with an uninterrupted run's, through the checksums that
each checkpoint stores.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]
BEFORE, TOTAL = 4, 8  # Steps of the healthy run every case starts from, and of the full run.
TRAIN_FLAGS = [
    f"--config={ROOT}/configs/demo.py", "--config.model.name=R14x1",
    "--config.pp_train=decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)",
    "--config.pp_eval=decode|resize(16)|value_range(-1, 1)", "--config.batch_size=16",
    "--config.eval_batch_size=64", "--config.schedule.warmup_steps=2",
    "--config.schedule.decay_epochs=(1,)", "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=10",
    "--config.eval_every_steps=2",
]
REPEATS = 3  # Tries of each randomly timed fault with --full.


class CaseFailed(AssertionError):
  """A case whose outcome is not the promised one."""


@dataclasses.dataclass
class Row:
  case: str
  fault: str
  tries: int
  outcome: str
  kept: str
  nothing_lost: str


@dataclasses.dataclass
class Snapshot:
  files: dict[str, str]  # Relative path -> sha256 of every file of the workdir.
  metrics: bytes

  def checkpoints(self) -> dict[str, dict[str, str]]:
    """{step: {path inside the step: hash}} of the complete checkpoints."""
    steps = {}
    for path, digest in self.files.items():
      parts = path.split("/")
      if parts[0] == "checkpoints" and parts[1].isdigit():
        steps.setdefault(parts[1], {})["/".join(parts[2:])] = digest
    return steps


def snapshot(workdir: str) -> Snapshot:
  files = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  metrics = pathlib.Path(workdir, "metrics.jsonl")
  return Snapshot(files, metrics.read_bytes() if metrics.exists() else b"")


def check_nothing_lost(before: Snapshot, after: Snapshot) -> str:
  """What was verified; CaseFailed naming the first file lost or changed."""
  hashed = 0
  for step, files in before.checkpoints().items():
    for place in ("checkpoints", "corrupt_checkpoints"):
      moved = {p.split("/", 2)[2]: d for p, d in after.files.items()
               if p.startswith(f"{place}/{step}/")}
      if moved == files:
        break
    else:
      raise CaseFailed(f"checkpoint {step} lost or changed")
    hashed += len(files)
  if not after.metrics.startswith(before.metrics):
    raise CaseFailed("metrics.jsonl lost lines written before the fault")
  lines = before.metrics.count(b"\n")
  return (f"yes: {len(before.checkpoints())} checkpoints ({hashed} files) hashed, "
          f"{lines} metrics lines kept")


@dataclasses.dataclass
class Run:
  returncode: int
  stdout: str
  stderr: str

  def error_line(self) -> str:
    """The one `error: ` line a failed run ends with (no traceback), else CaseFailed."""
    lines = self.stderr.strip().splitlines()
    if (self.returncode != 1 or not lines or not lines[-1].startswith("error: ")
        or sum(line.startswith("error:") for line in lines) != 1
        or self.tracebacks() > self.closed_loop_reports()):
      raise CaseFailed(f"expected one error line and exit 1, got exit {self.returncode}: "
                       f"{self.stderr[-2000:]}")
    return lines[-1]

  def tracebacks(self) -> int:
    return self.stderr.count("Traceback (most recent call last)")

  def closed_loop_reports(self) -> int:
    """Tracebacks that tensorstore prints from C++ (no Python hook sees them) when orbax has
    closed its event loop after a failed write while other writes were in flight."""
    return self.stderr.count("\nRuntimeError: Event loop is closed")

  def resumed_from(self) -> int | None:
    found = re.findall(r"Resuming from checkpoint at step (\d+)\.", self.stdout)
    return int(found[-1]) if found else None


class Matrix:
  """The shared healthy run, its uninterrupted continuation and the trainer commands."""

  def __init__(self, scratch: str, data_dir: str, seed: int, reference: bool):
    self.scratch, self.data_dir, self.seed = scratch, data_dir, seed
    self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}"
                f"{os.environ.get('PYTHONPATH', '')}"}
    # Every run compiles the same programs: compile them once.
    self.env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(scratch, "jax_cache"))
    self.env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    self.base = os.path.join(scratch, "base")
    self._check(self.start(self.base, f"--config.total_steps={BEFORE}").wait(), "healthy run")
    self.expected = None
    if reference:
      workdir = self.copy_base("reference")
      self._check(self.start(workdir).wait(), "uninterrupted run")
      self.expected = final_checksums(workdir)

  @staticmethod
  def _check(run: Run, what: str) -> None:
    if run.returncode:
      raise RuntimeError(f"The {what} failed ({run.returncode}): {run.stderr[-3000:]}")

  def copy_base(self, name: str) -> str:
    workdir = os.path.join(self.scratch, name, "run")
    shutil.rmtree(os.path.dirname(workdir), ignore_errors=True)
    shutil.copytree(self.base, workdir)
    return workdir

  def start(self, workdir: str, *flags: str, fault: dict | None = None) -> "Process":
    module = "big_transfer.tools.faulty_train" if fault else "big_transfer.train"
    env = {**self.env, "BIT_FAULT": json.dumps(fault)} if fault else self.env
    cmd = [sys.executable, "-m", module, *TRAIN_FLAGS, f"--config.data_dir={self.data_dir}",
           f"--config.total_steps={TOTAL}", f"--workdir={workdir}", *flags]
    return Process(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))

  def recover(self, workdir: str, after_fault: Snapshot, resume_from: int) -> str:
    """Reruns the plain command: it must resume from `resume_from` (taking over the lock a
    dead run left), finish, keep everything and (with a reference) end in the uninterrupted
    run's state."""
    stale = os.path.exists(os.path.join(workdir, "workdir.lock"))
    run = self.start(workdir).wait()
    self._check_finished(run, workdir, resume_from)
    if stale and "Taking over the stale workdir lock" not in run.stdout:
      raise CaseFailed("the rerun did not report taking over the dead run's lock")
    lost = check_nothing_lost(after_fault, snapshot(workdir))
    return lost + ("; the dead run's lock taken over" if stale else "")

  def _check_finished(self, run: Run, workdir: str, resume_from: int | None) -> None:
    if run.returncode:
      raise CaseFailed(f"the rerun failed ({run.returncode}): {run.stderr[-2000:]}")
    if run.resumed_from() != resume_from:
      raise CaseFailed(f"resumed from {run.resumed_from()}, expected {resume_from}")
    if self.expected is not None and final_checksums(workdir) != self.expected:
      raise CaseFailed("the final state differs from the uninterrupted run's")

  @property
  def same_as_reference(self) -> str:
    return "; final state = uninterrupted run's" if self.expected is not None else ""


class Process:
  def __init__(self, popen: subprocess.Popen):
    self.popen = popen
    self.pid = popen.pid

  def wait_for_line(self, prefix: str) -> list[str]:
    lines = []
    for line in self.popen.stdout:
      lines.append(line)
      if line.startswith(prefix):
        return lines
    raise CaseFailed(f"the run ended before printing {prefix!r}")

  def wait(self, before: list[str] = ()) -> Run:
    out, err = self.popen.communicate(timeout=1200)
    return Run(self.popen.returncode, "".join(before) + out, err)


def final_checksums(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "checkpoints", str(TOTAL), "_CHECKPOINT_METADATA")) as f:
    return json.load(f)["custom_metadata"]["bit_checksums"]


def complete_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


# ---- The cases ------------------------------------------------------------------------------
# Each takes (matrix, rng, name) and returns (outcome, kept, nothing lost); CaseFailed if not.

def _killed(matrix: Matrix, rng: random.Random, name: str, fault: dict) -> tuple[str, str, str]:
  workdir = matrix.copy_base(name)
  before = snapshot(workdir)
  run = matrix.start(workdir, fault=fault).wait()
  if run.returncode not in (-signal.SIGKILL, 0):
    raise CaseFailed(f"exit {run.returncode}: {run.stderr[-2000:]}")
  after = snapshot(workdir)
  check_nothing_lost(before, after)
  steps = complete_steps(workdir)
  when = "killed" if run.returncode else "finished before the kill"
  lost = matrix.recover(workdir, after, steps[-1] if steps[-1] < TOTAL else TOTAL)
  return (f"{when}; rerun resumed from step {steps[-1]}{matrix.same_as_reference}",
          f"checkpoints {', '.join(map(str, steps))}", lost)


def kill_train(matrix, rng, name):
  fault = {"kind": "kill_train", "at": rng.randint(1, TOTAL - BEFORE),
           "delay": round(rng.uniform(0, 0.5), 3)}
  return _killed(matrix, rng, name, fault)


def kill_eval(matrix, rng, name):
  # 360 test images in batches of 64: batches 0-5 of the evaluation at step 6.
  fault = {"kind": "kill_eval", "at": rng.randint(0, 5), "delay": round(rng.uniform(0, 0.2), 3)}
  return _killed(matrix, rng, name, fault)


def kill_save(matrix, rng, name):
  fault = {"kind": "kill_save", "at": rng.choice([6, 8]),
           "delay": round(rng.uniform(0, 0.3), 3)}
  return _killed(matrix, rng, name, fault)


def sigterm(matrix, rng, name):
  workdir = matrix.copy_base(name)
  before = snapshot(workdir)
  fault = {"kind": "term_train", "at": rng.randint(1, TOTAL - BEFORE - 1),
           "delay": round(rng.uniform(0, 0.3), 3)}
  run = matrix.start(workdir, fault=fault).wait()
  saved = re.search(r"Preempted \(SIGTERM\): saved step (\d+);", run.stdout)
  if run.returncode or not saved:
    raise CaseFailed(f"exit {run.returncode}, no preemption line: {run.stderr[-2000:]}")
  after = snapshot(workdir)
  check_nothing_lost(before, after)
  lost = matrix.recover(workdir, after, int(saved[1]))
  return (f"exit 0 with step {saved[1]} saved; rerun resumed from it{matrix.same_as_reference}",
          f"checkpoints {', '.join(map(str, complete_steps(workdir)))}", lost)


def _write_fails(matrix, name, fault: dict, reasons: tuple[str, ...], workdir=None,
                 restore: Callable[[], None] = lambda: None):
  workdir = workdir or matrix.copy_base(name)
  before = snapshot(workdir)
  run = matrix.start(workdir, fault=fault).wait()
  try:
    line = run.error_line()
  finally:
    restore()
  if not any(reason in line for reason in reasons):
    raise CaseFailed(f"the error does not name the cause: {line}")
  after = snapshot(workdir)
  check_nothing_lost(before, after)
  steps = complete_steps(workdir)
  lost = matrix.recover(workdir, after, steps[-1])
  noise = (f" (before it, tensorstore printed {run.closed_loop_reports()} 'Event loop is "
           "closed' tracebacks)" if run.closed_loop_reports() else "")
  return (f"exit 1: {line[len('error: '):]}{noise}; rerun resumed from step {steps[-1]}"
          f"{matrix.same_as_reference}", f"checkpoints {', '.join(map(str, steps))}", lost)


def disk_full(matrix, rng, name):
  return _write_fails(matrix, name, {"kind": "fsize", "at": 6, "limit": 1 << 20},
                      ("File too large",))


def workdir_readonly(matrix, rng, name):
  if os.geteuid() != 0:
    workdir = matrix.copy_base(name)
    return _write_fails(matrix, name, {"kind": "readonly", "at": 6},
                        ("Permission denied", "Read-only"), workdir=workdir,
                        restore=lambda: subprocess.run(["chmod", "-R", "u+w", workdir],
                                                       check=True))
  # Root writes through permissions: checkpoints/ on a file system of its own, remounted
  # read-only (a file system with files open for writing, as metrics are, cannot be).
  workdir = matrix.copy_base(name)
  checkpoints_dir = os.path.join(workdir, "checkpoints")
  saved = checkpoints_dir + ".saved"
  os.rename(checkpoints_dir, saved)
  os.makedirs(checkpoints_dir)
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", checkpoints_dir], check=True)
  try:
    shutil.copytree(saved, checkpoints_dir, dirs_exist_ok=True)
    shutil.rmtree(saved)
    return _write_fails(
        matrix, name, {"kind": "readonly", "at": 6}, ("Read-only file system",),
        workdir=workdir, restore=lambda: subprocess.run(
            ["mount", "-o", "remount,rw", checkpoints_dir], check=True))
  finally:
    subprocess.run(["umount", checkpoints_dir], check=False)


def _corrupted(matrix, rng, name, damage: Callable[[str], str]):
  workdir = matrix.copy_base(name)
  latest = os.path.join(workdir, "checkpoints", str(BEFORE))
  files = [os.path.join(d, n) for d, _, names in os.walk(latest) for n in names]
  what = damage(max(files, key=os.path.getsize), rng)
  before = snapshot(workdir)
  run = matrix.start(workdir).wait()
  matrix._check_finished(run, workdir, BEFORE - 2)
  if f"WARNING: checkpoint at step {BEFORE} does not restore" not in run.stdout:
    raise CaseFailed("no warning about the corrupt checkpoint")
  lost = check_nothing_lost(before, snapshot(workdir))
  return (f"{what}; moved to corrupt_checkpoints/{BEFORE} with a warning, resumed from step "
          f"{BEFORE - 2}{matrix.same_as_reference}",
          f"checkpoints {', '.join(map(str, complete_steps(workdir)))} + the corrupt one", lost)


def _flip_bit(path: str, rng: random.Random) -> str:
  data = bytearray(pathlib.Path(path).read_bytes())
  byte, bit = rng.randrange(len(data)), rng.randrange(8)
  data[byte] ^= 1 << bit
  pathlib.Path(path).write_bytes(bytes(data))
  return f"bit {bit} of byte {byte} of its largest file flipped"


def _truncate(path: str, rng: random.Random) -> str:
  del rng
  size = os.path.getsize(path)
  os.truncate(path, size // 2)
  return f"largest file truncated to {size // 2} of {size} bytes"


def bitflip(matrix, rng, name):
  return _corrupted(matrix, rng, name, _flip_bit)


def truncated(matrix, rng, name):
  return _corrupted(matrix, rng, name, _truncate)


def _refused(matrix, name, flags, expected: str, prepare: Callable[[str], None] = lambda w: None,
             workdir: str | None = None):
  workdir = workdir or matrix.copy_base(name)
  prepare(workdir)
  before = snapshot(workdir)
  line = matrix.start(workdir, *flags).wait().error_line()
  if expected not in line:
    raise CaseFailed(f"unexpected error: {line}")
  after = snapshot(workdir)
  if after.files != before.files:
    changed = sorted(set(after.files.items()) ^ set(before.files.items()))
    raise CaseFailed(f"the refused run changed {changed}")
  lost = check_nothing_lost(before, after) + f"; all {len(before.files)} workdir files unchanged"
  matrix.recover(workdir, after, BEFORE)
  return (f"exit 1: {line[len('error: '):]}; the original command then resumed from step "
          f"{BEFORE}{matrix.same_as_reference}", "everything (nothing written)", lost)


def _without_config_json(workdir: str) -> None:
  os.remove(os.path.join(workdir, "config.json"))  # As in a workdir written before it existed.


def other_model(matrix, rng, name):
  return _refused(matrix, name, ["--config.model.name=R26x1"],
                  "holds checkpoints of another model", _without_config_json)


def other_classes(matrix, rng, name):
  folder = _three_class_folder(os.path.join(matrix.scratch, "three_classes"))
  return _refused(matrix, name, [f"--config.dataset=folder:{folder}", "--config.num_classes=3"],
                  "for params/head/conv2d/", _without_config_json)


def config_model(matrix, rng, name):
  return _refused(matrix, name, ["--config.model.name=R26x1"],
                  "holds a run with model.name='R14x1'")


def config_batch(matrix, rng, name):
  return _refused(matrix, name, ["--config.batch_size=32"], "holds a run with batch_size=16")


def config_log_interval(matrix, rng, name):
  workdir = matrix.copy_base(name)
  before = snapshot(workdir)
  run = matrix.start(workdir, "--config.log_every_steps=2").wait()
  matrix._check_finished(run, workdir, BEFORE)
  lost = check_nothing_lost(before, snapshot(workdir))
  return (f"accepted: resumed from step {BEFORE}{matrix.same_as_reference}",
          f"checkpoints {', '.join(map(str, complete_steps(workdir)))}", lost)


def second_run(matrix, rng, name):
  workdir = matrix.copy_base(name)
  before = snapshot(workdir)
  release = os.path.join(matrix.scratch, name, "release")
  # The first run holds at its first step until the second one has been refused.
  first = matrix.start(workdir, fault={"kind": "hold_train", "at": 1, "until": release})
  printed = first.wait_for_line("R14x1:")  # Printed once the first run holds the lock.
  line = matrix.start(workdir).wait().error_line()
  pathlib.Path(release).touch()
  if f"in use by pid {first.pid} on host" not in line:
    raise CaseFailed(f"the second run was not refused naming pid {first.pid}: {line}")
  run = first.wait(printed)
  matrix._check_finished(run, workdir, BEFORE)
  lost = check_nothing_lost(before, snapshot(workdir))
  if os.path.exists(os.path.join(workdir, "workdir.lock")):
    raise CaseFailed("the first run left its lock behind")
  return (f"second run: exit 1: {line[len('error: '):]}; the first run finished untouched"
          f"{matrix.same_as_reference}",
          f"checkpoints {', '.join(map(str, complete_steps(workdir)))}", lost)


def workdir_unwritable(matrix, rng, name):
  blocker = os.path.join(matrix.scratch, name, "a_file")
  os.makedirs(os.path.dirname(blocker), exist_ok=True)
  pathlib.Path(blocker).write_text("not a folder\n")
  line = matrix.start(os.path.join(blocker, "run")).wait().error_line()
  if "Cannot create the workdir" not in line:
    raise CaseFailed(f"unexpected error: {line}")
  return f"exit 1: {line[len('error: '):]}", "(nothing to keep)", "yes: nothing was written"


def _three_class_folder(root: str) -> str:
  """ROOT/{train,test}/{a,b,c}/ with two tiny PNGs each (made with numpy and zlib only)."""
  import zlib  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  def png(value: int) -> bytes:
    raw = b"".join(b"\x00" + bytes([value]) * 24 for _ in range(8))  # 8x8 RGB rows.
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
  for split in ("train", "test"):
    for index, label in enumerate("abc"):
      folder = pathlib.Path(root, split, label)
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(2):
        (folder / f"{i}.png").write_bytes(png(60 * index + i))
  return root


CASES = {  # name: (function, the fault in words, randomly timed: repeated with --full)
    "kill_train": (kill_train, "kill -9 at a random moment of training", True),
    "kill_eval": (kill_eval, "kill -9 at a random moment of an evaluation", True),
    "kill_save": (kill_save, "kill -9 at a random moment of a checkpoint write", True),
    "sigterm": (sigterm, "SIGTERM (preemption notice) at a random step", True),
    "disk_full": (disk_full, "files limited to 1 MiB from the save of step 6 (RLIMIT_FSIZE)",
                  False),
    "workdir_readonly": (workdir_readonly, "workdir turns read-only at the save of step 6",
                         False),
    "workdir_unwritable": (workdir_unwritable, "--workdir below a regular file", False),
    "bitflip": (bitflip, "one bit flipped in the latest checkpoint", False),
    "truncated": (truncated, "latest checkpoint truncated", False),
    "other_model": (other_model, "checkpoints of R14x1, run with R26x1, no config.json", False),
    "other_classes": (other_classes, "checkpoints of 10 classes, run on 3, no config.json",
                      False),
    "second_run": (second_run, "a second run started on the workdir of a live one", False),
    "config_model": (config_model, "resumed with another model.name", False),
    "config_batch": (config_batch, "resumed with another batch_size", False),
    "config_log_interval": (config_log_interval, "resumed with another log_every_steps", False),
}


def run_matrix(cases: list[str], *, repeats: int, seed: int, scratch: str, data_dir: str,
               reference: bool, log=print) -> list[Row]:
  """Runs `cases`, each randomly timed one `repeats` times; returns a row per case (CaseFailed
  in a row's outcome when a try broke the promise)."""
  started = time.time()
  matrix = Matrix(scratch, data_dir, seed, reference)
  rows = []
  for name in cases:
    function, fault, random_timing = CASES[name]
    tries = repeats if random_timing else 1
    results = []
    for attempt in range(tries):
      rng = random.Random(f"{seed}:{name}:{attempt}")
      try:
        results.append(function(matrix, rng, f"{name}_{attempt}"))
      except CaseFailed as e:
        results.append((f"FAILED: {str(e)[-600:]}", "", "no"))
      log(f"[{time.time() - started:6.0f} s] {name} try {attempt + 1}/{tries}: {results[-1][0]}")
    failed = [r for r in results if r[0].startswith("FAILED")]
    outcome, kept, lost = (failed or results)[0]
    if tries > 1 and not failed:
      outcome = f"{tries}/{tries} recovered; e.g. {outcome}"
    rows.append(Row(name, fault, tries, outcome, kept, lost))
  return rows


def table(rows: list[Row], scratch: str = "") -> str:
  """A Markdown table, one line per case (the scratch folder written as $SCRATCH)."""
  def cell(text) -> str:
    text = " ".join(str(text).replace("|", "/").split())
    return text.replace(scratch, "$SCRATCH") if scratch else text
  lines = ["| case | fault | tries | outcome | kept | nothing lost |",
           "| --- | --- | --- | --- | --- | --- |"]
  lines += ["| " + " | ".join(cell(v) for v in dataclasses.astuple(r)) + " |" for r in rows]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--full", action="store_true",
                      help=f"every case, randomly timed ones {REPEATS} times, with --reference")
  parser.add_argument("--cases", default="kill_save,bitflip,second_run,config_batch",
                      help=f"comma-separated, of: {', '.join(CASES)}")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--reference", action="store_true",
                      help="compare the recovered runs' final state with an uninterrupted run")
  parser.add_argument("--scratch", help="folder for the runs (default: a temporary one)")
  parser.add_argument("--data_dir", help="TFDS data_dir holding sklearn_digits (prepared if "
                      "missing)")
  args = parser.parse_args(argv)
  cases = list(CASES) if args.full else args.cases.split(",")
  unknown = [c for c in cases if c not in CASES]
  if unknown:
    parser.error(f"unknown cases {unknown}; valid: {', '.join(CASES)}")
  scratch = args.scratch or tempfile.mkdtemp(prefix="bit_fault_matrix_")
  data_dir = args.data_dir or os.path.join(scratch, "tfds")
  rows = run_matrix(cases, repeats=REPEATS if args.full else 1, seed=args.seed,
                    scratch=scratch, data_dir=data_dir, reference=args.full or args.reference,
                    log=lambda line: print(line, file=sys.stderr, flush=True))
  print(table(rows, scratch))
  return int(any(r.outcome.startswith("FAILED") for r in rows))


if __name__ == "__main__":
  sys.exit(main())
