"""Evaluators. Classification: top-1 accuracy (precision@1 for multi-hot labels) and loss over
every example exactly once, padding masked out."""

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from big_transfer import sharding


def make_classification_step(apply_fn: Callable, loss_fn: Callable):
  """Jitted (params, batch) -> sums of correct predictions, loss and real examples."""

  @jax.jit
  def step(params, batch):
    logits = apply_fn(params, batch["image"])
    mask = batch["mask"].astype(jnp.float32)
    top1 = jnp.argmax(logits, axis=-1)
    correct = jnp.take_along_axis(batch["labels"], top1[:, None], axis=-1)[:, 0] > 0
    return {"correct": jnp.sum(correct * mask),
            "loss": jnp.sum(loss_fn(logits, batch["labels"]) * mask),
            "count": jnp.sum(mask)}

  return step


def classification(step: Callable, params, batches: Iterable[dict], mesh) -> dict[str, float]:
  totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for batch in batches:
    sums = jax.device_get(step(params, sharding.to_global(batch, mesh)))
    totals = {k: totals[k] + float(np.asarray(sums[k])) for k in totals}
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count, "loss": totals["loss"] / count,
          "count": totals["count"]}
