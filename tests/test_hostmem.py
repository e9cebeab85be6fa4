"""When the CPU entry points re-execute themselves with glibc malloc tunables (hostmem.py).

The effect itself (no page faults per step) is checked on the benchmark command's own run in
test_benchmark.py::test_json_figures_are_consistent.
"""

import os
import subprocess
import sys

import pytest

from big_transfer import hostmem


@pytest.fixture
def glibc_linux(monkeypatch):
  monkeypatch.setattr(hostmem.sys, "platform", "linux")
  monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("glibc", "2.36"))


@pytest.fixture
def no_accelerator(monkeypatch):
  monkeypatch.setattr(hostmem.glob, "glob", lambda pattern: [])


def test_cpu_gets_the_tunables_and_keeps_the_rest_of_the_environment(glibc_linux,
                                                                      no_accelerator):
  environ = hostmem.cpu_environment({"PATH": "/bin", "JAX_PLATFORMS": "cpu"})
  assert environ == {"PATH": "/bin", "JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": hostmem.TUNABLES}
  assert hostmem.cpu_environment({"PATH": "/bin"})["GLIBC_TUNABLES"] == hostmem.TUNABLES
  assert "glibc.malloc.arena_max=1" in hostmem.TUNABLES.split(":")


@pytest.mark.parametrize("environ", [
    {"GLIBC_TUNABLES": ""},  # The user's own choice, even glibc's defaults, is kept...
    {"GLIBC_TUNABLES": hostmem.TUNABLES},  # ...and the re-executed process does not loop.
    {"JAX_PLATFORMS": "tpu"},
    {"JAX_PLATFORMS": "cuda,cpu"},
])
def test_left_alone(glibc_linux, no_accelerator, environ):
  assert hostmem.cpu_environment(environ) is None


def test_an_accelerator_device_file_means_not_cpu(glibc_linux, monkeypatch):
  monkeypatch.setattr(hostmem.glob, "glob",
                      lambda pattern: ["/dev/accel0"] if pattern == "/dev/accel*" else [])
  assert hostmem.cpu_environment({}) is None
  assert hostmem.cpu_environment({"JAX_PLATFORMS": "cpu"}) is not None  # Asked for the CPU.


def test_other_c_libraries_are_left_alone(no_accelerator, monkeypatch):
  monkeypatch.setattr(hostmem.sys, "platform", "linux")
  monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("", ""))  # e.g. musl.
  assert hostmem.cpu_environment({"JAX_PLATFORMS": "cpu"}) is None
  monkeypatch.setattr(hostmem.sys, "platform", "darwin")
  monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("glibc", "2.36"))
  assert hostmem.cpu_environment({"JAX_PLATFORMS": "cpu"}) is None


# What XLA:CPU does each step, in miniature: a long-lived worker thread allocates a big buffer,
# writes it and frees it. Prints the page faults of each writing. (malloc, where XLA calls
# posix_memalign: its alignment slack makes a lone freed block of the same size too small to
# reuse, which the other buffers of a step freed beside it cure in XLA.)
_STEP_ALLOCATIONS = """
import ctypes, resource, threading
libc = ctypes.CDLL("libc.so.6")
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: count faults in 4 KiB pages everywhere.
size, faults = 256 << 20, []
def steps():
  for _ in range(3):
    libc.malloc.restype = ctypes.c_void_p
    buffer = libc.malloc(ctypes.c_size_t(size))
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(buffer, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    libc.free(ctypes.c_void_p(buffer))
worker = threading.Thread(target=steps)
worker.start()
worker.join()
print(*faults)
"""


@pytest.mark.skipif(not hostmem.on_glibc(), reason="glibc tunables")
def test_the_tunables_keep_a_threads_freed_buffer_mapped():
  def faults(tunables: str) -> list[int]:
    env = {**os.environ, "GLIBC_TUNABLES": tunables}
    out = subprocess.run([sys.executable, "-c", _STEP_ALLOCATIONS], env=env, check=True,
                         capture_output=True, text=True).stdout
    return [int(n) for n in out.split()]
  pages = (256 << 20) // 4096
  default = faults("")
  assert min(default) > pages // 2, default  # glibc maps and unmaps it each time...
  tuned = faults(hostmem.TUNABLES)
  assert tuned[0] > pages // 2 and max(tuned[1:]) < 100, tuned  # ...the tunables keep it.


# Installed as sitecustomize in the entry point's process: at its os.exec* call, records the
# environment's GLIBC_TUNABLES and which heavy libraries are already imported, then exits
# instead of executing (the re-executed process is the entry point itself, not under test here).
_EXEC_PROBE = """
import os, sys
def _probe(event, args):
  if event == "os.exec":
    loaded = [m for m in ("jax", "tensorflow", "flax") if m in sys.modules]
    print("exec", dict(args[2]).get("GLIBC_TUNABLES"), *loaded, flush=True)
    os._exit(0)
sys.addaudithook(_probe)
"""


@pytest.mark.skipif(not hostmem.on_glibc(), reason="glibc tunables")
@pytest.mark.parametrize("entry_point", ["train", "benchmark", "predict", "fewshot"])
def test_entry_points_reexecute_before_loading_jax_or_tensorflow(entry_point, tmp_path):
  (tmp_path / "sitecustomize.py").write_text(_EXEC_PROBE)
  env = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
  proc = subprocess.run([sys.executable, "-m", f"big_transfer.{entry_point}", "--help"],
                        env=env, capture_output=True, text=True, timeout=120)
  # One exec, under the tunables, with none of the libraries loaded that would load twice.
  assert proc.stdout.splitlines() == [f"exec {hostmem.TUNABLES}"], proc.stdout + proc.stderr
