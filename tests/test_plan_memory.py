"""The planner's arithmetic on made-up compiler numbers and fake TPU devices: no libtpu, no
compile. What a device holds and computes comes from Google's per-chip figures (TPU v3: 32 GiB
HBM and 123 bf16 TFLOP/s per chip of 2 TensorCores, each a JAX device; TPU v4: 32 GiB and 275
TFLOP/s per chip, one megacore device, unless a topology lists both cores)."""

import types

import jax
import pytest
from jax.experimental import topologies

from big_transfer import config_common, plan, scaling
from configs import demo

GiB = plan.GiB


def _devices(kind: str, chips: int, cores_per_chip: int):
  """Fake devices as a topology description lists them: cores of a chip share its coords."""
  return [types.SimpleNamespace(id=chip * cores_per_chip + core, device_kind=kind,
                                coords=(chip % 2, chip // 2, 0), core_on_chip=core)
          for chip in range(chips) for core in range(cores_per_chip)]


@pytest.fixture
def fake_topology(monkeypatch):
  """tpu_target("v3:2x2") etc. answered from fake descriptions, as libtpu would."""
  kinds = {"v3:2x2": ("TPU v3", 4, 2), "v4:2x2x1": ("TPU v4", 4, 1),
           "v4:2x2x1/cores": ("TPU v4", 4, 2)}

  def describe(platform, topology_name):
    assert platform == "tpu"
    return types.SimpleNamespace(devices=_devices(*kinds[topology_name]))

  monkeypatch.setattr(topologies, "get_topology_desc", describe)


@pytest.mark.parametrize("topology, description, hbm_gib, tflops", [
    ("v3:2x2", "v3:2x2: 8 devices (TPU v3, 2 per chip)", 16, 61.5),
    ("v4:2x2x1", "v4:2x2x1: 4 devices (TPU v4, 1 per chip)", 32, 275),
    ("v4:2x2x1/cores", "v4:2x2x1/cores: 8 devices (TPU v4, 2 per chip)", 16, 137.5),
], ids=["v3", "v4", "v4-both-cores"])
def test_capacity_and_peak_are_per_device(fake_topology, topology, description, hbm_gib, tflops):
  target = plan.tpu_target(topology)
  assert target.description == description
  assert target.hbm_bytes == hbm_gib * GiB
  assert target.peak_flops == pytest.approx(tflops * 1e12)
  overridden = plan.tpu_target(topology, hbm_bytes=10 * GiB)  # --hbm_gib wins.
  assert overridden.hbm_bytes == 10 * GiB and overridden.peak_flops == target.peak_flops


def test_unknown_devices_have_no_capacity_unless_given():
  devices = _devices("cpu", 2, 1)
  target = plan._target  # pylint: disable=protected-access
  assert target("local cpu", devices, None).hbm_bytes is None
  assert target("local cpu", devices, None).peak_flops is None
  assert target("local cpu", devices, 3 * GiB).hbm_bytes == 3 * GiB


def _memory(temporaries_gib: float) -> plan.Memory:
  """A step whose new state (8.5 GiB of its 9 GiB of outputs) is written over the donated
  state: arguments 10 + outputs 9 - aliased 8.5 + temporaries + program 0.25."""
  gib = lambda x: int(x * GiB)
  return plan.Memory(arguments=gib(10), outputs=gib(9), aliased=gib(8.5),
                     temporaries=gib(temporaries_gib), code=gib(0.25), live_peak=gib(12))


def test_total_counts_aliased_outputs_once():
  memory = _memory(4)
  assert memory.total == int(10 * GiB) + int(9 * GiB) - int(8.5 * GiB) + 4 * GiB + GiB // 4
  step = plan.Plan(8, 1.0, memory, 1e12)
  assert step.fits(memory.total) and not step.fits(memory.total - 1)
  assert step.fits(None)  # No capacity known: no verdict against it.
  assert not plan.Plan(8, 1.0, out_of_memory="RESOURCE_EXHAUSTED").fits(None)


def _config():
  return config_common.with_overrides(demo.get_config(), {
      "batch_size": 64, "pp_train": "decode|resize(18)|random_crop(16)|value_range(-1, 1)"})


@pytest.mark.parametrize("temporaries, verdict, tight", [
    (4.0, "-> FITS, headroom 1.25 GiB (8%)", False),  # 14.75 of 16 GiB.
    (4.8, "-> FITS, headroom 0.45 GiB (3%)", True),  # 15.55: under 5% headroom.
    (6.0, "-> DOES NOT FIT, headroom -0.75 GiB (-5%)", False),
], ids=["fits", "tight", "does-not-fit"])
def test_report_on_a_v3_core(fake_topology, temporaries, verdict, tight):
  target = plan.tpu_target("v3:2x2")
  text = plan.report(_config(), target, plan.Plan(8, 2.0, _memory(temporaries), 1e12))
  words = " ".join(text.split())
  total = 10 + 9 - 8.5 + temporaries + 0.25
  assert f"total {total:.2f} GiB peak" in words, text
  assert f"capacity 16.00 GiB {verdict}" in words, text
  assert ("TIGHT: under 5% headroom" in text) == tight
  # 1e12 FLOPs per device at 61.5 TFLOP/s: 16.3 ms, 8 x 8 images in that time.
  assert "At peak (61.5 TFLOP/s per device): 16.3 ms per step, 3,936 img/s (492 per device)" \
      in text, text


def test_compiler_numbers_reach_the_plan(monkeypatch):
  """compile_step reads each of the compiler's figures into its own field, and scales the
  FLOPs of the scanned micro-batch by batch_split (the compile itself is faked)."""
  stats = types.SimpleNamespace(argument_size_in_bytes=11, output_size_in_bytes=13,
                                alias_size_in_bytes=5, temp_size_in_bytes=17,
                                generated_code_size_in_bytes=3, peak_memory_in_bytes=19)
  outcome = {}

  class Compiled:
    def memory_analysis(self):
      return stats

    def cost_analysis(self):
      return {"flops": 1000.0}

    def as_text(self):  # One all-reduce of 4 floats over every device, once per step.
      return ("ENTRY %main () -> f32[4] {\n"
              "  ROOT %ar = f32[4]{0} all-reduce(%g), channel_id=1, to_apply=%add\n}\n")

  def compile_():
    if "error" in outcome:
      raise outcome["error"]
    return Compiled()

  lowered = types.SimpleNamespace(compile=compile_)
  fake_setup = types.SimpleNamespace(abstract_state={}, train_step=types.SimpleNamespace(
      lower=lambda state, batch: lowered))
  monkeypatch.setattr(plan.trainer, "build", lambda *args, **kwargs: fake_setup)
  target = plan.local_target()
  config = config_common.with_overrides(_config(), {"batch_size": 8 * jax.device_count(),
                                                    "batch_split": 4})
  result = plan.compile_step(config, target)
  assert result.memory == plan.Memory(11, 13, 5, 17, 3, 19)
  assert result.memory.total == 11 + 13 - 5 + 17 + 3
  assert result.flops == 4000.0 and result.batch_per_device == 8
  assert result.collectives == (scaling.Collective("all-reduce", 16, jax.device_count()),)
  outcome["error"] = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in hbm")
  refused = plan.compile_step(config, target)
  assert refused.memory is None and not refused.fits(None)
  assert refused.out_of_memory.startswith("RESOURCE_EXHAUSTED")
