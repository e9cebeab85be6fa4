"""HPT on CPU (docs/hpt.md): does continued self-supervised pretraining help a far target?

    python -m big_transfer.experiments.hpt_cifar10 --data_root=.../cifar10 --workdir=DIR \
        [--moco_steps=200] [--finetune_steps=200]

CIFAR-10 split in two (class subsets as symlink folders under DIR/data): base = R14x1
supervised on classes 0-4 (configs/demo.py's recipe at 16 px, 600 steps); then MoCo-v2
(configs/hpt.py:cpu, `--moco_steps` steps) on the images of classes 5-9, labels unused: HPT from
the base, HPT norm-only from the base, and from scratch. Each row is evaluated on the 1,000
target test images twice: a ridge probe on frozen pre-logits (evaluate.ridge_probe) fitted to
100 train images per target class, and semi-supervised fine-tuning (HPT's 1% labels point):
the whole model transferred by BiT-HyperRule (configs/transfer.py) from the row's checkpoint to
1,000 labelled train images (200 per class), `--finetune_steps` steps. Reruns resume unfinished
runs and skip finished ones. Writes DIR/summary.json.
"""

import json
import os

import jax
import numpy as np
from absl import app, flags

from big_transfer import checkpoints, config_common, evaluate, models, results, sharding, trainer
from big_transfer.data import datasets, pipeline
from configs import demo, hpt
from configs import transfer as transfer_config

# allow_override: mini_bit.py defines --data_root, train.py --workdir (same defaults), and the
# tests import several entry modules into one process.
DATA_ROOT = flags.DEFINE_string("data_root", None, "CIFAR-10 folder: train|test/<class>/*.jpg.",
                                allow_override=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Where the data links, runs and summary go.",
                              allow_override=True)
MOCO_STEPS = flags.DEFINE_integer("moco_steps", 200, "Self-supervised steps of each HPT row.")
FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 200,
                                      "Steps of each row's fine-tuning on 1,000 labels.")
PROBE_SHOTS = 100
LABELS_PER_CLASS = 200  # 1,000 labels over the 5 target classes.
EVAL_PP = "decode|resize(16)|value_range(-1, 1)"


def build_folders(data_root: str, root: str) -> tuple[str, str]:
  """root/{source,target}/{train,test}/<class> -> the classes 0-4 and 5-9 of data_root."""
  classes = sorted(os.listdir(os.path.join(data_root, "train")))
  for part, names in (("source", classes[:5]), ("target", classes[5:])):
    for split in ("train", "test"):
      os.makedirs(os.path.join(root, part, split), exist_ok=True)
      for name in names:
        link = os.path.join(root, part, split, name)
        if not os.path.islink(link):
          os.symlink(os.path.join(os.path.abspath(data_root), split, name), link)
  return os.path.join(root, "source"), os.path.join(root, "target")


def base_config(source: str):
  config = demo.get_config()
  return config_common.with_overrides(config, {
      "dataset": f"folder:{source}", "num_classes": 5, "model.name": "R14x1",
      "pp_train": "decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)",
      "pp_eval": EVAL_PP, "batch_size": 64, "total_steps": 600, "lr": 0.1,
      "schedule.kind": "cosine", "schedule.warmup_steps": 30, "shuffle_buffer": 10_000,
      "cache": True, "log_every_steps": 25, "eval_every_steps": 0,
      "checkpoint_every_steps": 200})


def finetune_config(target: str, init: str, steps: int):
  """BiT-HyperRule transfer of `init` (a supervised or MoCo workdir; a MoCo projection is
  dropped, the head starts at zero) to LABELS_PER_CLASS labelled train images per target
  class, scaled to the CPU as configs/mini_bit.py's transfer: batch 64 at the rule's lr 0.003
  per step, `steps` steps with the rule's warmup (100 of 500 steps) and decays (40/60/80%)
  scaled to them, 16 px."""
  config = transfer_config.get_config(
      f"task=folder:{target},model=R14x1,shots={LABELS_PER_CLASS}")
  return config_common.with_overrides(config, {
      "init": init, "batch_size": 64, "lr": 0.003, "lr_batch_ref": 0, "total_steps": steps,
      "schedule.warmup_steps": steps // 5,
      "pp_train": "decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)",
      "pp_eval": EVAL_PP, "cache": True, "eval_batch_size": 200,
      "checkpoint_every_steps": steps})


def probe(workdir: str, target: str) -> float:
  """Ridge-probe accuracy of the workdir's backbone on the target classes."""
  _, params = checkpoints.load_params(workdir, 0)
  mesh = sharding.make_mesh()
  model = models.get_model("R14x1", 0, for_cpu=sharding.runs_on_cpu(mesh))
  dataset = datasets.get(f"folder:{target}")
  subset = pipeline.few_shot_subset(dataset, "train", PROBE_SHOTS, 0)
  step = evaluate.make_features_step(lambda p, x: model.apply({"params": p}, x), mesh)
  with jax.set_mesh(mesh):
    train = evaluate.features(step, params, pipeline.eval_iterator(
        dataset, "train", EVAL_PP, 64, subset=subset), mesh)
    test = evaluate.features(step, params, pipeline.eval_iterator(
        dataset, "test", EVAL_PP, 64), mesh)
  return evaluate.ridge_probe(*train, *test, dataset.num_classes)["accuracy"]


def _train(config, workdir: str) -> None:
  """Trains unless finished: rerunning a finished run would rewrite its results.json with the
  rerun's wall time."""
  if not os.path.exists(os.path.join(workdir, results.RESULTS_FILE)):
    trainer.run(config, workdir)


def main(argv):
  del argv
  root = WORKDIR.value
  source, target = build_folders(DATA_ROOT.value, os.path.join(root, "data"))
  runs = os.path.join(root, "runs")
  base = os.path.join(runs, "base")
  _train(base_config(source), base)
  rows = [("base (supervised, classes 0-4)", base)]
  for name, overrides in (("hpt", {"init": base}),
                          ("hpt_norm_only", {"init": base, "trainable": "norm_only"}),
                          ("scratch", {})):
    config = config_common.with_overrides(hpt.get_config("cpu"), {
        "dataset": f"folder:{target}", "total_steps": MOCO_STEPS.value,
        "probe_shots": PROBE_SHOTS, **overrides})
    _train(config, os.path.join(runs, name))
    rows.append((name, os.path.join(runs, name)))
  summary = []
  for name, workdir in rows:
    finetuned = os.path.join(runs, f"finetune_{name.split()[0]}")
    _train(finetune_config(target, workdir, FINETUNE_STEPS.value), finetuned)
    record, finetune = results.load(workdir), results.load(finetuned)
    summary.append({"row": name, "probe_accuracy": probe(workdir, target),
                    "steps": record["steps"], "wall_s": record["wall_s"],
                    "finetune_accuracy": finetune["top1"], "finetune_steps": finetune["steps"],
                    "finetune_wall_s": finetune["wall_s"]})
    print(f"| {name} | {100 * summary[-1]['probe_accuracy']:.1f}% | "
          f"{100 * finetune['top1']:.1f}% | {record['steps']} | {record['wall_s']:.0f} s | "
          f"{finetune['wall_s']:.0f} s |", flush=True)
  with open(os.path.join(root, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["data_root", "workdir"])
  app.run(main)
