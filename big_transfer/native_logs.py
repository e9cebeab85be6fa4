"""TensorFlow's import-time notices, kept out of the user's terminal on every CPU.

On some CPUs (seen on AMD EPYC with AVX-512 BF16) importing TensorFlow writes, from C++ and
before absl logging is initialised, "WARNING: All log messages before absl::InitializeLog() is
called are written to STDERR" and "I0000 ... port.cc:153] oneDNN custom operations are on ...".
TF_CPP_MIN_LOG_LEVEL does not reach those lines, and they go to file descriptor 2 directly, so
Python's logging cannot filter them. `import_tensorflow()` imports TensorFlow with descriptor 2
pointed at a temporary file and passes on every line that is not one of these informational
notices: warnings and errors still reach the user. oneDNN itself stays on (it is what makes
TensorFlow's CPU ops fast); only its notice is dropped.

Every module of this package that imports TensorFlow (directly or through tfds or clu) calls
`import_tensorflow()` first; later imports are then no-ops.
"""

import os
import re
import sys
import tempfile

# Informational lines only: absl's pre-initialisation banner and INFO-level ('I') lines from
# TensorFlow's CPU-feature and oneDNN notices. W/E/F lines always pass.
_NOTICES = (
    re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called are "
               r"written to STDERR"),
    re.compile(r"I\d{4} [\d:.]+\s+\d+ (port|cpu_feature_guard)\.cc:\d+\] "),
    re.compile(r"To enable the following instructions: .* rebuild TensorFlow with the "
               r"appropriate compiler flags\.$"),  # cpu_feature_guard's second line.
)


def is_notice(line: str) -> bool:
  """True for one of TensorFlow's informational import notices (see the module docstring)."""
  return any(pattern.match(line) for pattern in _NOTICES)


def import_tensorflow():
  """Imports and returns `tensorflow`, dropping its import-time notices from stderr."""
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # The C++ logs that do honour it.
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      kept = "".join(line for line in lines if not is_notice(line))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()
  return tensorflow
