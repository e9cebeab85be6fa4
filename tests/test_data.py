"""Input pipeline: the embedded digits (TFDS path end to end) and CIFAR-10 as an image folder."""

import itertools
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import CIFAR10

from big_transfer.data import datasets, mixup, pipeline, preprocess
from big_transfer.errors import UserError

needs_cifar10 = pytest.mark.usefixtures("cifar10_dir")  # A skip, or in CI a failure.

PP_TRAIN = "decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)"
PP_EVAL = "decode|resize(16)|value_range(-1, 1)"


@pytest.fixture(scope="module")
def digits(data_dir):
  return datasets.get("sklearn_digits", data_dir)


def test_digits_is_a_tfds_dataset(digits):
  assert (digits.num_examples("train"), digits.num_examples("test")) == (1437, 360)
  assert digits.num_classes == 10 and not digits.multi_label
  with pytest.raises(UserError, match="has no split 'validation'; valid: train, test"):
    digits.check_split("validation")


def test_train_batches_shapes_and_range(digits):
  batch = next(pipeline.train_iterator(digits, "train", PP_TRAIN, 32, seed=0))
  assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.float32
  assert -1 <= batch["image"].min() < 0 < batch["image"].max() <= 1
  np.testing.assert_array_equal(batch["labels"].sum(axis=1), 1)  # One-hot.
  unordered = next(pipeline.train_iterator(digits, "train", PP_TRAIN, 32, seed=0,
                                           deterministic=False))
  assert unordered["image"].shape == batch["image"].shape


def test_resumed_iterator_continues_exactly(digits):
  """Batch k is the same whether the iterator starts at 0 or resumes at k."""
  fresh = pipeline.train_iterator(digits, "train", PP_TRAIN, 16, seed=3, shuffle_buffer=100)
  expected = next(itertools.islice(fresh, 5, None))
  resumed = next(pipeline.train_iterator(digits, "train", PP_TRAIN, 16, seed=3,
                                         shuffle_buffer=100, start_step=5))
  for key in expected:
    np.testing.assert_array_equal(resumed[key], expected[key])
  other_seed = next(pipeline.train_iterator(digits, "train", PP_TRAIN, 16, seed=4,
                                            shuffle_buffer=100, start_step=5))
  assert not np.array_equal(other_seed["image"], expected["image"])


@pytest.mark.parametrize("batch", [64, 7, 500])
def test_eval_counts_every_example_once(digits, batch):
  batches = list(pipeline.eval_iterator(digits, "test", PP_EVAL, batch))
  assert len(batches) == -(-360 // batch)
  assert all(b["image"].shape[0] == batch for b in batches)
  assert sum(int(b["mask"].sum()) for b in batches) == 360
  padding = batches[-1]["mask"] == 0
  assert np.all(batches[-1]["image"][padding] == 0)


def test_eval_shards_over_processes(digits):
  """Two processes: the same number of batches each, shards that add up to the split."""
  shards = [list(pipeline.eval_iterator(digits, "test", PP_EVAL, 64, process_index=i,
                                        process_count=2)) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3
  counts = [sum(int(b["mask"].sum()) for b in shard) for shard in shards]
  assert counts == [180, 180]
  images = [b["image"][b["mask"]] for shard in shards for b in shard]
  flat = np.concatenate(images).reshape(360, -1)
  assert len({row.tobytes() for row in flat}) > 350  # Disjoint: (near-)distinct images.


def test_unknown_preprocessing_op():
  with pytest.raises(UserError, match=r"Unknown preprocessing op 'rezise'.*valid: .*resize"):
    preprocess.parse("decode|rezise(32)")


def test_unknown_and_unprepared_datasets(tmp_path):
  with pytest.raises(UserError, match=r"Unknown dataset 'mnsit'.*Did you mean .*mnist"):
    datasets.get("mnsit", str(tmp_path))
  with pytest.raises(UserError, match=r"Dataset 'mnist' is not prepared in .*tfds build mnist"):
    datasets.get("mnist", str(tmp_path))


def test_multi_hot_labels(tmp_path):
  """A `labels` Sequence(ClassLabel) dataset gives multi-hot rows, duplicates and [] included."""
  TinyMultiLabel(data_dir=str(tmp_path)).download_and_prepare()
  dataset = datasets.get("tiny_multi_label", str(tmp_path))
  assert dataset.multi_label and dataset.num_classes == 5
  batch = next(pipeline.eval_iterator(dataset, "train", "decode", 4))
  example_index = batch["image"][:, 0, 0, 0]  # TFDS shuffled the examples when preparing.
  np.testing.assert_array_equal(batch["labels"], np.array(MULTI_LABEL_EXPECTED)[example_index])


class TinyMultiLabel(tfds.core.GeneratorBasedBuilder):
  """Four 4x4 images with label sets [0, 3], [1], [], [2, 4, 4]."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(4, 4, 3)),
        "labels": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=5))}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, labels in enumerate([[0, 3], [1], [], [2, 4, 4]]):
      yield i, {"image": np.full((4, 4, 3), i, np.uint8), "labels": labels}


MULTI_LABEL_EXPECTED = [[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 1]]


# ---- Preprocessing ops ------------------------------------------------------------------------

def _decode(data: bytes, spec: str = "decode") -> np.ndarray:
  example = {"image": tf.constant(data), "_seed": tf.constant([0, 0], tf.int64)}
  return preprocess.parse(spec)(example)["image"].numpy()


def test_decode_gives_rgb_for_grayscale_rgba_and_cmyk():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20
  rgba = np.concatenate([np.full((3, 4, 3), 7, np.uint8), np.zeros((3, 4, 1), np.uint8)], -1)
  np.testing.assert_array_equal(_decode(tf.io.encode_png(gray).numpy()), np.repeat(gray, 3, -1))
  np.testing.assert_array_equal(_decode(tf.io.encode_png(rgba).numpy()), rgba[..., :3])
  image = pytest.importorskip("PIL.Image")
  import io  # pylint: disable=g-import-not-at-top
  cmyk = io.BytesIO()
  image.new("RGB", (8, 6), (200, 40, 10)).convert("CMYK").save(cmyk, "JPEG", quality=100)
  rgb = _decode(cmyk.getvalue())
  assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
  np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), (200, 40, 10), atol=12)


def test_resize_is_antialiased_resize_either_way():
  """Antialiasing is skipped when upscaling (faster); the pixels are the same."""
  for shape, size in (((50, 40, 3), 16), ((12, 20, 3), 32), ((12, 40, 3), 24)):
    image = tf.random.stateless_uniform(shape, (0, 1), maxval=256, dtype=tf.int32)
    image = tf.cast(image, tf.uint8)
    expected = tf.image.resize(image, (size, size), antialias=True)
    expected = tf.cast(tf.clip_by_value(tf.round(expected), 0, 255), tf.uint8)
    resized = preprocess.parse(f"resize({size})")({"image": image})["image"]
    np.testing.assert_array_equal(resized, expected)


def test_inception_box_covers_5_to_100_percent_at_aspect_3_4_to_4_3():
  shape = tf.constant([300, 400, 3])
  boxes = [preprocess.inception_box(shape, tf.constant([7, i], tf.int64)) for i in range(400)]
  sizes = np.array([size.numpy() for _, size in boxes], np.float64)
  offsets = np.array([begin.numpy() for begin, _ in boxes])
  area = sizes.prod(1) / (300 * 400)
  aspect = sizes[:, 1] / sizes[:, 0]
  assert 0.05 - 1e-3 <= area.min() < 0.15 and 0.8 < area.max() <= 1
  # Integer sides: the aspect range holds up to a pixel's rounding.
  assert 3 / 4 - 0.02 <= aspect.min() < 0.8 and 1.25 < aspect.max() <= 4 / 3 + 0.02
  assert np.all(offsets + sizes <= (300, 400)) and np.all(offsets >= 0)


def test_decode_jpeg_and_inception_crop_equals_decode_then_crop():
  smooth = tf.image.resize(tf.random.stateless_uniform((12, 10, 3), (1, 2)) * 255, (240, 200))
  jpeg = tf.io.encode_jpeg(tf.cast(smooth, tf.uint8), quality=95).numpy()
  for spec_seed in range(5):
    example = {"image": tf.constant(jpeg), "_seed": tf.constant([spec_seed, 3], tf.int64)}
    fused = preprocess.parse("decode_jpeg_and_inception_crop(64)")(example)["image"].numpy()
    plain = preprocess.parse("decode|inception_crop(64)")(example)["image"].numpy()
    assert fused.shape == plain.shape == (64, 64, 3)
    assert np.abs(fused.astype(int) - plain).mean() < 2  # Same crop; JPEG block edges differ.


def test_hyperrule_resolutions_and_switches():
  assert preprocess.hyperrule(32 * 32) == (
      "decode|resize(160)|random_crop(128)|flip_lr|value_range(-1, 1)",
      "decode|resize(128)|value_range(-1, 1)")
  assert preprocess.hyperrule(96 * 96, large=(512, 480))[0] == (
      "decode|resize(512)|random_crop(480)|flip_lr|value_range(-1, 1)")
  train, test = preprocess.hyperrule(500 * 375, flip=False, crop=False)
  assert (train, test) == ("decode|resize(384)|value_range(-1, 1)",
                           "decode|resize(384)|value_range(-1, 1)")
  for spec in (train, preprocess.UPSTREAM_TRAIN, preprocess.UPSTREAM_EVAL):
    preprocess.parse(spec)


# ---- MixUp --------------------------------------------------------------------------------------

def test_mixup_mixes_images_and_labels_with_one_beta_draw():
  batch = {"image": np.arange(8 * 2, dtype=np.float32).reshape(8, 2),
           "labels": np.eye(8, dtype=np.float32)}
  assert mixup.mixup(jax.random.key(0), batch, 0.0) is batch
  keys = jax.random.split(jax.random.key(2), 4000)
  mixed = jax.jit(jax.vmap(lambda key: mixup.mixup(key, batch, 0.2)))(keys)  # One compile.
  lams = mixed["labels"][:, 0, 0]  # Row 0 = lam * example 0 + (1 - lam) * example 7.
  for lam, labels, image in zip(lams[:3], mixed["labels"], mixed["image"]):
    np.testing.assert_allclose(labels, lam * batch["labels"] + (1 - lam) * np.eye(8)[::-1],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(image, lam * batch["image"] + (1 - lam) * batch["image"][::-1],
                               rtol=1e-5, atol=1e-5)
  # Beta(0.2, 0.2): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.179; mostly near 0 or 1.
  assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 0.179) < 0.02
  assert np.mean((lams < 0.1) | (lams > 0.9)) > 0.5


# ---- Few-shot -----------------------------------------------------------------------------------

def test_few_shot_subset_on_tfds_digits_feeds_the_iterators(digits):
  subset = pipeline.few_shot_subset(digits, "train", 3, seed=0)
  labels = digits.labels("train")[subset]
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), 3)
  chosen = list(pipeline.eval_iterator(digits, "train", "decode", 64, subset=subset))
  assert len(chosen) == 1 and chosen[0]["mask"].sum() == 30
  chosen_images = {im.tobytes() for im in chosen[0]["image"][chosen[0]["mask"]]}
  train = next(pipeline.train_iterator(digits, "train", "decode", 60, seed=1, subset=subset))
  assert {im.tobytes() for im in train["image"]} == chosen_images  # Two epochs of the 30.
  with pytest.raises(UserError, match="fewer than 1000 shots"):
    pipeline.few_shot_subset(digits, "train", 1000, seed=0)


# ---- CIFAR-10 as an image folder -----------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar10(cifar10_dir):
  return datasets.get(f"folder:{cifar10_dir}")


def _files(split: str) -> list[str]:
  return sorted(str(p) for p in (CIFAR10 / split).glob("*/*.jpg"))


def test_image_folder_sizes_classes_and_resolution(cifar10):
  assert (cifar10.num_examples("train"), cifar10.num_examples("test")) == (50_000, 2_000)
  assert cifar10.num_examples("train[:10%]") == 5_000
  assert cifar10.class_names() == sorted(p.name for p in (CIFAR10 / "train").iterdir())
  assert cifar10.num_classes == 10 and not cifar10.multi_label
  assert cifar10.image_area("test") == 32 * 32  # HyperRule: resize 160, crop 128.


def test_few_shot_is_stratified_and_seeded(cifar10):
  subset = pipeline.few_shot_subset(cifar10, "train", 10, seed=0)
  assert len(subset) == 10 * 10  # The HyperRule dataset size: shots x classes.
  np.testing.assert_array_equal(np.bincount(cifar10.labels("train")[subset]), 10)
  np.testing.assert_array_equal(subset, pipeline.few_shot_subset(cifar10, "train", 10, seed=0))
  assert len(np.intersect1d(subset, pipeline.few_shot_subset(cifar10, "train", 10, seed=1))) < 10
  # The files the iterators read are those of the subset, 10 from each class folder.
  ids = [i.decode() for b in pipeline.eval_iterator(cifar10, "train", "decode", 64, subset=subset,
                                                    with_ids=True) for i in b["id"][b["mask"]]]
  classes = [i.split("/")[-2] for i in ids]
  assert len(set(ids)) == 100 and all(classes.count(c) == 10 for c in cifar10.class_names())


@pytest.mark.parametrize("batch", [64, 333])
def test_eval_sees_every_cifar10_test_image_once(cifar10, batch):
  """1 and 8 processes: equal batch counts, disjoint shards, together the 2000 files."""
  for processes in (1, 8):
    shards = [list(pipeline.eval_iterator(cifar10, "test", "decode", batch, with_ids=True,
                                          process_index=p, process_count=processes))
              for p in range(processes)]
    assert len({len(shard) for shard in shards}) == 1
    ids = [i.decode() for shard in shards for b in shard for i in b["id"][b["mask"]]]
    assert len(ids) == len(set(ids)) == 2000 and sorted(ids) == _files("test")
    assert all(i == b"" for shard in shards for b in shard for i in b["id"][~b["mask"]])


def test_random_flip_flips_about_half(cifar10):
  """Official bug #62 flipped every image; here each one is flipped with probability 1/2."""
  subset = np.arange(1000)
  plain, flipped = [np.concatenate([b["image"][b["mask"]] for b in pipeline.eval_iterator(
      cifar10, "test", spec, 500, subset=subset)]) for spec in ("decode", "decode|flip_lr")]
  is_flipped = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
  is_plain = np.all(flipped == plain, axis=(1, 2, 3))
  assert np.all(is_flipped ^ is_plain)
  assert 0.4 <= is_flipped.mean() <= 0.6


def _small_folder(root, extra: dict[str, bytes]):
  """root/{train,test}/<3 classes>/ with 4 real CIFAR-10 images each, plus `extra` files."""
  for split in ("train", "test"):
    for name in ("cat", "dog", "ship"):
      (root / split / name).mkdir(parents=True)
      for source in sorted((CIFAR10 / "test" / name).glob("*.jpg"))[:4]:
        shutil.copy(source, root / split / name / source.name)
  for path, data in extra.items():
    (root / path).write_bytes(data)
  return datasets.get(f"folder:{root}")


@needs_cifar10
def test_undecodable_image_is_named(tmp_path):
  dataset = _small_folder(tmp_path, {"test/dog/broken.jpg": b"\xff\xd8\xff not a jpeg",
                                     "train/cat/notes.txt": b"ignored: not an image name"})
  assert dataset.num_examples("test") == 13 and dataset.num_examples("train") == 12
  with pytest.raises(UserError, match=r"Cannot decode image .*test/dog/broken\.jpg"):
    list(pipeline.eval_iterator(dataset, "test", "decode|resize(8)", 4))
  shutil.move(tmp_path / "test/dog/broken.jpg", tmp_path / "train/dog/broken.jpg")
  dataset = datasets.get(f"folder:{tmp_path}")
  with pytest.raises(UserError, match=r"Cannot decode image .*train/dog/broken\.jpg"):
    list(itertools.islice(pipeline.train_iterator(dataset, "train", "decode", 5, seed=0), 6))


@needs_cifar10
def test_image_folder_layout_errors(tmp_path):
  with pytest.raises(UserError, match=r"Image folder '.*/missing' does not exist; expected ROOT/"):
    datasets.get(f"folder:{tmp_path}/missing")
  (tmp_path / "train" / "frog").mkdir(parents=True)
  with pytest.raises(UserError, match=r"Class folder '.*/train/frog' has no .jpg/.jpeg/.png"):
    _small_folder(tmp_path, {})
