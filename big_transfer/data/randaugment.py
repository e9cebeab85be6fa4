"""RandAugment (Cubuk et al. 2020) in TensorFlow ops, as ResNet strikes back uses it.

timm's "rand-m{M}-mstd{S}-inc1" (Wightman et al. 2021, arXiv 2110.00476, §3): each image
gets `num_layers` ops drawn uniformly with replacement from the 15 below; each is applied with
probability 0.5 at a magnitude drawn per op from N(M, S) clipped to [0, 10], and the
geometric and enhancement ops pick their direction at random. "inc1" is timm's increasing set:
a larger magnitude is always a stronger change (posterize keeps fewer bits, solarize inverts
more). Pixels are uint8 RGB in and out; geometric ops fill with grey 128 as timm does.

All draws are stateless from the example's seed, like every other random op here.
"""

import math

import tensorflow as tf

MAX_LEVEL = 10.0
FILL = 128


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to uint8."""
  degenerate, image = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
  blended = degenerate + factor * (image - degenerate)
  return tf.cast(tf.clip_by_value(tf.round(blended), 0, 255), tf.uint8)


def _grey(image: tf.Tensor) -> tf.Tensor:
  return tf.image.rgb_to_grayscale(image)  # uint8, ITU-R 601 weights as PIL's "L".


def _affine(image: tf.Tensor, transform: list) -> tf.Tensor:
  """Output pixel (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2), bilinear, grey
  outside the image."""
  transform = tf.cast(tf.stack(transform + [0.0, 0.0]), tf.float32)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=transform,
      output_shape=tf.shape(image)[:2], fill_value=float(FILL), interpolation="BILINEAR",
      fill_mode="CONSTANT")[0]
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def auto_contrast(image, level, sign):
  del level, sign
  def channel(c):
    c = tf.cast(c, tf.float32)
    lo, hi = tf.reduce_min(c), tf.reduce_max(c)
    scaled = (c - lo) * (255.0 / tf.maximum(hi - lo, 1.0))
    return tf.where(hi > lo, scaled, c)
  out = tf.stack([channel(image[..., i]) for i in range(3)], -1)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def equalize(image, level, sign):
  """PIL ImageOps.equalize per channel."""
  del level, sign
  def channel(c):
    c = tf.cast(c, tf.int32)
    hist = tf.math.bincount(tf.reshape(c, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    safe_step = tf.maximum(step, 1)
    lut = tf.concat([[0], (tf.cumsum(hist) + safe_step // 2)[:-1] // safe_step], 0)
    return tf.where(step > 0, tf.gather(tf.clip_by_value(lut, 0, 255), c), c)
  return tf.cast(tf.stack([channel(image[..., i]) for i in range(3)], -1), tf.uint8)


def invert(image, level, sign):
  del level, sign
  return 255 - image


def rotate(image, level, sign):
  angle = sign * level / MAX_LEVEL * 30.0 * math.pi / 180.0
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _affine(image, [cos, sin, cx - cos * cx - sin * cy,
                         -sin, cos, cy + sin * cx - cos * cy])


def posterize_increasing(image, level, sign):
  del sign
  shift = 8 - (4 - tf.cast(level / MAX_LEVEL * 4, tf.int32))  # Keeps 4 bits at 0, none at 10.
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.int32), shift),
                                       shift), tf.uint8)


def solarize_increasing(image, level, sign):
  del sign
  threshold = 256 - tf.cast(level / MAX_LEVEL * 256, tf.int32)
  return tf.where(tf.cast(image, tf.int32) >= threshold, 255 - image, image)


def solarize_add(image, level, sign):
  del sign
  added = tf.minimum(tf.cast(image, tf.int32) + tf.cast(level / MAX_LEVEL * 110, tf.int32), 255)
  return tf.where(image < 128, tf.cast(added, tf.uint8), image)


def _enhance_factor(level, sign):
  return 1.0 + sign * level / MAX_LEVEL * 0.9


def color_increasing(image, level, sign):
  return _blend(tf.image.grayscale_to_rgb(_grey(image)), image, _enhance_factor(level, sign))


def contrast_increasing(image, level, sign):
  mean = tf.reduce_mean(tf.cast(_grey(image), tf.float32))
  return _blend(tf.fill(tf.shape(image), tf.round(mean)), image, _enhance_factor(level, sign))


def brightness_increasing(image, level, sign):
  return _blend(tf.zeros_like(image), image, _enhance_factor(level, sign))


def sharpness_increasing(image, level, sign):
  """Blend with PIL's SMOOTH filter (3x3, centre 5, total 13); the border stays unfiltered."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1],
                                  "VALID")[0]
  smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones(tf.shape(image)[:2] - 2, tf.bool), [[1, 1], [1, 1]])[..., None]
  degenerate = tf.where(interior, smooth, tf.cast(image, tf.float32))
  return _blend(degenerate, image, _enhance_factor(level, sign))


def shear_x(image, level, sign):
  return _affine(image, [1.0, sign * level / MAX_LEVEL * 0.3, 0.0, 0.0, 1.0, 0.0])


def shear_y(image, level, sign):
  return _affine(image, [1.0, 0.0, 0.0, sign * level / MAX_LEVEL * 0.3, 1.0, 0.0])


def translate_x_rel(image, level, sign):
  pixels = sign * level / MAX_LEVEL * 0.45 * tf.cast(tf.shape(image)[1], tf.float32)
  return _affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def translate_y_rel(image, level, sign):
  pixels = sign * level / MAX_LEVEL * 0.45 * tf.cast(tf.shape(image)[0], tf.float32)
  return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels])


OPS = (auto_contrast, equalize, invert, rotate, posterize_increasing, solarize_increasing,
       solarize_add, color_increasing, contrast_increasing, brightness_increasing,
       sharpness_increasing, shear_x, shear_y, translate_x_rel, translate_y_rel)
# The ops that leave every image unchanged at magnitude 0 (the others do not use it).
IDENTITY_AT_ZERO = (rotate, solarize_increasing, solarize_add, color_increasing,
                    contrast_increasing, brightness_increasing, sharpness_increasing, shear_x,
                    shear_y, translate_x_rel, translate_y_rel)


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int = 2,
                magnitude: float = 9.0, magnitude_std: float = 0.5,
                prob: float = 0.5) -> tf.Tensor:
  """`num_layers` random ops on a uint8 RGB image, drawn from the stateless `seed`."""
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
    draw_seed, level_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 2))
    draws = tf.random.stateless_uniform([3], draw_seed)  # Which op, whether, which direction.
    level = magnitude + magnitude_std * tf.random.stateless_normal([], level_seed)
    level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
    sign = tf.where(draws[2] < 0.5, -1.0, 1.0)
    index = tf.minimum(tf.cast(draws[0] * len(OPS), tf.int32), len(OPS) - 1)
    branches = [lambda op=op: op(image, level, sign) for op in OPS]
    image = tf.cond(draws[1] < prob, lambda: tf.switch_case(index, branches), lambda: image)
    image = tf.ensure_shape(image, [None, None, 3])
  return image
