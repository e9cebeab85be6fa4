"""Labels that are not a ClassLabel feature of the dataset: VTAB's structured tasks derive them.

`config.label` names what to predict:
  ""                  the dataset's `label` (or multi-hot `labels`) feature;
  "FEATURE"           another ClassLabel feature (SmallNORB `label_azimuth`, `label_elevation`);
  "FEATURE:N"         that feature's values grouped into N classes of equal width,
                      floor(value / (values / N)) (dSprites `label_x_position:16`,
                      `label_orientation:16`);
  a name of DERIVED   a function of other features (Clevr, KITTI).

The definitions are the VTAB benchmark's (Zhai et al. 2019, arXiv 1910.04867), as written in
google-research/task_adaptation `task_adaptation/data/{clevr,kitti,dsprites}.py`.
"""

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf


def _index_of_last_below(thresholds, value) -> tf.Tensor:
  """The index of the largest threshold below `value` (thresholds ascending)."""
  below = tf.where(tf.constant(thresholds, tf.float32) < tf.cast(value, tf.float32))
  return tf.cast(tf.reduce_max(below), tf.int64)


def _clevr_count_all(example) -> tf.Tensor:
  # 3 to 10 objects -> classes 0-7.
  return tf.cast(tf.size(example["objects"]["size"]) - 3, tf.int64)


def _clevr_closest_object_distance(example) -> tf.Tensor:
  # Depth of the nearest object, in bins chosen to balance the classes.
  distance = tf.reduce_min(example["objects"]["pixel_coords"][:, 2])
  return _index_of_last_below([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0], distance)


def _kitti_closest_vehicle_distance(example) -> tf.Tensor:
  # Depth (m) of the nearest car, van or truck (types 0-2); 1000 when there is none: classes
  # near, middle, far, no vehicle.
  objects = example["objects"]
  vehicles = tf.where(objects["type"] < 3)
  depths = tf.gather(objects["location"][:, 2], vehicles)
  distance = tf.reduce_min(tf.concat([depths, tf.constant([[1000.0]])], axis=0))
  return _index_of_last_below([-100.0, 8.0, 20.0, 999.0], distance)


@dataclasses.dataclass(frozen=True)
class Derived:
  num_classes: int
  fn: Callable[[dict], tf.Tensor]  # Example (image still encoded) -> int64 label.


DERIVED = {
    "clevr_count_all": Derived(8, _clevr_count_all),
    "clevr_closest_object_distance": Derived(6, _clevr_closest_object_distance),
    "kitti_closest_vehicle_distance": Derived(4, _kitti_closest_vehicle_distance),
}


def binned(feature: str, values: int, num_classes: int) -> Derived:
  """`feature`'s `values` integer values in `num_classes` equal bins (VTAB's dSprites)."""
  width = np.float32(values / num_classes)
  return Derived(num_classes, lambda example: tf.cast(
      tf.math.floordiv(tf.cast(example[feature], tf.float32), width), tf.int64))
