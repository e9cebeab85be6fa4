"""MixUp and CutMix on a whole batch: one draw per batch, inside the jitted train step.

MixUp as BiT-HyperRule uses it (alpha 0.1 for 20k+ train examples); MixUp or CutMix, switched
per batch with probability 0.5, as ResNet strikes back does (timm's Mixup, mode "batch").
Pure jax functions, so they run where the rng is at hand.
"""

import jax
import jax.numpy as jnp


def mixup(rng: jax.Array, batch: dict, alpha: float) -> dict:
  """Mixes each example with its mirror in the batch (i with n-1-i) by one lambda ~ Beta(a, a).

  Images and labels are mixed with the same lambda, so the soft labels say how much of each
  image is in the mix. `alpha` 0 (a Python number: it decides what is traced) returns `batch`.
  """
  if alpha == 0:
    return batch
  lam = jax.random.beta(rng, alpha, alpha)
  mix = lambda x: (lam * x + (1 - lam) * x[::-1]).astype(x.dtype)
  return {**batch, "image": mix(batch["image"]), "labels": mix(batch["labels"])}


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
  """A (height, width) bool mask of a box of about (1 - lam) of the image (Yun et al. 2019).

  Sides sqrt(1 - lam) times the image's, centred uniformly in the image, clipped to it: near
  the border the box is smaller than 1 - lam, so the labels must be mixed by its true area.
  """
  ry, rx = jax.random.uniform(rng, (2,))
  ratio = jnp.sqrt(1.0 - lam)
  cy, cx = ry * height, rx * width
  half_h, half_w = jnp.round(ratio * height) / 2, jnp.round(ratio * width) / 2
  y0, y1 = jnp.clip(jnp.round(cy - half_h), 0, height), jnp.clip(jnp.round(cy + half_h), 0, height)
  x0, x1 = jnp.clip(jnp.round(cx - half_w), 0, width), jnp.clip(jnp.round(cx + half_w), 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


def cutmix(rng: jax.Array, batch: dict, alpha: float) -> dict:
  """Pastes a box of each example's mirror (i with n-1-i) into it; lambda ~ Beta(a, a) sets
  the box's size, and the labels are mixed by the pasted box's true (clipped) area."""
  if alpha == 0:
    return batch
  lam_rng, box_rng = jax.random.split(rng)
  images = batch["image"]
  box = cutmix_box(box_rng, images.shape[1], images.shape[2],
                   jax.random.beta(lam_rng, alpha, alpha))
  lam = 1.0 - jnp.mean(box.astype(jnp.float32))  # The share of each image left in place.
  mixed = jnp.where(box[None, :, :, None], images[::-1], images)
  labels = batch["labels"]
  return {**batch, "image": mixed,
          "labels": (lam * labels + (1 - lam) * labels[::-1]).astype(labels.dtype)}


def mix(rng: jax.Array, batch: dict, mixup_alpha: float, cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5) -> dict:
  """MixUp, CutMix, or one of the two per batch (CutMix with `switch_prob`) when both are on.

  With CutMix off this is `mixup(rng, ...)`, drawing exactly as before it existed.
  """
  if cutmix_alpha == 0:
    return mixup(rng, batch, mixup_alpha)
  if mixup_alpha == 0:
    return cutmix(rng, batch, cutmix_alpha)
  switch_rng, rng = jax.random.split(rng)
  return jax.lax.cond(jax.random.bernoulli(switch_rng, switch_prob),
                      lambda: cutmix(rng, batch, cutmix_alpha),
                      lambda: mixup(rng, batch, mixup_alpha))
