"""launch/tpu_vm.py and launch/local.sh: the commands they print and run, run nowhere real.

A fake `gcloud` and `git` first on PATH record every call, so a dry run that executed anything
would be caught, and a real run is compared with what its dry run printed. The commands meant
for the TPU workers' shell run here in bash with a fake interpreter, which proves that trainer
flags with spaces and quotes arrive intact. The launcher only needs absl: each call is a cheap
subprocess (importing it here would clash with the planner's --topology flag).
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from conftest import ROOT, error_line

LAUNCHER = str(ROOT / "launch" / "tpu_vm.py")
WHERE = ["--name=bit", "--zone=europe-west4-a"]
# Values a shell would split, expand or unquote if the launcher did not quote them.
TRICKY = [
    "--config=configs/demo.py",
    "--workdir=gs://bucket/runs/bit m",
    "--config.pp_train=decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)",
    "--config.dataset=folder:/data/it's \"mine\"",
    "--config.data_dir=$HOME/*; echo pwned `id` \\",
]


@pytest.fixture
def fake_bin(tmp_path):
  """A directory of fake `gcloud` and `git` that append their argv (JSON) to calls.jsonl and
  exit with the status in exit_status (0 if absent)."""
  directory = tmp_path / "bin"
  directory.mkdir()
  for tool in ("gcloud", "git"):
    script = directory / tool
    script.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as f:\n"
        "  f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"status = {str(tmp_path / 'exit_status')!r}\n"
        "sys.exit(int(open(status).read()) if os.path.exists(status) else 0)\n")
    script.chmod(0o755)
  return directory


def launch(fake_bin, *args):
  env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
  return subprocess.run([sys.executable, LAUNCHER, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)


def calls(fake_bin) -> list[list[str]]:
  path = fake_bin.parent / "calls.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def dry_run(fake_bin, *args) -> list[list[str]]:
  """The commands a dry run prints, parsed back; checks that nothing ran."""
  proc = launch(fake_bin, args[0], "--dry_run", *args[1:])  # Before a `--`.
  assert proc.returncode == 0, proc.stderr
  assert calls(fake_bin) == [], "a dry run executed a command"
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def remote(command: list[str]) -> str:
  """The shell command of a `gcloud ... ssh --command=...`."""
  assert command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], command
  (value,) = [a.split("=", 1)[1] for a in command if a.startswith("--command=")]
  return value


GCLOUD_TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
GCLOUD_QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]


def test_create_as_a_vm_or_a_queued_resource(fake_bin):
  (vm,) = dry_run(fake_bin, "create", *WHERE, "--accelerator=v3-32")
  assert vm == GCLOUD_TPU_VM + ["create", "bit", "--zone=europe-west4-a",
                                "--accelerator-type=v3-32", "--version=tpu-ubuntu2204-base"]
  (queued,) = dry_run(fake_bin, "create", *WHERE, "--accelerator=v6e-16", "--queued", "--spot",
                      "--project=my-project")
  assert queued == GCLOUD_QUEUED + ["create", "bit", "--zone=europe-west4-a",
                                    "--project=my-project", "--node-id=bit",
                                    "--accelerator-type=v6e-16",
                                    "--runtime-version=v2-alpha-tpuv6e", "--spot"]
  (pinned,) = dry_run(fake_bin, "create", *WHERE, "--accelerator=v4-8", "--version=my-runtime")
  assert "--version=my-runtime" in pinned


def test_setup_ships_head_to_every_worker(fake_bin):
  archive, scp, install = dry_run(fake_bin, "setup", *WHERE)
  assert archive[:4] == ["git", "-C", str(ROOT), "archive"] and archive[-1] == "HEAD"
  output = archive[4:-1][-1].split("=", 1)[1]
  assert scp == GCLOUD_TPU_VM + ["scp", "bit", "--zone=europe-west4-a", output,
                                 "bit:big_transfer.tar.gz", "--worker=all"]
  assert "--worker=all" in install
  script = remote(install)
  assert "pip install -q -e '.[tpu]'" in script and "PIP_CONSTRAINT=requirements.lock" in script


def test_train_logs_stop_delete_commands(fake_bin):
  (train,) = dry_run(fake_bin, "train", *WHERE, "--accelerator=v3-32", "--", *TRICKY)
  assert train[:7] == GCLOUD_TPU_VM + ["ssh", "bit", "--zone=europe-west4-a"]
  assert "--worker=all" in train
  plan, train = dry_run(fake_bin, "train", *WHERE, "--accelerator=v3-32", "--plan", "--",
                        *TRICKY)
  assert "--worker=0" in plan and "--worker=all" in train
  (logs,) = dry_run(fake_bin, "logs", *WHERE)
  assert "--worker=0" in logs and "tail -n 100 -F ~/bit_train.log" == remote(logs)
  (logs,) = dry_run(fake_bin, "logs", *WHERE, "--worker=3")
  assert "--worker=3" in logs
  (stop,) = dry_run(fake_bin, "stop", *WHERE)
  assert "--worker=all" in stop and "kill -TERM" in remote(stop)
  _, stop_vm = dry_run(fake_bin, "stop", *WHERE, "--vm")
  assert stop_vm == GCLOUD_TPU_VM + ["stop", "bit", "--zone=europe-west4-a"]
  assert dry_run(fake_bin, "delete", *WHERE) == [
      GCLOUD_TPU_VM + ["delete", "bit", "--zone=europe-west4-a", "--quiet"]]
  assert dry_run(fake_bin, "delete", *WHERE, "--queued") == [
      GCLOUD_QUEUED + ["delete", "bit", "--zone=europe-west4-a", "--force", "--quiet"]]


def _fake_worker(tmp_path, sleep: float):
  """A HOME like a set-up worker's, whose venv python records its argv and JAX_PLATFORMS, and
  as the trainer runs `sleep` seconds or until SIGTERM."""
  home = tmp_path / "home"
  (home / "big_transfer").mkdir(parents=True)
  (home / "bit_venv" / "bin").mkdir(parents=True)
  python = home / "bit_venv" / "bin" / "python"
  python.write_text(
      f"#!{sys.executable}\nimport json, signal, sys, time\n"
      "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
      "import os\n"
      f"with open({str(tmp_path / 'argv.json')!r}, 'w') as f:\n"
      "  json.dump(sys.argv[1:] + [os.environ.get('JAX_PLATFORMS')], f)\n"
      f"time.sleep({sleep} if 'big_transfer.train' in sys.argv else 0)\n")
  python.chmod(0o755)
  return home


def _on_worker(home, command: str):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # As on a TPU VM.
  return subprocess.run(["bash", "-c", command], env={**env, "HOME": str(home)},
                        capture_output=True, text=True, timeout=60)


def _wait_for(path, timeout: float = 30.0):
  deadline = time.monotonic() + timeout
  while not path.exists() or not path.read_text():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.05)
  time.sleep(0.1)  # Let the writer finish.
  return json.loads(path.read_text())


def test_train_flags_survive_the_workers_shell(fake_bin, tmp_path):
  plan, train = dry_run(fake_bin, "train", *WHERE, "--accelerator=v3-32", "--plan", "--",
                        *TRICKY)
  home = _fake_worker(tmp_path, sleep=60)
  proc = _on_worker(home, remote(train))
  assert proc.returncode == 0, proc.stderr
  assert _wait_for(tmp_path / "argv.json") == ["-m", "big_transfer.train", *TRICKY,
                                                "--distributed", None]
  pid = int((home / "bit_train.pid").read_text())
  # A second start is refused while the first runs; stop ends it by SIGTERM and waits.
  again = _on_worker(home, remote(train))
  assert again.returncode == 1 and "training is running" in again.stderr
  (stop,) = dry_run(fake_bin, "stop", *WHERE)
  stopped = _on_worker(home, remote(stop))
  assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  assert "no training running" in _on_worker(home, remote(stop)).stdout
  # The planner gets the config flags only and the accelerator's topology, and compiles on
  # the CPU backend.
  (tmp_path / "argv.json").unlink()
  assert _on_worker(home, remote(plan)).returncode == 0
  assert _wait_for(tmp_path / "argv.json") == [
      "-m", "big_transfer.plan", TRICKY[0], *TRICKY[2:], "--topology=v3:4x4", "--require_fit",
      "cpu"]


def test_runs_exactly_what_the_dry_run_prints(fake_bin):
  printed = dry_run(fake_bin, "stop", *WHERE, "--vm")
  proc = launch(fake_bin, "stop", *WHERE, "--vm")
  assert proc.returncode == 0, proc.stderr
  assert calls(fake_bin) == [command[1:] for command in printed]
  # A failing command stops the verb: the VM is not stopped after a failed ssh.
  (fake_bin.parent / "calls.jsonl").unlink()
  (fake_bin.parent / "exit_status").write_text("3")
  line = error_line(launch(fake_bin, "stop", *WHERE, "--vm"))
  assert "exit status 3" in line and "nothing after it ran" in line
  assert len(calls(fake_bin)) == 1


@pytest.mark.parametrize("args, message", [
    (["train", *WHERE, "--accelerator=v3-32", "--", "--config=c.py", "--workdir=/tmp/run"],
     "v3-32 spans 4 hosts, which must share the workdir: use a gs:// bucket"),
    (["train", *WHERE, "--accelerator=v3-32"], "train needs the trainer's flags after `--`"),
    (["train", *WHERE, "--", "--config=c.py"], "train needs --accelerator"),
    (["create", *WHERE, "--accelerator=v3-33"], "count TensorCores, 2 per chip"),
    (["create", *WHERE, "--accelerator=tpu9"], "Unknown accelerator 'tpu9'"),
    (["create", "--name=bit", "--accelerator=v3-8"], "--zone is required"),
    (["logs", *WHERE, "--", "--config=c.py"], "Only train takes flags after `--`"),
    (["launch", *WHERE], "Unknown verb 'launch'"),
    (["stop", *WHERE, "--vm", "--spot"], "Spot TPU VMs cannot be restarted"),
    (["train", *WHERE, "--accelerator=v4-48", "--plan", "--", "--config=c.py",
      "--workdir=gs://b/r"], "pass --topology"),
])
def test_bad_input_is_one_line(fake_bin, args, message):
  line = error_line(launch(fake_bin, args[0], "--dry_run", *args[1:]))
  assert message in line, line
  assert calls(fake_bin) == []


def _topology(fake_bin, accelerator: str) -> str:
  plan, _ = dry_run(fake_bin, "train", *WHERE, f"--accelerator={accelerator}", "--plan", "--",
                    "--config=c.py", "--workdir=gs://b/r")
  return shlex.split(remote(plan))[-2].split("=", 1)[1]


def test_planner_topology_of_each_accelerator(fake_bin):
  """gcloud counts TensorCores (2 per chip) for v2-v5p, chips for v5e/v6e; the planner wants
  the chip grid (v4/v5p as Google's default 3D shapes)."""
  expected = {"v3-8": "v3:2x2", "v3-32": "v3:4x4", "v3-64": "v3:4x8", "v3-512": "v3:16x16",
              "v2-32": "v2:4x4", "v4-8": "v4:2x2x1", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
              "v5p-128": "v5p:4x4x4", "v5litepod-16": "v5e:4x4", "v6e-256": "v6e:16x16"}
  assert {a: _topology(fake_bin, a) for a in expected} == expected


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'); CI has none")
def test_topologies_have_the_accelerators_chip_counts():
  chips = {"v3:4x4": 16, "v3:4x8": 32, "v4:2x2x4": 16, "v5p:2x2x1": 4, "v5e:4x4": 16}
  code = ("import json; from jax.experimental import topologies as t; print(json.dumps({n: "
          "len({tuple(d.coords) for d in t.get_topology_desc(platform='tpu', topology_name=n)"
          f".devices}}) for n in {list(chips)!r}}}))")
  env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.splitlines()[-1]) == chips


def test_local_script_passes_flags_and_devices(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "python").write_text(
      f"#!{sys.executable}\nimport json, os, sys\n"
      "print(json.dumps([sys.argv[1:]] + [os.environ.get(k) for k in "
      "('JAX_PLATFORMS', 'XLA_FLAGS', 'CUDA_VISIBLE_DEVICES')]))\n")
  (fake / "python").chmod(0o755)
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES")}
  env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
  local = lambda *args: subprocess.run([str(ROOT / "launch" / "local.sh"), *args], env=env,
                                       capture_output=True, text=True, timeout=60)
  proc = local("--cpu=8", "--gpus=1", "configs/demo.py", "/tmp/my run", TRICKY[2])
  assert proc.returncode == 0, proc.stderr
  argv, platforms, xla_flags, gpus = json.loads(proc.stdout)
  assert argv == ["-m", "big_transfer.train", "--config=configs/demo.py",
                  "--workdir=/tmp/my run", TRICKY[2]]
  assert platforms == "cpu" and xla_flags.split() == ["--xla_force_host_platform_device_count=8"]
  assert gpus == "1"
  assert json.loads(local("configs/demo.py", "/tmp/w").stdout)[1:] == [None, None, None]
  for args, message in [(["--cpu=x", "c.py", "w"], "not a device count"),
                        (["c.py"], "CONFIG and WORKDIR are required"),
                        (["--fast", "c.py", "w"], "unknown option --fast")]:
    proc = local(*args)
    assert proc.returncode == 1 and message in proc.stderr.strip().splitlines()[-1]
