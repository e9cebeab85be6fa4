"""Transfer tasks: the 19 VTAB-1k entries against the VTAB paper and task_adaptation, derived
labels, top-5 evaluation, and the results table's means."""

import csv
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

from big_transfer import evaluate, sharding, tabulate, transfer
from big_transfer.data import datasets, labels, pipeline, tasks
from big_transfer.errors import UserError
from configs import transfer as transfer_config

# The 19 tasks of VTAB-1k (Zhai et al. 2019, arXiv 1910.04867): group and classes, and what
# google-research/task_adaptation (scripts/run_all_tasks.sh, task_adaptation/data/*.py) loads
# for each: TFDS name and version, the predicted attribute.
VTAB_PAPER = {
    "caltech101": ("natural", 102, "caltech101:3.*.*", ""),
    "cifar100": ("natural", 100, "cifar100:3.*.*", ""),
    "dtd": ("natural", 47, "dtd:3.*.*", ""),
    "oxford_flowers102": ("natural", 102, "oxford_flowers102:2.*.*", ""),
    "oxford_iiit_pet": ("natural", 37, "oxford_iiit_pet:3.*.*", ""),
    "sun397": ("natural", 397, "sun397/tfds:4.*.*", ""),
    "svhn": ("natural", 10, "svhn_cropped:3.*.*", ""),
    "patch_camelyon": ("specialized", 2, "patch_camelyon:2.*.*", ""),
    "eurosat": ("specialized", 10, "eurosat/rgb:2.*.*", ""),
    "resisc45": ("specialized", 45, "resisc45:3.*.*", ""),
    "diabetic_retinopathy": ("specialized", 5,
                             "diabetic_retinopathy_detection/btgraham-300:3.*.*", ""),
    "clevr_count": ("structured", 8, "clevr:3.*.*", "clevr_count_all"),
    "clevr_distance": ("structured", 6, "clevr:3.*.*", "clevr_closest_object_distance"),
    "dmlab": ("structured", 6, "dmlab:2.0.1", ""),
    "kitti_distance": ("structured", 4, "kitti:3.1.0", "kitti_closest_vehicle_distance"),
    "dsprites_location": ("structured", 16, "dsprites:2.*.*", "label_x_position:16"),
    "dsprites_orientation": ("structured", 16, "dsprites:2.*.*", "label_orientation:16"),
    "smallnorb_azimuth": ("structured", 18, "smallnorb:2.*.*", "label_azimuth"),
    "smallnorb_elevation": ("structured", 9, "smallnorb:2.*.*", "label_elevation"),
}
# Where BiT turns random flips or crops off because they change the label (paper §3.3).
NO_FLIP = {"dsprites_orientation", "smallnorb_azimuth", "dsprites_location"}
NO_CROP = {"clevr_count", "clevr_distance", "dmlab", "kitti_distance", "dsprites_location"}

# task_adaptation's split formulas (task_adaptation/data/*.py) worked out by hand for the TFDS
# example counts of those versions: (counts, val200, test).
VTAB_SPLITS = {
    "caltech101": ({"train": 3060, "test": 6084}, "train[2754:2954]", "test"),
    "cifar100": ({"train": 50_000, "test": 10_000}, "train[45000:45200]", "test"),
    "oxford_iiit_pet": ({"train": 3680, "test": 3669}, "train[2944:3144]", "test"),
    "svhn": ({"train": 73_257, "test": 26_032}, "train[65931:66131]", "test"),
    "dtd": ({"train": 1880, "validation": 1880, "test": 1880}, "validation[:200]", "test"),
    "clevr_count": ({"train": 70_000, "validation": 15_000}, "train[63000:63200]", "validation"),
    "eurosat": ({"train": 27_000}, "train[16200:16400]", "train[21600:]"),
    "resisc45": ({"train": 31_500}, "train[18900:19100]", "train[25200:]"),
    "dsprites_location": ({"train": 737_280}, "train[589824:590024]", "train[663552:]"),
    "smallnorb_azimuth": ({"train": 24_300, "test": 24_300}, "test[:200]", "test[50%:]"),
}


def test_the_19_vtab_tasks_are_the_paper_s():
  assert [t.name for t in tasks.VTAB] == [tasks.VTAB_PREFIX + n for n in VTAB_PAPER]
  for name, (group, _, tfds_name, label) in VTAB_PAPER.items():
    task = tasks.get(tasks.VTAB_PREFIX + name)
    assert (task.group, task.dataset, task.label) == (group, tfds_name, label), name
    assert (task.flip, task.crop) == (name not in NO_FLIP, name not in NO_CROP), name
    assert (task.train_split, task.eval_split) == ("train800val200", "test"), name
  assert [sum(t.group == g for t in tasks.VTAB) for g in tasks.VTAB_GROUPS] == [7, 4, 8]


@pytest.mark.parametrize("name", sorted(VTAB_SPLITS))
def test_vtab_splits_follow_task_adaptation(name):
  counts, val200, test = VTAB_SPLITS[name]
  splits = tasks.get(tasks.VTAB_PREFIX + name).vtab.tfds_splits(counts)
  assert splits == {"train800": "train[:800]", "val200": val200,
                    "train800val200": f"train[:800]+{val200}", "test": test}


class _UnpreparedData:
  """What transfer.resolve reads of a VTAB dataset (counts, image size), without its data."""
  name, num_classes = "fake", 16
  builder = types.SimpleNamespace(info=types.SimpleNamespace(splits={
      split: types.SimpleNamespace(num_examples=10_000)
      for split in ("train", "validation", "test")}))

  def check_split(self, split):
    pass

  def num_examples(self, split):
    return 1000

  def image_area(self, split):
    return 64 * 64


def test_vtab_augmentation_exceptions_reach_the_preprocessing(monkeypatch):
  """From each task through configs/transfer.py and the HyperRule to the training and
  test-resolution preprocessing: no random flip where it changes the label, no random crop
  where position, count or size is the label, dSprites' 0/1 pixels scaled to 0..255."""
  monkeypatch.setattr(transfer.datasets, "get", lambda *args: _UnpreparedData())
  for name in VTAB_PAPER:
    config = transfer.resolve(transfer_config.get_config(f"task=vtab/{name},model=R14x1")).config
    decode = "decode|scale(255)" if name.startswith("dsprites") else "decode"
    flip = "" if name in NO_FLIP else "|flip_lr"
    resize = "resize(128)" if name in NO_CROP else "resize(160)|random_crop(128)"
    assert config.pp_train == f"{decode}|{resize}{flip}|value_range(-1, 1)", name
    assert config.test_res.pp == f"{decode}|resize(128){flip}|value_range(-1, 1)", name
    assert config.pp_eval == f"{decode}|resize(128)|value_range(-1, 1)", name


@pytest.mark.parametrize("name", sorted(VTAB_PAPER))
def test_vtab_class_counts_from_the_tfds_features(name):
  """The label each task predicts has the paper's class count (TFDS metadata, no data)."""
  _, classes, _, _ = VTAB_PAPER[name]
  task = tasks.get(tasks.VTAB_PREFIX + name)
  # The feature metadata does not depend on the version (Pets 3.x cannot be built by this TFDS).
  builder = tfds.builder(task.dataset.split(":")[0], data_dir="/nonexistent")
  dataset = datasets._with_label(task.dataset, builder, task.label)
  assert (dataset.num_classes, len(dataset.class_names())) == (classes, classes)


def test_standard_tasks_and_folders():
  assert [tasks.get(n).dataset for n in ("cifar10", "cifar100", "oxford_iiit_pet",
                                         "oxford_flowers102", "imagenet2012")] == [
      "cifar10", "cifar100", "oxford_iiit_pet", "oxford_flowers102", "imagenet2012"]
  assert tasks.get("oxford_flowers102").train_split == "train+validation"
  assert tasks.get("imagenet2012").eval_split == "validation"
  folder = tasks.get("folder:/data/x")
  assert (folder.dataset, folder.train_split, folder.eval_split) == ("folder:/data/x", "train",
                                                                     "test")
  with pytest.raises(UserError, match="Unknown task 'vtab/clevr'; valid: cifar10, "):
    tasks.get("vtab/clevr")


# ---- Derived labels (task_adaptation's definitions) -----------------------------------------

def _objects(**features):
  return {"objects": {k: tf.constant(v) for k, v in features.items()}}


@pytest.mark.parametrize("name, example, expected", [
    ("clevr_count_all", _objects(size=[0, 1, 1]), 0),  # 3 objects.
    ("clevr_count_all", _objects(size=[0] * 10), 7),
    ("clevr_closest_object_distance", _objects(pixel_coords=[[0., 0., 9.7], [1., 1., 8.7]]), 2),
    ("clevr_closest_object_distance", _objects(pixel_coords=[[0., 0., 7.9]]), 0),
    ("clevr_closest_object_distance", _objects(pixel_coords=[[0., 0., 12.0]]), 5),
    ("kitti_closest_vehicle_distance",  # Type 5 (a pedestrian) is not a vehicle.
     _objects(type=[0, 5, 2], location=[[0., 0., 25.], [0., 0., 3.], [0., 0., 10.]]), 1),
    ("kitti_closest_vehicle_distance", _objects(type=[1], location=[[0., 0., 5.]]), 0),
    ("kitti_closest_vehicle_distance", _objects(type=[2], location=[[0., 0., 30.]]), 2),
    ("kitti_closest_vehicle_distance", _objects(type=[4], location=[[0., 0., 5.]]), 3),
])
def test_derived_labels(name, example, expected):
  assert int(labels.DERIVED[name].fn(example)) == expected


def test_binned_labels_group_neighbouring_values():
  orientation = labels.binned("label_orientation", 40, 16)  # 2.5 values per class.
  got = [int(orientation.fn({"label_orientation": tf.constant(v, tf.int64)}))
         for v in (0, 2, 3, 39)]
  assert got == [0, 0, 1, 15]
  position = labels.binned("label_x_position", 32, 16)
  assert int(position.fn({"label_x_position": tf.constant(31, tf.int64)})) == 15


def test_a_derived_label_reaches_the_batches_and_the_few_shot_labels(tmp_path):
  """Classes a, b, c of a folder grouped into 2 bins ({a, b}, {c}) by label="label:2"."""
  for name, count in (("a", 3), ("b", 2), ("c", 2)):
    os.makedirs(tmp_path / "test" / name)
    for i in range(count):
      (tmp_path / "test" / name / f"{i}.png").write_bytes(
          tf.io.encode_png(tf.zeros((4, 4, 3), tf.uint8)).numpy())
  dataset = datasets.get(f"folder:{tmp_path}", label="label:2")
  assert (dataset.num_classes, dataset.class_names()) == (2, ["0", "1"])
  np.testing.assert_array_equal(dataset.labels("test"), [0, 0, 0, 0, 0, 1, 1])
  batch = next(pipeline.eval_iterator(dataset, "test", "decode", 8))
  np.testing.assert_array_equal(batch["labels"][batch["mask"]].argmax(-1), [0, 0, 0, 0, 0, 1, 1])


def test_unusable_label_is_one_line():
  builder = tfds.builder("smallnorb", data_dir="/nonexistent")
  for label in ("label_nope", "label_azimuth:99", "image"):
    with pytest.raises(UserError, match="is not usable for dataset 'smallnorb'; valid: "
                       "label_category, instance, label_elevation, label_azimuth, label_lig"):
      datasets._with_label("smallnorb", builder, label)


# ---- Evaluation ------------------------------------------------------------------------------

def test_top1_and_top5_count_real_examples_only():
  logits = np.tile(np.arange(7, dtype=np.float32)[::-1], (8, 1))  # Class 0 ranks first.
  true = [0, 2, 4, 5, 0, 0, 0, 0]  # Ranks 1, 3, 5, 6; the padding would all be top-1 hits.
  batch = {"image": logits, "labels": np.eye(7, dtype=np.float32)[true],
           "mask": np.arange(8) < 4}
  mesh = sharding.make_mesh()
  step = evaluate.make_classification_step(lambda params, x: x, lambda x, y: jnp.zeros(len(x)),
                                           mesh)
  result = evaluate.classification(step, None, [batch], mesh)
  assert (result["accuracy"], result["top5"], result["count"]) == (0.25, 0.75, 4)


# ---- The results table -----------------------------------------------------------------------

def _write_result(workdir, task, top1, model="R50x1", init="BiT-M-R50x1.npz"):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"task": task, "model": model, "init": init, "shots": None, "steps": 500,
               "top1": top1, "top5": min(1.0, top1 + 0.1), "wall_s": 12.5}, f)


def test_tabulate_vtab_means(tmp_path, capsys):
  by_group = {"natural": 0.8, "specialized": 0.6, "structured": 0.4}
  for task in tasks.VTAB:
    _write_result(tmp_path / "vtab" / task.name.split("/")[1], task.name, by_group[task.group])
  _write_result(tmp_path / "cifar10", "cifar10", 0.975)
  for name, top1 in (("caltech101", 0.9), ("dtd", 0.7)):  # Another model, 2 tasks.
    _write_result(tmp_path / "r101" / name, f"vtab/{name}", top1, model="R101x1")
  csv_path = tmp_path / "table.csv"
  flags.FLAGS(["tabulate", f"--csv={csv_path}"])
  try:
    tabulate.main(["tabulate", str(tmp_path / "vtab"), str(tmp_path / "cifar10"),
                   str(tmp_path / "r101")])
  finally:
    flags.FLAGS.unparse_flags()
  markdown = capsys.readouterr().out.splitlines()
  with open(csv_path) as f:
    table = list(csv.DictReader(f))
  assert len(markdown) == 2 + len(table) and len(table) == 19 + 1 + 2 + 4 + 2
  summary = {(r["model"], r["task"]): r["top1_%"] for r in table if r["task"].startswith("VTAB")}
  assert summary == {
      ("R50x1", "VTAB-1k natural"): "80.00", ("R50x1", "VTAB-1k specialized"): "60.00",
      ("R50x1", "VTAB-1k structured"): "40.00",
      # The mean over the 19 tasks, (7 x 80 + 4 x 60 + 8 x 40) / 19, not over the 3 groups.
      ("R50x1", "VTAB-1k mean"): "58.95",
      ("R101x1", "VTAB-1k natural (2/7 tasks)"): "80.00",
      ("R101x1", "VTAB-1k mean (2/19 tasks)"): "80.00"}
  cifar = next(r for r in table if r["task"] == "cifar10")
  assert (cifar["group"], cifar["top1_%"], cifar["top5_%"]) == ("", "97.50", "100.00")
  assert "| VTAB-1k mean |  | R50x1 | BiT-M-R50x1.npz |  |  | 58.95 |  |  |  |" in markdown


def test_tabulate_without_results_is_one_line(tmp_path):
  with pytest.raises(UserError, match=f"No results.json in or below {tmp_path}; pass finished"):
    tabulate.find([str(tmp_path)])
