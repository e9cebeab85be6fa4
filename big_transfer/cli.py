"""Command-line config handling shared by the entry points.

`--config=configs/NAME.py[:arg]` plus `--config.key=value` overrides (ml_collections config
flags, locked so that a typo is an error). Any problem with them ends the program with one
line naming the problem and the valid choices, not a traceback.
"""

import difflib
import importlib.util
import os
import sys
import traceback

from absl import flags
from flax import traverse_util
from ml_collections import config_dict, config_flags

from big_transfer.errors import UserError

CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file, `configs/NAME.py[:arg]`; override fields with --config.key=value.",
    lock_config=True)


def _load(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _override_error(argv: list[str], error: Exception) -> str:
  """The one-line message for a bad `--config...` flag.

  config_flags' own errors name only an unknown key's last part ('nme' for model.nme) and
  embed the config file's traceback over many lines, so the file is run again here, as a
  fresh module (config_flags reloads under one module name: in a process that loaded another
  config, a file without get_config would silently get the previous file's).
  """
  specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if not specs:
    return "--config=configs/NAME.py is required."
  spec = specs[-1]
  path = spec.partition(":")[0]
  if not os.path.exists(path):
    return f"Config file {path!r} not found."
  try:
    keys = list(traverse_util.flatten_dict(_load(spec).to_dict(), sep="."))
  except UserError as e:  # get_config refused its argument (e.g. an unknown task).
    return f"{spec}: {e}"
  except Exception as e:  # pylint: disable=broad-except  (any error of the user's file)
    where = next((f" (line {frame.lineno})" for frame in reversed(traceback.extract_tb(
        e.__traceback__)) if os.path.abspath(frame.filename) == os.path.abspath(path)), "")
    reason = " ".join(str(e).split())[:200]
    return (f"Config file {path!r} raised {type(e).__name__}{where}: {reason}; fix the file "
            "(it must define get_config(arg=None) returning a ConfigDict).")
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      key = a[len("--config."):].split("=", 1)[0]
      if key not in keys:  # Close across levels too (warmup_steps: schedule.warmup_steps).
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f" (closest: {', '.join(close)})" if close else ""
        return f"Unknown config key {key!r}{hint}; valid: {', '.join(keys)}."
  return f"Bad config flag: {str(error).splitlines()[0].strip(chr(39) + chr(34))}"


def parse_flags(argv: list[str]) -> list[str]:
  """An absl `flags_parser`: parses argv, exiting with one line on a bad config."""
  try:
    argv = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f"error: {_override_error(argv, e)}")
  if CONFIG.value is None or not isinstance(CONFIG.value, config_dict.ConfigDict):
    sys.exit(f"error: {_override_error(argv, ValueError('could not load the config'))}")
  return argv
