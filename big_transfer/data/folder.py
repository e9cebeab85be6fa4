"""Image-folder datasets, `config.dataset = "folder:ROOT"` with ROOT/<split>/<class>/*.jpg|png.

Built on tfds's ImageFolder (split sizes and sorted class names come from its file listing),
with what our pipeline needs and it lacks: a layout check with a one-line error, subsplits
(per-process shards "train[0:25000]", "train[:90%]"), a seeded file order and `tfds_id`s.
"""

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from big_transfer.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LAYOUT = "ROOT/<split>/<class>/*.jpg|jpeg|png"


def _subfolders(path: epath.Path) -> list[epath.Path]:
  return sorted(p for p in path.iterdir() if p.is_dir())


def check_layout(root: str) -> None:
  """UserError for a missing root, a split without class folders or an empty class folder."""
  if not epath.Path(root).is_dir():
    raise UserError(f"Image folder {root!r} does not exist; expected {LAYOUT}.")
  splits = _subfolders(epath.Path(root))
  if not splits:
    raise UserError(f"Image folder {root!r} has no split folders; expected {LAYOUT}.")
  for split_dir in splits:
    classes = _subfolders(split_dir)
    if not classes:
      raise UserError(f"Split folder {os.fspath(split_dir)!r} has no class folders; expected "
                      f"{LAYOUT}.")
    for class_dir in classes:
      if not any(_is_image(p.name) for p in class_dir.iterdir()):
        raise UserError(f"Class folder {os.fspath(class_dir)!r} has no "
                        f"{'/'.join(IMAGE_EXTENSIONS)} images; add images or remove the folder.")
      for nested in _subfolders(class_dir):  # Rare: only then is a second level listed.
        if any(_is_image(p.name) for p in nested.iterdir()):
          raise UserError(f"Folder {os.fspath(nested)!r} holds images one level too deep, "
                          f"where they would be ignored; expected {LAYOUT}: move them up into "
                          "the class folder.")


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolder(tfds.folder_dataset.ImageFolder):
  """tfds.folder_dataset.ImageFolder, checked on open and readable by any split spec.

  Images stay encoded: decoding (and naming an undecodable file) is the pipeline's job.
  """

  def __init__(self, root: str):
    root = os.path.expanduser(root)
    check_layout(root)
    super().__init__(root)
    # SplitInfo resolves any split spec into (file, skip, take); one "file" per split here.
    self._split_of_file = {self.info.splits[s].file_instructions[0].filename: s
                           for s in self.info.splits}

  def _examples(self, split) -> list:
    examples = []
    for instruction in self.info.splits[split].file_instructions:
      files = self._split_examples[self._split_of_file[instruction.filename]]
      end = None if instruction.take < 0 else instruction.skip + instruction.take
      examples += files[instruction.skip:end]
    return examples

  def labels(self, split) -> np.ndarray:
    """Labels in read order, from the file listing alone (nothing is read)."""
    str2int = self.info.features["label"].str2int
    return np.array([str2int(e.label) for e in self._examples(split)], np.int64)

  def _as_dataset(self, split, shuffle_files=False, decoders=None, read_config=None):
    return self._load(self._examples(split), shuffle_files, decoders, read_config)

  def as_subset(self, split, positions: np.ndarray, *, decoders=None,
                read_config=None) -> tf.data.Dataset:
    """The examples of `split` at `positions`, in order; no other file is read."""
    examples = self._examples(split)
    return self._load([examples[i] for i in positions], False, decoders, read_config)

  def _load(self, examples, shuffle_files, decoders, read_config) -> tf.data.Dataset:
    str2int = self.info.features["label"].str2int
    ds = tf.data.Dataset.from_tensor_slices({
        "path": tf.constant([e.image_path for e in examples], tf.string),
        "label": tf.constant([str2int(e.label) for e in examples], tf.int64)})
    if shuffle_files:
      ds = ds.shuffle(len(examples), seed=read_config and read_config.shuffle_seed)
    add_id = read_config is not None and read_config.add_tfds_id

    def load(example):
      path = example["path"]
      encoded = {"image": tf.io.read_file(path), "label": example["label"],
                 "image/filename": path}
      decoded = self.info.features.decode_example(encoded, decoders=decoders)
      return {**decoded, "tfds_id": path} if add_id else decoded

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
