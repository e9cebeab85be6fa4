"""Train on a Cloud TPU VM (one host or a pod slice) from your workstation, through gcloud.

    python launch/tpu_vm.py create --name=bit --zone=europe-west4-a --accelerator=v3-32 [--queued]
        [--spot] [--project=P] [--version=RUNTIME]
    python launch/tpu_vm.py setup --name=bit --zone=europe-west4-a
    python launch/tpu_vm.py train --name=bit --zone=europe-west4-a --accelerator=v3-32 \\
        [--plan] -- \\
        --config=configs/bit_m.py:R50x1 --workdir=gs://BUCKET/bit_m \\
        --config.dataset=imagenet21k --config.data_dir=gs://BUCKET/tensorflow_datasets
    python launch/tpu_vm.py logs --name=bit --zone=europe-west4-a [--worker=N]
    python launch/tpu_vm.py stop --name=bit --zone=europe-west4-a [--vm]
    python launch/tpu_vm.py delete --name=bit --zone=europe-west4-a [--queued]

Verbs (each runs the gcloud commands it prints; `--dry_run` prints them, one per line and
shell-quoted, and runs nothing):
  create  a TPU VM (`gcloud compute tpus tpu-vm create`) or, with --queued, a queued resource
          whose node is named --name (`gcloud compute tpus queued-resources create`; it waits in
          Google's queue, see `gcloud compute tpus queued-resources list`). --version defaults
          to the runtime Google lists for JAX on the accelerator's generation.
  setup   ships this repository's committed HEAD (`git archive`) to every worker and installs it
          there into ~/bit_venv (Python 3.11 from apt, `pip install -e '.[tpu]'` with the pins of
          requirements.lock): `tpu-vm scp` and `tpu-vm ssh --worker=all`. Commit first: edits
          that are not committed do not travel.
  train   starts `python -m big_transfer.train FLAGS --distributed` on every worker
          (`--worker=all`; JAX finds the coordinator on TPU VMs) in the background, appending to
          ~/bit_train.log; FLAGS are everything after `--`, each shell-quoted, so values with
          spaces and quotes arrive intact. Refuses while a previous run is still going. With
          --plan it first compiles the step on worker 0 for the accelerator's topology
          (`python -m big_transfer.plan --topology=... --require_fit`, minutes to tens of
          minutes for the largest models) and starts nothing if the step does not fit.
  logs    follows ~/bit_train.log of worker 0 (process 0 prints the progress; --worker=N for
          another host's warnings and errors). Ctrl-C stops following, not training.
  stop    sends SIGTERM to the trainer on every worker: it saves the current step and exits (the
          preemption path of big_transfer.train); `train` again resumes. The VM keeps running
          (and billing) until `delete`; --vm then also stops it (`gcloud compute tpus tpu-vm
          stop`; not for Spot VMs, which cannot be restarted: delete those).
  delete  deletes the TPU VM, or with --queued the queued resource and its node (`--force`).

Workdirs: on a multi-host slice every host writes its part of each checkpoint into the same
directory, so `--workdir` (and usually `--config.data_dir`) must be a gs:// bucket in the TPU's
region; `train` refuses a local workdir there. (The trainer writes gs:// workdirs from issue #18
on; orbax checkpoints already do.)

gcloud syntax as documented in Google's gcloud reference
(https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/create, .../tpu-vm/ssh,
.../tpu-vm/scp, .../tpu-vm/stop, .../tpu-vm/delete,
https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create and
.../queued-resources/delete); runtime versions from "TPU software versions"
(https://cloud.google.com/tpu/docs/runtimes); installing on every host with `ssh --worker=all`
as in "Run JAX code on TPU slices" (https://cloud.google.com/tpu/docs/jax-pods). Accelerator
names count TensorCores for v2-v4 and v5p (2 per chip: v3-32 is 16 chips, 4 hosts) and chips
for v5e (`v5litepod-N`) and v6e; the planner's topology is the chip grid (v3-32 -> v3:4x4).
"""

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile

from absl import app, flags

VERBS = ("create", "setup", "train", "logs", "stop", "delete")

NAME = flags.DEFINE_string("name", None, "The TPU VM's name (and the queued resource's).")
ZONE = flags.DEFINE_string("zone", None, "The TPU's zone, e.g. europe-west4-a.")
PROJECT = flags.DEFINE_string("project", None, "Google Cloud project; default: gcloud's.")
ACCELERATOR = flags.DEFINE_string(
    "accelerator", None, "Accelerator type as gcloud names it (v3-8, v3-32, v4-64, v5p-128, "
    "v5litepod-16, v6e-64); needed by create and train.")
QUEUED = flags.DEFINE_bool("queued", False, "create/delete a queued resource, not a bare VM.")
SPOT = flags.DEFINE_bool("spot", False, "create a Spot TPU (cheaper, preemptible).")
VERSION = flags.DEFINE_string("version", None, "TPU runtime (software) version; default: by "
                              "generation (tpu-ubuntu2204-base for v2-v4).")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands, one per line; run nothing.")
PLAN = flags.DEFINE_bool("plan", False, "train: refuse a config whose step does not fit the "
                         "accelerator's memory (compiles it on worker 0 first; slow).")
TOPOLOGY = flags.DEFINE_string("topology", None, "train --plan: the planner's topology "
                               "(default: from --accelerator, e.g. v3-32 -> v3:4x4).")
WORKER = flags.DEFINE_string("worker", "0", "logs: the worker whose log to follow.")
VM = flags.DEFINE_bool("vm", False, "stop: after the trainer, stop the TPU VM itself.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_REPO = "~/big_transfer"
REMOTE_PYTHON = "~/bit_venv/bin/python"
LOG = "~/bit_train.log"
PID = "~/bit_train.pid"
ARCHIVE = "big_transfer.tar.gz"
# Ends a worker's command while a trainer started by `train` is still alive there.
NOT_RUNNING = (f'if [ -f {PID} ] && kill -0 "$(cat {PID})" 2>/dev/null; then echo "$(hostname): '
               f'training is running (pid $(cat {PID})); run stop first" >&2; exit 1; fi')

# Google's runtime for JAX per generation ("TPU software versions").
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
            "v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
            "v5e": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}


class LaunchError(Exception):
  """Bad flags or a failed command; main prints it as one `error: ...` line."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A TPU slice as gcloud names it."""
  name: str
  generation: str  # v2, v3, v4, v5p, v5e, v6e: the planner's topology prefix.
  chips: int

  @property
  def hosts(self) -> int:
    """4 chips per host; v5e and v6e put up to 8 chips on a single host."""
    if self.generation in ("v5e", "v6e") and self.chips <= 8:
      return 1
    return max(1, self.chips // 4)

  @property
  def topology(self) -> str:
    """The chip grid for `big_transfer.plan --topology` (2D torus v2/v3/v5e/v6e, 3D v4/v5p).

    The planner's one-axis data mesh depends only on the device count, not on the grid's shape.
    """
    if self.chips & (self.chips - 1):
      raise LaunchError(f"No default topology for {self.name} ({self.chips} chips, not a power "
                        "of 2); pass --topology=GENERATION:AxB[xC] for --plan.")
    if self.generation in ("v4", "v5p"):  # Google's default 3D shapes: 2x2x1, 2x2x2, 2x2x4,
      if self.chips < 4:                   # 2x4x4, 4x4x4, 4x4x8, ...
        raise LaunchError(f"{self.name} is smaller than one host; it needs no planner topology.")
      shape = [2, 2, 1]
      for _ in range(self.chips.bit_length() - 3):
        shape[max(i for i, d in enumerate(shape) if d == min(shape))] *= 2
    else:
      k = self.chips.bit_length() - 1
      shape = [2 ** (k // 2), 2 ** (k - k // 2)]  # 4 -> 2x2, 16 -> 4x4, 32 -> 4x8.
    return f"{self.generation}:{'x'.join(map(str, shape))}"


_ACCELERATOR = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)$")


def parse_accelerator(name: str) -> Accelerator:
  match = _ACCELERATOR.match(name or "")
  if not match or int(match[2]) < 1:
    raise LaunchError(f"Unknown accelerator {name!r}; use gcloud's names: v2-8, v3-8, v3-32, "
                      "v4-8, v5p-8, v5litepod-16, v6e-8 (see `gcloud compute tpus "
                      "accelerator-types list --zone=ZONE`).")
  family, size = match[1], int(match[2])
  if family in ("v5litepod", "v6e"):  # Named by chips.
    return Accelerator(name, "v5e" if family == "v5litepod" else family, size)
  if size % 2:
    raise LaunchError(f"{name}: {family} names count TensorCores, 2 per chip; use an even size.")
  return Accelerator(name, family, size // 2)


def _where() -> list[str]:
  return [f"--zone={ZONE.value}"] + ([f"--project={PROJECT.value}"] if PROJECT.value else [])


def tpu_vm(verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, NAME.value, *_where(), *args]


def queued_resources(verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, NAME.value, *_where(), *args]


def ssh(command: str, worker: str = "all") -> list[str]:
  return tpu_vm("ssh", f"--worker={worker}", f"--command={command}")


def _accelerator(verb: str) -> Accelerator:
  if not ACCELERATOR.value:
    raise LaunchError(f"{verb} needs --accelerator (e.g. --accelerator=v3-32).")
  return parse_accelerator(ACCELERATOR.value)


def create_commands() -> list[list[str]]:
  accelerator = _accelerator("create")
  version = VERSION.value or RUNTIMES[accelerator.generation]
  spot = ["--spot"] if SPOT.value else []
  if QUEUED.value:
    return [queued_resources("create", f"--node-id={NAME.value}",
                             f"--accelerator-type={accelerator.name}",
                             f"--runtime-version={version}", *spot)]
  return [tpu_vm("create", f"--accelerator-type={accelerator.name}", f"--version={version}",
                 *spot)]


def setup_commands() -> list[list[str]]:
  archive = os.path.join(tempfile.gettempdir(), f"big_transfer-{NAME.value}.tar.gz")
  install = "; ".join([
      "set -e",
      NOT_RUNNING,  # The install replaces the code a running trainer imports.
      "if ! command -v python3.11 >/dev/null; then sudo apt-get update -qq && sudo "
      "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; fi",
      f"rm -rf {REMOTE_REPO}",
      f"mkdir {REMOTE_REPO}",
      f"tar -xzf ~/{ARCHIVE} -C {REMOTE_REPO}",
      "[ -d ~/bit_venv ] || python3.11 -m venv ~/bit_venv",
      f"cd {REMOTE_REPO}",
      "PIP_CONSTRAINT=requirements.lock ~/bit_venv/bin/pip install -q -e '.[tpu]'",
      'echo "$(hostname): big_transfer installed"',
  ])
  return [["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
          tpu_vm("scp", archive, f"{NAME.value}:{ARCHIVE}", "--worker=all"),
          ssh(install)]


def _flag_value(train_flags: list[str], name: str) -> str | None:
  values = [f.split("=", 1)[1] for f in train_flags if f.startswith(f"--{name}=")]
  return values[-1] if values else None


def _remote_python(module: str, args: list[str]) -> str:
  """`python -m module args` for the workers' shell, every argument quoted (the venv's path
  is not: its ~ must expand)."""
  return " ".join([REMOTE_PYTHON, "-m", module, *map(shlex.quote, args)])


def train_commands(train_flags: list[str]) -> list[list[str]]:
  accelerator = _accelerator("train")
  if not _flag_value(train_flags, "config"):
    raise LaunchError("train needs the trainer's flags after `--`, at least "
                      "`-- --config=configs/NAME.py --workdir=gs://BUCKET/DIR` (with the =).")
  workdir = _flag_value(train_flags, "workdir")
  if not workdir:
    raise LaunchError("train needs --workdir=gs://BUCKET/DIR (with the =) after `--`.")
  if accelerator.hosts > 1 and not workdir.startswith("gs://"):
    raise LaunchError(f"{accelerator.name} spans {accelerator.hosts} hosts, which must share "
                      f"the workdir: use a gs:// bucket, not {workdir!r}.")
  commands = []
  if PLAN.value:
    topology = TOPOLOGY.value or accelerator.topology
    plan = _remote_python("big_transfer.plan", [f for f in train_flags if f.startswith("--config")]
                          + [f"--topology={topology}", "--require_fit"])
    # On the CPU backend: an ahead-of-time compile needs no TPU, and claiming worker 0's TPU
    # alone would wait for the slice's other hosts.
    commands.append(ssh(f"cd {REMOTE_REPO} && JAX_PLATFORMS=cpu {plan}", worker="0"))
  train = _remote_python("big_transfer.train", train_flags + ["--distributed"])
  start = "; ".join([
      NOT_RUNNING,
      f"cd {REMOTE_REPO}",
      # `&` ends the statement: no `;` after it.
      f"nohup {train} >> {LOG} 2>&1 < /dev/null & echo $! > {PID}",
      f'echo "$(hostname): training started (pid $(cat {PID})), log {LOG}"',
  ])
  commands.append(ssh(start))
  return commands


def logs_commands() -> list[list[str]]:
  return [ssh(f"tail -n 100 -F {LOG}", worker=WORKER.value)]


def stop_commands() -> list[list[str]]:
  if VM.value and SPOT.value:
    raise LaunchError("Spot TPU VMs cannot be restarted, so stopping one only loses it: run "
                      "`stop` without --vm, then `delete`.")
  # Waits up to 30 minutes for the checkpoint (BiT-L's takes minutes), then reports.
  signal = "; ".join([
      f"pid=$(cat {PID} 2>/dev/null || true)",
      'if [ -z "$pid" ] || ! kill -TERM "$pid" 2>/dev/null; then echo "$(hostname): no '
      'training running"; exit 0; fi',
      'echo "$(hostname): saving a checkpoint and stopping"',
      'for i in $(seq 1800); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done',
      'if kill -0 "$pid" 2>/dev/null; then echo "$(hostname): still running after 30 min; see '
      f'{LOG}" >&2; exit 1; fi',
      'echo "$(hostname): stopped"',
  ])
  return [ssh(signal)] + ([tpu_vm("stop")] if VM.value else [])


def delete_commands() -> list[list[str]]:
  if QUEUED.value:
    return [queued_resources("delete", "--force", "--quiet")]
  return [tpu_vm("delete", "--quiet")]


def commands(verb: str, train_flags: list[str]) -> list[list[str]]:
  """The commands `verb` runs, in order; LaunchError for bad flags."""
  if verb not in VERBS:
    raise LaunchError(f"Unknown verb {verb!r}; valid: {', '.join(VERBS)}.")
  if train_flags and verb != "train":
    raise LaunchError(f"Only train takes flags after `--`, not {verb}.")
  for flag in (NAME, ZONE):
    if not flag.value:
      raise LaunchError(f"--{flag.name} is required.")
  if verb == "train":
    return train_commands(train_flags)
  return {"create": create_commands, "setup": setup_commands, "logs": logs_commands,
          "stop": stop_commands, "delete": delete_commands}[verb]()


def run(command: list[str]) -> None:
  print(f"$ {shlex.join(command)}", file=sys.stderr, flush=True)
  try:
    status = subprocess.run(command, check=False).returncode
  except FileNotFoundError:
    raise LaunchError(f"{command[0]} is not installed or not on PATH (gcloud: "
                      "https://cloud.google.com/sdk/docs/install).") from None
  if status:
    raise LaunchError(f"the command above failed with exit status {status} (its output is "
                      "above); nothing after it ran.")


def parse_flags(argv: list[str]) -> tuple[list[str], list[str]]:
  """(positional arguments, the trainer's flags after `--`)."""
  split = argv.index("--") if "--" in argv else len(argv)
  try:
    positional = flags.FLAGS(argv[:split])
  except flags.Error as e:
    sys.exit(f"error: {e}")
  return positional, argv[split + 1:]


def main(args):
  positional, train_flags = args
  if len(positional) != 2:
    sys.exit(f"error: give one verb ({', '.join(VERBS)}); the trainer's flags go after `--`.")
  try:
    todo = commands(positional[1], train_flags)
    for command in todo:
      if DRY_RUN.value:
        print(shlex.join(command))
      else:
        run(command)
  except LaunchError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
