"""Optimizer, learning-rate schedule and durations, all built from the config.

Durations are written in the config as `<name>_steps`, `<name>_examples` or `<name>_epochs`
and resolved to steps by `Durations`, the one place that does so.

Schedule convention (0-based update index s, the value the update at s uses):
    lr(s) = base * min(1, (s + 1) / warmup) * decay(s)
so the first update already has lr = base / warmup (the official code's first update had
lr = 0, big_transfer issue #58). Stair decay multiplies by `decay_factor` once for each
boundary b <= s, i.e. "/10 after b updates" (optax.piecewise_constant_schedule); cosine
decays from the end of warmup to 0 at `total_steps`. base = config.lr * batch_size /
lr_batch_ref (BiT: 0.03 per 256 upstream, 0.003 per 512 in transfer); lr_batch_ref = 0
disables the scaling.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from big_transfer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Durations:
  """Converts steps / epochs / examples in a config to steps."""
  num_examples: int  # Training examples per epoch.
  batch_size: int  # Global batch.

  def __call__(self, config: ml_collections.ConfigDict, name: str, required: bool = True):
    """`<name>_steps`, else `<name>_examples`, else `<name>_epochs` (the first one set, so
    `--config.total_steps=N` overrides a config written in epochs), as steps; a list of
    values gives a list of steps."""
    for unit in ("steps", "examples", "epochs"):
      value = config.get(f"{name}_{unit}")
      if value is not None:
        return jax.tree.map(lambda v, unit=unit: self._to_steps(unit, v), value)
    if required:
      raise UserError(f"Set one of {name}_steps, {name}_examples or {name}_epochs.")
    return None

  def _to_steps(self, unit: str, value: float) -> int:
    if unit == "steps":
      return int(value)
    examples = value * (self.num_examples if unit == "epochs" else 1)
    return max(1, round(examples / self.batch_size))


def base_lr(config: ml_collections.ConfigDict, lr: float | None = None) -> float:
  """`lr` (default config.lr) scaled to the batch: lr * batch_size / lr_batch_ref."""
  ref = config.get("lr_batch_ref", 0)
  return (config.lr if lr is None else lr) * (config.batch_size / ref if ref else 1.0)


def then_constant(schedule: optax.Schedule, start: int, value: float) -> optax.Schedule:
  """`schedule` before step `start`, `value` from it on (a final phase at its own lr)."""
  return lambda s: jnp.where(s < start, schedule(s), value)


def make_schedule(config: ml_collections.ConfigDict, durations: Durations,
                  total_steps: int) -> optax.Schedule:
  sched = config.schedule
  base = base_lr(config)
  warmup = durations(sched, "warmup", required=False) or 0
  if sched.kind == "stair":
    scales = {}  # Repeated boundaries (very short runs) decay once each.
    for boundary in durations(sched, "decay", required=False) or []:
      scales[int(boundary)] = scales.get(int(boundary), 1.0) * sched.decay_factor
    decay = optax.piecewise_constant_schedule(base, scales)
  elif sched.kind == "cosine":
    cosine = optax.cosine_decay_schedule(base, max(1, total_steps - warmup))
    decay = lambda s: cosine(jnp.maximum(s - warmup, 0))
  else:
    raise UserError(f"Unknown schedule kind {sched.kind!r}; valid: stair, cosine.")
  if warmup <= 1:
    return decay
  # (s + 1) / warmup directly: optax.linear_schedule from 1/warmup loses 1e-4 relative to
  # float32 cancellation at the first steps.
  return lambda s: jnp.minimum(1.0, (s + 1) / warmup) * decay(s)


def decay_mask(params, pattern: str):
  """True for parameters whose '/'-joined path fully matches `pattern` (e.g. kernels)."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(regex.fullmatch("/".join(k.key for k in path))), params)


OPTIMIZERS = ("sgd", "lamb")


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """`config.optimizer` on the gradients clipped to `grad_clip_norm` (global norm) if set, of
  the `config.trainable` parameters only (only_trainable).

  "sgd": SGD with momentum and coupled L2 weight decay on the masked parameters (as in the
  paper's TF code): grad += wd * param before momentum, the gradient of wd/2 * ||param||^2.
  "lamb": LAMB (You et al. 2020) as ResNet strikes back trains it (timm's Lamb): Adam
  moments (b1 0.9, b2 0.999, eps 1e-6), decoupled weight decay wd * param added to the
  update, then the layer-wise trust ratio ||param|| / ||update||, and both only on the
  parameters `wd_mask` selects: timm skips the trust ratio where it skips weight decay
  (biases, GroupNorm scales and offsets), which optax.lamb cannot mask, hence the chain.
  """
  if config.get("optimizer", "sgd") not in OPTIMIZERS:
    raise UserError(f"Unknown optimizer {config.optimizer!r}; valid: {', '.join(OPTIMIZERS)}.")
  mask = lambda params: decay_mask(params, config.wd_mask)
  chain = []
  if config.get("grad_clip_norm"):
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.get("optimizer", "sgd") == "lamb":
    chain += [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
              optax.add_decayed_weights(config.wd, mask=mask),
              optax.masked(optax.scale_by_trust_ratio(), mask),
              optax.scale_by_learning_rate(schedule)]
  else:
    if config.wd:
      chain.append(optax.add_decayed_weights(config.wd, mask=mask))
    chain.append(optax.sgd(schedule, momentum=config.momentum))
  return only_trainable(config.trainable, optax.chain(*chain))


# `config.trainable`: None trains every parameter, a pattern the paths it fully matches.
TRAINABLE = {"all": None,
             "norm_only": r"(.*/)?group_norm/(gamma|beta)|head/.*|projection/.*"}


def only_trainable(trainable: str,
                   tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the parameters `trainable` names (TRAINABLE); the others get zero updates, so
  they stay bitwise unchanged, and no optimizer state (nor weight decay)."""
  if trainable not in TRAINABLE:
    raise UserError(f"Unknown trainable {trainable!r}; valid: {', '.join(TRAINABLE)}.")
  if TRAINABLE[trainable] is None:
    return tx
  labels = lambda params: jax.tree.map(lambda train: "train" if train else "freeze",
                                       decay_mask(params, TRAINABLE[trainable]))
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
