"""Classification losses, averaged over the batch."""

import jax
import optax

from big_transfer.errors import UserError


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy against (possibly mixed) one-hot labels."""
  return optax.softmax_cross_entropy(logits, labels)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example sigmoid cross-entropy summed over classes (one binary classifier per label,
  the BiT multi-label pretraining loss)."""
  return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}


def get(name: str):
  if name not in LOSSES:
    raise UserError(f"Unknown loss {name!r}; valid: {', '.join(LOSSES)}.")
  return LOSSES[name]
