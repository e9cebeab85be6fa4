"""Config overrides: ml_collections sets them (config_flags on the command line,
ConfigDict.update_from_flattened_dict in code); the CLI only words its errors.

The CLI's own bad-input lines are in test_bad_input.py.
"""

from absl import flags
import pytest

from big_transfer import config_common, plan, train
from configs import demo
from conftest import ROOT, error_line, run_cli


def test_with_overrides_sets_dotted_keys_on_a_copy():
  config = demo.get_config()
  before = config.to_json()
  changed = config_common.with_overrides(config, {
      "batch_size": 32, "model.name": "R14x1", "schedule.decay_steps": (2, 3),
      "total_steps": None})
  assert (changed.batch_size, changed.model.name, changed.schedule.decay_steps,
          changed.total_steps) == (32, "R14x1", (2, 3), None)
  assert config.to_json() == before


@pytest.mark.parametrize("key, message", [
    ("batch_sise", 'Did you mean "batch_size"'),
    ("model.nme", 'Did you mean "name"'),
    ("warmup_steps", 'Key "warmup_steps" does not exist'),  # It is schedule.warmup_steps.
    ("sched.kind", 'Key "sched.kind" cannot be set as "sched" was not found.'),
])
def test_with_overrides_refuses_an_unknown_key(key, message):
  """As --config.key=value would: a typo is an error, not a new key nobody reads."""
  with pytest.raises(KeyError, match=message):
    config_common.with_overrides(demo.get_config(), {key: 1})


def test_with_overrides_keeps_the_types():
  with pytest.raises(TypeError, match="sixteen is of original type <class 'str'> and cannot be "
                     "casted to type <class 'int'>"):
    config_common.with_overrides(demo.get_config(), {"batch_size": "sixteen"})


@pytest.mark.parametrize("flag, named", [
    # config_flags' own error names only 'nme', and suggests nothing for keys one level off.
    ("--config.model.nme=R14x1", "'model.nme' (closest: model.name, model.dtype"),
    ("--config.warmup_steps=5", "'warmup_steps' (closest: schedule.warmup_steps"),
    ("--config.no_such_key=1", "'no_such_key'; valid: batch_size, batch_split, cache"),
])
def test_an_unknown_key_is_named_in_full_with_the_closest(tmp_path, flag, named):
  proc = run_cli(f"--config={ROOT}/configs/demo.py", flag, f"--workdir={tmp_path / 'run'}")
  line = error_line(proc)
  assert line.startswith(f"error: Unknown config key {named}")
  assert ", schedule.warmup_steps, seed, " in line  # Every key is listed.
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", [train, plan])
def test_help_lists_the_config_flag(module):
  """`python -m big_transfer.train --help` shows --config, defined in cli.py."""
  assert "--config: Config file, `configs/NAME.py[:arg]`" in flags.FLAGS.module_help(module)
