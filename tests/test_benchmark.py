"""The training-step benchmark command: its JSON, its figures' consistency, its errors.

No timing thresholds: the machine is shared. The timm comparison runs only where an
interpreter with torch and timm is named by BIT_TIMM_PYTHON (none in CI).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, error_line, train_env

from big_transfer import benchmark, hostmem, metrics, models, plan, sharding, trainer
from big_transfer.errors import UserError

KEYS = ("img_per_sec", "step_s", "compile_s", "flops_per_step", "mfu", "peak_bytes", "device")
TINY = ("--model=R14x1", "--resolution=32", "--batch_size=8", "--num_classes=10", "--steps=2",
        "--warmup=1")


def run_benchmark(*flags):
  cmd = [sys.executable, "-m", "big_transfer.benchmark", *flags]
  env = {k: v for k, v in train_env(1).items() if k != "GLIBC_TUNABLES"}  # As users start it.
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _check(result: dict, images: int, flops: float):
  assert all(result[k] is not None for k in KEYS if k != "compile_s"), result
  assert len(result["step_times"]) == 2 and result["step_s"] > 0
  assert result["img_per_sec"] == pytest.approx(images / result["step_s"])
  assert result["flops_per_step"] == pytest.approx(flops)
  assert result["mfu"] == pytest.approx(
      flops / result["step_s"] / result["matmul_peak_flops"])
  assert result["peak_bytes"] > 0


def test_json_figures_are_consistent():
  proc = run_benchmark(*TINY, "--json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  flops = plan.analytic_train_flops("R14x1", (32, 32), 10) * 8
  _check(result, 8, flops)
  assert result["compile_s"] > 0 and "cpu" in result["device"]
  # The compiler counts the same convolutions plus norms, WS and the update: near the model.
  assert 0.9 < result["compiler_flops_per_step"] / flops < 1.5
  assert "ours: " in proc.stdout and "img/s" in proc.stdout and "Load average" in proc.stdout
  # On CPU the command re-executes itself with glibc malloc tunables that keep the step's
  # buffers mapped (big_transfer/hostmem.py): this step faults ~20,000 pages per step without
  # them (GLIBC_TUNABLES= by hand), none with them.
  if hostmem.on_glibc():
    assert f"GLIBC_TUNABLES={hostmem.TUNABLES}" in proc.stdout
    assert result["page_faults"] < 1000, result["page_faults"]


def test_cpu_mesh_builds_the_cpu_form_of_the_model():
  config = benchmark.make_config("R14x1", 8, "float32", "replicated", 1)
  assert trainer.build(config, sharding.make_mesh(), 10, 8).model.for_cpu


def _library_calls(hlo: str) -> dict[str, list[str]]:
  """Opcodes of the computations each `__ynn_fusion` of a compiled HLO module calls."""
  bodies = dict(re.findall(r"^%?([\w.-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S))
  return {callee: re.findall(r"= \S+ ([a-z-]+)\(", bodies.get(callee, ""))
          for callee in re.findall(r"calls=%?([\w.-]+)[^\n]*__ynn_fusion", hlo)}


def test_cpu_step_runs_convolutions_outside_ynnpack(monkeypatch):
  """On CPU devices the step's convolutions are XLA's own (Eigen; YNNPACK's were slower,
  docs/performance.md) while the dots and reductions that jaxlib's default gives YNNPACK on
  this CPU stay YNNPACK fusions."""
  config = benchmark.make_config("R14x1", 8, "float32", "replicated", 1)
  batch = benchmark.synthetic_batch(8, 32, 10)

  def compiled_step():
    hlo = benchmark.OurStep(config, batch, 10).compiled.as_text()
    return hlo, {op for ops in _library_calls(hlo).values() for op in ops}

  hlo, library_ops = compiled_step()
  monkeypatch.setattr(sharding, "_CPU_COMPILER_OPTIONS", {})  # jaxlib's default.
  _, default_library_ops = compiled_step()
  assert {"dot", "reduce"} & default_library_ops <= library_ops, library_ops
  assert "convolution" not in library_ops
  assert len(re.findall(r"= \S+ convolution\(", hlo)) >= 3 * 4  # fwd, dx, dw of 3x3 convs.


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'); CI has none")
def test_tpu_mesh_keeps_the_conv_form():
  """The planner's TPU programs stay as they were: for_cpu is for CPU devices only."""
  config = benchmark.make_config("R14x1", 8, "float32", "replicated", 1)
  mesh = sharding.make_mesh(plan.tpu_target("v3:2x2").devices)
  assert not trainer.build(config, mesh, 10, 8).model.for_cpu
  assert sharding.compiler_options(mesh) is None


@pytest.mark.parametrize("flags, message", [
    (("--vs_timm", "--timm_python=/nonexistent/python"), "cannot be run"),
    # The project's venv has no timm: the worker stops at its import, before any compile.
    (("--vs_timm", f"--timm_python={sys.executable}"), "needs torch and timm"),
])
def test_timm_missing_is_one_line(flags, message):
  assert message in error_line(run_benchmark(*TINY, *flags))


@pytest.mark.parametrize("overrides, message", [
    ({"model": "R50x5"}, "Unknown model 'R50x5'"),
    ({"steps": 0}, "Need --steps >= 1"),
    ({"batch_split": 3}, "batch_split 3 must divide"),
])
def test_bad_input_is_a_user_error(overrides, message):
  kwargs = {"model": "R14x1", "resolution": 32, "batch_size": 8, **overrides}
  with pytest.raises(UserError, match=message):
    benchmark.run(**kwargs)


@pytest.mark.skipif(not os.environ.get("BIT_TIMM_PYTHON"),
                    reason="set BIT_TIMM_PYTHON to an interpreter with torch and timm")
@pytest.mark.parametrize("compile_timm", [False, True])
def test_vs_timm_alternates_on_the_same_batch(compile_timm):
  proc = run_benchmark(*TINY, "--json", "--vs_timm", "--block=1",
                       f"--timm_python={os.environ['BIT_TIMM_PYTHON']}",
                       f"--timm_compile={compile_timm}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  flops = plan.analytic_train_flops("R14x1", (32, 32), 10) * 8
  _check(result["timm"], 8, flops)
  shapes = jax.eval_shape(models.get_model("R14x1", 10).init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  assert result["timm"]["details"]["params"] == sum(x.size for x in jax.tree.leaves(shapes))
  assert result["timm"]["details"]["compiled"] == compile_timm
  assert result["ratio_vs_timm"] == pytest.approx(
      result["img_per_sec"] / result["timm"]["img_per_sec"])
  assert "Ratio ours / timm" in proc.stdout
  steps = len(result["step_times"])
  assert steps == len(result["timm"]["step_times"]) and 0 <= result["faster_steps_vs_timm"] <= steps


def test_steps_are_paired_by_turn_against_timm():
  """The i-th steps of the two frameworks ran in the same turn: ours is counted faster only
  where its step took strictly less time than timm's of the same index."""
  def result(framework, times):
    return benchmark.Result(framework, "cpu", sorted(times)[len(times) // 2], 8 / 2.0,
                            times, 4.0, 0.0)
  # Faster in turns 2 and 3, level in turn 5; by rank instead of by turn it would be none.
  ours = result("ours", [3.0, 1.0, 2.5, 1.5, 2.0])
  timm = result("timm", [2.0, 1.2, 3.0, 1.0, 2.0])
  assert benchmark.faster_steps(ours, timm) == 2
  assert benchmark.summary([ours, timm])["faster_steps_vs_timm"] == 2
  assert "ours faster in 2 of 5 steps paired by turn" in benchmark.report([ours, timm], 5, 2)


def test_train_throughput_leaves_out_evaluation_and_the_compiling_step(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
  progress = metrics.Progress(total_steps=30, batch_size=8, start_step=0)
  clock[0] += 50  # Step 1 compiles ...
  progress.restart(1)  # ... and the trainer restarts the count at its end.
  clock[0] += 9  # Steps 2-10 take 1 s each.
  assert progress.report(10) == {"img_per_sec": 8.0, "eta_sec": 20.0}
  clock[0] += 5
  with progress.paused():  # Evaluation.
    clock[0] += 60
  clock[0] += 5
  assert progress.report(20)["img_per_sec"] == 8.0
