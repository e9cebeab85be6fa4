"""Dataset resolution: TFDS names, the embedded digits and image folders ("folder:ROOT").

Everything the trainer needs to know about a dataset (class count, label kind, split sizes)
comes from here, read from the TFDS metadata rather than from a hand-kept size table.
"""

import contextlib
import dataclasses
import difflib
import io
import os
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from big_transfer.data import digits, folder, labels as derived_labels
from big_transfer.errors import UserError

# Datasets that ship inside an installed package and are prepared on first use.
EMBEDDED = {"sklearn_digits": digits.SklearnDigits}
FOLDER_PREFIX = "folder:"


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  builder: tfds.core.DatasetBuilder
  num_classes: int
  multi_label: bool  # `labels` is a set of classes (ImageNet-21k / JFT style).
  label_key: str
  # Computes the label from the example's features (VTAB's structured tasks, data/labels.py).
  derive_label: Callable[[dict], tf.Tensor] | None = None

  def label(self, example: dict) -> tf.Tensor:
    """The example's label (class index, or class indices when multi-label)."""
    return self.derive_label(example) if self.derive_label else example[self.label_key]

  def as_dataset(self, split: str, *, decoders=None, read_config=None) -> tf.data.Dataset:
    """`builder.as_dataset`, also for data prepared as array_record (which TFDS reads only by
    random access): then the examples in order, `tfds_id`s included."""
    reader = None if isinstance(self.builder, folder.ImageFolder) else self.reader(split, decoders)
    if reader is None:
      return self.builder.as_dataset(split=split, decoders=decoders, read_config=read_config)
    examples = tf.data.Dataset.range(reader.size).map(reader.read,
                                                      num_parallel_calls=tf.data.AUTOTUNE)
    if not (read_config and read_config.add_tfds_id):
      examples = examples.map(lambda example: {k: v for k, v in example.items()
                                                if k != "tfds_id"})
    return examples

  def reader(self, split: str, decoders=None) -> "Reader | None":
    """Random access to the examples of `split` (image folders and TFDS data prepared as
    array_record); None for TFDS data prepared as tfrecord (read only in sequence)."""
    self.check_split(split)
    if isinstance(self.builder, folder.ImageFolder):
      size, read = self.builder.reader(split, decoders)
      return Reader(size, read)
    formats = self.builder.info.available_file_formats()
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
      return None
    return _array_record_reader(self.builder, split, decoders)

  def num_examples(self, split: str) -> int:
    return self.builder.info.splits[split].num_examples

  def check_split(self, split: str) -> None:
    try:
      self.num_examples(split)
    except (KeyError, ValueError):
      raise UserError(f"Dataset {self.name!r} has no split {split!r}; "
                       f"valid: {', '.join(self.builder.info.splits)}.") from None

  def class_names(self) -> list[str]:
    if self.derive_label:
      return [str(i) for i in range(self.num_classes)]
    feature = self.builder.info.features[self.label_key]
    return (feature.feature if self.multi_label else feature).names

  def labels(self, split: str) -> np.ndarray:
    """Every example's label in read order, images not decoded (few-shot selection)."""
    self.check_split(split)
    if isinstance(self.builder, folder.ImageFolder):
      labels = self.builder.labels(split)
      if not self.derive_label:
        return labels
      examples = tf.data.Dataset.from_tensor_slices({"label": labels})  # All a folder knows.
    elif self.derive_label:
      examples = self.as_dataset(
          split, decoders={"image": tfds.decode.SkipDecoding()},
          read_config=tfds.ReadConfig(try_autocache=False))
    if self.derive_label:
      batches = examples.map(self.derive_label, num_parallel_calls=tf.data.AUTOTUNE).batch(8192)
      return np.concatenate(list(batches.as_numpy_iterator()) or [np.zeros(0, np.int64)])
    ds = self.as_dataset(
        split, decoders=tfds.decode.PartialDecoding({self.label_key: True}),
        read_config=tfds.ReadConfig(try_autocache=False))
    batches = ds.batch(8192).as_numpy_iterator()
    return np.concatenate([b[self.label_key] for b in batches] or [np.zeros(0, np.int64)])

  def image_area(self, split: str) -> int:
    """Height x width: from the features when fixed, else of the split's first image.

    BiT-HyperRule picks its resolution from it (see preprocess.hyperrule).
    """
    height, width = self.builder.info.features["image"].shape[:2]
    if height is None or width is None:  # Variable-size images (folders, ImageNet).
      example = next(iter(self.as_dataset(
          split, decoders={"image": tfds.decode.SkipDecoding()},
          read_config=tfds.ReadConfig(add_tfds_id=True))))
      try:
        height, width = tf.io.decode_image(example["image"], expand_animations=False).shape[:2]
      except tf.errors.InvalidArgumentError:
        raise UserError(f"Cannot decode image {example['tfds_id'].numpy().decode()}, the first "
                        f"of {split!r} (corrupt or not an image); replace or delete it.") from None
    return int(height) * int(width)


@dataclasses.dataclass(frozen=True)
class Reader:
  """Random access: `read(position)` (an int64 scalar tensor, 0 <= position < size) is the
  example there, as `as_dataset` gives it, with its `tfds_id`; traceable inside tf.data."""
  size: int
  read: Callable[[tf.Tensor], dict]


def _array_record_reader(builder: tfds.core.DatasetBuilder, split: str, decoders) -> Reader:
  """Reads serialized examples through TFDS's array_record data source (one Python call per
  example) and parses them with TensorFlow ops, as TFDS does for tfrecord files."""
  source = builder.as_data_source(
      split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
      file_format=tfds.core.FileFormat.ARRAY_RECORD)
  instructions = builder.info.splits[split].file_instructions
  ends = np.cumsum([instruction.take for instruction in instructions])
  names = [os.path.basename(instruction.filename) for instruction in instructions]
  features = builder.info.features
  if isinstance(decoders, tfds.decode.PartialDecoding):  # As builder.as_dataset does.
    features, decoders = decoders.extract_features(features), decoders.decoders

  def fetch(position):
    position = int(position)
    file = int(np.searchsorted(ends, position, side="right"))
    index = instructions[file].skip + position - (ends[file - 1] if file else 0)
    return source[position], f"{names[file]}__{index}".encode()  # TFDS's tfds_id format.

  def read(position):
    serialized, tfds_id = tf.numpy_function(fetch, [position], (tf.string, tf.string),
                                            stateful=False)
    serialized.set_shape([])
    tfds_id.set_shape([])
    example = features.deserialize_example(serialized, decoders=decoders)
    return {**example, "tfds_id": tfds_id}

  return Reader(len(source), read)


def _not_found(name: str) -> UserError:
  known = tfds.list_builders(with_community_datasets=False)
  close = difflib.get_close_matches(name, known, n=3)
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  return UserError(f"Unknown dataset {name!r}; valid: {', '.join(EMBEDDED)} (embedded), "
                    f"{FOLDER_PREFIX}ROOT (an image folder) or any registered TFDS name "
                    f"(tfds.list_builders()).{hint}")


def _prepare_embedded(builder: tfds.core.DatasetBuilder) -> None:
  """Builds an embedded dataset (seconds, no download), saying so in one line instead of
  tfds's progress bars and banners."""
  print(f"Preparing the embedded dataset {builder.name} in {builder.data_dir} (once).",
        flush=True)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()
  finally:
    tfds.display_progress_bar(True)


def get(name: str, data_dir: str | None = None, label: str = "") -> Dataset:
  """Resolves `name`, preparing embedded datasets; UserError with the fix otherwise.

  `label` picks what to predict (data/labels.py): "" the `label` or multi-hot `labels`
  feature, another ClassLabel feature, "FEATURE:N" (binned) or a derived label's name.
  """
  if name.startswith(FOLDER_PREFIX):
    builder = folder.ImageFolder(name[len(FOLDER_PREFIX):])
    return _with_label(name, builder, label)
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  # Checked up front: for an unregistered name TFDS would search cloud storage.
  if name.split(":")[0].split("/")[0] not in tfds.list_builders(with_community_datasets=False):
    raise _not_found(name)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (AssertionError, ValueError) as e:  # E.g. a version this TFDS cannot build.
    reason = " ".join(str(e).rsplit('": ', 1)[-1].split()).rstrip(".")
    raise UserError(f"Dataset {name!r}: {reason}; prepare that version with a matching "
                    "tensorflow-datasets release or name another version.") from None
  if name in EMBEDDED and not builder.is_prepared():
    # As array_record: read by position, a resumed run reads no input to find its place.
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    _prepare_embedded(builder)
  elif not builder.is_prepared():
    manual = (" --manual_dir=DIR` (DIR holding the files its TFDS catalog page lists: it cannot "
              "be downloaded automatically)" if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else "`")
    raise UserError(
        f"Dataset {name!r} is not prepared in {builder.data_dir!r}: run `tfds build {name} "
        f"--data_dir=...{manual} and pass --config.data_dir.")
  return _with_label(name, builder, label)


def _with_label(name: str, builder: tfds.core.DatasetBuilder, label: str) -> Dataset:
  features = builder.info.features
  if not label:
    for key, multi in (("label", False), ("labels", True)):
      if key in features:
        feature = features[key].feature if multi else features[key]
        return Dataset(name, builder, feature.num_classes, multi, key)
    raise UserError(f"Dataset {name!r} has no `label` or `labels` feature; features: "
                     f"{', '.join(features)}; pick one with --config.label.")
  if label in derived_labels.DERIVED:
    derived = derived_labels.DERIVED[label]
    return Dataset(name, builder, derived.num_classes, False, label, derived.fn)
  key, _, bins = label.partition(":")
  feature = features[key] if key in features else None
  if not isinstance(feature, tfds.features.ClassLabel) or (bins and not (
      bins.isdigit() and 1 < int(bins) <= feature.num_classes)):
    class_labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    raise UserError(f"Label {label!r} is not usable for dataset {name!r}; valid: "
                     f"{', '.join(class_labels)} (each optionally FEATURE:N to group its values "
                     f"into N classes) or {', '.join(derived_labels.DERIVED)}.")
  if bins:
    derived = derived_labels.binned(key, feature.num_classes, int(bins))
    return Dataset(name, builder, derived.num_classes, False, label, derived.fn)
  return Dataset(name, builder, feature.num_classes, False, key)
