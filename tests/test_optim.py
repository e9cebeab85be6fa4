"""Schedules and durations against values computed by hand."""

import ml_collections
import numpy as np
import pytest

from big_transfer import optim
from big_transfer.errors import UserError


def _config(**schedule):
  config = ml_collections.ConfigDict({
      "lr": 0.03, "lr_batch_ref": 256, "batch_size": 64, "total_epochs": 12.0,
      "schedule": {"kind": "stair", "decay_factor": 0.1, **schedule}})
  return config


def test_durations_units_and_precedence():
  durations = optim.Durations(num_examples=1437, batch_size=64)
  config = ml_collections.ConfigDict({"total_epochs": 12.0, "decay_epochs": (6, 9, 11)})
  assert durations(config, "total") == 269  # round(12 * 1437 / 64) = round(269.4)
  assert durations(config, "decay") == (135, 202, 247)  # 134.7, 202.1, 247.0
  config.total_examples = 6400
  assert durations(config, "total") == 100
  config.total_steps = 7  # Steps win over examples and epochs.
  assert durations(config, "total") == 7
  assert durations(config, "warmup", required=False) is None
  with pytest.raises(UserError, match="Set one of warmup_steps"):
    durations(config, "warmup")


def test_stair_schedule_at_boundaries():
  config = _config(warmup_steps=20, decay_epochs=(6, 9, 11))
  durations = optim.Durations(num_examples=1437, batch_size=64)
  schedule = optim.make_schedule(config, durations, total_steps=269)
  base = 0.03 * 64 / 256  # 0.0075
  expected = {
      0: base / 20,  # The first update is not lr = 0 (official bug #58).
      1: base * 2 / 20,
      18: base * 19 / 20,
      19: base, 134: base,  # "/10 after b updates": update index s >= b is decayed.
      135: base / 10, 201: base / 10,
      202: base / 100, 246: base / 100,
      247: base / 1000, 268: base / 1000,
  }
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, err_msg=f"step {step}")


def test_cosine_schedule():
  config = _config(warmup_steps=10)
  config.schedule.kind = "cosine"
  schedule = optim.make_schedule(config, optim.Durations(1000, 64), total_steps=110)
  base = 0.0075
  np.testing.assert_allclose(float(schedule(0)), base / 10, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(9)), base, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), base, rtol=1e-6)  # Cosine starts at warmup.
  np.testing.assert_allclose(float(schedule(60)), base / 2, rtol=1e-5)  # Half-way.
  np.testing.assert_allclose(float(schedule(110)), 0.0, atol=1e-9)


def test_weight_decay_mask_selects_kernels():
  params = {"block1": {"unit01": {"a": {"group_norm": {"gamma": 1, "beta": 0},
                                        "standardized_conv2d": {"kernel": 2}}}},
            "head": {"conv2d": {"kernel": 3, "bias": 4}}}
  mask = optim.decay_mask(params, r".*/kernel")
  assert mask["block1"]["unit01"]["a"]["standardized_conv2d"]["kernel"] is True
  assert mask["block1"]["unit01"]["a"]["group_norm"]["gamma"] is False
  assert mask["head"]["conv2d"] == {"kernel": True, "bias": False}
