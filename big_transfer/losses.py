"""Classification losses, per example (the trainer averages them over the batch).

`get(name, ...)` is the training loss: a registry entry, with label smoothing applied to the
targets first where set. Losses take (logits, targets); the targets are the (possibly mixed)
one-hot labels, or the teacher's logits for `distill_kl` (the trainer feeds them, see
`uses_teacher`). Evaluation reports `eval_loss(name)`, which always compares with the labels.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from big_transfer.errors import UserError


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy against (possibly mixed) one-hot labels."""
  return optax.softmax_cross_entropy(logits, labels)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example sigmoid cross-entropy summed over classes (one binary classifier per label,
  the BiT multi-label pretraining loss)."""
  return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)


def bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example sigmoid cross-entropy averaged over classes: the ResNet-strikes-back loss
  (Wightman et al. 2021, arXiv 2110.00476, Table 1; timm's BinaryCrossEntropy, reduction 'mean').

  Averaged over the batch by the trainer this is timm's mean over batch x classes, i.e.
  `sigmoid_xent` / num_classes. The factor matters: gradient clipping (RSB clips the global
  norm at 1.0) and the first Adam steps see the loss's scale.
  """
  return optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)


def distill_kl(logits: jax.Array, teacher_logits: jax.Array,
               temperature: float = 1.0) -> jax.Array:
  """T^2 KL(softmax(teacher / T) || softmax(student / T)) per example (Hinton et al. 2015).

  The T^2 factor keeps the gradient's scale as T changes: d/d logits = T (p_s - p_t) at
  temperature T. Zero when the student's logits equal the teacher's. Bag of Tricks (He et
  al. 2019, arXiv 1812.01187, §5.3) uses T = 20; BiT's distilled R50x1 models (Beyer et al.
  2022, arXiv 2106.05237, "function matching") use T = 1 and the same crop for both.
  """
  teacher = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  log_ratio = (jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
               - jax.nn.log_softmax(logits / temperature, axis=-1))
  return temperature ** 2 * jnp.sum(teacher * log_ratio, axis=-1)


def smooth_labels(labels: jax.Array, smoothing: float) -> jax.Array:
  """(1 - eps) y + eps / K: each row keeps its sum (1 for one-hot labels).

  Linear in y, so smoothing mixed labels equals mixing smoothed ones (timm mixes smoothed
  targets; Szegedy et al. 2016; Bag of Tricks §5.2 uses eps 0.1).
  """
  return labels * (1.0 - smoothing) + smoothing / labels.shape[-1]


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent, "bce": bce,
          "distill_kl": distill_kl}
_TEACHER_LOSSES = ("distill_kl",)


def uses_teacher(name: str) -> bool:
  """Whether the loss's targets are a teacher's logits instead of the labels."""
  return name in _TEACHER_LOSSES


def get(name: str, *, label_smoothing: float = 0.0, temperature: float = 1.0):
  """The training loss `name` (logits, targets) -> per-example loss."""
  if name not in LOSSES:
    raise UserError(f"Unknown loss {name!r}; valid: {', '.join(LOSSES)}.")
  if uses_teacher(name):
    if label_smoothing:
      raise UserError(f"label_smoothing {label_smoothing} does not apply to {name} (its "
                      "targets are the teacher's logits); set --config.label_smoothing=0.")
    return functools.partial(LOSSES[name], temperature=temperature)
  if not label_smoothing:
    return LOSSES[name]
  return lambda logits, labels: LOSSES[name](logits, smooth_labels(labels, label_smoothing))


def eval_loss(name: str):
  """The loss evaluation reports against the labels: a distilled model's softmax xent."""
  return softmax_xent if uses_teacher(name) else get(name)
