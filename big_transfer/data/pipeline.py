"""tf.data input: per-process shards, deterministic augmentation, padded evaluation.

`config.batch_size` is global; the trainer divides it by the process count and hands the
per-process batch here. Batches are numpy dicts {image, labels[, mask][, id]}.

Positions: an example's position is its index in the split as read unshuffled; few-shot
subsets are sets of positions, and the per-process shards are contiguous runs of them.
"""

import itertools
import math
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from big_transfer.data import datasets, folder, preprocess
from big_transfer.errors import UserError


def _labels(dataset: datasets.Dataset, example: dict) -> tf.Tensor:
  label = example[dataset.label_key]
  if dataset.multi_label:  # Multi-hot over the label set (which may be empty).
    return tf.minimum(tf.reduce_sum(tf.one_hot(label, dataset.num_classes), axis=0), 1)
  return tf.one_hot(label, dataset.num_classes)


def few_shot_subset(dataset: datasets.Dataset, split: str, shots: int, seed: int) -> np.ndarray:
  """Sorted positions of `shots` random examples of every class of `split`.

  The same seed gives the same subset on every machine (labels are read, images are not).
  For BiT-HyperRule its size, shots x classes, stands for the train-split size.
  """
  if dataset.multi_label:
    raise UserError(f"Few-shot needs single-label classes; {dataset.name!r} is multi-label.")
  if shots < 1:
    raise UserError(f"Few-shot needs at least 1 example per class, got {shots}.")
  labels = dataset.labels(split)
  rng = np.random.default_rng(seed)
  chosen = []
  for label, name in enumerate(dataset.class_names()):
    candidates = np.flatnonzero(labels == label)
    if len(candidates) < shots:
      raise UserError(f"Class {name!r} has {len(candidates)} examples in {split!r}, fewer than "
                       f"{shots} shots; lower the shots or use a larger split.")
    chosen.append(rng.choice(candidates, shots, replace=False))
  return np.sort(np.concatenate(chosen))


def _shard(split: str, process_index: int, process_count: int):
  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count)


def _shard_sizes(dataset: datasets.Dataset, split: str, process_count: int,
                 subset: np.ndarray | None) -> list[int]:
  sizes = [dataset.num_examples(_shard(split, p, process_count)) for p in range(process_count)]
  if subset is None:
    return sizes
  ends = np.cumsum(sizes)
  return list(np.diff(np.searchsorted(subset, ends), prepend=0))


def _read(dataset: datasets.Dataset, split: str, process_index: int, process_count: int, *,
          shuffle_seed: int | None, subset: np.ndarray | None = None) -> tf.data.Dataset:
  """This process's examples with the image still encoded; `subset` keeps only those positions
  (then read in order: positions are only defined for the unshuffled read)."""
  dataset.check_split(split)
  shard = _shard(split, process_index, process_count)
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, add_tfds_id=True, try_autocache=False)
  decoders = {"image": tfds.decode.SkipDecoding()}
  if subset is None:
    return dataset.builder.as_dataset(split=shard, shuffle_files=shuffle_seed is not None,
                                      read_config=read_config, decoders=decoders)
  num_examples = dataset.num_examples(split)
  if (len(subset) == 0 or subset[0] < 0 or subset[-1] >= num_examples
      or np.any(np.diff(subset) <= 0)):
    raise UserError(f"Subset positions must be sorted, distinct, in [0, {num_examples}) for "
                     f"{split!r} and not empty; build them with pipeline.few_shot_subset.")
  offset = sum(_shard_sizes(dataset, split, process_count, None)[:process_index])
  local = subset[(subset >= offset) & (subset < offset + dataset.num_examples(shard))] - offset
  if isinstance(dataset.builder, folder.ImageFolder):  # Selects before reading any file.
    return dataset.builder.as_subset(shard, local, decoders=decoders, read_config=read_config)
  keep = np.zeros(dataset.num_examples(shard), bool)
  keep[local] = True
  keep = tf.constant(keep)
  ds = dataset.builder.as_dataset(split=shard, read_config=read_config, decoders=decoders)
  return ds.enumerate().filter(lambda i, _: keep[i]).map(lambda _, example: example)


def _options(deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  # Order (and so resumption and the undecodable-file report) depends on it; off is faster.
  options.deterministic = deterministic
  # Parallelism comes from the parallel map; ops spawning threads of their own oversubscribe.
  options.threading.max_intra_op_parallelism = 1
  return options


def _example_fn(dataset: datasets.Dataset, pp_spec: str, seed: int, with_ids: bool = False):
  pp = preprocess.parse(pp_spec)

  def fn(index, example):
    processed = pp({"image": example["image"], dataset.label_key: dataset.label(example),
                    "_seed": tf.stack([tf.cast(seed, tf.int64), index])})
    out = {"image": processed["image"], "labels": _labels(dataset, processed)}
    return {**out, "id": example["tfds_id"]} if with_ids else out

  return fn


def _batches(ds: tf.data.Dataset, make_stream, batch_size: int, example_fn) -> Iterator[dict]:
  """Numpy batches of `ds`, built from `make_stream()` (position, encoded example) by
  `example_fn`.

  An image that cannot be decoded or preprocessed stops with a UserError naming its file
  (found by processing the failed batch's examples again, from a new stream: iterating the
  same shuffled dataset twice would give another order), not a bare "Invalid JPEG data".
  """
  iterator = ds.as_numpy_iterator()
  for step in itertools.count():
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as error:
      _raise_bad_example(make_stream().skip(step * batch_size).take(batch_size), example_fn,
                         error)
    yield batch


def _raise_bad_example(examples: tf.data.Dataset, example_fn, error: Exception):
  for index, example in examples:
    name = example["tfds_id"].numpy().decode()
    try:
      shape = tf.io.decode_image(example["image"], expand_animations=False).shape
    except tf.errors.InvalidArgumentError:
      raise UserError(f"Cannot decode image {name} (corrupt or not an image); replace or delete "
                       "it.") from None
    try:
      example_fn(index, example)
    except tf.errors.InvalidArgumentError as e:
      raise UserError(f"Preprocessing fails on image {name} ({shape[0]}x{shape[1]}): "
                       f"{preprocess.error_reason(e)}; "
                       "make the ops fit the images (e.g. resize before random_crop).") from None
  raise error


def train_iterator(dataset: datasets.Dataset, split: str, pp_spec: str, local_batch: int, *,
                   seed: int, start_step: int = 0, shuffle_buffer: int = 10_000,
                   cache: bool = False, subset: np.ndarray | None = None,
                   deterministic: bool = True, process_index: int = 0,
                   process_count: int = 1, repeats: int = 1) -> Iterator[dict]:
  """Endless shuffled, augmented batches, positioned at `start_step` for exact resumption.

  The order and every random draw depend only on (seed, example position), so batch k is the
  same whether the run started at 0 or resumed at k. `subset` (few_shot_subset) restricts the
  examples, cached in memory after one pass over the split. `deterministic=False` lets reads
  and decoding finish out of order: faster, but batches are no longer reproducible (nor the
  resumption exact, nor the undecodable-file report sure to find the file).

  `repeats` r > 1: repeated augmentation (Hoffer et al. 2020; ResNet strikes back uses 3).
  Each example read from this process's shard comes r times in a row, each copy at its own
  stream position and so with its own augmentation draws; the shards stay disjoint, so the
  processes hold distinct copies of distinct images. Steps and epochs count the copies, as
  timm's RepeatAugSampler does (an epoch sees 1/r of the images, r times each).
  """
  # A buffer beyond the shard only mixes epochs, and takes that many reads to fill.
  shard_size = _shard_sizes(dataset, split, process_count, subset)[process_index]

  def make_stream():
    """(position, encoded example) in training order; a new dataset repeats the same order."""
    ds = _read(dataset, split, process_index, process_count, shuffle_seed=seed, subset=subset)
    if cache or subset is not None:  # A subset is small, and reading it again means the split.
      ds = ds.cache()
    stream = ds.repeat().shuffle(min(shuffle_buffer, shard_size), seed=seed,
                                 reshuffle_each_iteration=True)
    if repeats > 1:
      stream = stream.flat_map(lambda x: tf.data.Dataset.from_tensors(x).repeat(repeats))
    return stream.enumerate().skip(start_step * local_batch)  # Skipping costs reads only.

  example_fn = _example_fn(dataset, pp_spec, seed)
  ds = make_stream().map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _batches(ds.with_options(_options(deterministic)), make_stream, local_batch, example_fn)


def eval_iterator(dataset: datasets.Dataset, split: str, pp_spec: str, local_batch: int, *,
                  subset: np.ndarray | None = None, with_ids: bool = False,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Every example of this process's shard exactly once, in batches padded with mask 0.

  All processes yield the same number of batches (collectives need it), padding with empty
  batches where a shard is shorter. `with_ids` adds each example's `id` (its file name for
  image folders, the TFDS id otherwise; b"" in padding).
  """
  make_stream = lambda: _read(dataset, split, process_index, process_count, shuffle_seed=None,
                              subset=subset).enumerate()
  example_fn = _example_fn(dataset, pp_spec, 0, with_ids)
  ds = make_stream().map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(_options(True))
  # Every process runs as many batches as the largest shard needs.
  steps = math.ceil(max(_shard_sizes(dataset, split, process_count, subset)) / local_batch)
  # Padding batches are shaped like the real ones (the spec may not know the image size).
  empty = {k: np.zeros([0] + [d or 0 for d in spec.shape[1:]], spec.dtype.as_numpy_dtype)
           for k, spec in ds.element_spec.items()}
  for batch in _batches(ds, make_stream, local_batch, example_fn):
    steps -= 1
    empty = {k: v[:0] for k, v in batch.items()}
    yield _pad(batch, local_batch)
  for _ in range(steps):
    yield _pad(empty, local_batch)


def eval_positions(dataset: datasets.Dataset, split: str, *, subset: np.ndarray | None = None,
                   process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """The positions of the examples `eval_iterator` yields on this process, in order (its
  real rows; padding excluded)."""
  sizes = _shard_sizes(dataset, split, process_count, None)
  start = sum(sizes[:process_index])
  stop = start + sizes[process_index]
  if subset is None:
    return np.arange(start, stop)
  return subset[(subset >= start) & (subset < stop)]


def _pad(batch: dict, size: int) -> dict:
  n = len(batch["image"])
  padded = {k: np.concatenate([v, np.full((size - n,) + v.shape[1:], b"" if v.dtype == object
                                          else 0, v.dtype)])
            for k, v in batch.items()}
  padded["mask"] = np.arange(size) < n
  return padded
