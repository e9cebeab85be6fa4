"""Training objectives: what the update step minimises, and the state it keeps besides the
parameters (checkpointed with them, so a resumed run continues exactly).

`get(config, model, loss_fn, mesh)` by `config.objective`:

- "supervised": the classifier's training loss on the labels (BiT upstream and transfer; the
  trainer puts a distillation teacher's logits in the labels, and MixUp/CutMix mix both).
- "moco": MoCo-v2 (He et al. 2019, arXiv 1911.05722; Chen et al. 2020, arXiv 2003.04297), the
  self-supervised objective of hierarchical pretraining (HPT, Reed et al. 2021, arXiv
  2103.12718). The batch holds two augmented views of each image (preprocessing op `views(2)`);
  a query encoder (backbone + 2-layer MLP projection, trained) embeds the first, a key encoder
  (its exponential moving average, `moco.momentum`) the second; InfoNCE at temperature
  `moco.temperature` asks each query to pick its own key among the keys of earlier batches, a
  queue of `moco.queue_size`. Keys enter the queue all-gathered over the devices (and so the
  processes), in global batch order. GroupNorm has no batch statistics, so MoCo's shuffled
  BatchNorm (against leaks through them) has nothing to do here.

The MoCo parameters are the backbone's (the BiT names, no head) plus `projection/`: a run's
workdir loads as `--config.init` of a transfer or probe, which drop the projection.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from big_transfer import losses, sharding
from big_transfer.errors import UserError

OBJECTIVES = ("supervised", "moco")
PROJECTION = "projection"


@dataclasses.dataclass(frozen=True)
class Objective:
  """An objective as the trainer uses it.

  `loss(params, extra, batch, rng) -> (mean loss, new extra)` is differentiated with respect
  to `params` only; `extra` is the objective's own part of the train state (the entries
  `init_extra(params, rng)` returns, {} when it has none); `rng` is the model's stream
  (stochastic depth).
  """
  name: str
  init_params: Callable  # (rng, images) -> params.
  # (params, images, rng=None) -> logits (supervised) or embeddings (moco); with an rng
  # (training) stochastic depth is on where configured.
  apply_fn: Callable
  features_fn: Callable  # (params, images) -> pre-logits, for linear probes.
  init_extra: Callable  # (params, rng) -> {state key: pytree}.
  loss: Callable  # (params, extra, batch, rng) -> (loss, extra).
  evaluator: str  # "classification" or "linear_probe": what the trainer evaluates.


def get(config: ml_collections.ConfigDict, model: nn.Module, loss_fn: Callable,
        mesh) -> Objective:
  """`config.objective` for `model` (a BiT ResNetV2: with a head for "supervised", without
  for "moco"); `loss_fn(logits, targets)` is the supervised training loss (losses.get)."""
  if config.objective == "supervised":
    return supervised(model, loss_fn, drop_path=bool(config.model.drop_path_rate))
  if config.objective == "moco":
    return moco(config, model, mesh)
  raise UserError(f"Unknown objective {config.objective!r}; valid: {', '.join(OBJECTIVES)}.")


def supervised(model: nn.Module, loss_fn: Callable, drop_path: bool = False) -> Objective:
  def apply_fn(params, images, rng=None):
    if rng is None or not drop_path:
      return model.apply({"params": params}, images)
    return model.apply({"params": params}, images, train=True, rngs={"drop_path": rng})

  def loss(params, extra, batch, rng):
    return jnp.mean(loss_fn(apply_fn(params, batch["image"], rng), batch["labels"])), extra

  return Objective(
      "supervised", init_params=lambda rng, images: model.init(rng, images)["params"],
      apply_fn=apply_fn,
      features_fn=lambda params, images: model.apply({"params": params}, images,
                                                     pre_logits=True),
      init_extra=lambda params, rng: {}, loss=loss, evaluator="classification")


# ---- MoCo-v2 pieces (pure functions, tested alone) ----

class ProjectionHead(nn.Module):
  """MoCo-v2's 2-layer MLP: Dense(hidden) -> ReLU -> Dense(dim)."""
  hidden: int
  dim: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.dim, name="dense2")(nn.relu(nn.Dense(self.hidden, name="dense1")(x)))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps))


def info_nce(queries: jax.Array, keys: jax.Array, queue: jax.Array,
             temperature: float) -> jax.Array:
  """Per-example InfoNCE of L2-normalised (B, D) queries against their keys (the positives)
  and the (K, D) queue (the negatives): cross-entropy of logits [q.k, q.queue] / T, class 0."""
  positive = jnp.sum(queries * keys, axis=-1, keepdims=True)
  negatives = queries @ queue.T
  logits = jnp.concatenate([positive, negatives], axis=-1) / temperature
  return -jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, 0]


def ema(target, online, momentum: float):
  """momentum * target + (1 - momentum) * online, leaf by leaf (the key encoder's update)."""
  return jax.tree.map(lambda t, o: momentum * t + (1 - momentum) * o, target, online)


def enqueue(queue: jax.Array, pointer: jax.Array, keys: jax.Array, mesh):
  """(queue, pointer) after writing `keys` (global (B, D), rows split over the devices) at
  `pointer`: every device all-gathers the keys in global row order (device 0's rows first)
  and overwrites the oldest B rows of its copy of the queue. B divides the queue size."""
  def write(queue, pointer, local_keys):
    keys = jax.lax.all_gather(local_keys, sharding.DATA, tiled=True)
    queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (pointer, 0))
    return queue, (pointer + keys.shape[0]) % queue.shape[0]

  return jax.shard_map(write, mesh=mesh, in_specs=(P(), P(), P(sharding.DATA)),
                       out_specs=(P(), P()), check_vma=False)(queue, pointer, keys)


def moco(config: ml_collections.ConfigDict, backbone: nn.Module, mesh) -> Objective:
  settings = config.moco
  _check_moco(config)
  head = ProjectionHead(settings.proj_hidden, settings.proj_dim)

  def features_fn(params, images):
    return backbone.apply({"params": {k: v for k, v in params.items() if k != PROJECTION}},
                          images)

  def apply_fn(params, images, rng=None):  # No stochastic depth (_check_moco).
    del rng
    return l2_normalize(head.apply({"params": params[PROJECTION]}, features_fn(params, images)))

  def init_params(rng, images):
    backbone_rng, head_rng = jax.random.split(rng)
    params = backbone.init(backbone_rng, images)["params"]
    features = jax.eval_shape(backbone.apply, {"params": params}, images)
    head_params = head.init(head_rng, jnp.zeros(features.shape, jnp.float32))["params"]
    return {**params, PROJECTION: head_params}

  def init_extra(params, rng):
    # MoCo starts from random unit vectors: the first batches contrast against noise.
    queue = l2_normalize(jax.random.normal(rng, (settings.queue_size, settings.proj_dim)))
    return {"moco": {"key_params": params, "queue": queue,
                     "queue_pointer": jnp.zeros((), jnp.int32)}}

  def loss(params, extra, batch, rng):
    del rng
    state = extra["moco"]
    views = batch["image"]
    if views.ndim != 5 or views.shape[1] != 2:
      raise UserError(f"MoCo needs two views of each image, got images of shape {views.shape}; "
                      "put views(2) in --config.pp_train (configs/hpt.py).")
    # MoCo's order: the key encoder moves towards the current query encoder, then embeds.
    key_params = jax.lax.stop_gradient(ema(state["key_params"], params, settings.momentum))
    keys = jax.lax.stop_gradient(apply_fn(key_params, views[:, 1]))
    queries = apply_fn(params, views[:, 0])
    value = jnp.mean(info_nce(queries, keys, state["queue"], settings.temperature))
    queue, pointer = enqueue(state["queue"], state["queue_pointer"], keys, mesh)
    return value, {"moco": {"key_params": key_params, "queue": queue,
                            "queue_pointer": pointer}}

  return Objective("moco", init_params, apply_fn, features_fn, init_extra, loss,
                   evaluator="linear_probe")


def _check_moco(config: ml_collections.ConfigDict) -> None:
  settings = config.moco
  if settings.queue_size < 1 or settings.queue_size % config.batch_size:
    fit = max(1, settings.queue_size // config.batch_size) * config.batch_size
    raise UserError(f"moco.queue_size {settings.queue_size} must be a positive multiple of "
                    f"batch_size {config.batch_size} (each step replaces one batch of keys); "
                    f"e.g. --config.moco.queue_size={fit}.")
  if not 0 <= settings.momentum < 1:
    raise UserError(f"moco.momentum {settings.momentum} must be in [0, 1); MoCo uses 0.999.")
  if not settings.temperature > 0:
    raise UserError(f"moco.temperature {settings.temperature} must be positive; MoCo-v2 uses "
                    "0.2.")
  queue = "the queue takes whole batches of keys"
  unsupported = [(config.batch_split != 1, "batch_split=1", queue),
                 (config.state_sharding != "replicated", "state_sharding=replicated", queue),
                 (bool(config.mixup_alpha), "mixup_alpha=0", "labels are unused"),
                 (bool(config.cutmix_alpha), "cutmix_alpha=0", "labels are unused"),
                 (losses.uses_teacher(config.loss), "loss=softmax_xent", "labels are unused"),
                 (bool(config.model.drop_path_rate), "model.drop_path_rate=0",
                  "the key encoder embeds deterministically")]
  for refused, fix, why in unsupported:
    if refused:
      raise UserError(f"objective=moco supports {fix} only ({why}); set --config.{fix}.")
