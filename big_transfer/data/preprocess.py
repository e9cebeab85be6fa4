"""Named preprocessing ops, chained by a spec string (the big_vision way).

    "decode|resize(36)|random_crop(32)|flip_lr|value_range(-1, 1)"

Each op maps an example dict to an example dict and touches only `image`. Random ops are
stateless: they draw from the per-example `_seed` that the pipeline attaches, so a given
example of a given epoch is augmented the same way whatever the parallelism, and a resumed run
sees exactly the images of an uninterrupted one.
"""

import ast
from typing import Callable

import tensorflow as tf

from big_transfer.errors import UserError

Op = Callable[[dict], dict]
_OPS: dict[str, Callable[..., Op]] = {}


def register(fn):
  _OPS[fn.__name__] = fn
  return fn


def names() -> list[str]:
  return sorted(_OPS)


def parse(spec: str) -> Op:
  """Builds one function from "op1(args)|op2|..."; UserError names an unknown op."""
  ops = []
  for part in filter(None, (p.strip() for p in spec.split("|"))):
    name, _, args = part.partition("(")
    if name not in _OPS:
      raise UserError(f"Unknown preprocessing op {name!r} in {spec!r}; valid: {', '.join(names())}.")
    args = ast.literal_eval(f"({args.rstrip(')')},)") if args.strip(") ") else ()
    ops.append(_OPS[name](*args))

  def apply(example):
    for op in ops:
      example = op(example)
    return example

  return apply


def _next_seed(example: dict) -> tuple[dict, tf.Tensor]:
  """Splits the example's seed: one half for this op, one carried to the next."""
  seeds = tf.random.experimental.stateless_split(example["_seed"], 2)
  return {**example, "_seed": seeds[0]}, seeds[1]


def _image_op(fn: Callable[[tf.Tensor], tf.Tensor]) -> Op:
  return lambda example: {**example, "image": fn(example["image"])}


@register
def decode(channels: int = 3) -> Op:
  """Encoded bytes (or an already decoded image) to uint8 RGB; grayscale, RGBA, CMYK alike."""
  def fn(image):
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    elif image.shape[-1] == 1 and channels == 3:
      image = tf.image.grayscale_to_rgb(image)
    return image
  return _image_op(fn)


@register
def resize(size: int, method: str = "bilinear") -> Op:
  """Resizes to size x size (aspect not kept, as BiT does), keeping the dtype."""
  def fn(image):
    dtype = image.dtype
    image = tf.image.resize(image, (size, size), method=method, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), dtype) if dtype == tf.uint8 else image
  return _image_op(fn)


@register
def random_crop(size: int) -> Op:
  def op(example):
    example, seed = _next_seed(example)
    image = example["image"]
    crop = tf.image.stateless_random_crop(image, (size, size, tf.shape(image)[-1]), seed)
    return {**example, "image": crop}
  return op


@register
def central_crop(size: int) -> Op:
  def fn(image):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    return tf.image.crop_to_bounding_box(image, (h - size) // 2, (w - size) // 2, size, size)
  return _image_op(fn)


@register
def inception_crop(size: int, area_min: float = 0.05, area_max: float = 1.0) -> Op:
  """Random crop of 5-100% of the area with aspect 3/4-4/3, resized to size x size."""
  def op(example):
    example, seed = _next_seed(example)
    image = example["image"]
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
        area_range=(area_min, area_max), aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    crop = tf.image.resize(crop, (size, size), antialias=True)
    return {**example, "image": tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), image.dtype)}
  return op


@register
def flip_lr() -> Op:
  """Random horizontal flip with probability 1/2, drawn per example."""
  def op(example):
    example, seed = _next_seed(example)
    return {**example, "image": tf.image.stateless_random_flip_left_right(example["image"], seed)}
  return op


@register
def value_range(vmin: float = -1.0, vmax: float = 1.0) -> Op:
  """uint8 [0, 255] to float32 [vmin, vmax]."""
  return _image_op(lambda image: vmin + tf.cast(image, tf.float32) * ((vmax - vmin) / 255.0))


def output_image_size(spec: str) -> tuple[int, int]:
  """(height, width) of the images `spec` produces, found by running it on dummy JPEGs.

  The TPU planner compiles the step for this shape. Two input sizes are tried so that a spec
  whose output follows its input (no resize or crop to a fixed size) is an error, not a guess.
  """
  shapes = set()
  for size in (521, 613):  # Larger than any crop a spec takes without resizing first.
    jpeg = tf.io.encode_jpeg(tf.zeros((size, size + 3, 3), tf.uint8))
    example = {"image": jpeg, "_seed": tf.constant([0, 0], tf.int64)}
    shapes.add(tuple(parse(spec)(example)["image"].shape[:2]))
  if len(shapes) != 1:
    raise UserError(f"Preprocessing {spec!r} does not produce one fixed image size; end it "
                    "with a fixed-size op such as resize(N), random_crop(N) or inception_crop(N).")
  return shapes.pop()
