"""Up-front checks of a run's config: every cheap mistake is one line naming the fix, found
before any dataset is prepared or any program is compiled.

What needs the data (unknown splits, class counts, images) is checked where it is read.
"""

import math
import re

import jax
import ml_collections

from big_transfer import losses, models, native_logs, objectives, optim, sharding
from big_transfer.data import preprocess
from big_transfer.errors import UserError

tf = native_logs.import_tensorflow()

SCHEDULES = ("stair", "cosine")
INPUT_SHARDINGS = ("process", "global")
DTYPES = ("float32", "bfloat16", "float16")
# Two dummy JPEG sizes larger than any crop a spec takes without resizing first (as the planner's
# preprocess.output_image_size): a spec's output size is fixed when both give the same.
_PROBE_SIZES = ((521, 524), (613, 616))


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """UserError (one line, naming the fix) for the first invalid value of `config`.

  A transfer config leaves the HyperRule's fields unset (None) until `transfer.resolve` reads
  the data: those are skipped here, and the trainer checks the resolved config again.
  """
  num_devices = num_devices or jax.device_count()
  if not config.dataset:
    raise UserError("No dataset: set --config.dataset (sklearn_digits, folder:ROOT or a TFDS "
                    "name).")
  _check_optimization(config)
  _check_batches(config, num_devices)
  _check_durations(config, rule_fills="hyperrule" in config)
  _check_choice("loss", config.loss, losses.LOSSES)
  _check_choice("objective", config.objective, objectives.OBJECTIVES)
  _check_choice("trainable", config.trainable, optim.TRAINABLE)
  _check_choice("optimizer", config.optimizer, optim.OPTIMIZERS)
  _check_recipe(config)
  _check_choice("schedule.kind", config.schedule.kind, SCHEDULES)
  _check_choice("state_sharding", config.state_sharding, sharding.STATE_SHARDINGS)
  _check_choice("input_sharding", config.input_sharding, INPUT_SHARDINGS)
  models.parse_name(config.model.name)
  _check_choice("model.dtype", config.model.dtype, DTYPES)
  if config.get("num_classes") is not None and config.num_classes < 1:
    raise UserError(f"num_classes {config.num_classes} must be at least 1; leave it unset to "
                    "take the dataset's count.")
  for key, minimum in (("log_every_steps", 1), ("checkpoint_every_steps", 1),
                       ("keep_checkpoints", 1), ("eval_every_steps", 0), ("shuffle_buffer", 1)):
    if config[key] < minimum:
      raise UserError(f"{key} {config[key]} must be at least {minimum}; e.g. "
                      f"--config.{key}={max(minimum, 1)}.")
  for key in ("pp_train", "pp_eval"):
    if config[key] is not None:
      check_preprocessing(key, config[key], views=2 if key == "pp_train" and
                          config.objective == "moco" else None)
  if config.objective == "moco" and config.probe_shots < 1:
    raise UserError(f"probe_shots {config.probe_shots} must be at least 1 (the linear probe "
                    "that evaluates a self-supervised run); e.g. --config.probe_shots=100.")


def _check_choice(key: str, value, valid) -> None:
  if value not in valid:
    raise UserError(f"Unknown {key} {value!r}; valid: {', '.join(valid)} "
                    f"(--config.{key}=...).")


def _positive(key: str, value, example) -> None:
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
    raise UserError(f"{key} {value} must be a positive number; e.g. --config.{key}={example}.")


def _check_optimization(config) -> None:
  _positive("lr", config.lr, 0.003)
  if config.lr_batch_ref < 0:
    raise UserError(f"lr_batch_ref {config.lr_batch_ref} must be >= 0 (0: no batch scaling; "
                    "BiT: 256 upstream, 512 in transfer).")
  if not 0 <= config.momentum < 1:
    raise UserError(f"momentum {config.momentum} must be in [0, 1); BiT uses 0.9.")
  if not (math.isfinite(config.wd) and config.wd >= 0):
    raise UserError(f"wd {config.wd} must be >= 0; BiT uses 1e-4 (0 turns weight decay off).")
  try:
    re.compile(config.wd_mask)
  except re.error as e:
    raise UserError(f"wd_mask {config.wd_mask!r} is not a regular expression ({e}); e.g. "
                    "--config.wd_mask='.*/kernel'.") from None
  if config.get("grad_clip_norm") is not None:
    _positive("grad_clip_norm", config.grad_clip_norm, 1.0)
  if config.mixup_alpha is not None and not (math.isfinite(config.mixup_alpha)
                                             and config.mixup_alpha >= 0):
    raise UserError(f"mixup_alpha {config.mixup_alpha} must be >= 0 (0: no MixUp; "
                    "BiT-HyperRule: 0.1).")
  _positive("schedule.decay_factor", config.schedule.decay_factor, 0.1)


def _check_recipe(config) -> None:
  """The training-recipe switches (ResNet strikes back, Bag of Tricks, distillation)."""
  for key, value, low, high, example in (
      ("label_smoothing", config.label_smoothing, 0, 1, 0.1),
      ("model.drop_path_rate", config.model.drop_path_rate, 0, 1, 0.05)):
    if not (isinstance(value, (int, float)) and low <= value < high):
      raise UserError(f"{key} {value} must be in [{low}, {high}); e.g. --config.{key}={example}.")
  if not (math.isfinite(config.cutmix_alpha) and config.cutmix_alpha >= 0):
    raise UserError(f"cutmix_alpha {config.cutmix_alpha} must be >= 0 (0: no CutMix; ResNet "
                    "strikes back: 1.0).")
  if not 0 <= config.cutmix_switch_prob <= 1:
    raise UserError(f"cutmix_switch_prob {config.cutmix_switch_prob} must be in [0, 1] (the "
                    "share of batches mixed by CutMix when MixUp is on too; 0.5 in timm).")
  if not (isinstance(config.repeated_aug, int) and config.repeated_aug >= 1):
    raise UserError(f"repeated_aug {config.repeated_aug} must be an integer >= 1 (1: off; "
                    "ResNet strikes back: 3).")
  if (config.optimizer == "lamb" and config.model.head_zero_init
      and re.fullmatch(config.wd_mask, "head/conv2d/kernel")):
    raise UserError("optimizer lamb scales each update by the parameter's norm (trust ratio), "
                    "so a zero-initialised head never grows; set "
                    "--config.model.head_zero_init=False (configs/rsb.py does).")
  distill = config.distill
  if losses.uses_teacher(config.loss):
    if not distill.teacher or not distill.model:
      raise UserError(f"loss {config.loss} needs a teacher: set --config.distill.teacher "
                      "(a BiT .npz or a run's workdir) and --config.distill.model (e.g. R152x2).")
    models.parse_name(distill.model)
    _positive("distill.temperature", distill.temperature, 1.0)
    if config.label_smoothing:
      raise UserError(f"label_smoothing {config.label_smoothing} does not apply to "
                      f"{config.loss} (its targets are the teacher's logits); set "
                      "--config.label_smoothing=0.")
  elif distill.teacher:
    raise UserError(f"distill.teacher is set but loss is {config.loss}; set "
                    "--config.loss=distill_kl to distill, or leave distill.teacher empty.")


def _check_batches(config, num_devices: int) -> None:
  for key in ("batch_size", "eval_batch_size"):
    value = config.get(key)
    if value is None:
      continue
    if value < 1:
      raise UserError(f"{key} {value} must be a positive multiple of the {num_devices} "
                      f"devices; e.g. --config.{key}={num_devices * 8}.")
    sharding.check_batch_size(value, num_devices, key)
  if config.batch_split < 1:
    raise UserError(f"batch_split {config.batch_split} must be at least 1 (1: no gradient "
                    "accumulation).")
  per_device = config.batch_size // num_devices
  if per_device % config.batch_split:
    raise UserError(f"batch_split {config.batch_split} must divide the per-device batch "
                    f"{per_device} (batch_size {config.batch_size} over {num_devices} devices).")


def _check_durations(config, rule_fills: bool) -> None:
  """The total and the schedule's durations, in the unit `optim.Durations` will read; with
  `rule_fills` an unset total is the HyperRule's to choose."""
  for node, name, prefix in ((config, "total", ""), (config.schedule, "warmup", "schedule."),
                             (config.schedule, "decay", "schedule.")):
    for unit in ("steps", "examples", "epochs"):
      value = node.get(f"{name}_{unit}")
      if value is None:
        continue
      values = value if isinstance(value, (tuple, list)) else (value,)
      key = f"{prefix}{name}_{unit}"
      valid = (lambda v: v > 0) if name == "total" else (lambda v: v >= 0)
      if any(not (isinstance(v, (int, float)) and math.isfinite(v) and valid(v))
             for v in values):
        if name == "total":
          raise UserError(f"{key} {value} must be positive: there would be nothing to train; "
                          f"e.g. --config.{key}=1000.")
        raise UserError(f"{key} {value} must be >= 0.")
      break  # Durations reads the first unit set.
    else:
      if name == "total" and not rule_fills:
        raise UserError("No training length: set one of --config.total_steps, total_examples "
                        "or total_epochs.")


def check_preprocessing(key: str, spec: str, views: int | None = None) -> None:
  """Runs `spec` on dummy JPEGs: bad op arguments, crops larger than the resized image, and
  output the model cannot take (not float, not RGB, empty; not `views` views of each image
  when set, none otherwise) are UserErrors here."""
  if not spec:
    raise UserError(f"{key} is empty; set it, e.g. --config.{key}='decode|resize(224)|"
                    "value_range(-1, 1)'.")
  fn = preprocess.parse(spec)
  shapes = set()
  for height, width in _PROBE_SIZES:
    example = {"image": tf.io.encode_jpeg(tf.zeros((height, width, 3), tf.uint8)),
               "_seed": tf.constant([0, 0], tf.int64)}
    try:
      image = fn(example)["image"]
    except (tf.errors.OpError, ValueError, TypeError) as e:
      raise UserError(f"{key} {spec!r} fails on a {height}x{width} image: "
                      f"{preprocess.error_reason(e)}; check the ops' arguments (preprocess.py "
                      "documents each op).") from None
    shapes.add(tuple(image.shape))
  if image.dtype != tf.float32:
    raise UserError(f"{key} {spec!r} gives {image.dtype.name} pixels; end it with "
                    "value_range(-1, 1): the model takes float pixels in [-1, 1].")
  found = image.shape[0] if image.shape.rank == 4 else None
  if found != views:
    fix = (f"put views({views}) before the ops that make each view, e.g. 'decode|views(2)|"
           "inception_crop(224, 0.2)|...' (configs/hpt.py)" if views
           else "remove views(...): this objective takes one image per example")
    raise UserError(f"{key} {spec!r} gives {found or 'no'} views of each image; {fix}.")
  if image.shape[-1] != 3:
    raise UserError(f"{key} {spec!r} gives {image.shape[-1]}-channel images; the model takes "
                    "RGB: use decode (3 channels).")
  height, width = image.shape[-3:-1]
  if len(shapes) == 1 and 0 in (height, width):
    raise UserError(f"{key} {spec!r} gives {height}x{width} images; the model "
                    "needs at least 1x1 pixels (BiT trains at 128-480): raise the size.")

