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


def _paper_schedule(config_module, num_examples):
  config = config_module.get_config()
  durations = optim.Durations(num_examples, config.batch_size)
  total = durations(config, "total")
  return total, optim.make_schedule(config, durations, total)


@pytest.mark.parametrize("name, num_examples, total, boundaries", [
    # 90 epochs, /10 at 30, 60, 80: e.g. 30 * 1281167 / 4096 = 9383.5 -> 9384.
    ("bit_s", 1_281_167, 28151, (9384, 18767, 25023)),
    ("bit_m", 14_197_122, 311948, (103983, 207966, 277288)),
    # 40 epochs, /10 at 10, 23, 30, 37 of a 300M-image dataset.
    ("bit_l", 300_000_000, 2929688, (732422, 1684570, 2197266, 2709961)),
])
def test_upstream_schedules_at_boundaries(name, num_examples, total, boundaries):
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  steps, schedule = _paper_schedule(module, num_examples)
  assert steps == total
  peak = 0.03 * 4096 / 256  # 0.48
  expected = {0: peak / 5000, 2499: peak / 2, 4999: peak, 5000: peak}
  for i, b in enumerate(boundaries):
    expected[b - 1] = peak * 0.1 ** i
    expected[b] = peak * 0.1 ** (i + 1)
  expected[total - 1] = peak * 0.1 ** len(boundaries)
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5, err_msg=f"{name} {step}")


@pytest.mark.parametrize("warmup, decays, total", [
    (100, (200, 300, 400), 500),  # < 20k examples.
    (500, (3000, 6000, 9000), 10_000),  # 20k - 500k.
    (500, (6000, 12000, 18000), 20_000),  # >= 500k.
])
def test_hyperrule_schedules_at_boundaries(warmup, decays, total):
  """BiT-HyperRule: lr 0.003 at batch 512, the paper's three regimes (§3.3)."""
  config = ml_collections.ConfigDict({
      "lr": 0.003, "lr_batch_ref": 512, "batch_size": 512, "total_steps": total,
      "schedule": {"kind": "stair", "decay_factor": 0.1, "warmup_steps": warmup,
                   "decay_steps": decays}})
  schedule = optim.make_schedule(config, optim.Durations(50_000, 512), total)
  expected = {0: 0.003 / warmup, warmup // 2 - 1: 0.0015, warmup - 1: 0.003,
              decays[0] - 1: 0.003, decays[0]: 3e-4, decays[1] - 1: 3e-4, decays[1]: 3e-5,
              decays[2] - 1: 3e-5, decays[2]: 3e-6, total - 1: 3e-6}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5, err_msg=f"step {step}")
