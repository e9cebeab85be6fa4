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

from big_transfer import metrics
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


_ENCODED = {"image": tfds.decode.SkipDecoding()}  # The pipeline decodes (and names bad files).


def _local_subset(dataset: datasets.Dataset, split: str, process_index: int, process_count: int,
                  subset: np.ndarray) -> np.ndarray:
  """The positions of `subset` that fall in this process's shard, relative to the shard."""
  num_examples = dataset.num_examples(split)
  if (len(subset) == 0 or subset[0] < 0 or subset[-1] >= num_examples
      or np.any(np.diff(subset) <= 0)):
    raise UserError(f"Subset positions must be sorted, distinct, in [0, {num_examples}) for "
                     f"{split!r} and not empty; build them with pipeline.few_shot_subset.")
  offset = sum(_shard_sizes(dataset, split, process_count, None)[:process_index])
  shard_size = dataset.num_examples(_shard(split, process_index, process_count))
  return subset[(subset >= offset) & (subset < offset + shard_size)] - offset


def _read(dataset: datasets.Dataset, split: str, process_index: int, process_count: int, *,
          subset: np.ndarray | None = None) -> tf.data.Dataset:
  """This process's examples in order, the image still encoded; `subset` keeps only those
  positions."""
  dataset.check_split(split)
  shard = _shard(split, process_index, process_count)
  read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False)
  if subset is None:
    return dataset.as_dataset(shard, read_config=read_config, decoders=_ENCODED)
  local = _local_subset(dataset, split, process_index, process_count, subset)
  if isinstance(dataset.builder, folder.ImageFolder):  # Selects before reading any file.
    return dataset.builder.as_subset(shard, local, decoders=_ENCODED, read_config=read_config)
  keep = np.zeros(dataset.num_examples(shard), bool)
  keep[local] = True
  keep = tf.constant(keep)
  ds = dataset.as_dataset(shard, read_config=read_config, decoders=_ENCODED)
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


def _batches(ds: tf.data.Dataset, examples_of_batch, example_fn) -> Iterator[dict]:
  """Numpy batches of `ds`; `examples_of_batch(k)` is batch k's (stream index, encoded example)
  stream, read again when batch k fails.

  An image that cannot be decoded or preprocessed stops with a UserError naming its file
  (found by processing the failed batch's examples again), not a bare "Invalid JPEG data".
  """
  iterator = ds.as_numpy_iterator()
  for step in itertools.count():
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as error:
      _raise_bad_example(examples_of_batch(step), example_fn, error)
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


_ENDLESS = 2**62  # Stream indices run from 0 to here: no run reaches it.


def _random_access_stream(reader: datasets.Reader, positions: np.ndarray, seed: int,
                          repeats: int):
  """(start, keep) -> (index, example) from stream index `start` on, for the indices that
  `keep` (a predicate, or None for all) selects: index i holds example j = i // repeats, epoch
  j // n's (j % n)-th, epochs being permutations of `positions` drawn from (seed, epoch). Only
  the selected examples at or after `start` are read."""
  n = len(positions)
  positions = tf.constant(positions, tf.int64)

  def example(index):
    j = index // repeats
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), j // n])
    shuffled = tf.random.experimental.index_shuffle(j % n, epoch_seed, n - 1)
    return index, reader.read(tf.gather(positions, shuffled))

  def stream(start, keep=None):
    indices = tf.data.Dataset.range(start, _ENDLESS)
    if keep is not None:
      indices = indices.filter(keep)
    return indices.map(example, num_parallel_calls=tf.data.AUTOTUNE)

  return stream


def _sequential_stream(examples: tf.data.Dataset, n: int, seed: int, shuffle_buffer: int,
                       repeats: int):
  """(start, keep) -> (index, example) as `_random_access_stream`, for data read only in
  sequence: epoch e is `examples` through a shuffle buffer seeded by (seed, e), each example
  `repeats` times in a row. Starting mid-epoch reads (and drops) the epoch's examples before
  `start`: up to one epoch of this process's shard."""
  buffer = min(shuffle_buffer, n)  # A larger one only takes longer to fill.

  def epoch(e):
    epoch_seed = tf.random.stateless_uniform([], tf.stack([tf.constant(seed, tf.int64), e]),
                                             minval=None, maxval=None, dtype=tf.int64)
    return examples.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

  def copies(j, example):
    """Example j at stream indices j x repeats ... (j + 1) x repeats - 1."""
    return tf.data.Dataset.zip((tf.data.Dataset.range(j * repeats, (j + 1) * repeats),
                                tf.data.Dataset.from_tensors(example).repeat(repeats)))

  def stream(start, keep=None):
    begin = start // repeats  # The example (index without repeats) holding `start`.
    first = begin // n * n
    epochs = tf.data.Dataset.range(begin // n, _ENDLESS).flat_map(epoch)
    indexed = epochs.enumerate(first).skip(begin - first)
    if repeats > 1:
      indexed = indexed.flat_map(copies).skip(start - begin * repeats)
    return indexed if keep is None else indexed.filter(lambda i, _: keep(i))

  return stream


def _stream(dataset: datasets.Dataset, split: str, *, seed: int, shuffle_buffer: int,
            cache: bool, subset: np.ndarray | None, repeats: int, process_index: int,
            process_count: int):
  """(the `_random_access_stream`-like stream of this process's encoded examples, examples per
  epoch, whether starting late costs reads): random access where the data allows it, else in
  sequence."""
  dataset.check_split(split)
  shard = _shard(split, process_index, process_count)
  reader = dataset.reader(shard, _ENCODED)
  if reader is not None:
    positions = (np.arange(reader.size) if subset is None else
                 _local_subset(dataset, split, process_index, process_count, subset))
    return _random_access_stream(reader, positions, seed, repeats), len(positions), False
  n = _shard_sizes(dataset, split, process_count, subset)[process_index]
  examples = _read(dataset, split, process_index, process_count, subset=subset)
  if cache or subset is not None:  # A subset is small, and reading it again means the split.
    examples = examples.cache()
  return _sequential_stream(examples, n, seed, shuffle_buffer, repeats), n, True


class TrainIterator:
  """Numpy batches of `train_iterator`. `position` is the stream index of the next batch's
  first example: the checkpoint stores it, and `train_iterator(start=position)` continues."""

  def __init__(self, make_batches, start: int, batch_size: int, then: tuple[int, str] | None):
    self._make_batches = make_batches
    self._batch_size = batch_size
    self.position = start
    if then is not None and start >= then[0]:
      self._batches, self._then = make_batches(start, then[1]), None
    else:
      self._batches, self._then = make_batches(start, None), then

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._then is not None and self.position >= self._then[0]:
      self._batches, self._then = self._make_batches(self.position, self._then[1]), None
    batch = next(self._batches)
    self.position += self._batch_size
    return batch


def train_iterator(dataset: datasets.Dataset, split: str, pp_spec: str, batch_size: int, *,
                   seed: int, start: int = 0, rows: tuple[int, int] | None = None,
                   then: tuple[int, str] | None = None, shuffle_buffer: int = 10_000,
                   cache: bool = False, subset: np.ndarray | None = None,
                   deterministic: bool = True, process_index: int = 0,
                   process_count: int = 1, repeats: int = 1) -> TrainIterator:
  """Endless shuffled, augmented batches of `batch_size`, from stream index `start` on.

  The stream is this process's shard in epochs, each a permutation drawn from (seed, epoch),
  and every random augmentation draws from (seed, stream index): batch k is the same whether
  the run started at 0 or at `start` = k x batch_size. Image folders and TFDS data prepared as
  array_record are read by position (the way Grain reads them), so starting late costs no
  reads; TFDS tfrecord data is read in sequence through a shuffle buffer of `shuffle_buffer`
  examples, and starting late reads the current epoch up to `start` (`cache` keeps it in
  memory after the first pass). `rows=(lo, hi)` keeps rows lo:hi of each batch (only those are
  read where the data allows it). From stream index `then[0]` on, images are preprocessed with
  `then[1]`. `subset` (few_shot_subset) restricts the examples. `deterministic=False` lets
  reads and decoding finish out of order: faster, but batches are no longer reproducible (nor
  the resumption exact, nor the undecodable-file report sure to find the file).

  `repeats` r > 1: repeated augmentation (Hoffer et al. 2020; ResNet strikes back uses 3).
  Stream index i holds the example of index i // r of the stream without repeats, so each
  example of this process's shard comes r times in a row, each copy at its own stream index and
  so with its own augmentation draws; the shards stay disjoint, so the processes hold distinct
  copies of distinct images. Steps and epochs count the copies, as timm's RepeatAugSampler does
  (an epoch sees 1/r of the images, r times each).
  """
  if start % batch_size:
    raise ValueError(f"start {start} is not a multiple of the batch size {batch_size}.")
  stream, epoch_size, late_start_reads = _stream(
      dataset, split, seed=seed, shuffle_buffer=shuffle_buffer, cache=cache, subset=subset,
      repeats=repeats, process_index=process_index, process_count=process_count)
  to_read = start // repeats % epoch_size
  if late_start_reads and to_read:
    metrics.log(f"Input: {dataset.name} {split!r} is stored as tfrecord, read only in "
                f"sequence: reading {to_read} examples to resume mid-epoch (at most "
                f"an epoch, {epoch_size}, per process). Prepare it as array_record (`tfds build "
                "--file_format=array_record`) to resume without reading.")
  lo, hi = rows or (0, batch_size)
  keep = None if rows is None else (
      lambda i: (i % batch_size >= lo) & (i % batch_size < hi))

  def make_batches(begin, spec):
    example_fn = _example_fn(dataset, spec or pp_spec, seed)
    ds = stream(begin, keep).map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(hi - lo, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    examples_of_batch = lambda k: stream(begin + k * batch_size, keep).take(hi - lo)
    return _batches(ds.with_options(_options(deterministic)), examples_of_batch, example_fn)

  return TrainIterator(make_batches, start, batch_size, then)


def eval_iterator(dataset: datasets.Dataset, split: str, pp_spec: str, local_batch: int, *,
                  subset: np.ndarray | None = None, with_ids: bool = False,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Every example of this process's shard exactly once, in batches padded with mask 0.

  All processes yield the same number of batches (collectives need it), padding with empty
  batches where a shard is shorter. `with_ids` adds each example's `id` (its file name for
  image folders, the TFDS id otherwise; b"" in padding).
  """
  examples = _read(dataset, split, process_index, process_count, subset=subset).enumerate()
  example_fn = _example_fn(dataset, pp_spec, 0, with_ids)
  ds = examples.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(_options(True))
  # Every process runs as many batches as the largest shard needs.
  steps = math.ceil(max(_shard_sizes(dataset, split, process_count, subset)) / local_batch)
  # Padding batches are shaped like the real ones (the spec may not know the image size).
  empty = {k: np.zeros([0] + [d or 0 for d in spec.shape[1:]], spec.dtype.as_numpy_dtype)
           for k, spec in ds.element_spec.items()}
  examples_of_batch = lambda k: examples.skip(k * local_batch).take(local_batch)
  for batch in _batches(ds, examples_of_batch, example_fn):
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
