"""Evaluators. Classification: top-1 accuracy (precision@1 for multi-hot labels), top-5 (a
correct class among the 5 highest logits) and loss over every example exactly once, padding
masked out. Linear probe: the few-shot evaluator's ridge classifier fitted to frozen pre-logits
(self-supervised objectives, whose models have no classifier)."""

import functools
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from big_transfer import fewshot_eval, sharding


def make_classification_step(apply_fn: Callable, loss_fn: Callable, mesh):
  """Jitted (params, batch) -> sums of top-1 and top-5 hits, loss and real examples."""

  @functools.partial(jax.jit, compiler_options=sharding.compiler_options(mesh))
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


def make_features_step(features_fn: Callable, mesh):
  """Jitted (params, batch) -> (pre-logits, labels, mask), global arrays."""
  return jax.jit(lambda params, batch: (features_fn(params, batch["image"]), batch["labels"],
                                        batch["mask"]),
                 compiler_options=sharding.compiler_options(mesh))


def features(step: Callable, params, batches: Iterable[dict], mesh) -> tuple[np.ndarray, ...]:
  """(features, class indices) of every real example of `batches` (padding dropped), on every
  process."""
  chunks, labels = [], []
  for batch in batches:
    batch = {k: batch[k] for k in ("image", "labels", "mask")}
    out = multihost_utils.process_allgather(step(params, sharding.to_global(batch, mesh)),
                                            tiled=True)
    x, onehot, mask = (np.asarray(a) for a in out)
    chunks.append(x[mask].astype(np.float64))
    labels.append(np.argmax(onehot[mask], axis=-1))
  return np.concatenate(chunks), np.concatenate(labels)


# Absolute, on standardised features (fewshot_eval.fit); big_vision's fixed 2^10 among them.
RIDGE_L2 = tuple(2.0 ** e for e in range(0, 17, 2))


def ridge_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                test_y: np.ndarray, num_classes: int,
                l2_candidates: Sequence[float] = RIDGE_L2) -> dict[str, float]:
  """A linear classifier on frozen features: the few-shot evaluator's closed-form ridge
  regression onto +-1 targets (fewshot_eval.fit, big_vision's probe), with the L2 strength of
  `l2_candidates` that classifies held-out training examples best (fewshot_eval.choose_l2;
  one candidate: that strength). Returns accuracy, top5, loss (the test squared error),
  count, as `classification` does, and the chosen l2."""
  best = fewshot_eval.choose_l2(train_x, train_y, num_classes, l2_candidates)
  scores = fewshot_eval.scores(fewshot_eval.fit(train_x, train_y, num_classes, best), test_x)
  top5 = np.argsort(-scores, axis=-1)[:, :5]
  return {"accuracy": float(np.mean(top5[:, 0] == test_y)),
          "top5": float(np.mean(np.any(top5 == test_y[:, None], axis=-1))),
          "loss": float(np.mean(np.square(scores - fewshot_eval.targets(test_y, num_classes)))),
          "count": float(len(test_y)), "l2": best}
