"""The TPU pod planner: analytic FLOPs, the fit/suggest/max-batch searches, the CLI.

The searches run against a fake compiler with a known memory line, so they need no libtpu;
the CLI compiles for real on the local CPU, and for a TPU topology only where libtpu is
installed (`pip install -e '.[tpu]'`; CI has no libtpu and skips that test).
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from big_transfer import config_common, errors, plan
from conftest import ROOT, error_line, run_cli, xla_flags
from configs import demo

GiB = plan.GiB
# R14x1 at 16 px, batch 16: compiles in seconds on an idle CPU.
TINY = ["--config.pp_train=decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)",
        "--config.batch_size=16"]


def run_plan(*flags, devices: int = 1):
  env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
  if not any(f.startswith("--topology") for f in flags):
    env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "big_transfer.plan", f"--config={ROOT}/configs/demo.py", *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_analytic_flops_match_the_resnet50_reference():
  # timm's resnet50 model cards: 4.1 GMACs per 224 px image forward; training (forward and
  # backward) ~ 3 x 4.1 GMACs x 2 FLOPs per MAC = ~24.6 GFLOPs.
  flops = plan.analytic_train_flops("R50x1", (224, 224), 1000)
  assert flops == pytest.approx(24.6e9, rel=0.02)
  # Width x4 multiplies the MACs of every conv but the root (3 input channels) by 16;
  # resolution scales them by its area.
  r152x4 = plan.analytic_train_flops("R152x4", (224, 224), 0)
  assert plan.analytic_train_flops("R152x1", (224, 224), 0) * 16 == pytest.approx(r152x4,
                                                                                 rel=0.01)
  assert plan.analytic_train_flops("R50x1", (448, 448), 0) == pytest.approx(
      4 * plan.analytic_train_flops("R50x1", (224, 224), 0), rel=0.01)


def _fake_compiler(fixed_gib: float, per_image_gib: float, log: list):
  """plan_fn whose memory is fixed + per_image x micro-batch; fsdp and bfloat16 shrink it."""
  def plan_fn(config):
    per_device = config.batch_size // 8
    fixed = fixed_gib / (8 if config.state_sharding == "fsdp" else 1)
    activations = per_image_gib * per_device / config.batch_split
    activations /= 2 if config.model.dtype == "bfloat16" else 1
    log.append((per_device, config.batch_split, config.state_sharding, config.model.dtype))
    total = int((fixed + activations) * GiB)
    return plan.Plan(per_device, 0.0, plan.Memory(total, 0, 0, 0, 0, total), 1.0)
  return plan_fn


def _config():
  """The demo config at 8 images per device on 8 devices."""
  spec = importlib.util.spec_from_file_location("demo", ROOT / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_common.with_overrides(module.get_config(), {"batch_size": 64})


def test_find_max_batch_takes_few_compiles():
  log = []
  plan_fn = _fake_compiler(fixed_gib=1.0, per_image_gib=0.1, log=log)
  config = _config()
  first = plan_fn(config)  # 8 per device: 1.8 GiB.
  batch, best = plan.find_max_batch(config, plan_fn, int(3.05 * GiB), first)
  assert batch == 20 and best.memory.total <= 3.05 * GiB
  assert len(log) <= 5, log
  # Starting above the limit it searches down; nothing fits under the fixed part.
  assert plan.find_max_batch(config, plan_fn, int(1.45 * GiB), first)[0] == 4
  assert plan.find_max_batch(config, plan_fn, int(0.5 * GiB), first) is None


def test_suggest_confirms_the_smallest_change():
  log = []
  plan_fn = _fake_compiler(fixed_gib=1.0, per_image_gib=0.25, log=log)
  config = _config()  # 8 per device: 3 GiB.
  overrides, fixed = plan.suggest(config, plan_fn, int(2.6 * GiB), 8)
  assert overrides == {"state_sharding": "fsdp"}  # 0.125 + 2 GiB: one change suffices.
  overrides, fixed = plan.suggest(config, plan_fn, int(1.6 * GiB), 8)
  assert overrides == {"batch_split": 4}  # 1 + 0.5 GiB; split 2 (2 GiB) is too little.
  assert fixed.memory.total <= 1.6 * GiB
  overrides, _ = plan.suggest(config, plan_fn, int(0.7 * GiB), 8)
  assert overrides == {"state_sharding": "fsdp", "batch_split": 4}
  assert plan.suggest(config, plan_fn, int(0.1 * GiB), 8) is None


def test_candidate_changes_fewest_first_and_exact_math_before_bfloat16():
  groups = plan.candidate_changes(_config(), 8)
  assert groups[:3] == [[{"state_sharding": "fsdp"}],
                        [{"batch_split": k} for k in (2, 4, 8)],
                        [{"model.dtype": "bfloat16"}]]
  assert groups[-1][-1] == {"state_sharding": "fsdp", "model.dtype": "bfloat16",
                            "batch_split": 8}


def test_local_cpu_report():
  proc = run_plan(*TINY, "--hbm_gib=2", devices=2)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "R14x1, 10 classes, batch 16 = 8 per device at 16x16 px" in out
  assert "local cpu: 2 devices" in out
  assert "-> FITS" in out and "total" in out and "aliased" in out
  assert "FLOPs per device per step: compiler" in out


@pytest.mark.parametrize("flags, message", [
    (["--topology=v9:1x1"], "Cannot make TPU topology 'v9:1x1'"),
    (["--config.num_classes=0"], "no num_classes"),
    (["--config.pp_train=decode|value_range(-1, 1)"], "does not produce one fixed image size"),
])
def test_bad_input_is_one_line(flags, message):
  """In this process (conftest.run_cli); test_local_cpu_report runs the real command."""
  proc = run_cli(f"--config={ROOT}/configs/demo.py", *TINY, *flags, module="plan")
  assert message in error_line(proc)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'); CI has none")
def test_tpu_topology_end_to_end():
  proc = run_plan(*TINY, "--topology=v3:2x2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "v3:2x2: 8 devices (TPU v3, 2 per chip)" in out
  assert "16.00 GiB memory, 61.5 TFLOP/s bf16 peak" in out
  assert "-> FITS" in out and "img/s" in out


def test_compiler_flops_count_every_micro_batch():
  """XLA counts a scanned loop body once; the plan scales it by batch_split. That also
  multiplies the per-step work outside the loop (weight standardization, the optimizer), so
  the scaled figure lies between the unsplit step's and batch_split times it."""
  config = config_common.with_overrides(demo.get_config(), {
      "model.name": "R14x1", "batch_size": 16,
      "pp_train": "decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)"})
  whole = plan.compile_step(config, plan.local_target())
  split = plan.compile_step(config_common.with_overrides(config, {"batch_split": 2}),
                            plan.local_target())
  assert 0.9 < split.flops / whole.flops < 2, (split.flops, whole.flops)


def test_require_fit_refuses_a_step_over_the_capacity(monkeypatch, capsys):
  """One compile (faked here: a 3 GiB step), no search: what `launch/tpu_vm.py train --plan`
  runs on a TPU worker."""
  total = 3 * GiB
  compiled = plan.Plan(8, 1.0, plan.Memory(total, 0, 0, 0, 0, total), 1.0)
  monkeypatch.setattr(plan, "compile_step", lambda config, target: compiled)
  target = lambda gib: plan.Target("v3:4x4: 32 devices (TPU v3, 2 per chip)", [], gib * GiB, None)
  assert plan.require_fit(_config(), target(4)) is compiled
  assert "-> FITS" in capsys.readouterr().out
  with pytest.raises(errors.UserError, match=r"The step needs 3\.00 GiB per device, more than "
                     r"the 2\.00 GiB of v3:4x4: 32 devices .*without --require_fit"):
    plan.require_fit(_config(), target(2))
  assert "-> DOES NOT FIT" in capsys.readouterr().out
  with pytest.raises(errors.UserError, match="needs a memory capacity"):
    plan.require_fit(_config(), plan.Target("local cpu", [], None, None))
