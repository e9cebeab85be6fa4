"""Training-recipe switches (ResNet strikes back, Bag of Tricks, distillation), each against a
hand computation or its definition, and the RSB configs through the real command."""

import functools
import itertools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from big_transfer import checkpoints, config_common, losses, models, optim, trainer, validate
from big_transfer.data import datasets, mixup, pipeline, preprocess, randaugment
from big_transfer.errors import UserError
from big_transfer.models import bit
from configs import rsb
from conftest import ROOT, error_line, run_cli

# ---- Losses ---------------------------------------------------------------------------------


def test_label_smoothing_targets_sum_to_one_with_the_right_values():
  labels = jax.nn.one_hot(jnp.array([3, 0]), 10)
  smoothed = losses.smooth_labels(labels, 0.1)
  np.testing.assert_allclose(smoothed.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(smoothed[0, 3], 0.91, rtol=1e-6)  # 1 - eps + eps / K.
  np.testing.assert_allclose(np.delete(np.asarray(smoothed[0]), 3), 0.01, rtol=1e-5)
  # Smoothing mixed labels equals mixing smoothed labels (it is linear); rows still sum to 1.
  mixed = 0.7 * labels + 0.3 * labels[::-1]
  np.testing.assert_allclose(losses.smooth_labels(mixed, 0.1),
                             0.7 * smoothed + 0.3 * smoothed[::-1], rtol=1e-6)
  # The training loss smooths its targets: cross-entropy against the smoothed row, by hand.
  logits = jax.random.normal(jax.random.key(0), (2, 10))
  loss = losses.get("softmax_xent", label_smoothing=0.1)(logits, labels)
  log_p = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(loss, -(np.asarray(smoothed) * log_p).sum(-1), rtol=1e-5)
  assert losses.eval_loss("softmax_xent") is losses.softmax_xent  # Evaluation: plain labels.


def test_bce_is_the_mean_over_classes():
  logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], np.float32)
  labels = np.array([[1.0, 0.0, 0.0], [0.2, 0.8, 0.0]], np.float32)
  p = 1 / (1 + np.exp(-logits))
  by_hand = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  # Averaged over the batch by the trainer: timm's mean over batch x classes.
  np.testing.assert_allclose(np.mean(losses.bce(logits, labels)), by_hand.mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.bce(logits, labels),
                             losses.sigmoid_xent(logits, labels) / 3, rtol=1e-6)


def test_distillation_kl_is_zero_for_the_teacher_and_has_the_hand_gradient():
  teacher = jax.random.normal(jax.random.key(0), (4, 7)) * 3
  student = jax.random.normal(jax.random.key(1), (4, 7))
  for t in (1.0, 4.0):
    loss = losses.get("distill_kl", temperature=t)
    np.testing.assert_allclose(loss(teacher, teacher), 0.0, atol=1e-6)
    assert np.all(loss(student, teacher) > 0)
    # d/ds T^2 KL(softmax(t/T) || softmax(s/T)) = T (softmax(s/T) - softmax(t/T)).
    grad = jax.grad(lambda s: loss(s, teacher).sum())(student)
    p_s = np.exp(student / t) / np.exp(student / t).sum(-1, keepdims=True)
    p_t = np.exp(teacher / t) / np.exp(teacher / t).sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, t * (p_s - p_t), rtol=1e-4, atol=1e-6)
  assert losses.eval_loss("distill_kl") is losses.softmax_xent  # Evaluated on the labels.


# ---- MixUp / CutMix ---------------------------------------------------------------------------


def _constant_batch(n=8, size=32):
  """Image i is filled with the value i; its label is class i."""
  images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None],
                            (n, size, size, 3))
  return {"image": images, "labels": jax.nn.one_hot(jnp.arange(n), n)}


def test_cutmix_box_area_and_labels_mixed_by_the_clipped_area():
  size, lam = 32, 0.75  # Box sides round(0.5 * 32) = 16: a quarter of the image unclipped.
  keys = jax.random.split(jax.random.key(0), 200)
  boxes = jax.jit(jax.vmap(lambda k: mixup.cutmix_box(k, size, size, lam)))(keys)
  areas = np.asarray(boxes).mean(axis=(1, 2))
  assert np.isclose(areas.max(), 1 - lam)  # Never larger than 1 - lambda ...
  assert areas.min() < 1 - lam - 0.05  # ... smaller where the border clips it.
  mixed = jax.jit(jax.vmap(lambda k: mixup.cutmix(k, _constant_batch(), alpha=1.0)))(keys[:20])
  pasted = np.mean(np.asarray(mixed["image"][:, 0, ..., 0]) == 7, axis=(1, 2))  # 0 takes 7's.
  np.testing.assert_allclose(mixed["labels"][:, 0, 7], pasted, atol=1e-6)
  np.testing.assert_allclose(mixed["labels"][:, 0, 0], 1 - pasted, atol=1e-6)
  np.testing.assert_allclose(mixed["labels"].sum(-1), 1.0, rtol=1e-6)
  assert len(set(pasted)) > 10  # Boxes of many sizes.


def test_mix_switches_between_mixup_and_cutmix_with_probability_half():
  batch = _constant_batch()
  keys = jax.random.split(jax.random.key(1), 200)
  mixed = jax.jit(jax.vmap(lambda k: mixup.mix(k, batch, 0.2, 1.0, 0.5)["image"][0, ..., 0]))(keys)
  mixed = np.asarray(mixed)
  cut = np.sum(np.all((mixed == 0) | (mixed == 7), axis=(1, 2)))  # CutMix pastes; MixUp blends.
  assert 70 <= cut <= 130, cut  # Binomial(200, 0.5): mean 100, std 7.
  # With CutMix off it is MixUp drawing as before (the BiT-HyperRule configs).
  key = jax.random.key(3)
  jax.tree.map(np.testing.assert_array_equal, mixup.mix(key, batch, 0.1),
               mixup.mixup(key, batch, 0.1))


# ---- RandAugment ------------------------------------------------------------------------------


def _image():
  """A low-contrast 32x32 image with structure (gradients, a square), values 60-180."""
  y, x = np.mgrid[:32, :32]
  image = np.stack([60 + 3 * x, 60 + 3 * y, 120 + 0 * x], -1)
  image[8:20, 10:22] = [170, 90, 70]
  return tf.constant(image.astype(np.uint8))


@pytest.mark.parametrize("op", randaugment.OPS, ids=lambda op: op.__name__)
def test_randaugment_op_keeps_shape_and_dtype_and_changes_pixels(op):
  image = _image()
  out = op(image, tf.constant(5.0), tf.constant(1.0))
  assert out.shape == image.shape and out.dtype == tf.uint8
  assert np.any(out.numpy() != image.numpy())
  at_zero = op(image, tf.constant(0.0), tf.constant(-1.0)).numpy()
  if op in randaugment.IDENTITY_AT_ZERO:
    np.testing.assert_array_equal(at_zero, image.numpy())
  else:  # Ops without a magnitude (or posterize's 4 bits at 0) change the image anyway.
    assert np.any(at_zero != image.numpy())


def test_randaug_pp_op_is_stateless_per_example():
  fn = preprocess.parse("decode|randaug(2, 9, 0.5)")
  example = lambda seed: {"image": tf.io.encode_png(_image()),
                          "_seed": tf.constant(seed, tf.int64)}
  outputs = [fn(example([0, i]))["image"].numpy() for i in range(8)]
  np.testing.assert_array_equal(outputs[0], fn(example([0, 0]))["image"].numpy())
  assert len({o.tobytes() for o in outputs}) > 4  # Different seeds, different ops.
  with pytest.raises(UserError, match="randaug takes uint8 pixels"):
    validate.check_preprocessing("pp_train", "decode|value_range(-1, 1)|randaug(2, 9)")


def test_resize_small_keeps_the_aspect_for_the_test_crop():
  image = tf.zeros((100, 200, 3), tf.uint8)
  out = preprocess.parse("resize_small(235)|central_crop(224)")({"image": image})["image"]
  assert out.shape == (224, 224, 3)
  assert preprocess.parse("resize_small(235)")({"image": image})["image"].shape == (235, 470, 3)


# ---- Model options ----------------------------------------------------------------------------


def test_stochastic_depth_drop_rate_and_deterministic_eval():
  unit = bit.Unit(mid=32, drop_rate=0.3)
  x = jax.random.normal(jax.random.key(0), (2000, 2, 2, 128))
  variables = jax.jit(unit.init)(jax.random.key(1), x)
  branch = jax.jit(unit.apply)(variables, x) - x  # Deterministic: every branch kept, unscaled.
  train = jax.jit(functools.partial(unit.apply, deterministic=False))
  out = train(variables, x, rngs={"drop_path": jax.random.key(2)}) - x
  dropped = np.all(np.asarray(out) == 0, axis=(1, 2, 3))
  assert abs(dropped.mean() - 0.3) < 0.04, dropped.mean()  # Binomial std 0.01.
  np.testing.assert_allclose(out[~dropped], branch[~dropped] / 0.7, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(jax.jit(unit.apply)(variables, x), branch + x)
  rates = bit.drop_path_rates(bit.DEPTHS[50], 0.05)
  assert [len(r) for r in rates] == [3, 4, 6, 3] and rates[0][0] == 0 and rates[-1][-1] == 0.05


def test_zero_initialised_residual_gain_starts_each_unit_as_its_shortcut():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 128))
  unit = bit.Unit(mid=32, residual_gain=True)
  variables = jax.jit(unit.init)(jax.random.key(1), x)
  assert variables["params"]["residual_gain"].shape == (128,)
  np.testing.assert_array_equal(jax.jit(unit.apply)(variables, x), x)
  # Not weight-decayed by the default mask (kernels only), like Bag of Tricks' norm scales.
  model = models.get_model("R14x1", 10, residual_gain=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  mask = optim.decay_mask(shapes, r".*/kernel")
  assert not mask["block1"]["unit01"]["residual_gain"]


def test_resnet_d_shortcut_pools_before_the_projection():
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 32))  # Odd: a partial last window.
  proj = bit.Projection(64, 2, avg_down=True)
  variables = proj.init(jax.random.key(1), x)
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  counts = jnp.pad(jnp.ones((1, 7, 7, 1)), ((0, 0), (0, 1), (0, 1), (0, 0)))
  window = lambda a: a.reshape(a.shape[0], 4, 2, 4, 2, a.shape[-1]).sum((2, 4))
  pooled = window(padded) / window(counts)  # Averages over the valid pixels only.
  expected = bit.StdConv(64, 1).apply({"params": variables["params"]["standardized_conv2d"]},
                                      pooled)
  np.testing.assert_allclose(proj.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
  # The same parameters as the released architecture; an odd input size runs through.
  default = models.get_model("R14x1", 10)
  resnet_d = models.get_model("R14x1", 10, avg_down=True)
  init = lambda m: jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  assert jax.tree.structure(init(default)) == jax.tree.structure(init(resnet_d))


# ---- LAMB -------------------------------------------------------------------------------------


def test_lamb_trust_ratio_and_decay_only_on_masked_parameters():
  config = config_common.base()
  config.optimizer, config.wd, config.grad_clip_norm = "lamb", 0.02, 1.0
  lr = 0.01
  tx = optim.make_optimizer(config, lambda step: lr)
  params = {"conv": {"kernel": jnp.full((2, 3), 2.0)}, "norm": {"gamma": jnp.ones((3,))}}
  grads = {"conv": {"kernel": jnp.array([[3.0, -1.0, 0.5], [0.0, 2.0, -4.0]])},
           "norm": {"gamma": jnp.array([0.3, -0.2, 0.1])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  # By hand: clip to global norm 1, first Adam step m/(sqrt(v)+eps) = g/(|g|+eps).
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  clipped = jax.tree.map(lambda g: np.asarray(g) / norm, grads)
  adam = jax.tree.map(lambda g: g / (np.abs(g) + 1e-6), clipped)
  kernel = adam["conv"]["kernel"] + 0.02 * 2.0  # Decoupled decay, then the trust ratio.
  ratio = np.linalg.norm(np.full((2, 3), 2.0)) / np.linalg.norm(kernel)
  np.testing.assert_allclose(updates["conv"]["kernel"], -lr * ratio * kernel, rtol=1e-5)
  # The GroupNorm scale: no weight decay and no trust ratio (timm's Lamb for wd=0 groups).
  np.testing.assert_allclose(updates["norm"]["gamma"], -lr * adam["norm"]["gamma"], rtol=1e-5)
  assert not np.isclose(ratio, 1.0)


# ---- Repeated augmentation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(data_dir):
  return datasets.get("sklearn_digits", data_dir)


def _batch(digits, pp, process_index, start_step=0):
  return next(pipeline.train_iterator(
      digits, "train", pp, 12, seed=0, shuffle_buffer=100, repeats=3, start=start_step * 12,
      process_index=process_index, process_count=2))


def test_repeated_augmentation_gives_each_process_distinct_copies(digits):
  plain, augmented = "decode|resize(16)|value_range(-1, 1)", \
      "decode|resize(20)|random_crop(16)|flip_lr|value_range(-1, 1)"
  per_process = []
  for process in (0, 1):
    images = _batch(digits, plain, process)["image"].reshape(4, 3, -1)
    assert all(np.array_equal(group[0], copy) for group in images for copy in group[1:])
    per_process.append({group[0].tobytes() for group in images})
    assert len(per_process[-1]) == 4  # Four different images, three copies each.
    copies = _batch(digits, augmented, process)["image"].reshape(4, 3, -1)
    assert all(not np.array_equal(a, b) for group in copies
               for a, b in itertools.combinations(group, 2))  # Each copy its own draws.
  assert not per_process[0] & per_process[1]  # The processes' shards stay disjoint.
  # Resumption stays exact with repeats: batch 5 of a resumed stream is batch 5.
  stream = pipeline.train_iterator(digits, "train", augmented, 12, seed=0, shuffle_buffer=100,
                                   repeats=3, process_index=1, process_count=2)
  np.testing.assert_array_equal(next(itertools.islice(stream, 5, None))["image"],
                                _batch(digits, augmented, 1, start_step=5)["image"])


# ---- Validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer": "adam"}, "Unknown optimizer 'adam'; valid: sgd, lamb"),
    ({"model.head_zero_init": True}, "so a zero-initialised head never grows"),
    ({"label_smoothing": 1.0}, "label_smoothing 1.0 must be in [0, 1)"),
    ({"model.drop_path_rate": -0.1}, "model.drop_path_rate -0.1 must be in [0, 1)"),
    ({"cutmix_alpha": -1.0}, "cutmix_alpha -1.0 must be >= 0"),
    ({"repeated_aug": 0}, "repeated_aug 0 must be an integer >= 1"),
    ({"loss": "distill_kl"}, "loss distill_kl needs a teacher: set --config.distill.teacher"),
    ({"distill.teacher": "t.npz"}, "distill.teacher is set but loss is bce"),
    ({"loss": "distill_kl", "distill.teacher": "t.npz", "distill.model": "R50x1",
      "label_smoothing": 0.1}, "label_smoothing 0.1 does not apply to distill_kl"),
])
def test_bad_recipe_values_are_one_line(overrides, message):
  config = config_common.with_overrides(rsb.get_config("A2,local"), overrides)
  with pytest.raises(UserError, match=None) as error:
    validate.check_config(config, num_devices=8)
  assert message in str(error.value)


# ---- The procedures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "procedure, epochs, lr, wd, smoothing, mixup, magnitude, repeats, drop_path, train_res", [
        ("A1", 600, 5e-3, 0.01, 0.1, 0.2, 7, 3, 0.05, 224),
        ("A2", 300, 5e-3, 0.02, 0.0, 0.1, 7, 3, 0.05, 224),
        ("A3", 100, 8e-3, 0.02, 0.0, 0.1, 6, 1, 0.0, 160),
    ])
def test_rsb_procedures_are_the_paper_s_table_1(procedure, epochs, lr, wd, smoothing, mixup,
                                                magnitude, repeats, drop_path, train_res):
  """Wightman et al. 2021, Table 1; what every procedure shares; and its `local` form a valid
  run of the same procedure at 1/25 of the epochs."""
  config = rsb.get_config(procedure)
  assert (config.total_epochs, config.lr, config.wd, config.label_smoothing, config.mixup_alpha,
          config.repeated_aug, config.model.drop_path_rate) == (
              epochs, lr, wd, smoothing, mixup, repeats, drop_path)
  assert f"inception_crop({train_res}, 0.08)|flip_lr|randaug(2, {magnitude}, 0.5)|" in (
      config.pp_train)
  assert config.pp_eval == "decode|resize_small(235)|central_crop(224)|value_range(-1, 1)"
  assert (config.optimizer, config.batch_size, config.lr_batch_ref, config.grad_clip_norm,
          config.loss, config.cutmix_alpha, config.cutmix_switch_prob, config.schedule.kind,
          config.schedule.warmup_epochs) == ("lamb", 2048, 2048, 1.0, "bce", 1.0, 0.5, "cosine", 5)
  local = rsb.get_config(f"{procedure},local")
  assert (local.total_epochs, local.lr, local.repeated_aug) == (epochs / 25, lr, repeats)
  validate.check_config(local, num_devices=8)  # Its preprocessing runs on dummy images.


# ---- The recipes through the real command -----------------------------------------------------

RECIPE_FLAGS = {"model.name": "R14x1", "batch_size": 16, "eval_batch_size": 120,
                "total_steps": 3, "log_every_steps": 1, "checkpoint_every_steps": 2,
                "keep_checkpoints": 2, "shuffle_buffer": 100}


def _params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope="module")
def teacher_npz(tmp_path_factory):
  """An R14x1 teacher of the digits' 10 classes with a non-zero head, as an official .npz."""
  model = models.get_model("R14x1", 10, head_zero_init=False)
  params = jax.jit(model.init)(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))["params"]
  path = str(tmp_path_factory.mktemp("teacher") / "teacher.npz")
  checkpoints.save_bit_npz(jax.device_get(params), path)
  return path


@pytest.mark.parametrize("arg, extra", [
    ("A1,local", {}),
    ("A2,local", {"loss": "distill_kl", "distill.model": "R14x1", "distill.temperature": 2.0,
                  "model.residual_gain": True, "model.avg_down": True}),
], ids=["A1", "A2-distill-residual_gain-resnet_d"])
def test_recipe_trains_and_resumes_bitwise(tmp_path, data_dir, teacher_npz, arg, extra,
                                           one_device):
  """trainer.run for 3 steps (checkpoints 2 and 3); then checkpoint 3 deleted and the run
  resumed from 2 through the real command (in-process): step 3 again, bit for bit. A2 runs
  with the Bag-of-Tricks model options and distillation on top. A2 and A3 differ from A1 only
  in values (test_rsb_procedures_are_the_paper_s_table_1); each case costs a compile (on one
  device: the recipes do not depend on the device count)."""
  if "distill.model" in extra:
    extra = {**extra, "distill.teacher": teacher_npz}
  overrides = {**RECIPE_FLAGS, "data_dir": data_dir, **extra}
  reference = str(tmp_path / "reference")
  result = trainer.run(config_common.with_overrides(rsb.get_config(arg), overrides), reference)
  assert result["count"] == 360
  resumed = str(tmp_path / "resumed")
  shutil.copytree(reference, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "3"))
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  proc = run_cli(f"--config={ROOT}/configs/rsb.py:{arg}", f"--workdir={resumed}", *flags)
  assert proc.returncode == 0, proc.stderr
  expected, actual = _params(reference, 3), _params(resumed, 3)
  assert set(expected) == set(actual)
  jax.tree.map(np.testing.assert_array_equal, expected, actual)
  if "distill.teacher" in overrides:  # The teacher is carried frozen, as loaded.
    loaded = checkpoints.load_params(teacher_npz, 10, head="keep")[1]
    jax.tree.map(np.testing.assert_array_equal, actual["teacher"], loaded)


def test_rsb_config_argument_errors_are_one_line(tmp_path):
  assert "Unknown procedure 'A4' in configs/rsb.py:A4; valid: A1, A2, A3" in error_line(
      run_cli(f"--config={ROOT}/configs/rsb.py:A4", f"--workdir={tmp_path}"))
  assert "Bad option 'size=3' in configs/rsb.py:A1,size=3" in error_line(
      run_cli(f"--config={ROOT}/configs/rsb.py:A1,size=3", f"--workdir={tmp_path}"))
