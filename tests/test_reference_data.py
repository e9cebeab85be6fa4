"""Augmentation and few-shot selection against what the images themselves say, on images that
encode their own pixel positions (no CIFAR-10 needed), and the rule for expected test data."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import require_data

from big_transfer.data import datasets, pipeline, preprocess
from big_transfer.errors import UserError

SIZE, CROP = 24, 16
CLASSES = {"a": 5, "b": 7, "c": 9}  # Train images per class: unequal, so stratifying shows.


def coded_image(image_id: int, size: int = SIZE) -> np.ndarray:
  """Red = 10 x row, green = 10 x column, blue = image_id: a crop tells its offset, a flip its
  direction, and every image its identity."""
  rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  return np.stack([10 * rows, 10 * cols, np.full_like(rows, image_id)], -1).astype(np.uint8)


def decode_placement(image: np.ndarray) -> tuple[int, int, bool, int]:
  """(row offset, column offset, mirrored, image id) of an augmented coded image, checking
  that it is an unscaled window of the original, mirrored or not."""
  rows, cols = image[..., 0].astype(int) // 10, image[..., 1].astype(int) // 10
  top, left = rows[0, 0], cols[0].min()
  mirrored = bool(cols[0, 0] > cols[0, -1])
  h, w = rows.shape
  window_cols = left + np.arange(w)
  np.testing.assert_array_equal(rows, (top + np.arange(h))[:, None] + 0 * cols)
  np.testing.assert_array_equal(cols, np.broadcast_to(window_cols[::-1] if mirrored
                                                      else window_cols, (h, w)))
  return int(top), int(left), mirrored, int(image[0, 0, 2])


def _augment(spec: str, seed) -> np.ndarray:
  example = {"image": tf.constant(coded_image(0)), "_seed": tf.constant(seed, tf.int64)}
  return preprocess.parse(spec)(example)["image"].numpy()


def test_random_crop_offsets_vary_with_the_seed_and_repeat_for_a_fixed_one():
  placements = [decode_placement(_augment(f"random_crop({CROP})", [7, i])) for i in range(64)]
  tops, lefts = {p[0] for p in placements}, {p[1] for p in placements}
  assert tops <= set(range(SIZE - CROP + 1)) and lefts <= set(range(SIZE - CROP + 1))
  # 9 possible offsets per axis: a centre crop (4, 4) or a fixed corner would give one.
  assert len(tops) >= 7 and len(lefts) >= 7, (tops, lefts)
  assert {0, SIZE - CROP} <= tops | lefts  # The extremes are reachable.
  for i in range(3):
    np.testing.assert_array_equal(_augment(f"random_crop({CROP})", [7, i]),
                                  _augment(f"random_crop({CROP})", [7, i]))


def test_flip_is_random_per_draw_about_half_the_time():
  """Official bug #62 flipped every image; each draw here flips with probability 1/2."""
  flips = [decode_placement(_augment("flip_lr", [3, i]))[2] for i in range(200)]
  assert 0.4 <= np.mean(flips) <= 0.6, np.mean(flips)
  assert _augment("flip_lr", [3, 5]).tobytes() == _augment("flip_lr", [3, 5]).tobytes()


def test_value_range_maps_0_and_255_to_the_ends():
  pixels = np.array([[[0, 1, 127], [128, 254, 255]]], np.uint8)
  out = preprocess.parse("value_range(-1, 1)")({"image": tf.constant(pixels)})["image"].numpy()
  np.testing.assert_allclose(out, pixels / 127.5 - 1, rtol=0, atol=1e-6)
  out = preprocess.parse("value_range(0, 1)")({"image": tf.constant(pixels)})["image"].numpy()
  np.testing.assert_allclose(out, pixels / 255, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """ROOT/{train,test}/{a,b,c}/NN.png of coded images; the blue channel numbers them."""
  root = tmp_path_factory.mktemp("coded")
  image_id = 0
  for split, counts in (("train", CLASSES), ("test", {c: 2 for c in CLASSES})):
    for name, count in counts.items():
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        png = tf.io.encode_png(coded_image(image_id)).numpy()
        (root / split / name / f"{i:02d}.png").write_bytes(png)
        image_id += 1
  return datasets.get(f"folder:{root}")


def _stream(dataset, seed, batches=3):
  """(top, left, mirrored, image id) of each training example, in stream order: three epochs
  of the 21 train images (mixed at the epoch boundaries by the shuffle buffer)."""
  n = sum(CLASSES.values())
  iterator = pipeline.train_iterator(dataset, "train", f"decode|random_crop({CROP})|flip_lr", n,
                                     seed=seed, shuffle_buffer=n)
  return [decode_placement(image) for _ in range(batches) for image in next(iterator)["image"]]


def test_pipeline_augments_each_example_with_its_own_seed(folder):
  stream = _stream(folder, seed=0)
  assert len({p[:2] for p in stream[:21]}) >= 12  # Per-example draws, not one per batch.
  assert 0.3 <= np.mean([p[2] for p in stream]) <= 0.7
  by_image = {}
  for placement in stream:
    by_image.setdefault(placement[3], []).append(placement[:3])
  repeated = [p for p in by_image.values() if len(p) >= 2]
  assert len(repeated) >= 15 and sum(p[0] != p[1] for p in repeated) >= 0.8 * len(repeated)
  assert _stream(folder, seed=0) == stream  # Reproducible ...
  other = _stream(folder, seed=1)  # ... and the seed decides: other draws at each position.
  assert sum(a[:3] != b[:3] for a, b in zip(stream, other)) >= 0.8 * len(stream)


def test_eval_covers_unequal_shards_once_in_equal_batch_counts(folder):
  """21 images over 2 processes: shards of 11 and 10, in batches of 5 that is 3 batches on
  both (collectives need equal counts), the shorter one padded, every image once."""
  shards = [list(pipeline.eval_iterator(folder, "train", "decode", 5, with_ids=True,
                                        process_index=p, process_count=2)) for p in range(2)]
  assert [len(shard) for shard in shards] == [3, 3]
  assert [sum(int(b["mask"].sum()) for b in shard) for shard in shards] == [11, 10]
  ids = [i for shard in shards for b in shard for i in b["id"][b["mask"]]]
  assert len(ids) == len(set(ids)) == 21


def test_few_shot_subset_is_stratified_seeded_and_random(folder):
  labels = folder.labels("train")
  np.testing.assert_array_equal(np.bincount(labels), list(CLASSES.values()))
  subsets = [pipeline.few_shot_subset(folder, "train", 3, seed=s) for s in range(8)]
  for subset in subsets:
    np.testing.assert_array_equal(np.bincount(labels[subset], minlength=3), 3)
    assert np.all(np.diff(subset) > 0)  # Sorted positions, no repeats.
  np.testing.assert_array_equal(subsets[0], pipeline.few_shot_subset(folder, "train", 3, seed=0))
  assert len({s.tobytes() for s in subsets}) >= 6  # Another seed, another subset ...
  chosen_in_c = np.unique(np.concatenate(subsets)[labels[np.concatenate(subsets)] == 2])
  assert len(chosen_in_c) >= 7  # ... drawn from the whole class, not its first files.
  # The iterators read exactly the files at those positions.
  everything = next(pipeline.eval_iterator(folder, "train", "decode", 32, with_ids=True))
  chosen = next(pipeline.eval_iterator(folder, "train", "decode", 32, subset=subsets[0],
                                       with_ids=True))
  np.testing.assert_array_equal(chosen["id"][chosen["mask"]], everything["id"][subsets[0]])
  np.testing.assert_array_equal(chosen["image"][chosen["mask"]], everything["image"][subsets[0]])
  with pytest.raises(UserError, match=r"Class 'a' has 5 examples in 'train', fewer than 6 shots"):
    pipeline.few_shot_subset(folder, "train", 6, seed=0)


def test_missing_expected_data_fails_in_ci_and_skips_with_its_name_elsewhere(tmp_path,
                                                                            monkeypatch):
  missing = tmp_path / "cifar10"
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception, match=f"CIFAR-10 image folder not found at {missing}"):
    require_data(missing, "CIFAR-10 image folder")
  monkeypatch.delenv("CI")
  with pytest.raises(pytest.skip.Exception, match=f"CIFAR-10 image folder not found at {missing}"):
    require_data(missing, "CIFAR-10 image folder")
  missing.mkdir()
  assert require_data(missing, "CIFAR-10 image folder") == missing
