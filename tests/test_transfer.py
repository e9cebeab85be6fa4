"""Transfer: the HyperRule at its boundaries, overrides, few-shot size, a BiT .npz and one of our
workdirs fine-tuned on an image folder through the real command, the test-resolution phase,
one-line errors."""

import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from big_transfer import (checkpoints, config_common, hyperrule, optim, sharding, trainer,
                          transfer)
from big_transfer.data import pipeline
from big_transfer.errors import UserError
from configs import transfer as transfer_config
from conftest import ROOT, train_env


TEST_IMAGES = {"a": 3, "b": 2, "c": 2}  # A zero head predicts class 0: top-1 = 3/7.
PP_16 = {"pp_train": "decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)",
         "pp_eval": "decode|resize(16)|value_range(-1, 1)"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """ROOT/{train,test}/{a,b,c}/*.jpg: 16x16 images, 6 per class in train, 3/2/2 in test."""
  root = tmp_path_factory.mktemp("task")
  rng = np.random.default_rng(0)
  for split, counts in (("train", dict.fromkeys(TEST_IMAGES, 6)), ("test", TEST_IMAGES)):
    for label, (name, count) in enumerate(counts.items()):
      os.makedirs(root / split / name)
      for i in range(count):
        image = rng.integers(0, 80, (16, 16, 3))
        image[..., label] += 150  # The class is the dominant colour.
        jpeg = tf.io.encode_jpeg(tf.constant(image, tf.uint8)).numpy()
        (root / split / name / f"{i}.jpg").write_bytes(jpeg)
  return str(root)


def _config(folder, arg="", **overrides):
  config = transfer_config.get_config(f"task=folder:{folder},model=R14x1{arg}")
  return config_common.with_overrides(config, overrides)


# ---- The rule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("examples, regime, steps, warmup, decays, mixup", [
    (1, "small", 500, 100, (200, 300, 400), 0.0),
    (19_999, "small", 500, 100, (200, 300, 400), 0.0),
    (20_000, "medium", 10_000, 500, (3000, 6000, 9000), 0.1),
    (499_999, "medium", 10_000, 500, (3000, 6000, 9000), 0.1),
    (500_000, "large", 20_000, 500, (6000, 12_000, 18_000), 0.1),
    (1_281_167, "large", 20_000, 500, (6000, 12_000, 18_000), 0.1),
])
def test_regimes_at_their_boundaries(examples, regime, steps, warmup, decays, mixup):
  choice = hyperrule.choose(examples, 32 * 32)
  assert (choice.regime.name, choice.total_steps, choice.warmup_steps, choice.decay_steps,
          choice.mixup_alpha) == (regime, steps, warmup, decays, mixup)
  # The paper's text: /10 at 30%, 60% and 90% of the steps (differs only below 20k).
  paper = hyperrule.choose(examples, 32 * 32, decays="paper").decay_steps
  assert paper == tuple(round(f * steps) for f in (0.3, 0.6, 0.9))
  assert (paper == decays) == (regime != "small")


def test_resolution_below_and_from_96x96():
  small, large = hyperrule.choose(100, 95 * 95), hyperrule.choose(100, 96 * 96)
  assert (small.resize_size, small.crop_size) == (160, 128)
  assert (large.resize_size, large.crop_size) == (448, 384)
  released = hyperrule.choose(100, 96 * 96, resolution="released")
  assert (released.resize_size, released.crop_size) == (512, 480)
  assert hyperrule.choose(100, 95 * 95, resolution="released").crop_size == 128
  with pytest.raises(UserError, match="hyperrule.resolution='big'; valid: paper, released"):
    hyperrule.choose(100, 96 * 96, resolution="big")


def test_a_total_steps_override_keeps_the_decay_fractions():
  assert hyperrule.choose(100, 1024, total_steps=1000).decay_steps == (400, 600, 800)
  assert hyperrule.choose(100, 1024, total_steps=1000, decays="paper").decay_steps == (
      300, 600, 900)


def test_short_runs_keep_every_decay():
  """10 steps, 40/60/80%: boundaries 4, 6, 8; 2 steps: 1, 1, 2 (both first decays at once)."""
  for total, expected in ((10, (4, 6, 8)), (2, (1, 1, 2))):
    config = config_common.with_overrides(config_common.base(), {
        "lr": 0.003, "lr_batch_ref": 512, "batch_size": 512, "total_steps": total,
        "schedule.decay_steps": hyperrule.choose(100, 1024, total_steps=total).decay_steps})
    assert config.schedule.decay_steps == expected
    schedule = optim.make_schedule(config, optim.Durations(100, 512), total)
    lrs = [float(schedule(s)) for s in range(total)]
    np.testing.assert_allclose(lrs, [0.003 * 0.1 ** sum(b <= s for b in expected)
                                     for s in range(total)], rtol=1e-6)


def test_resolve_fills_the_unset_fields_from_the_data(folder):
  resolved = transfer.resolve(_config(folder))
  config = resolved.config
  assert resolved.dataset.num_examples(config.train_split) == 18
  assert (config.total_steps, config.schedule.warmup_steps, config.schedule.decay_steps) == (
      500, 100, (200, 300, 400))
  assert config.mixup_alpha == 0.0 and config.wd == 0.0 and config.momentum == 0.9
  assert (config.lr, config.batch_size, config.lr_batch_ref) == (0.003, 512, 512)
  assert config.pp_train == "decode|resize(160)|random_crop(128)|flip_lr|value_range(-1, 1)"
  assert config.pp_eval == "decode|resize(128)|value_range(-1, 1)"
  assert config.test_res.pp == "decode|resize(128)|flip_lr|value_range(-1, 1)"
  assert config.test_res.lr == pytest.approx(0.0003)
  assert resolved.notes[0].startswith(
      f"HyperRule (folder:{folder} 'train'): 18 examples -> small regime (< 20k): 500 steps")
  assert "image area 256 px < 96x96 -> resize 160, crop 128" in resolved.notes[0]


def test_shots_times_classes_is_the_rule_s_size(folder):
  resolved = transfer.resolve(_config(folder, ",shots=4"))
  assert "4 shots x 3 classes): 12 examples -> small regime" in resolved.notes[0]
  subset = transfer.train_subset(resolved.config, resolved.dataset)
  labels = resolved.dataset.labels("train")[subset]
  np.testing.assert_array_equal(np.bincount(labels), [4, 4, 4])
  np.testing.assert_array_equal(  # Drawn with config.seed.
      subset, pipeline.few_shot_subset(resolved.dataset, "train", 4, seed=0))


OVERRIDES = {
    "total_steps": 7, "schedule.warmup_steps": 3, "schedule.decay_steps": (5,),
    "mixup_alpha": 0.2, "pp_train": "decode|resize(20)|value_range(-1, 1)",
    "pp_eval": "decode|resize(20)|value_range(0, 1)", "test_res.pp": "decode|resize(24)",
    "test_res.lr": 0.01, "test_res.steps": 2, "lr": 0.01, "batch_size": 64, "momentum": 0.8,
    "wd": 1e-5, "hyperrule.flip": False, "shots": 2, "seed": 3,
}


@pytest.mark.parametrize("key", sorted(OVERRIDES))
def test_every_overridden_field_wins(folder, key):
  config = transfer.resolve(_config(folder, **{key: OVERRIDES[key]})).config
  *parents, leaf = key.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  assert node[leaf] == OVERRIDES[key]


def test_overrides_in_other_units_and_the_rule_s_switches(folder):
  config = transfer.resolve(_config(
      folder, total_epochs=10, batch_size=6, **{"schedule.warmup_epochs": 1.0,
                                                "hyperrule.decays": "paper",
                                                "hyperrule.flip": False,
                                                "hyperrule.crop": False})).config
  assert config.total_steps is None and config.schedule.warmup_steps is None  # Left as set.
  assert config.schedule.decay_steps == (9, 18, 27)  # 30/60/90% of 10 epochs x 3 steps.
  assert config.pp_train == "decode|resize(128)|value_range(-1, 1)"


# ---- Transfer through the real command -------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(folder, r14x1_npz, tmp_path_factory):
  """The real command from a BiT .npz for one step: with the head at zero the first update
  leaves the backbone as loaded (its gradient is zero, and transfer has no weight decay)."""
  workdir = str(tmp_path_factory.mktemp("from_npz") / "run")
  flags = [f"--config.{k}={v}" for k, v in {
      **PP_16, "init": r14x1_npz, "total_steps": 1, "batch_size": 8,
      "log_every_steps": 1}.items()]
  proc = subprocess.run(
      [sys.executable, "-m", "big_transfer.train",
       f"--config={ROOT}/configs/transfer.py:task=folder:{folder},model=BiT-S-R14x1",
       f"--workdir={workdir}", *flags], cwd=ROOT, env=train_env(1), capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return workdir, proc.stdout


def test_npz_backbone_loads_with_a_zero_head_and_every_test_image_counts(cli_run, folder,
                                                                        r14x1_npz):
  workdir, stdout = cli_run
  assert (f"Initialised from {r14x1_npz}: R14x1 backbone loaded, a zero 3-class head "
          "(init_head=reset).") in stdout
  assert "step 1/1: loss 1.0986" in stdout  # ln 3: equal logits from the zero head.
  name, params = checkpoints.load_params(workdir)
  assert name == "R14x1"
  backbone = checkpoints.load_bit_npz(r14x1_npz, "R14x1", num_classes=0)
  flat = lambda tree: {"/".join(k.key for k in path): np.asarray(leaf)
                       for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  trained = flat(params)
  head = {k: trained.pop(k) for k in list(trained) if k.startswith("head/")}
  assert set(trained) == set(flat(backbone))
  for key, value in flat(backbone).items():
    np.testing.assert_array_equal(trained[key], value, err_msg=key)
  assert head["head/conv2d/kernel"].shape == (2048, 3)
  assert all(map(np.any, head.values()))  # The head (only) took the first update.

  with open(os.path.join(workdir, "results.json")) as f:
    record = json.load(f)
  assert record["eval_count"] == 7  # Every test image once (one batch of 8, padded).
  assert record["top1"] * 7 == pytest.approx(round(record["top1"] * 7)) and record["top5"] == 1.0
  assert {k: record[k] for k in ("task", "model", "init", "shots", "steps")} == {
      "task": f"folder:{folder}", "model": "BiT-S-R14x1",
      "init": r14x1_npz, "shots": None, "steps": 1}
  assert record["wall_s"] > 0 and record["config"]["pp_train"] == PP_16["pp_train"]
  assert record["config"]["schedule"]["warmup_steps"] == 100  # Resolved by the rule.
  assert os.path.exists(os.path.join(workdir, "config.json"))


def test_transfer_from_our_workdir_with_shots_and_a_test_resolution_phase(
    cli_run, folder, tmp_path, capsys, one_device):
  source, _ = cli_run
  # The params a run starts from: the source workdir's backbone as stored, a zero head.
  _, stored = checkpoints.load_params(source)
  mesh = sharding.make_mesh()
  placed = transfer.init_params(_config(folder, init=source), 3, jax.tree.map(
      lambda _: sharding.replicated(mesh), stored))
  stored["head"]["conv2d"] = jax.tree.map(np.zeros_like, stored["head"]["conv2d"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(placed), stored)

  workdir = str(tmp_path / "run")
  overrides = {**PP_16, "init": source, "total_steps": 2, "batch_size": 8, "lr": 0.3,
               "schedule.warmup_steps": 1, "schedule.decay_steps": (1,), "log_every_steps": 1,
               "checkpoint_every_steps": 1,
               "test_res.steps": 1, "test_res.pp": "decode|resize(16)|flip_lr|value_range(-1, 1)"}
  result = trainer.run(_config(folder, ",shots=2", **overrides), workdir)
  out = capsys.readouterr().out
  assert f"Initialised from {source}: R14x1 backbone loaded, a zero 3-class head" in out
  assert "2 shots x 3 classes): 6 examples" in out and "6 train images (2 per class)" in out
  assert result["count"] == 7
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}
  assert logged[1]["train/loss"] == pytest.approx(np.log(3), abs=1e-6)  # The zero head.
  # Steps 1-2: the schedule, 0.3 x 8/512 then /10; step 3: the test-resolution phase at
  # test_res.lr, the rule's (configured lr)/10, scaled alike.
  np.testing.assert_allclose([logged[s]["train/lr"] for s in (1, 2, 3)],
                             [0.3 * 8 / 512, 0.03 * 8 / 512, 0.03 * 8 / 512], rtol=1e-6)
  _, params = checkpoints.load_params(workdir)
  assert np.any(params["head"]["conv2d"]["kernel"])  # Trained.

  # A workdir holding a transfer checkpoint resumes it (here into a longer test-res phase).
  trainer.run(_config(folder, ",shots=2", **{**overrides, "test_res.steps": 2}), workdir)
  out = capsys.readouterr().out
  assert "Resuming from checkpoint at step 3." in out and "Initialised" not in out
  assert "step 4/4: loss" in out and "step 3/4" not in out
  with open(os.path.join(workdir, "results.json")) as f:
    record = json.load(f)
  assert (record["steps"], record["resumed_from_step"], record["shots"]) == (4, 3, 2)


def test_test_resolution_phase_switches_preprocessing(folder):
  resolved = transfer.resolve(_config(folder, **{
      "pp_train": "decode|resize(20)|value_range(-1, 1)", "test_res.steps": 2,
      "test_res.pp": "decode|resize(12)|value_range(-1, 1)"}))
  sizes = lambda start: [batch["image"].shape[1] for batch in itertools.islice(
      trainer._train_batches(resolved.config, resolved.dataset, 4, start, test_res_start=3),
      5 - start)]
  assert sizes(0) == [20, 20, 20, 12, 12]
  assert sizes(3) == [12, 12]


# ---- One-line errors ---------------------------------------------------------------------------

def test_missing_or_mismatched_init_is_one_line(folder, r14x1_npz, tmp_path):
  cases = [
      ({"init": str(tmp_path / "missing.npz")}, "does not exist; check the path"),
      ({"init": r14x1_npz, "model.name": "R26x1"},
       f"--config.init={r14x1_npz} holds R14x1 but config.model.name is R26x1; set "
       "--config.model.name=R14x1 or pass a R26x1 checkpoint."),
      ({"init": str(tmp_path)}, "holds no checkpoint"),
      ({"init": r14x1_npz, "init_head": "keep"}, "has a 10-class head but num_classes=3"),
  ]
  for overrides, message in cases:
    workdir = tmp_path / "run"
    with pytest.raises(UserError) as error:
      trainer.run(_config(folder, **overrides), str(workdir))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not os.listdir(workdir / "checkpoints")


def test_unprepared_or_unbuildable_tfds_task_is_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  for task, message in [
      ("vtab/dmlab", "Dataset 'dmlab:2.0.1' is not prepared in"),
      ("imagenet2012", "run `tfds build imagenet2012 --data_dir=... --manual_dir=DIR` (DIR "
       "holding the files its TFDS catalog page lists: it cannot be downloaded automatically) "
       "and pass --config.data_dir."),
      ("vtab/oxford_iiit_pet", "Dataset 'oxford_iiit_pet:3.*.*': Dataset oxford_iiit_pet "
       "cannot be loaded at version 3.*.*, only: 4.0.0; prepare that version"),
  ]:
    config = transfer_config.get_config(f"task={task}")
    config = config_common.with_overrides(config, {"data_dir": str(tmp_path / "tfds")})
    with pytest.raises(UserError) as error:
      trainer.run(config, str(workdir))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not workdir.exists()
