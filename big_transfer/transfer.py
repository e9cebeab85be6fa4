"""Transfer: a run's data-dependent config (BiT-HyperRule), few-shot subset and initial params.

`resolve(config)` is the one place a config meets its data, called by `trainer.run` and by
`train --print_config`: it opens the dataset, turns VTAB split names into TFDS splits and, for
configs with a `hyperrule` section (configs/transfer.py), fills every HyperRule field still
unset after the command line's overrides, from the training set's size (the split's count, or
shots x classes) and image area. It says what it chose and why.
"""

import dataclasses

import jax
import ml_collections
import numpy as np

from big_transfer import checkpoints, hyperrule, metrics, models, optim
from big_transfer.data import datasets, pipeline, preprocess, tasks
from big_transfer.errors import UserError


@dataclasses.dataclass
class Resolved:
  config: ml_collections.ConfigDict
  dataset: datasets.Dataset
  notes: list[str]  # What was resolved, and why (printed by the trainer and --print_config).


def resolve(config: ml_collections.ConfigDict) -> Resolved:
  config = config.copy_and_resolve_references()
  dataset = datasets.get(config.dataset, config.data_dir, config.label)
  notes = _vtab_splits(config, dataset)
  dataset.check_split(config.train_split)
  dataset.check_split(config.eval_split)
  if "hyperrule" in config:
    notes += _apply_hyperrule(config, dataset)
  return Resolved(config, dataset, notes)


def _vtab_splits(config, dataset) -> list[str]:
  """VTAB-1k split names (train800val200, test, ...) of a VTAB task -> TFDS split strings."""
  task = tasks.TASKS.get(config.get("task", ""))
  if not task or not task.vtab:
    return []
  counts = {name: split.num_examples for name, split in dataset.builder.info.splits.items()}
  splits = task.vtab.tfds_splits(counts)
  notes = []
  for field in ("train_split", "eval_split"):
    if config[field] in splits:
      notes.append(f"VTAB-1k {config[field]} = {splits[config[field]]}.")
      config[field] = splits[config[field]]
  return notes


def _apply_hyperrule(config, dataset) -> list[str]:
  """Sets the HyperRule's fields that are None in `config` (in place); returns the notes."""
  classes = dataset.num_classes
  if config.shots:
    num_examples, source = config.shots * classes, f"{config.shots} shots x {classes} classes"
  else:
    num_examples = dataset.num_examples(config.train_split)
    source = f"{config.train_split!r}"
  total = optim.Durations(num_examples, config.batch_size)(config, "total", required=False)
  rule = config.hyperrule
  choice = hyperrule.choose(num_examples, dataset.image_area(config.train_split),
                            decays=rule.decays, resolution=rule.resolution, total_steps=total)
  pp_train, pp_eval = preprocess.transfer_specs(
      choice.resize_size, choice.crop_size, flip=rule.flip, crop=rule.crop, decode=rule.decode)
  test_res_pp = preprocess.transfer_specs(choice.resize_size, choice.crop_size, flip=rule.flip,
                                          crop=False, decode=rule.decode)[0]
  schedule = config.schedule
  duration = lambda node, name: [f"{name}_{unit}" for unit in ("steps", "examples", "epochs")
                                 if node.get(f"{name}_{unit}") is not None]
  fields = [  # (config node, its path, field, the rule's value, the configured fields)
      (config, "", "total_steps", choice.total_steps, duration(config, "total")),
      (schedule, "schedule.", "warmup_steps", choice.warmup_steps, duration(schedule, "warmup")),
      (schedule, "schedule.", "decay_steps", choice.decay_steps, duration(schedule, "decay")),
      (config, "", "mixup_alpha", choice.mixup_alpha, []),
      (config, "", "pp_train", pp_train, []),
      (config, "", "pp_eval", pp_eval, []),
      (config.test_res, "test_res.", "pp", test_res_pp, []),
      (config.test_res, "test_res.", "lr", float(f"{config.lr * schedule.decay_factor:.6g}"), []),
  ]
  chosen, kept = [], []
  for node, prefix, name, value, configured in fields:
    configured = configured or ([name] if node[name] is not None else [])
    if configured:
      kept += [f"{prefix}{key}={node[key]}" for key in configured]
    else:
      node[name] = value
      chosen.append(f"{prefix}{name}={value}")
  notes = [f"HyperRule ({dataset.name} {source}): {choice.explain()}",
           f"HyperRule set: {', '.join(chosen) or 'nothing'}."]
  if kept:
    notes.append(f"HyperRule left as configured: {', '.join(kept)}.")
  return notes


def train_subset(config: ml_collections.ConfigDict,
                 dataset: datasets.Dataset) -> np.ndarray | None:
  """The few-shot positions (`shots` per class, drawn with `seed`), None for the whole split."""
  if not config.shots:
    return None
  return pipeline.few_shot_subset(dataset, config.train_split, config.shots, config.seed)


def init_params(config: ml_collections.ConfigDict, num_classes: int, shardings):
  """`config.init`'s params for the run's model, placed with `shardings`: the backbone as
  stored, the head as `config.init_head` says (transfer: a zero head of `num_classes`)."""
  return _load(config.init, config.model.name, num_classes, config.init_head, shardings,
               "--config.init", "config.model.name", "Initialised")


def teacher_params(config: ml_collections.ConfigDict, num_classes: int, shardings):
  """The distillation teacher `config.distill.teacher` (a `distill.model` with its head of
  `num_classes`), placed with `shardings`."""
  return _load(config.distill.teacher, config.distill.model, num_classes, "keep", shardings,
               "--config.distill.teacher", "config.distill.model", "Teacher")


def _load(path: str, model: str, num_classes: int, head: str, shardings, flag: str,
          model_key: str, role: str):
  name, params = checkpoints.load_params(path, num_classes, head=head)
  wanted = models.parse_name(model)
  try:
    found = models.parse_name(name)
  except UserError:
    found = None
  if found != wanted:
    raise UserError(f"{flag}={path} holds {name} but {model_key} is {model}; set "
                    f"--{model_key}={name} or pass a {model} checkpoint.")
  head_params = params.get("head", {}).get("conv2d", {})
  zero = not any(np.any(x) for x in head_params.values())
  head_note = (f"{'a zero' if zero else 'the checkpoint' + chr(39) + 's'} {num_classes}-class "
               f"head (init_head={head})" if num_classes else "no head")
  metrics.log(f"{role} from {path}: {name} backbone loaded, {head_note}.")
  # `shardings` may name more (a self-supervised objective's projection, initialised fresh).
  return jax.tree.map(
      lambda x, sharding: jax.make_array_from_callback(x.shape, sharding, lambda i: x[i]),
      params, {k: shardings[k] for k in params})
