"""Top classes of images: `python -m big_transfer.predict --init=PATH IMAGE... [--top=5] [--json]`.

`--init` takes what `config.init` takes (`checkpoints.load_params`): an official BiT `.npz` or the
workdir of one of our runs (its newest checkpoint).

- A workdir: images are preprocessed by the run's `pp_eval` (`<workdir>/config.json`), classes are
  named by `<workdir>/class_names.json` (the dataset's names, written when the run started), and
  scores follow the run's loss (softmax or sigmoid).
- An `.npz`: images are resized to `--resolution` x `--resolution` (default 224, the resolution
  BiT-S/M were pretrained at, paper §3.3; the `*-ILSVRC2012.npz` files were fine-tuned at 480 by
  the released code's HyperRule) with pixels in [-1, 1]. Classes are named by `--names` (e.g.
  `imagenet21k_wordnet_lemmas.txt` for the 21843-class BiT-M heads), else by their index. Scores
  are sigmoid for 21843-class heads (BiT-M was pretrained with one binary classifier per label,
  google-research/big_transfer issue #26) and softmax otherwise.

Images are decoded by TensorFlow (JPEG, PNG, GIF, BMP; grayscale and RGBA become RGB) and run in
batches of `--batch_size` (the last one padded, so the model compiles once). Prints each image's
top classes, or with `--json` one JSON object per image and line. Bad input ends with one
`error: ...` line.
"""

import dataclasses
import json
import sys
from typing import Iterator, Sequence

from absl import app, flags, logging

from big_transfer import errors, hostmem, native_logs

if __name__ == "__main__":  # Before TensorFlow and JAX load, so they load once.
  hostmem.reexec_for_cpu()
native_logs.import_tensorflow()  # Keeps TensorFlow's import notices off stderr.

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from etils import epath  # noqa: E402

from big_transfer import checkpoints, models, sharding, workdirs  # noqa: E402
from big_transfer.data import preprocess  # noqa: E402

INIT = flags.DEFINE_string("init", None,
                           "An official BiT .npz or a run's workdir (as config.init).")
TOP = flags.DEFINE_integer("top", 5, "How many classes to print per image.", lower_bound=1)
JSON = flags.DEFINE_bool("json", False, "One JSON object per image and line instead of text.")
NAMES = flags.DEFINE_string(
    "names", None, "Class names: a text file with one name per line in label order (e.g. "
    "imagenet21k_wordnet_lemmas.txt) or a JSON list; default: the workdir's class_names.json.")
RESOLUTION = flags.DEFINE_integer(
    "resolution", 224, "Image size for an .npz (a workdir uses its run's pp_eval).", lower_bound=1)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", lower_bound=1)
SCORES = flags.DEFINE_enum("scores", "auto", ["auto", "softmax", "sigmoid"],
                           "How logits become scores; auto: see the module docstring.")

IMAGENET21K_CLASSES = 21843  # BiT-M's upstream head (sigmoid cross-entropy).


# Computed on the host, in forms that neither overflow nor warn for large logits.
SCORES_FROM_LOGITS = {
    "softmax": lambda logits: np.exp(logits - np.logaddexp.reduce(logits, -1, keepdims=True)),
    "sigmoid": lambda logits: np.exp(-np.logaddexp(0, -logits)),
}


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A classifier with its preprocessing and class names, from one checkpoint."""
  model_name: str
  params: dict
  pp_spec: str
  class_names: list[str]
  scores: str  # "softmax" or "sigmoid".


def _read_text(path: epath.Path, what: str) -> str:
  try:
    return path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise errors.UserError(f"Cannot read {what} {path} ({type(e).__name__}); check the path.") \
        from None


def read_names(path: str) -> list[str]:
  """Class names from a JSON list or from a text file with one name per line."""
  text = _read_text(epath.Path(path), "class names file")
  if path.endswith(".json"):
    try:
      names = json.loads(text)
    except json.JSONDecodeError as e:
      raise errors.UserError(f"{path} is not valid JSON ({e}); write a JSON list of names.") \
          from None
    if not isinstance(names, list):
      raise errors.UserError(f"{path} holds a JSON {type(names).__name__}, not a list of names.")
    return [str(name) for name in names]
  return text.splitlines()


def _run_config(workdir: str) -> dict:
  path = epath.Path(workdir) / workdirs.CONFIG_NAME
  if not path.exists():
    raise errors.UserError(f"{path} is missing: predict reads the run's pp_eval and loss from it "
                           "(runs write it when they start); pass a run's workdir or an .npz.")
  try:
    return json.loads(_read_text(path, "run config"))
  except json.JSONDecodeError as e:
    raise errors.UserError(f"{path} is not valid JSON ({e}); restore it from the run.") from None


def load(path: str, *, names_file: str | None = None, resolution: int = 224,
         scores: str = "auto") -> Predictor:
  """The classifier of `path` (an official BiT .npz or a run's workdir)."""
  is_workdir = epath.Path(path).is_dir()
  config = _run_config(path) if is_workdir else None  # Before the (slower) checkpoint read.
  model_name, params = checkpoints.load_params(path)
  if "head" not in params:
    raise errors.UserError(f"{path} has no classification head (a backbone-only checkpoint); "
                           "predict needs a file or run with a head.")
  num_classes = params["head"]["conv2d"]["bias"].shape[0]
  if is_workdir:
    pp_spec = config["pp_eval"]
    run_scores = "sigmoid" if config["loss"] == "sigmoid_xent" else "softmax"
    stored_names = epath.Path(path) / workdirs.CLASS_NAMES_NAME
    if names_file is None and stored_names.exists():
      names_file = str(stored_names)
  else:
    pp_spec = f"decode|resize({resolution})|value_range(-1, 1)"
    run_scores = "sigmoid" if num_classes == IMAGENET21K_CLASSES else "softmax"
  if names_file is None:
    names = [str(i) for i in range(num_classes)]
  else:
    names = read_names(names_file)
    if len(names) != num_classes:
      raise errors.UserError(f"{names_file} names {len(names)} classes but the head of {path} "
                             f"has {num_classes}; pass the names file of this checkpoint.")
  return Predictor(model_name, params, pp_spec, names, run_scores if scores == "auto" else scores)


def _load_image(path: str, pp) -> np.ndarray:
  try:
    data = tf.io.read_file(path)
  except tf.errors.OpError as e:  # A folder, no permission, ...
    reason = "a folder" if tf.io.gfile.isdir(path) else type(e).__name__
    raise errors.UserError(f"Cannot read image {path} ({reason}); check the path.") from None
  try:
    return pp({"image": data, "_seed": tf.zeros([2], tf.int64)})["image"].numpy()
  except tf.errors.InvalidArgumentError:
    raise errors.UserError(f"Cannot decode image {path} (corrupt or not an image); replace it "
                           "or leave it out.") from None


def predict(predictor: Predictor, images: Sequence[str], *, top: int = 5,
            batch_size: int = 32) -> Iterator[tuple[str, list[tuple[int, str, float]]]]:
  """(image, [(class, name, score)] best first) per image, in the order given."""
  missing = [path for path in images if not tf.io.gfile.exists(path)]
  if missing:
    more = f" ({len(missing) - 1} more are missing)" if len(missing) > 1 else ""
    raise errors.UserError(f"Image {missing[0]} does not exist{more}; check the paths.")
  # One device, with the model form and compiler options the trainer and evaluators use there.
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  model = models.get_model(predictor.model_name, len(predictor.class_names),
                           for_cpu=sharding.runs_on_cpu(mesh))
  forward = jax.jit(lambda params, x: model.apply({"params": params}, x),
                    compiler_options=sharding.compiler_options(mesh))
  params = jax.device_put(predictor.params, sharding.replicated(mesh))
  preprocess.output_image_size(predictor.pp_spec)  # UserError unless one fixed size: batchable.
  pp = preprocess.parse(predictor.pp_spec)
  batch_size = min(batch_size, len(images))
  top = min(top, len(predictor.class_names))
  for start in range(0, len(images), batch_size):
    paths = images[start:start + batch_size]
    batch = np.stack([_load_image(path, pp) for path in paths])
    padded = np.zeros((batch_size,) + batch.shape[1:], np.float32)
    padded[:len(batch)] = batch
    logits = np.asarray(forward(params, padded))[:len(batch)]
    scores = SCORES_FROM_LOGITS[predictor.scores](logits)
    for path, row in zip(paths, scores):
      best = np.argsort(-row, kind="stable")[:top]
      yield path, [(int(c), predictor.class_names[c], float(row[c])) for c in best]


def main(argv):
  images = argv[1:]
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  if not INIT.value:
    sys.exit("error: --init=PATH is required (an official BiT .npz or a run's workdir).")
  if not images:
    sys.exit("error: no images given; usage: python -m big_transfer.predict --init=PATH "
             "IMAGE [IMAGE ...].")
  try:
    predictor = load(INIT.value, names_file=NAMES.value, resolution=RESOLUTION.value,
                     scores=SCORES.value)
    for path, best in predict(predictor, images, top=TOP.value, batch_size=BATCH_SIZE.value):
      if JSON.value:
        print(json.dumps({"image": path, "predictions": [
            {"class": c, "name": name, "score": score} for c, name, score in best]}), flush=True)
      else:
        print(path)
        for c, name, score in best:
          print(f"  {score:.4f}  {c:>5}  {name}")
  except errors.UserError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
