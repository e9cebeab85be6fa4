"""tf.data input: per-process shards, deterministic augmentation, padded evaluation.

`config.batch_size` is global; the trainer divides it by the process count and hands the
per-process batch here. Batches are numpy dicts {image, labels[, mask]}.
"""

import math
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from big_transfer.data import datasets, preprocess


def _labels(dataset: datasets.Dataset, example: dict) -> tf.Tensor:
  label = example[dataset.label_key]
  if dataset.multi_label:  # Multi-hot over the label set.
    return tf.reduce_max(tf.one_hot(label, dataset.num_classes), axis=0)
  return tf.one_hot(label, dataset.num_classes)


def _read(dataset: datasets.Dataset, split: str, process_index: int, process_count: int,
          *, shuffle_seed: int | None) -> tf.data.Dataset:
  dataset.check_split(split)
  local_split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, add_tfds_id=False)
  return dataset.builder.as_dataset(
      split=local_split, shuffle_files=shuffle_seed is not None, read_config=read_config,
      decoders={"image": tfds.decode.SkipDecoding()})


def _example_fn(dataset: datasets.Dataset, pp_spec: str, seed: int):
  pp = preprocess.parse(pp_spec)

  def fn(index, example):
    example = pp({"image": example["image"], "_seed": tf.stack([tf.cast(seed, tf.int64), index]),
                  dataset.label_key: example[dataset.label_key]})
    return {"image": example["image"], "labels": _labels(dataset, example)}

  return fn


def train_iterator(dataset: datasets.Dataset, split: str, pp_spec: str, local_batch: int, *,
                   seed: int, start_step: int = 0, shuffle_buffer: int = 10_000,
                   cache: bool = False, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """Endless shuffled, augmented batches, positioned at `start_step` for exact resumption.

  The order and every random draw depend only on (seed, example position), so batch k is the
  same whether the run started at 0 or resumed at k.
  """
  ds = _read(dataset, split, process_index, process_count, shuffle_seed=seed)
  if cache:
    ds = ds.cache()
  ds = ds.repeat().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).enumerate()
  ds = ds.skip(start_step * local_batch)  # Before decoding: skipping costs reads only.
  ds = ds.map(_example_fn(dataset, pp_spec, seed), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def eval_steps(num_examples: int, local_batch: int, process_count: int) -> int:
  """Batches every process runs so that the largest shard is seen whole."""
  return math.ceil(math.ceil(num_examples / process_count) / local_batch)


def eval_iterator(dataset: datasets.Dataset, split: str, pp_spec: str, local_batch: int, *,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Every example of this process's shard exactly once, in batches padded with mask 0.

  All processes yield the same number of batches (collectives need it), padding with empty
  batches where a shard is shorter.
  """
  ds = _read(dataset, split, process_index, process_count, shuffle_seed=None).enumerate()
  ds = ds.map(_example_fn(dataset, pp_spec, seed=0), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  steps = eval_steps(dataset.num_examples(split), local_batch, process_count)
  for batch in ds.as_numpy_iterator():
    steps -= 1
    yield _pad(batch, local_batch)
  empty = {k: np.zeros((0,) + tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype)
           for k, spec in ds.element_spec.items()}
  for _ in range(steps):
    yield _pad(empty, local_batch)


def _pad(batch: dict, size: int) -> dict:
  n = len(batch["image"])
  padded = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}
  padded["mask"] = np.arange(size) < n
  return padded
