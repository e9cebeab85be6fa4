"""Evaluators. Classification: top-1 accuracy (precision@1 for multi-hot labels), top-5 (a
correct class among the 5 highest logits) and loss over every example exactly once, padding
masked out."""

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from big_transfer import sharding


def make_classification_step(apply_fn: Callable, loss_fn: Callable):
  """Jitted (params, batch) -> sums of top-1 and top-5 hits, loss and real examples."""

  @jax.jit
  def step(params, batch):
    logits = apply_fn(params, batch["image"])
    mask = batch["mask"].astype(jnp.float32)
    _, top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))  # Ties: the lower index first.
    hits = jnp.take_along_axis(batch["labels"], top5, axis=-1) > 0
    return {"correct": jnp.sum(hits[:, 0] * mask),
            "correct5": jnp.sum(jnp.any(hits, axis=-1) * mask),
            "loss": jnp.sum(loss_fn(logits, batch["labels"]) * mask),
            "count": jnp.sum(mask)}

  return step


def classification(step: Callable, params, batches: Iterable[dict], mesh) -> dict[str, float]:
  totals = {"correct": 0.0, "correct5": 0.0, "loss": 0.0, "count": 0.0}
  for batch in batches:
    sums = jax.device_get(step(params, sharding.to_global(batch, mesh)))
    totals = {k: totals[k] + float(np.asarray(sums[k])) for k in totals}
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count, "top5": totals["correct5"] / count,
          "loss": totals["loss"] / count, "count": totals["count"]}
