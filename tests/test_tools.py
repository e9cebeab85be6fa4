"""The tools around a run: predict, export and plot, on one tiny trained workdir and on an
official-layout .npz built here. Entry points run in-process (flags parsed, then `main`)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from big_transfer import (checkpoints, config_common, export, models, plot, predict, sharding,
                          trainer, workdirs)
from big_transfer.data import preprocess
from big_transfer.errors import UserError
from configs import demo
from conftest import TINY_CONFIG, on_devices


CLASSES = ["airplane", "bird", "cat"]


@pytest.fixture(scope="module")
def images(cifar10_dir):
  """One CIFAR-10 test image per class of CLASSES (32x32 JPEG)."""
  return [str(sorted((cifar10_dir / "test" / name).iterdir())[0]) for name in CLASSES]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cifar10_dir):
  """A 4-step R14x1 run on a 3-class image folder (CIFAR-10 images)."""
  root = tmp_path_factory.mktemp("folder")
  for split, start, count in (("train", 10, 8), ("test", 20, 4)):
    for name in CLASSES:
      (root / split / name).mkdir(parents=True)
      for path in sorted((cifar10_dir / "test" / name).iterdir())[start:start + count]:
        shutil.copy(path, root / split / name)
  config = config_common.with_overrides(demo.get_config(), {
      **TINY_CONFIG, "dataset": f"folder:{root}", "num_classes": len(CLASSES),
      "shuffle_buffer": 100})
  path = str(tmp_path_factory.mktemp("run") / "workdir")
  with on_devices(1):  # One device: compiles faster than eight.
    trainer.run(config, path)
  return path


def run_cli(module, *argv) -> str | None:
  """Parses `argv` as the module's command line and runs its main; the exit message or None."""
  with flagsaver.flagsaver():
    rest = flags.FLAGS([module.__name__, *argv])
    try:
      module.main(rest)
    except SystemExit as e:
      return str(e.code)
  return None


def test_trainer_records_the_class_names(workdir):
  with open(os.path.join(workdir, workdirs.CLASS_NAMES_NAME)) as f:
    assert json.load(f) == CLASSES


def _logits_of(model_name, params, batch):
  """The model's logits in the form predict runs on this platform, the trainer's (whether
  that form is the same function is test_models.py's business)."""
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  model = models.get_model(model_name, params["head"]["conv2d"]["bias"].shape[0],
                           for_cpu=sharding.runs_on_cpu(mesh))
  forward = jax.jit(model.apply, compiler_options=sharding.compiler_options(mesh))
  return np.asarray(forward({"params": params}, batch))


def test_predict_a_workdir_with_its_pp_eval_and_names(workdir, images):
  predictor = predict.load(workdir)
  assert predictor.pp_spec == TINY_CONFIG["pp_eval"]
  assert (predictor.class_names, predictor.scores) == (CLASSES, "softmax")
  # Batches of 2: the last one is padded; padding must not change any image's scores.
  results = list(predict.predict(predictor, images, top=3, batch_size=2))
  name, params = checkpoints.load_params(workdir)
  pp = preprocess.parse(TINY_CONFIG["pp_eval"])
  batch = np.stack([pp({"image": tf.io.read_file(p), "_seed": tf.zeros([2], tf.int64)})["image"]
                    for p in images])
  expected = np.asarray(jax.nn.softmax(_logits_of(name, params, batch)))
  assert [path for path, _ in results] == images
  for (_, best), scores in zip(results, expected):
    assert [c for c, _, _ in best] == list(np.argsort(-scores, kind="stable"))
    assert [n for _, n, _ in best] == [CLASSES[c] for c, _, _ in best]
    np.testing.assert_allclose([s for _, _, s in best], np.sort(scores)[::-1], rtol=1e-5)


def test_predict_an_npz_equals_the_model_on_hand_made_inputs(r14x1_npz, tmp_path):
  """32x32 PNGs at --resolution=32: no resampling, so the input is exactly -1 + 2 * pixel/255."""
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  paths = []
  for i, image in enumerate(pixels):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
  names = tmp_path / "names.txt"
  names.write_text("".join(f"class {i}, lemma\n" for i in range(10)))
  name, params = checkpoints.load_params(r14x1_npz)
  x = (-1 + pixels.astype(np.float32) * np.float32(2 / 255)).astype(np.float32)
  logits = _logits_of(name, params, x)
  expected = np.asarray(jax.nn.softmax(logits))
  predictor = predict.load(r14x1_npz, names_file=str(names), resolution=32)
  assert predictor.scores == "softmax"  # A 10-class head; 21843-class heads get sigmoid.
  results = list(predict.predict(predictor, paths, top=10))
  for (_, best), scores in zip(results, expected):
    assert [c for c, _, _ in best] == list(np.argsort(-scores, kind="stable"))
    assert best[0][1] == f"class {best[0][0]}, lemma"
    np.testing.assert_allclose([s for _, _, s in best], np.sort(scores)[::-1], rtol=1e-5,
                               atol=1e-7)
  # Sigmoid scores are per class; without --names the classes are named by their index. (The
  # same batch shape: the program comes from the compilation cache.)
  sigmoid = predict.load(r14x1_npz, resolution=32, scores="sigmoid")
  for (_, [(c, label, score)]), row in zip(predict.predict(sigmoid, paths, top=1), logits):
    assert (c, label) == (int(np.argmax(row)), str(c))
    np.testing.assert_allclose(score, 1 / (1 + np.exp(-row.max())), rtol=1e-5)


def test_predict_cli_output(r14x1_npz, images, capsys):
  assert run_cli(predict, f"--init={r14x1_npz}", "--resolution=32", "--json", "--top=2",
                 *images) is None
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["image"] for r in records] == images
  assert all(len(r["predictions"]) == 2 and r["predictions"][0]["score"]
             >= r["predictions"][1]["score"] and r["predictions"][0]["name"]
             == str(r["predictions"][0]["class"]) for r in records)
  # The same batch shape as above: the compiled program comes from the compilation cache.
  assert run_cli(predict, f"--init={r14x1_npz}", "--resolution=32", "--top=1", *images) is None
  text = capsys.readouterr().out.splitlines()
  assert text[::2] == images and len(text) == 6


def test_predict_bad_input_is_one_line(r14x1_npz, images, tmp_path):
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8 not a jpeg")
  short_names = tmp_path / "names.txt"
  short_names.write_text("cat\ndog\n")
  with np.load(r14x1_npz) as archive:
    backbone = str(tmp_path / "backbone.npz")
    np.savez(backbone, **{k: archive[k] for k in archive.files if "/head/" not in k})
  cases = [
      ([f"--init={backbone}", images[0]], "has no classification head"),
      ([f"--init={r14x1_npz}", str(tmp_path / "nope.jpg")], "does not exist"),
      ([f"--init={r14x1_npz}", "--resolution=32", str(tmp_path)], f"Cannot read image {tmp_path}"),
      ([f"--init={r14x1_npz}", "--resolution=32", images[0], str(corrupt)],
       f"Cannot decode image {corrupt}"),
      ([f"--init={r14x1_npz}", f"--names={short_names}", images[0]],
       "names 2 classes but the head"),
      ([f"--init={tmp_path}", images[0]], "config.json is missing"),
      ([images[0]], "--init=PATH is required"),
      ([f"--init={r14x1_npz}"], "no images given"),
  ]
  for argv, expected in cases:
    message = run_cli(predict, *argv)
    assert message and message.startswith("error: ") and expected in message, message
    assert "\n" not in message


def test_export_round_trip_is_bitwise(workdir, tmp_path):
  out = str(tmp_path / "run.npz")
  assert export.export(workdir, out) == "R14x1 with a 3-class head"
  with np.load(out) as archive:  # The official layout: resnet/ keys, a 1x1-conv head.
    assert all(key.startswith("resnet/") for key in archive.files)
    assert archive["resnet/head/conv2d/kernel"].shape == (1, 1, 2048, 3)
  name, params = checkpoints.load_params(workdir)
  assert checkpoints.load_params(out)[0] == name
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v)
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  ours, back = flat(params), flat(checkpoints.load_params(out)[1])
  assert sorted(ours) == sorted(back)
  for key in ours:
    assert ours[key].dtype == back[key].dtype == np.float32
    assert np.array_equal(ours[key].view(np.uint32), back[key].view(np.uint32)), key
  # An existing file is kept unless --overwrite; the CLI says so in one line.
  before = open(out, "rb").read()
  message = run_cli(export, f"--workdir={workdir}", f"--out={out}")
  assert message.startswith("error: ") and "exists; pass --overwrite" in message
  assert open(out, "rb").read() == before
  assert run_cli(export, f"--workdir={workdir}", f"--out={out}", "--overwrite") is None
  message = run_cli(export, f"--workdir={tmp_path}", f"--out={tmp_path / 'x.npz'}")
  assert message.startswith("error: ") and "holds no checkpoint" in message


def _write_metrics(path, lines):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write("\n".join(lines))


def test_plot_reads_resumed_and_cut_short_metrics(tmp_path):
  run = str(tmp_path / "resumed")
  _write_metrics(run, [
      '{"step": 1, "train/loss": 2.0, "train/lr": 0.1}',
      '{"step": 2, "train/loss": 1.5, "train/lr": 0.1}',
      '{"step": 2, "train/loss": 1.4, "train/lr": 0.1}',  # Logged again after a resume.
      '{"step": 3, "eval/accuracy": 0.5}',
      '{"step": 4, "train/lo'])  # Killed mid-write.
  series = plot.read_metrics(run)
  assert series["train/loss"] == {1: 2.0, 2: 1.4}
  assert series["eval/accuracy"] == {3: 0.5}
  bad = str(tmp_path / "bad")
  _write_metrics(bad, ['{"step": 1, "train/loss": 2.0}', "garbage", '{"step": 3}'])
  with pytest.raises(UserError, match=r"metrics.jsonl:2 is not a metrics record"):
    plot.read_metrics(bad)
  with pytest.raises(UserError, match=r"does not exist"):
    plot.read_metrics(str(tmp_path / "nothing"))


def test_plot_overlays_runs_into_a_png(workdir, tmp_path):
  other = str(tmp_path / "other")
  _write_metrics(other, ['{"step": 2, "train/loss": 1.0, "train/lr": 0.01}',
                         '{"step": 4, "train/loss": 0.8, "train/lr": 0.001, '
                         '"eval/accuracy": 0.4, "eval/loss": 1.1}'])
  out = str(tmp_path / "curves.png")
  fig = plot.plot([workdir, other], out)
  with Image.open(out) as image:
    assert image.format == "PNG" and image.size == (1500, 400)
  loss, accuracy, lr = fig.axes
  assert [t.get_text() for t in accuracy.get_legend().get_texts()] == [workdir, other]
  assert [t.get_text() for t in lr.get_legend().get_texts()] == [workdir, other]
  assert f"{other} (eval)" in [t.get_text() for t in loss.get_legend().get_texts()]
  assert list(accuracy.lines[1].get_ydata()) == [40.0]
  assert run_cli(plot, workdir, f"--out={out}", "--title=tiny") is None
  message = run_cli(plot, str(tmp_path / "nothing"), f"--out={out}")
  assert message.startswith("error: ") and "metrics.jsonl does not exist" in message
