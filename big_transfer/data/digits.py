"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits as a TFDS builder.

It ships inside an installed package (no download), and going through TFDS means the demo
exercises the same `tfds.builder(...).as_dataset(...)` path as ImageNet.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 360  # 20% of the 1797 images, a fixed random subset.


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """1797 grayscale 8x8 digits (UCI optical recognition set), 10 classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 1437 train / 360 test images."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's bundled 8x8 digits, pixel values 0-16 scaled to 0-255.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.RandomState(0).permutation(len(images))
    test, train = order[:NUM_TEST], order[NUM_TEST:]
    return {
        "train": self._generate_examples(images[train], digits.target[train], train),
        "test": self._generate_examples(images[test], digits.target[test], test),
    }

  def _generate_examples(self, images, labels, ids):
    for image, label, i in zip(images, labels, ids):
      yield int(i), {"image": image, "label": int(label)}
