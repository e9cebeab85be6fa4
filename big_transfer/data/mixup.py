"""MixUp as BiT-HyperRule uses it (alpha 0.1 for 20k+ train examples): one draw per batch.

A pure jax function, so it runs inside the jitted train step where the rng is at hand.
"""

import jax


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
