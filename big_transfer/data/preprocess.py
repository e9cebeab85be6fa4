"""Named preprocessing ops, chained by a spec string (the big_vision way).

    "decode|resize(36)|random_crop(32)|flip_lr|value_range(-1, 1)"

Each op maps an example dict to an example dict and touches only `image`. Random ops are
stateless: they draw from the per-example `_seed` that the pipeline attaches, so a given
example of a given epoch is augmented the same way whatever the parallelism, and a resumed run
sees exactly the images of an uninterrupted one.

`views(n)` runs the rest of the spec n times, each with its own seed, and stacks the results
as `image` (n, h, w, c): the two augmented views of contrastive learning (MoCo-v2's recipe,
Chen et al. 2020, arXiv 2003.04297: inception_crop(size, 0.2)|color_jitter(0.4, 0.4, 0.4, 0.1,
0.8)|random_grayscale(0.2)|gaussian_blur(0.5, 0.1, 2.0)|flip_lr, configs/hpt.py).
"""

import ast
import inspect
import re
from typing import Callable, Sequence

import tensorflow as tf

from big_transfer import hyperrule as rule
from big_transfer.data import randaugment
from big_transfer.errors import UserError

Op = Callable[[dict], dict]
_OPS: dict[str, Callable[..., Op]] = {}

# The upstream (BiT-S/M/L) recipe; decode_jpeg_and_inception_crop decodes only the crop.
UPSTREAM_TRAIN = "decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)"
UPSTREAM_EVAL = "decode|resize(224)|value_range(-1, 1)"


def hyperrule(image_area: int, *, flip: bool = True, crop: bool = True,
              large: Sequence[int] = rule.LARGE_IMAGE_SIZES["paper"]) -> tuple[str, str]:
  """BiT-HyperRule's (pp_train, pp_eval) for images of `image_area` pixels.

  Below 96x96: resize 160, random crop 128; else resize/crop `large` (448/384 in the paper,
  512/480 in the released code); the sizes come from `big_transfer.hyperrule`.
  """
  return transfer_specs(*rule.image_sizes(image_area, large), flip=flip, crop=crop)


def transfer_specs(resize_size: int, crop_size: int, *, flip: bool = True, crop: bool = True,
                   decode: str = "decode") -> tuple[str, str]:
  """(pp_train, pp_eval) of BiT transfer: resize, random crop, random flip; eval resizes to the
  crop size. Turn `flip` off where orientation is the label (dSprites orientation/location,
  SmallNORB azimuth) and `crop` off where position or size is (Clevr count/distance, DMLab,
  KITTI distance, dSprites location): training then resizes straight to the crop size.
  `decode` replaces the first op (e.g. "decode|scale(255)" for dSprites' 0/1 pixels).
  """
  train = [decode, f"resize({resize_size})|random_crop({crop_size})" if crop
           else f"resize({crop_size})"]
  train += ["flip_lr"] if flip else []
  train += ["value_range(-1, 1)"]
  return "|".join(train), f"{decode}|resize({crop_size})|value_range(-1, 1)"


def _views(count: int, view: "Op") -> "Op":
  def op(example):
    seeds = tf.random.experimental.stateless_split(example["_seed"], count)
    images = [view({**example, "_seed": seeds[i]})["image"] for i in range(count)]
    return {**example, "image": tf.stack(images)}
  return op


def register(fn):
  _OPS[fn.__name__] = fn
  return fn


def names() -> list[str]:
  return sorted(_OPS)


def parse(spec: str) -> Op:
  """Builds one function from "op1(args)|op2|..."; UserError names an unknown op."""
  ops = []
  parts = [p.strip() for p in spec.split("|") if p.strip()]
  for i, part in enumerate(parts):
    name, _, args = part.partition("(")
    if name == "views":  # The rest of the spec, once per view.
      count = ast.literal_eval(args.rstrip(")") or "2")
      if not isinstance(count, int) or count < 1 or i == len(parts) - 1:
        raise UserError(f"Bad views op {part!r} in {spec!r}; write views(N) with N >= 1 "
                        "before the ops that make each view.")
      ops.append(_views(count, parse("|".join(parts[i + 1:]))))
      break
    if name not in _OPS:
      raise UserError(f"Unknown preprocessing op {name!r} in {spec!r}; "
                       f"valid: {', '.join(names())}.")
    try:
      args = ast.literal_eval(f"({args.rstrip(')')},)") if args.strip(") ") else ()
      ops.append(_OPS[name](*args))
    except (SyntaxError, ValueError, TypeError) as e:
      raise UserError(f"Bad arguments in {part!r} of {spec!r} ({' '.join(str(e).split())}); "
                       f"write Python literals matching {name}{_signature(_OPS[name])}."
                       ) from None

  def apply(example):
    for op in ops:
      example = op(example)
    return example

  return apply


def error_reason(error: Exception) -> str:
  """A TensorFlow op error as one short line, without TF's node names and assert wrapping."""
  message = str(getattr(error, "message", None) or error)
  message = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*|\s*\[\[.*", "", message)
  message = re.sub(r"Expected 'tf.Tensor\(False.*?' to be true\. Summarized data: ", "", message)
  message = re.sub(r"b'([^']*)'", r"\1", message)
  return " ".join(message.split())[:200]


def _signature(fn) -> inspect.Signature:
  return inspect.signature(fn).replace(return_annotation=inspect.Signature.empty)


def _next_seed(example: dict) -> tuple[dict, tf.Tensor]:
  """Splits the example's seed: one half for this op, one carried to the next."""
  seeds = tf.random.experimental.stateless_split(example["_seed"], 2)
  return {**example, "_seed": seeds[0]}, seeds[1]


def _image_op(fn: Callable[[tf.Tensor], tf.Tensor]) -> Op:
  return lambda example: {**example, "image": fn(example["image"])}


@register
def decode(channels: int = 3) -> Op:
  """Encoded bytes (or an already decoded image) to uint8 RGB; grayscale, RGBA, CMYK alike.

  Alpha is dropped, not composited: transparent pixels keep their stored colour.
  """
  def fn(image):
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    elif image.shape[-1] == 1 and channels == 3:
      image = tf.image.grayscale_to_rgb(image)
    elif image.shape[-1] == 4 and channels == 3:
      image = image[..., :3]
    return image
  return _image_op(fn)


def _resize(image: tf.Tensor, size: int, method: str = "bilinear") -> tf.Tensor:
  # Antialiasing changes only downscaling; upscaling with it gives the same pixels, 2x slower.
  resize = lambda aa: lambda: tf.image.resize(image, (size, size), method, antialias=aa)
  resized = tf.cond(tf.reduce_any(tf.shape(image)[:2] > size), resize(True), resize(False))
  if image.dtype == tf.uint8:
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  return resized


@register
def resize(size: int, method: str = "bilinear") -> Op:
  """Resizes to size x size (aspect not kept, as BiT does), keeping the dtype."""
  return _image_op(lambda image: _resize(image, size, method))


@register
def resize_small(size: int, method: str = "bilinear") -> Op:
  """Resizes the shorter side to `size`, keeping the aspect (timm's evaluation resize)."""
  def fn(image):
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    scale = size / tf.minimum(h, w)
    shape = tf.cast(tf.round(tf.stack([h * scale, w * scale])), tf.int32)
    resized = tf.image.resize(image, shape, method, antialias=True)
    if image.dtype == tf.uint8:
      return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return resized
  return _image_op(fn)


@register
def randaug(num_layers: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5) -> Op:
  """RandAugment on uint8 pixels (before value_range): `num_layers` ops, each applied with
  probability 1/2 at a magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10], timm's
  "rand-m{magnitude}-mstd{magnitude_std}-inc1" (big_transfer/data/randaugment.py)."""
  def op(example):
    example, seed = _next_seed(example)
    if example["image"].dtype != tf.uint8:
      raise ValueError("randaug takes uint8 pixels: put it before value_range")
    return {**example, "image": randaugment.randaugment(
        example["image"], seed, int(num_layers), float(magnitude), float(magnitude_std))}
  return op


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


def inception_box(image_shape: tf.Tensor, seed: tf.Tensor, area_min: float = 0.05,
                  area_max: float = 1.0) -> tuple[tf.Tensor, tf.Tensor]:
  """(offset [y, x], size [h, w]) of a random crop of area_min-area_max of the image's area
  with aspect (w/h) 3/4-4/3, as in Inception; the whole image when 100 tries all fail."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, area_range=(area_min, area_max),
      aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0, use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


@register
def inception_crop(size: int, area_min: float = 0.05, area_max: float = 1.0) -> Op:
  """Random crop of 5-100% of the area with aspect 3/4-4/3, resized to size x size."""
  def op(example):
    example, seed = _next_seed(example)
    image = example["image"]
    begin, crop_size = inception_box(tf.shape(image), seed, area_min, area_max)
    crop = tf.image.crop_to_bounding_box(image, begin[0], begin[1], crop_size[0], crop_size[1])
    return {**example, "image": _resize(crop, size)}
  return op


@register
def decode_jpeg_and_inception_crop(size: int, area_min: float = 0.05,
                                   area_max: float = 1.0) -> Op:
  """decode|inception_crop(size) that decodes only the crop's part of a JPEG (upstream speed).

  The crop is the one inception_crop draws from the same seed; non-JPEG bytes (PNG) are
  decoded whole first.
  """
  def op(example):
    example, seed = _next_seed(example)
    data = example["image"]

    def jpeg():
      begin, crop_size = inception_box(tf.image.extract_jpeg_shape(data), seed, area_min, area_max)
      return tf.image.decode_and_crop_jpeg(data, tf.concat([begin, crop_size], 0), channels=3)

    def other():
      image = tf.io.decode_image(data, channels=3, expand_animations=False)
      begin, crop_size = inception_box(tf.shape(image), seed, area_min, area_max)
      return tf.image.crop_to_bounding_box(image, begin[0], begin[1], crop_size[0], crop_size[1])

    crop = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    return {**example, "image": _resize(crop, size)}
  return op


@register
def flip_lr() -> Op:
  """Random horizontal flip with probability 1/2, drawn per example."""
  def op(example):
    example, seed = _next_seed(example)
    return {**example, "image": tf.image.stateless_random_flip_left_right(example["image"], seed)}
  return op


def _with_probability(p: float, fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> Op:
  """An op applying fn(image, seed) with probability p (one draw per example)."""
  def op(example):
    example, seed = _next_seed(example)
    draw_seed, fn_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = example["image"]
    apply = tf.random.stateless_uniform([], draw_seed) < p
    return {**example, "image": tf.cond(apply, lambda: fn(image, fn_seed), lambda: image)}
  return op


def _as_float(fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]):
  """fn on the image as float [0, 1], the result back in the image's dtype."""
  def wrapped(image, seed):
    result = fn(tf.image.convert_image_dtype(image, tf.float32), seed)
    return tf.image.convert_image_dtype(tf.clip_by_value(result, 0.0, 1.0), image.dtype,
                                        saturate=True)
  return wrapped


@register
def color_jitter(brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, p: float = 0.8) -> Op:
  """With probability p: brightness, contrast and saturation scaled by factors drawn from
  [1 - x, 1 + x], hue shifted by up to `hue` of a turn (torchvision's ColorJitter, in this
  fixed order)."""
  def fn(image, seed):
    seeds = tf.random.experimental.stateless_split(seed, 4)
    factor = lambda x, i: tf.random.stateless_uniform([], seeds[i], 1 - x, 1 + x)
    image = image * factor(brightness, 0)
    image = tf.image.adjust_contrast(image, factor(contrast, 1))
    image = tf.image.adjust_saturation(tf.clip_by_value(image, 0.0, 1.0), factor(saturation, 2))
    return tf.image.adjust_hue(image, tf.random.stateless_uniform([], seeds[3], -hue, hue))
  return _with_probability(p, _as_float(fn))


@register
def random_grayscale(p: float = 0.2) -> Op:
  """With probability p, the image's luma in all three channels."""
  return _with_probability(p, lambda image, seed: tf.image.grayscale_to_rgb(
      tf.image.rgb_to_grayscale(image)))


@register
def gaussian_blur(p: float = 0.5, sigma_min: float = 0.1, sigma_max: float = 2.0) -> Op:
  """With probability p, a Gaussian blur of standard deviation drawn from [sigma_min,
  sigma_max] pixels (MoCo-v2: 0.1-2.0 at 224 px), edges reflected."""
  radius = max(1, int(round(3 * sigma_max)))

  def fn(image, seed):
    sigma = tf.random.stateless_uniform([], seed, sigma_min, sigma_max)
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps / sigma))
    kernel /= tf.reduce_sum(kernel)
    channels = tf.shape(image)[-1]
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
    rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    cols = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(blurred, cols, [1, 1, 1, 1], "VALID")[0]
  return _with_probability(p, _as_float(fn))


@register
def scale(factor: float) -> Op:
  """uint8 pixels times `factor`, clipped to [0, 255] (dSprites stores 0/1 pixels)."""
  return _image_op(lambda image: tf.cast(
      tf.clip_by_value(tf.cast(image, tf.float32) * factor, 0, 255), tf.uint8))


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
    shapes.add(tuple(parse(spec)(example)["image"].shape[-3:-1]))  # views(n) adds an axis.
  if len(shapes) != 1:
    raise UserError(f"Preprocessing {spec!r} does not produce one fixed image size; end it "
                    "with a fixed-size op such as resize(N), random_crop(N) or inception_crop(N).")
  return shapes.pop()
