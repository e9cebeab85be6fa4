"""The miniature BiT experiment on CIFAR-10 images, on CPU (configs/mini_bit.py has the recipe):

    python -m big_transfer.experiments.mini_bit --data_root=DATA --workdir=DIR \
        [--source_per_class=5000] [--seeds=3]

1. Image folders of symlinks in DIR/data: source = classes 0-4, `source_per_class` training
   images each (all their test images); target = classes 5-9, all their images.
2. Upstream: the scaled BiT-S recipe on the source (DIR/upstream<N>), with the 10-shot linear
   probe on the target logged during pretraining.
3. Per seed: the 10-shot linear probe of the upstream and of a random-init model; HyperRule
   fine-tuning from the upstream on 10 examples per class; the same model from scratch on the
   same examples at two learning rates (the better one counts).
4. The table on stdout and DIR/summary.json (top-1 fractions, means over seeds, wall_s; also
   kept as DIR/summary_source<N>.json, so both source sizes can share a workdir).

Every run lives in its own workdir and is resumed or reused when the command is run again.
"""

import json
import os
import resource
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from big_transfer import (checkpoints, config_common, errors, fewshot_eval, metrics, models,
                          results, sharding, trainer)
from big_transfer.data import datasets
# configs/mini_bit.py: run from the repository root, as `python -m big_transfer.train`.
from configs import mini_bit as configs_mini_bit

DATA_ROOT = flags.DEFINE_string("data_root", None,
                                "CIFAR-10 images: train/<class>/*.jpg, test/<class>/*.jpg.")
# allow_override: train.py and export.py define --workdir, fewshot.py --seeds (same defaults),
# and the tests import several entry modules into one process.
WORKDIR = flags.DEFINE_string("workdir", None, "Where the data subsets, runs and summary go.",
                              allow_override=True)
SOURCE_PER_CLASS = flags.DEFINE_integer("source_per_class", 5000,
                                        "Upstream training images per source class.",
                                        lower_bound=1)
SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds of the 10-shot draws, fine-tuning and scratch.",
                             lower_bound=1, allow_override=True)

SHOTS = 10
SOURCE, TARGET = range(0, 5), range(5, 10)
SCRATCH_LRS = (0.003, 0.03)  # The rule's rate and 10x (per step); the better one counts.


def _class_names(data_root: str) -> list[str]:
  names = []
  for split in ("train", "test"):
    path = os.path.join(data_root, split)
    found = sorted(e.name for e in os.scandir(path) if e.is_dir()) if os.path.isdir(path) else []
    if len(found) != 10:
      raise errors.UserError(f"{path} must hold the 10 CIFAR-10 class folders "
                             f"(<class>/*.jpg), found {len(found)}; pass --data_root=DIR with "
                             "DIR/train and DIR/test.")
    names.append(found)
  if names[0] != names[1]:
    raise errors.UserError(f"{data_root}: train and test have different class folders.")
  return names[0]


def _images(folder: str) -> list[str]:
  return sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))


def build_folder(data_root: str, root: str, classes: list[str],
                 train_per_class: int | None) -> str:
  """An image folder at `root` of symlinks into `data_root`: `classes`, the first
  `train_per_class` training images of each by name (all when None) and all their test
  images. Reused when it exists with the same recipe; never overwritten."""
  recipe = {"data_root": os.path.abspath(data_root), "classes": classes,
            "train_per_class": train_per_class}
  manifest = os.path.join(root, "recipe.json")
  if os.path.exists(manifest):
    with open(manifest) as f:
      if json.load(f) == recipe:
        return root
    raise errors.UserError(f"{root} was built from other data or settings; use a new "
                           "--workdir (nothing was changed).")
  if os.path.exists(root):
    raise errors.UserError(f"{root} exists but is incomplete; delete it or use a new --workdir.")
  partial = root + ".partial"
  for split, limit in (("train", train_per_class), ("test", None)):
    for name in classes:
      source = os.path.join(os.path.abspath(data_root), split, name)
      files = _images(source)
      if limit is not None and len(files) < limit:
        raise errors.UserError(f"{source} has {len(files)} images, fewer than {limit}; lower "
                               "--source_per_class.")
      os.makedirs(os.path.join(partial, split, name), exist_ok=True)
      for file in files[:limit]:
        link = os.path.join(partial, split, name, file)
        if not os.path.islink(link):
          os.symlink(os.path.join(source, file), link)
  with open(os.path.join(partial, "recipe.json"), "w") as f:
    json.dump(recipe, f)
  os.replace(partial, root)
  return root


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _train(config, workdir: str) -> dict:
  """trainer.run; a SIGTERM (the run saved its step) ends the experiment, resumable."""
  result = trainer.run(config, workdir)
  if not result:
    metrics.log("Stopped by SIGTERM; rerun the same command to resume.")
    sys.exit(0)
  return result


def run(data_root: str, workdir: str, source_per_class: int = 5000, seeds: int = 3,
        overrides: dict | None = None) -> dict:
  """The whole experiment; returns the summary (also written to workdir/summary.json).
  `overrides`: {"upstream"|"transfer": {config key: value}} (tests shrink the runs)."""
  started, cpu_started = time.monotonic(), _cpu_seconds()
  overrides = overrides or {}
  names = _class_names(data_root)
  data = os.path.join(workdir, "data")
  source = build_folder(data_root, os.path.join(data, f"source{source_per_class}"),
                        [names[i] for i in SOURCE], source_per_class)
  target = build_folder(data_root, os.path.join(data, "target"), [names[i] for i in TARGET],
                        None)
  with_overrides = lambda config, kind: config_common.with_overrides(
      config, overrides.get(kind, {}))

  def phase(title):
    metrics.log(f"\n=== {title} [{time.monotonic() - started:.0f} s, load "
                f"{os.getloadavg()[0]:.1f}] ===")

  # Upstream, with the target's 10-shot linear probe logged as it trains.
  phase(f"Upstream: {configs_mini_bit.MODEL} on {len(SOURCE)} classes x {source_per_class}")
  upstream_dir = os.path.join(workdir, f"upstream{source_per_class}")
  config = with_overrides(configs_mini_bit.get_config(f"upstream,root={source}"), "upstream")
  config.fewshot.dataset = f"folder:{target}"
  config.fewshot.shots = (SHOTS,)
  config.fewshot.every_steps = max(1, round(config.total_examples / config.batch_size / 3)
                                   ) if config.total_examples else 0
  upstream_top1 = _train(config, upstream_dir)["accuracy"]

  # Linear probes: the upstream's pre-logits and a random-init model's.
  phase("10-shot linear probes on the target")
  mesh = sharding.make_mesh()
  target_data = datasets.get(f"folder:{target}")
  model_name, upstream_params = checkpoints.load_params(upstream_dir, num_classes=0)
  model = models.get_model(model_name, 0, for_cpu=sharding.runs_on_cpu(mesh))
  random_params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
  evaluator = fewshot_eval.Evaluator(
      lambda params, images: model.apply({"params": params}, images, pre_logits=True),
      target_data, mesh, batch_size=200 // mesh.size * mesh.size,
      pp=configs_mini_bit.PP_EVAL,
      shots=(SHOTS,), seeds=seeds)
  probes = {}
  for name, params in (("upstream", upstream_params), ("random", random_params)):
    probes[name] = evaluator.run(jax.device_put(params, sharding.replicated(mesh)))[SHOTS]
    metrics.log(f"linear probe, {name}: {_percent(probes[name])}")

  # HyperRule fine-tuning from the upstream, and the same from scratch at two rates.
  runs = {"finetune": [], **{f"scratch_lr{lr:g}": [] for lr in SCRATCH_LRS}}
  for seed in range(seeds):
    for name in runs:
      phase(f"Transfer, seed {seed}: {name}")
      config = with_overrides(configs_mini_bit.get_config(f"transfer,root={target}"),
                              "transfer")
      config.seed = seed
      if name == "finetune":
        config.init = upstream_dir
      else:
        config.lr = float(name[len("scratch_lr"):])
      # Scratch runs do not depend on the source, so both source sizes share them.
      run_dir = os.path.join(workdir, f"{name}{source_per_class}" if name == "finetune"
                             else name, f"seed{seed}")
      _train(config, run_dir)
      runs[name].append(results.load(run_dir)["top1"])

  scratch_means = {name: float(np.mean(v)) for name, v in runs.items() if name != "finetune"}
  best_scratch = max(scratch_means, key=scratch_means.get)
  summary = {
      "linear_probe_upstream": float(np.mean(probes["upstream"])),
      "linear_probe_random": float(np.mean(probes["random"])),
      "finetune_upstream": float(np.mean(runs["finetune"])),
      "scratch": scratch_means[best_scratch],
      "scratch_best": best_scratch,
      "per_seed": {"linear_probe_upstream": probes["upstream"],
                   "linear_probe_random": probes["random"], **runs},
      "upstream_top1_source_test": upstream_top1,
      "source_per_class": source_per_class,
      "seeds": seeds,
      "shots": SHOTS,
      "data_root": os.path.abspath(data_root),
      "wall_s": round(time.monotonic() - started, 1),
      "cpu_s": round(_cpu_seconds() - cpu_started, 1),
      "cpu_count": os.cpu_count(),
      "load_average_end": [round(x, 2) for x in os.getloadavg()],
  }
  for name in ("summary.json", f"summary_source{source_per_class}.json"):
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(summary, f, indent=2)
      f.write("\n")
  metrics.log(table(summary))
  return summary


def _percent(values) -> str:
  return " ".join(f"{100 * v:5.1f}" for v in values)


def table(summary: dict) -> str:
  """The results as a Markdown table: top-1 % per seed and the mean."""
  seeds = summary["seeds"]
  per_seed = summary["per_seed"]
  rows = [("linear probe (10-shot), random init", "linear_probe_random"),
          ("linear probe (10-shot), upstream", "linear_probe_upstream")]
  rows += [(f"from scratch, lr {name[len('scratch_lr'):]}"
            + (" (better)" if name == summary["scratch_best"] else ""), name)
           for name in per_seed if name.startswith("scratch")]
  rows += [("HyperRule fine-tuning from upstream", "finetune")]
  head = ("| 10-shot CIFAR-10 classes 5-9, top-1 % | "
          + " | ".join(f"seed {s}" for s in range(seeds)) + " | mean |")
  lines = [head, "|---|" + "---:|" * (seeds + 1)]
  for label, key in rows:
    values = per_seed[key]
    lines.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in values)
                 + f" | {100 * np.mean(values):.1f} |")
  gain = summary["finetune_upstream"] - summary["scratch"]
  probe_gain = summary["linear_probe_upstream"] - summary["linear_probe_random"]
  return "\n".join([
      "", f"Mini BiT: upstream on {summary['source_per_class']} images per class of CIFAR-10 "
      f"classes 0-4 (source test top-1 {100 * summary['upstream_top1_source_test']:.1f}%), "
      f"{summary['shots']}-shot transfer to classes 5-9.", *lines,
      f"Linear probe: upstream - random = {100 * probe_gain:+.1f} points; fine-tuning - best "
      f"scratch = {100 * gain:+.1f} points (means of {seeds} seeds).",
      f"Wall time {summary['wall_s'] / 60:.1f} min, CPU time {summary['cpu_s'] / 60:.1f} min "
      f"on {summary['cpu_count']} cores, load average at the end "
      f"{summary['load_average_end'][0]:.1f}."])


def main(argv):
  del argv
  if not DATA_ROOT.value or not WORKDIR.value:
    sys.exit("error: --data_root=DIR (CIFAR-10 images) and --workdir=DIR are required.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  os.makedirs(WORKDIR.value, exist_ok=True)
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # The transfer runs compile the same few programs again and again.
    jax.config.update("jax_compilation_cache_dir", os.path.join(WORKDIR.value, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    run(DATA_ROOT.value, WORKDIR.value, SOURCE_PER_CLASS.value, SEEDS.value)
  except (errors.UserError, errors.TrainingError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
