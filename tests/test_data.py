"""Input pipeline on the embedded digits dataset (TFDS path end to end)."""

import itertools

import numpy as np
import pytest

from big_transfer.data import datasets, pipeline, preprocess
from big_transfer.errors import UserError

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
