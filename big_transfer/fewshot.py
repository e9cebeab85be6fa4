"""Few-shot linear evaluation of any checkpoint on frozen pre-logits:

    python -m big_transfer.fewshot --init=PATH --dataset=NAME|folder:ROOT \
        [--shots=1,5,10,25] [--seeds=3] [--pp=SPEC] [--data_dir=DIR] [--batch_size=N]

PATH is an official BiT .npz or the workdir of one of our runs (its newest checkpoint). Images
are preprocessed by `--pp`, by default the run's own `pp_eval` (from the workdir's config.json)
or, for an .npz, the upstream evaluation at 224 px. Prints the top-1 accuracy per shot count
(mean and spread over seeds). See big_transfer/fewshot_eval.py for the method.
"""

import json
import os
import sys

from absl import app, flags, logging

from big_transfer import hostmem

if __name__ == "__main__":  # Before JAX and TensorFlow load, so they load once.
  hostmem.reexec_for_cpu()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from big_transfer import (  # noqa: E402
    checkpoints, errors, fewshot_eval, metrics, models, sharding, workdirs)
from big_transfer.data import datasets, preprocess  # noqa: E402

# allow_override: predict.py defines --init and --batch_size too (same defaults), and the tests
# import both modules into one process.
INIT = flags.DEFINE_string("init", None, "An official BiT .npz or a run's workdir.",
                           allow_override=True)
DATASET = flags.DEFINE_string("dataset", None, "TFDS name (prepared in --data_dir) or "
                              "folder:ROOT (ROOT/<split>/<class>/*.jpg).")
DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "The split the shots come from.")
TEST_SPLIT = flags.DEFINE_string("test_split", "test", "The split accuracy is measured on.")
SHOTS = flags.DEFINE_list("shots", ["1", "5", "10", "25"], "Examples per class.")
# allow_override: experiments/mini_bit.py defines --seeds too (same default).
SEEDS = flags.DEFINE_integer("seeds", 3, "Draws of the shots; accuracies are averaged.",
                             lower_bound=1, allow_override=True)
L2_REG = flags.DEFINE_float("l2_reg", 2.0 ** 10, "L2 regularisation of the least squares.")
PP = flags.DEFINE_string("pp", None, "Preprocessing spec; default: the run's pp_eval, or 224 px "
                         "for an .npz.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Global batch for computing features.",
                                  lower_bound=1, allow_override=True)


def default_pp(init: str) -> str:
  """The workdir's evaluation preprocessing (what the model was trained at), else BiT's
  upstream evaluation at 224 px."""
  config_file = os.path.join(init, workdirs.CONFIG_NAME)
  if os.path.isfile(config_file):
    with open(config_file) as f:
      return json.load(f).get("pp_eval") or preprocess.UPSTREAM_EVAL
  return preprocess.UPSTREAM_EVAL


def evaluate(init: str, dataset: str, *, shots, seeds: int, pp: str | None = None,
             data_dir: str | None = None, train_split: str = "train", test_split: str = "test",
             l2_reg: float = 2.0 ** 10, batch_size: int = 32) -> dict[int, list[float]]:
  """{k: [accuracy per seed]} of the checkpoint `init` on `dataset`; prints the table."""
  try:
    shots = sorted({int(k) for k in shots})
  except ValueError:
    raise errors.UserError(f"--shots must be integers, got {','.join(map(str, shots))}.") from None
  pp = pp or default_pp(init)
  mesh = sharding.make_mesh()
  data = datasets.get(dataset, data_dir)
  model_name, params = checkpoints.load_params(init, num_classes=0)
  # The form the trainer runs on this platform, so a periodic evaluation and this one agree.
  model = models.get_model(model_name, 0, for_cpu=sharding.runs_on_cpu(mesh))
  evaluator = fewshot_eval.Evaluator(
      lambda p, images: model.apply({"params": p}, images, pre_logits=True), data, mesh,
      batch_size=batch_size, pp=pp, train_split=train_split, test_split=test_split,
      shots=shots, seeds=seeds, l2_reg=l2_reg)
  metrics.log(f"Few-shot linear evaluation of {model_name} ({init}) on {data.name}: shots from "
              f"{train_split!r}, accuracy on {test_split!r} ({data.num_examples(test_split):,} "
              f"images), pp {pp!r}, l2 {l2_reg:g}, {seeds} seeds.")
  results = evaluator.run(jax.device_put(params, sharding.replicated(mesh)))
  metrics.log("shots  top-1 (mean ± std over seeds)  per seed")
  for k, accuracies in results.items():
    per_seed = " ".join(f"{100 * a:.2f}" for a in accuracies)
    metrics.log(f"{k:>5}  {100 * np.mean(accuracies):6.2f}% ± {100 * np.std(accuracies):5.2f}"
                f"{'':14}{per_seed}")
  return results


def main(argv):
  del argv
  if not INIT.value or not DATASET.value:
    sys.exit("error: --init=PATH (a BiT .npz or a run's workdir) and --dataset=NAME|folder:ROOT "
             "are required.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  try:
    evaluate(INIT.value, DATASET.value, shots=SHOTS.value, seeds=SEEDS.value, pp=PP.value,
             data_dir=DATA_DIR.value, train_split=TRAIN_SPLIT.value, test_split=TEST_SPLIT.value,
             l2_reg=L2_REG.value, batch_size=BATCH_SIZE.value)
  except errors.UserError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
