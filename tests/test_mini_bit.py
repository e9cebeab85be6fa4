"""The miniature BiT experiment: its data subsets and its configs (the experiment itself takes
~25 minutes on 2 cores; README, Transfer section)."""

import json
import os

import numpy as np
import pytest

from big_transfer.errors import UserError
from big_transfer.experiments import mini_bit
from configs import mini_bit as mini_bit_config

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


@pytest.fixture
def data_root(tmp_path):
  """A CIFAR-10 layout with 6 training and 2 test files per class (contents never read)."""
  root = tmp_path / "cifar"
  for split, count in (("train", 6), ("test", 2)):
    for name in CLASSES:
      os.makedirs(root / split / name)
      for i in range(count):
        (root / split / name / f"{i:04d}.jpg").write_bytes(b"jpeg")
  return root


def _listing(root):
  return {split: {name: sorted(os.listdir(root / split / name))
                  for name in sorted(os.listdir(root / split))} for split in ("train", "test")}


def test_source_and_target_folders(data_root, tmp_path):
  names = mini_bit._class_names(str(data_root))  # pylint: disable=protected-access
  assert names == list(CLASSES)
  source = tmp_path / "work" / "source4"
  mini_bit.build_folder(str(data_root), str(source), names[:5], 4)
  listing = _listing(source)
  assert list(listing["train"]) == list(CLASSES[:5]) == list(listing["test"])
  assert all(files == ["0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg"]
             for files in listing["train"].values())
  assert all(len(files) == 2 for files in listing["test"].values())
  link = source / "train" / "deer" / "0003.jpg"
  assert os.readlink(link) == str(data_root / "train" / "deer" / "0003.jpg")

  target = tmp_path / "work" / "target"
  mini_bit.build_folder(str(data_root), str(target), names[5:], None)
  assert list(_listing(target)["train"]) == list(CLASSES[5:])
  assert all(len(files) == 6 for files in _listing(target)["train"].values())

  # The same recipe is reused; another one is refused and nothing changes.
  mini_bit.build_folder(str(data_root), str(source), names[:5], 4)
  with pytest.raises(UserError, match="built from other data or settings; use a new --workdir"):
    mini_bit.build_folder(str(data_root), str(source), names[:5], 5)
  assert _listing(source) == listing
  with pytest.raises(UserError, match="fewer than 7; lower --source_per_class"):
    mini_bit.build_folder(str(data_root), str(tmp_path / "work" / "source7"), names[:5], 7)


def test_data_root_must_hold_the_ten_classes(data_root):
  os.rename(data_root / "test" / "truck", data_root / "truck")
  with pytest.raises(UserError, match="test must hold the 10 CIFAR-10 class folders"):
    mini_bit._class_names(str(data_root))  # pylint: disable=protected-access


def test_configs_scale_the_recipes_as_documented():
  upstream = mini_bit_config.get_config("upstream,root=/data/source")
  assert (upstream.model.name, upstream.loss, upstream.num_classes) == ("R26x1", "softmax_xent", 5)
  assert upstream.dataset == "folder:/data/source" and "inception_crop(32" in upstream.pp_train
  assert upstream.wd == 1e-4 and upstream.momentum == 0.9
  fractions = np.array(upstream.schedule.decay_examples) / upstream.total_examples
  np.testing.assert_allclose(fractions, [30 / 90, 60 / 90, 80 / 90], atol=1e-4)  # BiT-S's.

  transfer = mini_bit_config.get_config("transfer,root=/data/target")
  assert transfer.dataset == "folder:/data/target" and transfer.shots == 10
  assert (transfer.wd, transfer.momentum, transfer.model.head_zero_init) == (0.0, 0.9, True)
  assert "hyperrule" in transfer  # Unset rule fields (decays, MixUp) are filled by the rule.
  with pytest.raises(ValueError, match="expected upstream,root=DIR or transfer,root=DIR"):
    mini_bit_config.get_config("transfer")


def test_table_reports_means_and_the_better_scratch_rate():
  summary = {
      "seeds": 2, "shots": 10, "source_per_class": 5000, "upstream_top1_source_test": 0.8,
      "linear_probe_upstream": 0.5, "linear_probe_random": 0.3, "finetune_upstream": 0.45,
      "scratch": 0.35, "scratch_best": "scratch_lr0.03", "wall_s": 600.0, "cpu_s": 1000.0,
      "cpu_count": 2, "load_average_end": [1.0, 1.0, 1.0],
      "per_seed": {"linear_probe_upstream": [0.5, 0.5], "linear_probe_random": [0.25, 0.35],
                   "finetune": [0.4, 0.5], "scratch_lr0.003": [0.2, 0.3],
                   "scratch_lr0.03": [0.3, 0.4]}}
  table = mini_bit.table(summary)
  assert "| from scratch, lr 0.03 (better) | 30.0 | 40.0 | 35.0 |" in table
  assert "| HyperRule fine-tuning from upstream | 40.0 | 50.0 | 45.0 |" in table
  assert "upstream - random = +20.0 points; fine-tuning - best scratch = +10.0 points" in table
  json.dumps(summary)  # What summary.json holds.
