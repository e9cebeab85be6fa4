"""glibc malloc settings for training on CPU: keep each step's buffers mapped between steps.

XLA:CPU allocates a step's temporary buffers (1.0 GiB for R50x1 at 128 px, batch 32) with
posix_memalign from its worker threads and frees them when the step ends. glibc serves an
allocation that large from a thread's arena with a fresh mmap() and unmaps it on free, so every
step faults the memory back in and the kernel zeroes it again: 280,000 page faults and 0.55 CPU
seconds of a 4.3 CPU-second step (docs/performance.md). With one arena that never maps nor trims,
the memory stays mapped and is reused; transparent huge pages for it (`glibc.malloc.hugetlb=1`,
where the kernel's THP mode is `madvise` or `always`) also spare TLB misses. The step then takes
3.6 instead of 4.3 CPU seconds; the process keeps its peak memory until it exits (the R50x1
benchmark's max RSS 4.97 GB, 3.0 GB without).

glibc reads these tunables only when a process starts, so the CPU entry points (`train`,
`benchmark`, `predict`, `fewshot`: their forward passes allocate the same way) re-execute
themselves once with GLIBC_TUNABLES set, before they import JAX or TensorFlow. They leave any
GLIBC_TUNABLES you set alone (set it, even empty, to keep glibc's defaults) and do nothing where
JAX will use an accelerator: one arena would serialise the input pipeline's many threads on a
TPU or GPU host.
"""

import glob
import os
import platform
import sys

TUNABLES = ":".join((
    "glibc.malloc.arena_max=1",  # XLA's worker threads allocate from the main arena...
    "glibc.malloc.mmap_max=0",  # ...which grows the heap instead of mapping big blocks...
    f"glibc.malloc.trim_threshold={2**62}",  # ...and never returns the freed top to the kernel.
    "glibc.malloc.hugetlb=1",  # madvise(MADV_HUGEPAGE) on what it maps.
))
# Device files of the accelerators JAX would pick before the CPU: TPU (accel, vfio), NVIDIA, AMD.
ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def runs_on_cpu(environ) -> bool:
  """Whether JAX will compute on the CPU, decided before JAX starts: JAX_PLATFORMS if set,
  else whether the machine has no accelerator device files."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def on_glibc() -> bool:
  """Whether this process runs on Linux with glibc, the C library these tunables are for."""
  return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def cpu_environment(environ) -> dict[str, str] | None:
  """The environment to re-execute with, or None where nothing should change."""
  if not on_glibc() or "GLIBC_TUNABLES" in environ or not runs_on_cpu(environ):
    return None
  return {**environ, "GLIBC_TUNABLES": TUNABLES}


def reexec_for_cpu() -> None:
  """Replaces this process with itself under the CPU tunables (same command line, same PID,
  same open files), where `cpu_environment` says so. Call it in `__main__` before importing
  JAX or TensorFlow, which would otherwise load twice."""
  environ = cpu_environment(os.environ)
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def tuned() -> bool:
  """Whether this process runs with the CPU tunables."""
  return os.environ.get("GLIBC_TUNABLES") == TUNABLES
