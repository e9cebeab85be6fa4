"""The pod-scale model: collectives read from compiled HLO against hand counts, the step-time
model and scaling efficiency against hand computations, the `--scaling` CLI.

The HLO checks compile the real training step on the 8 fake CPU devices (no libtpu needed).
"""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from big_transfer import config_common, errors, plan, scaling, sharding
from conftest import ROOT, error_line, run_cli, xla_flags
from configs import bit_m, demo

PARAM_BYTES = 4  # float32 parameters, hence float32 gradients.


def _tiny(**overrides):
  """R14x1 at 16 px, 2 images per device on 8 devices."""
  return config_common.with_overrides(demo.get_config(), {
      "model.name": "R14x1", "batch_size": 16,
      "pp_train": "decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)", **overrides})


def _param_sizes(state_sharding: str) -> tuple[int, int, int]:
  """(elements of split parameters, of replicated ones, number of split arrays) for R14x1."""
  from big_transfer import trainer  # pylint: disable=g-import-not-at-top
  setup = trainer.build(_tiny(state_sharding=state_sharding), sharding.make_mesh(), 10, 16)
  split = replicated = arrays = 0
  for leaf in jax.tree.leaves(setup.abstract_state["params"]):
    if leaf.sharding.spec == jax.sharding.PartitionSpec():
      replicated += leaf.size
    else:
      split, arrays = split + leaf.size, arrays + 1
  return split, replicated, arrays


def _per_kind(plan_result) -> dict[str, scaling.Traffic]:
  return {t.kind: t for t in scaling.summarize(list(plan_result.collectives))}


@pytest.mark.parametrize("batch_split", [1, 2])
def test_replicated_step_all_reduces_every_gradient_once(batch_split):
  """Data parallel: one all-reduce of all gradients (and the loss) per step over the 8
  devices, also when the batch is split (shard_map: one pmean after the micro-batch loop)."""
  compiled = plan.compile_step(_tiny(batch_split=batch_split), plan.local_target())
  split, replicated, _ = _param_sizes("replicated")
  assert split == 0 and replicated == 8_028_746  # R14x1 with a 10-class head.
  kinds = _per_kind(compiled)
  assert list(kinds) == ["all-reduce"]
  all_reduce = kinds["all-reduce"]
  assert all_reduce.bytes == PARAM_BYTES * (replicated + 1)  # Gradients + the loss.
  assert all_reduce.group_sizes == (8,) and all_reduce.executions == 1
  assert all_reduce.ring_bytes == pytest.approx(2 * 7 / 8 * all_reduce.bytes)


@pytest.mark.parametrize("batch_split", [1, 2])
def test_fsdp_step_gathers_parameters_and_reduce_scatters_gradients(batch_split):
  """FSDP: every split parameter all-gathered and its gradient reduce-scattered (per
  micro-batch); the small replicated parameters' gradients all-reduced once per step with
  the loss and, for the global gradient norm, one partial sum of squares per split array.
  XLA:CPU gathers once per step: the parameters do not change between micro-batches."""
  compiled = plan.compile_step(_tiny(state_sharding="fsdp", batch_split=batch_split),
                               plan.local_target())
  split, replicated, arrays = _param_sizes("fsdp")
  assert split > 0.99 * 8_028_746 and arrays == 16
  kinds = _per_kind(compiled)
  assert list(kinds) == ["all-reduce", "all-gather", "reduce-scatter"]
  assert kinds["all-gather"].bytes == PARAM_BYTES * split
  assert kinds["reduce-scatter"].bytes == PARAM_BYTES * split * batch_split
  assert kinds["all-reduce"].bytes == PARAM_BYTES * (replicated + 1 + arrays)
  assert all(t.group_sizes == (8,) for t in kinds.values())
  # A ring moves 7/8 of each gathered or scattered buffer: half an all-reduce of the same.
  assert kinds["reduce-scatter"].ring_bytes == pytest.approx(7 / 8 * 4 * split * batch_split)


HLO = """HloModule step, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[64])) -> pred[] {
  %p = (s32[], f32[64]) parameter(0)
  %limit = s32[]{:T(256)} constant(3)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (p.1: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p.1 = (s32[], f32[64]) parameter(0)
  %x = f32[64]{0} get-tuple-element(%p.1), index=1
  %rs = bf16[8]{0:T(256)} reduce-scatter(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add
  %ag-start = (bf16[8]{0}, bf16[64]{0}) all-gather-start(%rs), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %ag-done = bf16[64]{0} all-gather-done(%ag-start)
  ROOT %t = (s32[], f32[64]) tuple(%i, %x)
}

ENTRY %main () -> f32[] {
  %init = (s32[], f32[64]) tuple()
  %loop = (s32[], f32[64]) while(%init), condition=%cond, body=%body
  %loop2 = (s32[], f32[64]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %ar = (f32[10,10]{1,0}, f32[]) all-reduce(%a, %b), channel_id=3, replica_groups=mesh['x'=2,'y'=4] {'y'}, to_apply=%add
  %cp = f32[16]{0} collective-permute-start(%a), channel_id=4, source_target_pairs={{0,1},{1,2},{2,0}}
  ROOT %r = f32[] constant(0)
}
"""


def test_hlo_parsing_by_hand():
  """Group formats (iota, explicit, mesh axes, permute pairs), asynchronous pairs counted
  once, reduce-scatter counted by its input, loop bodies by their trip count (3 from the
  condition, 5 from the compiler's known_trip_count)."""
  found = scaling.collectives(HLO)
  by_kind = {c.kind: c for c in found if c.kind != "reduce-scatter"}
  scatters = [c for c in found if c.kind == "reduce-scatter"]
  assert len(found) == 4 and len(scatters) == 1
  assert scatters[0] == scaling.Collective("reduce-scatter", 2 * 8 * 8, 8, count=3 + 5)
  assert by_kind["all-gather"] == scaling.Collective("all-gather", 2 * 64, 4, count=8)
  assert by_kind["all-reduce"] == scaling.Collective("all-reduce", 4 * 101, 4, count=1)
  assert by_kind["collective-permute"] == scaling.Collective("collective-permute", 64, 3)
  assert by_kind["collective-permute"].ring_bytes == 64
  assert scaling.Collective("all-reduce", 100, 1).ring_bytes == 0  # Alone: nothing to send.


def test_step_time_by_hand():
  # 1 TFLOP at 100 TFLOP/s and 50% MFU: 20 ms (10 ms at peak); 9 GB at 900 GB/s: 10 ms.
  # Ring traffic over 4 devices: all-reduce of 1 GB 2*3/4 GB, all-gather of 1 GB 3/4 GB,
  # permute of 0.1 GB all of it = 2.35 GB at 100 GB/s: 23.5 ms.
  found = [scaling.Collective("all-reduce", 10 ** 9, 4),
           scaling.Collective("all-gather", 10 ** 9, 4),
           scaling.Collective("collective-permute", 10 ** 8, 2)]
  ring = sum(t.ring_bytes for t in scaling.summarize(found))
  assert ring == pytest.approx(2.35e9)
  time = scaling.step_time(1e12, 9e9, ring, 100e12, 900e9, 100e9, mfu=0.5)
  assert (time.compute_at_peak, time.compute, time.hbm, time.communication) == pytest.approx(
      (0.010, 0.020, 0.010, 0.0235))
  assert time.overlapped == pytest.approx(0.0235) and time.bound == "interconnect"
  assert time.serial == pytest.approx(0.0435)
  slow_compute = scaling.step_time(1e12, 9e9, ring, 100e12, 900e9, 100e9, mfu=0.1)
  assert slow_compute.bound == "compute" and slow_compute.overlapped == pytest.approx(0.1)
  with pytest.raises(ValueError, match="MFU"):
    scaling.step_time(1, 1, 1, 1, 1, 1, mfu=0)


def _point(devices, batch_per_device, communication, generation="v3"):
  """Per device: 1 GFLOP per image at 1 TFLOP/s (MFU 1), 1 ms per image; `communication`
  seconds of ring traffic (bytes at 1 byte/s); 2 devices per chip."""
  flops = 1e9 * batch_per_device
  time = scaling.step_time(flops, 0, communication, 1e12, 1e12, 1.0, mfu=1)
  return scaling.Point(f"{generation}-{devices}", generation, devices, devices // 2,
                       batch_per_device, 1, None, flops, 0, time=time)


def test_efficiency_is_one_without_communication():
  weak = scaling.scaling_rows([_point(n, 8, 0) for n in (8, 32, 128)], schedule_images=None)
  strong = scaling.scaling_rows([_point(n, 1024 // n, 0) for n in (8, 32, 128)], None)
  for rows in (weak, strong):
    assert [r.efficiency for r in rows] == pytest.approx([1.0, 1.0, 1.0])
    assert all(math.isnan(r.schedule_hours) for r in rows)
  assert [r.img_per_s for r in strong] == pytest.approx([8000, 32000, 128000])  # 1 ms/image.


def test_efficiency_and_schedule_time_by_hand():
  # Strong scaling of 1024 images: 8 devices x 128 ms compute, 6 ms of ring traffic (hidden);
  # 64 devices x 16 ms compute, 24 ms of traffic: interconnect-bound, 24 ms per step.
  rows = scaling.scaling_rows([_point(8, 128, 0.006), _point(64, 16, 0.024),
                               _point(64, 16, 0.0, generation="v4")],
                              schedule_images=3600 * 1024 / 0.024)
  assert rows[0].img_per_s == pytest.approx(1024 / 0.128)
  assert rows[0].img_per_s_serial == pytest.approx(1024 / 0.134)
  assert rows[1].img_per_s == pytest.approx(1024 / 0.024)
  assert rows[1].efficiency == pytest.approx((1024 / 0.024 / 64) / (1024 / 0.128 / 8))
  assert rows[1].schedule_hours == pytest.approx(1.0) and rows[1].chip_hours == 32
  assert rows[2].efficiency == 1.0  # Another generation: its own baseline.
  unfit = scaling.Point("v3-big", "v3", 512, 256, 2, None, 16)
  assert math.isnan(scaling.scaling_rows([unfit], None)[0].img_per_s)
  assert "| v3-big | 512 (256) | 2 | OOM |" in scaling.table(scaling.scaling_rows([unfit], None))


def test_table_and_plot(tmp_path):
  rows = scaling.scaling_rows([_point(8, 128, 0.006), _point(64, 16, 0.024)], 1e9)
  text = scaling.table(rows)
  assert text.count("\n") == 3 and "| interconnect |" in text and "| compute |" in text
  path = tmp_path / "scaling.png"
  scaling.plot({"strong": rows, "weak": rows}, str(path), "test")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_images_of_bit_m():
  # 90 epochs of ImageNet-21k at batch 4096: 311,948 steps (configs/bit_m.py).
  config = bit_m.get_config()
  assert plan.schedule_images(config, 14_197_122) == 311_948 * 4096
  assert plan.schedule_images(config, None) is None
  steps = config_common.with_overrides(config, {"total_steps": 10})
  assert plan.schedule_images(steps, None) == 40_960


def _run_plan(*flags):
  env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
  env.pop("JAX_PLATFORMS", None)
  cmd = [sys.executable, "-m", "big_transfer.plan", f"--config={ROOT}/configs/demo.py",
         "--config.model.name=R14x1", "--config.batch_size=16",
         "--config.pp_train=decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)",
         *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_scaling_bad_topology_is_one_line():
  """In this process (conftest.run_cli): the real command runs in test_plan.py and, with
  libtpu, test_scaling_cli_end_to_end."""
  proc = run_cli(f"--config={ROOT}/configs/demo.py", "--scaling=v9:1x1", module="plan")
  assert error_line(proc).startswith("error: Cannot make TPU topology 'v9:1x1'")


def test_scaling_refuses_an_mfu_outside_0_1():
  with pytest.raises(errors.UserError, match=r"^--mfu must be in \(0, 1\], got 1.5.$"):
    plan.run_scaling(_tiny(), ["v3:2x2"], 1.5, None, "unused.png", None)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'); CI has none")
def test_scaling_cli_end_to_end(tmp_path):
  plot_path = tmp_path / "plot.png"
  proc = _run_plan("--scaling=v3:2x2", f"--scaling_plot={plot_path}", "--mfu=0.5")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "Strong scaling (global batch 16):" in out and "Weak scaling (2 per device):" in out
  assert out.count("compiled v3:2x2") == 1  # Weak and strong coincide: one compile.
  row = next(line for line in out.splitlines() if line.startswith("| v3:2x2 |"))
  assert "| 8 (4) | 2 |" in row and "AR 32 MB/8" in row and row.endswith("| 1.00 | - | - |")
  assert plot_path.read_bytes()[:4] == b"\x89PNG"
  assert np.isfinite(float(row.split("|")[13].replace(",", "")))  # img/s.
