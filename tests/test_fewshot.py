"""The few-shot linear evaluator: the closed-form solve, the shots, features on the mesh, the
standalone command and the periodic evaluation during training."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, TINY_CONFIG, train_env

from big_transfer import config_common, fewshot, fewshot_eval, sharding, trainer
from big_transfer.data import datasets, pipeline
from big_transfer.errors import UserError


def _direct_ridge(features, labels, num_classes, l2):
  """The ridge solution as one least-squares problem: [X; sqrt(l2) I] W = [Y; 0]."""
  x = (features - features.mean(0)) / (features.std(0) + 1e-5)
  x = np.concatenate([x, np.full((len(x), 1), 100.0)], axis=1)
  y = 2.0 * np.eye(num_classes)[labels] - 1.0
  stacked_x = np.concatenate([x, np.sqrt(l2) * np.eye(x.shape[1])])
  stacked_y = np.concatenate([y, np.zeros((x.shape[1], num_classes))])
  return np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0]


@pytest.mark.parametrize("num_points, dim", [(40, 6), (8, 30)])  # Primal and dual forms.
@pytest.mark.parametrize("l2", [2.0 ** 10, 0.5])
def test_fit_equals_a_direct_least_squares_solve(num_points, dim, l2):
  rng = np.random.default_rng(0)
  features = rng.normal(3.0, 2.0, (num_points, dim)) * rng.uniform(0.1, 10, dim)
  labels = np.arange(num_points) % 4
  mean, std, weights = fewshot_eval.fit(features.astype(np.float32), labels, 4, l2)
  expected = _direct_ridge(features.astype(np.float32).astype(np.float64), labels, 4, l2)
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  np.testing.assert_allclose(mean, features.mean(0), rtol=1e-5)
  # Test accuracy is the argmax of the same linear map.
  test = rng.normal(3.0, 2.0, (50, dim)) * rng.uniform(0.1, 10, dim)
  test_labels = rng.integers(0, 4, 50)
  x = np.concatenate([(test - mean) / std, np.full((50, 1), 100.0)], axis=1)
  assert fewshot_eval.accuracy(features, labels, test, test_labels, 4, l2) == pytest.approx(
      np.mean(np.argmax(x @ expected, axis=1) == test_labels))


def test_separable_features_give_full_accuracy_and_noise_chance():
  rng = np.random.default_rng(1)
  num_classes, dim = 10, 64
  centers = rng.normal(0, 1, (num_classes, dim))

  def sample(n):
    labels = rng.integers(0, num_classes, n)
    return centers[labels] + 0.3 * rng.normal(0, 1, (n, dim)), labels

  for shots in (1, 5):
    train, train_labels = sample(num_classes * shots)
    train_labels = np.repeat(np.arange(num_classes), shots)
    train = centers[train_labels] + 0.3 * rng.normal(0, 1, train.shape)
    test, test_labels = sample(1000)
    assert fewshot_eval.accuracy(train, train_labels, test, test_labels, num_classes) > 0.99
    noise = rng.normal(0, 1, test.shape)  # Features that carry no label: chance.
    assert fewshot_eval.accuracy(train, train_labels, noise, test_labels, num_classes) < 0.2


def test_shots_are_seeded_stratified_and_nested():
  labels = np.array([0] * 30 + [1] * 7 + [2] * 12)
  np.random.default_rng(0).shuffle(labels)
  picks = fewshot_eval.shot_positions(labels, 3, (1, 5, 7), seed=4)
  for k, positions in picks.items():
    assert len(np.unique(positions)) == 3 * k
    np.testing.assert_array_equal(np.bincount(labels[positions], minlength=3), [k, k, k])
  assert set(picks[1]) <= set(picks[5]) <= set(picks[7])
  again = fewshot_eval.shot_positions(labels, 3, (1, 5, 7), seed=4)
  assert all(np.array_equal(picks[k], again[k]) for k in picks)
  other = fewshot_eval.shot_positions(labels, 3, (1, 5, 7), seed=5)
  assert not np.array_equal(picks[5], other[5])
  with pytest.raises(UserError, match="Class 1 has 7 training examples, fewer than 8 shots"):
    fewshot_eval.shot_positions(labels, 3, (1, 8), seed=0)


def _write_colour_folder(root, train_per_class, test_per_class):
  """Images whose class is their dominant colour (red, green, blue) under heavy noise."""
  rng = np.random.default_rng(0)
  for split, count in (("train", train_per_class), ("test", test_per_class)):
    for label, name in enumerate(("red", "green", "blue")):
      os.makedirs(root / split / name)
      for i in range(count):
        image = rng.integers(0, 150, (8, 8, 3))
        image[..., label] += 100
        (root / split / name / f"{i}.png").write_bytes(
            tf.io.encode_png(image.astype(np.uint8)).numpy())


def test_evaluator_on_the_mesh_keeps_every_feature_with_its_label(tmp_path):
  """Mean colour features separate the classes exactly: 100% unless a feature lands on another
  example's label. 21 test images in batches of 8 over 8 devices: padding is masked."""
  _write_colour_folder(tmp_path, train_per_class=9, test_per_class=7)
  data = datasets.get(f"folder:{tmp_path}")
  mesh = sharding.make_mesh()
  calls = []

  def mean_colour(params, images):
    calls.append(images.shape)
    return jnp.mean(images, axis=(1, 2)) * params["scale"]

  evaluator = fewshot_eval.Evaluator(mean_colour, data, mesh, batch_size=8,
                                     pp="decode|value_range(-1, 1)", shots=(1, 3, 9), seeds=2)
  results = evaluator.run({"scale": jnp.ones(())})
  assert results == {1: [1.0, 1.0], 3: [1.0, 1.0], 9: [1.0, 1.0]}
  assert calls == [(8, 8, 8, 3)]  # One compile, global batches of 8.
  # Processes' shares of the positions, concatenated, are the split (or the subset).
  subset = np.array([0, 3, 4, 10, 19, 20])
  for kwargs in ({}, {"subset": subset}):
    shares = [pipeline.eval_positions(data, "test", process_index=p, process_count=2, **kwargs)
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(shares), kwargs.get("subset", np.arange(21)))
  assert fewshot_eval.summarize(results, "colours") == {
      "fewshot/colours_1shot": 1.0, "fewshot/colours_3shot": 1.0, "fewshot/colours_9shot": 1.0}
  with pytest.raises(UserError, match="fewer than 10 shots"):
    fewshot_eval.Evaluator(mean_colour, data, mesh, batch_size=8, pp="decode", shots=(10,))
  with pytest.raises(UserError, match="fewshot batch_size 12 is not divisible by the 8"):
    fewshot_eval.Evaluator(mean_colour, data, mesh, batch_size=12, pp="decode")


@pytest.fixture(scope="module")
def cifar3(tmp_path_factory, cifar10_dir):
  """Three CIFAR-10 classes, 12 train and 10 test images each, as symlinks."""
  root = tmp_path_factory.mktemp("cifar3")
  for split, count in (("train", 12), ("test", 10)):
    for name in ("airplane", "cat", "ship"):
      os.makedirs(root / split / name)
      for path in sorted((cifar10_dir / split / name).iterdir())[:count]:
        os.symlink(path, root / split / name / path.name)
  return root


def test_standalone_command_on_a_tiny_npz(r14x1_npz, cifar3):
  """The command on 1 device prints what the evaluator computes in-process on 8."""
  pp = "decode|resize(32)|value_range(-1, 1)"
  proc = subprocess.run(
      [sys.executable, "-m", "big_transfer.fewshot", f"--init={r14x1_npz}",
       f"--dataset=folder:{cifar3}", "--shots=5,1", "--seeds=2", f"--pp={pp}",
       "--batch_size=16"], cwd=ROOT, env=train_env(1), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "Few-shot linear evaluation of R14x1" in proc.stdout
  assert "accuracy on 'test' (30 images)" in proc.stdout
  printed = {int(line.split()[0]): [float(a) for a in line.split()[-2:]]
             for line in proc.stdout.splitlines() if line.split()[0] in ("1", "5")}
  expected = fewshot.evaluate(r14x1_npz, f"folder:{cifar3}", shots=[1, 5], seeds=2, pp=pp,
                              batch_size=16)
  assert sorted(printed) == [1, 5]
  for k in (1, 5):
    np.testing.assert_allclose(printed[k], 100 * np.array(expected[k]), atol=0.006)
  assert len({a for v in expected.values() for a in v}) > 1  # Not a constant answer.


def test_bad_init_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    fewshot.evaluate(str(tmp_path / "missing.npz"), "sklearn_digits", shots=[1], seeds=1)
  with pytest.raises(UserError, match="holds no checkpoint"):
    fewshot.evaluate(str(tmp_path), "sklearn_digits", shots=[1], seeds=1)


def test_periodic_fewshot_during_training_matches_the_standalone_run(tmp_path, data_dir,
                                                                     capsys, one_device):
  """Both on one device (test_standalone_command_on_a_tiny_npz compares 1 with 8)."""
  config = config_common.with_overrides(config_common.base(), {
      **TINY_CONFIG, "dataset": "sklearn_digits", "data_dir": data_dir, "num_classes": 10,
      "fewshot.dataset": "sklearn_digits", "fewshot.shots": (1, 5), "fewshot.seeds": 2,
      "fewshot.every_steps": 2, "shuffle_buffer": 100})
  workdir = str(tmp_path / "run")
  trainer.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if "fewshot/sklearn_digits_1shot" in r]
  assert [r["step"] for r in logged] == [2, 4]
  assert "step 4: fewshot sklearn_digits: 1-shot" in capsys.readouterr().out
  # The workdir's newest checkpoint, evaluated by the standalone path with the run's pp_eval.
  standalone = fewshot.evaluate(workdir, "sklearn_digits", shots=[1, 5], seeds=2,
                                data_dir=data_dir, batch_size=64)
  for k in (1, 5):
    assert logged[-1][f"fewshot/sklearn_digits_{k}shot"] == pytest.approx(
        np.mean(standalone[k]), abs=1e-6)
