"""HPT's MoCo-v2 objective: its pieces against hand computations, the two-view preprocessing,
`trainable=norm_only`, a MoCo run that crashes and resumes bitwise, and the queue kept in order
over several devices and processes."""

import dataclasses
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from big_transfer import (config_common, evaluate, fewshot_eval, objectives, results, sharding,
                          trainer, transfer, validate)
from big_transfer.data import preprocess
from big_transfer.errors import UserError
from big_transfer.experiments import hpt_cifar10
from configs import hpt
from conftest import ROOT, logged_losses, on_devices, train_env
from helpers import moco_processes

VIEWS = ("decode|resize(18)|views(2)|inception_crop(16, 0.2)|color_jitter(0.4, 0.4, 0.4, 0.1, "
         "0.8)|random_grayscale(0.2)|gaussian_blur(0.5, 0.1, 1.0)|flip_lr|value_range(-1, 1)")


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_info_nce_equals_a_hand_computation():
  rng = np.random.default_rng(0)
  q, k, queue = _unit(rng, (3, 4)), _unit(rng, (3, 4)), _unit(rng, (5, 4))
  expected = []
  for i in range(3):  # -log(exp(q.k / T) / (exp(q.k / T) + sum_j exp(q.queue_j / T)))
    positive = np.exp(np.dot(q[i], k[i]) / 0.2)
    negatives = sum(np.exp(np.dot(q[i], n) / 0.2) for n in queue)
    expected.append(-np.log(positive / (positive + negatives)))
  loss = objectives.info_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                             jnp.asarray(queue, jnp.float32), 0.2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # Its own key scores best: the loss is lowest with q = k.
  assert objectives.info_nce(jnp.asarray(k), jnp.asarray(k), jnp.asarray(queue), 0.2)[0] < \
      loss[0]


def test_ema_update():
  target = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(-4.0)}}
  online = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(4.0)}}
  moved = objectives.ema(target, online, 0.75)
  np.testing.assert_allclose(moved["a"], [1.5, 1.5])  # 0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.
  np.testing.assert_allclose(moved["b"]["c"], -2.0)
  np.testing.assert_array_equal(objectives.ema(target, online, 0.0)["a"], online["a"])


def test_queue_takes_the_keys_of_every_device_in_global_order():
  mesh = sharding.make_mesh()  # 8 devices, 2 rows each.
  queue = jnp.zeros((48, 3))
  batches = [np.arange(16 * 3, dtype=np.float32).reshape(16, 3) + 1000 * i for i in range(4)]
  enqueue = jax.jit(lambda queue, pointer, keys: objectives.enqueue(queue, pointer, keys, mesh))
  expected = np.zeros((48, 3), np.float32)
  pointer = jnp.zeros((), jnp.int32)
  for i, keys in enumerate(batches):
    keys = jax.device_put(keys, sharding.batch_sharding(mesh))
    assert len({s.device for s in keys.addressable_shards}) == 8  # Really split.
    queue, pointer = enqueue(queue, pointer, keys)
    start = (16 * i) % 48  # The oldest rows go first; the fourth batch wraps to row 0.
    expected[start:start + 16] = batches[i]
    assert int(pointer) == (start + 16) % 48
    for shard in queue.addressable_shards:  # Every device holds the whole queue, in order.
      np.testing.assert_array_equal(shard.data, expected)


def test_two_views_are_augmented_apart_and_reproducible():
  image = tf.io.encode_jpeg(tf.cast(tf.random.stateless_uniform((24, 24, 3), (1, 2), 0, 255),
                                    tf.uint8))
  views = lambda seed: preprocess.parse(VIEWS)({"image": image, "_seed": tf.constant(
      [0, seed], tf.int64)})["image"].numpy()
  first = views(7)
  assert first.shape == (2, 16, 16, 3) and first.dtype == np.float32
  assert np.abs(first[0] - first[1]).mean() > 0.05  # Two different augmentations.
  np.testing.assert_array_equal(first, views(7))  # Drawn from the example's seed only.
  assert not np.array_equal(first, views(8))
  assert preprocess.output_image_size(VIEWS) == (16, 16)


def test_augmentation_ops():
  image = tf.cast(tf.random.stateless_uniform((16, 16, 3), (3, 4), 0, 255), tf.uint8)
  apply = lambda spec: preprocess.parse(spec)({"image": image, "_seed": tf.constant(
      [0, 1], tf.int64)})["image"].numpy().astype(np.float32)
  gray = apply("random_grayscale(1.0)")
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(apply("random_grayscale(0.0)"), image.numpy())
  np.testing.assert_array_equal(apply("color_jitter(0.4, 0.4, 0.4, 0.1, 0.0)"), image.numpy())
  assert np.abs(apply("color_jitter(0.4, 0.4, 0.4, 0.1, 1.0)") - image.numpy()).mean() > 1
  blurred = apply("gaussian_blur(1.0, 1.0, 1.0)")  # Smooths: neighbours differ less.
  assert np.abs(np.diff(blurred, axis=1)).mean() < 0.5 * np.abs(np.diff(
      image.numpy().astype(np.float32), axis=1)).mean()
  np.testing.assert_allclose(blurred.mean(), image.numpy().mean(), rtol=0.05)


def test_views_are_checked_against_the_objective():
  config = hpt.get_config("cpu")
  config.dataset = "sklearn_digits"
  validate.check_config(config)
  with pytest.raises(UserError, match=r"gives no views of each image; put views\(2\)"):
    validate.check_config(config_common.with_overrides(config, {"pp_train": config.pp_eval}))
  supervised = config_common.with_overrides(config, {"objective": "supervised"})
  with pytest.raises(UserError, match=r"gives 2 views of each image; remove views"):
    validate.check_config(supervised)
  with pytest.raises(UserError, match=r"moco.queue_size 4000 must be a positive multiple of "
                     r"batch_size 64 .* e.g. --config.moco.queue_size=3968.$"):
    trainer.build(config_common.with_overrides(config, {"moco.queue_size": 4000}),
                  sharding.make_mesh(), 10, 100)


@pytest.mark.parametrize("override, fix", [
    ({"batch_split": 2}, "batch_split=1"),
    ({"state_sharding": "fsdp"}, "state_sharding=replicated"),
    ({"mixup_alpha": 0.1}, "mixup_alpha=0"),
    ({"cutmix_alpha": 1.0}, "cutmix_alpha=0"),
    ({"loss": "distill_kl", "distill.model": "R14x1"}, "loss=softmax_xent"),
    ({"model.drop_path_rate": 0.1}, "model.drop_path_rate=0"),
    ({"moco.momentum": 1.0}, "moco.momentum 1.0 must be in [0, 1)"),
    ({"moco.temperature": 0.0}, "moco.temperature 0.0 must be positive"),
    ({"objective": "simclr"}, "Unknown objective 'simclr'; valid: supervised, moco."),
])
def test_moco_refuses_what_it_does_not_support(override, fix):
  config = config_common.with_overrides(hpt.get_config("cpu"), override)
  with pytest.raises(UserError) as error:
    trainer.build(config, sharding.make_mesh(), 10, 100)
  message = str(error.value)
  assert fix in message and "\n" not in message, message
  if "=" in fix:
    assert message.startswith("objective=moco supports ") and message.endswith(
        f"set --config.{fix}."), message


def _tiny(**overrides):
  config = hpt.get_config("cpu")
  config.dataset = "sklearn_digits"
  config.pp_train = VIEWS
  config.batch_size = 16
  config.total_steps = 4
  config.moco.queue_size = 32
  config.moco.proj_hidden = 64
  config.moco.proj_dim = 16
  config.moco.momentum = 0.9
  config.lr = 0.5  # Large enough to move GroupNorm scales visibly in two steps.
  config.probe_shots = 5
  config.eval_batch_size = 64
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  return config_common.with_overrides(config, overrides)


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def test_projection_head_and_two_moco_steps_by_hand(one_device):
  """The model's shapes and state at step 0, then two steps against MoCo's algorithm written
  out with the tested pieces: the key encoder moves towards the query encoder (before its
  update), then embeds the second views; InfoNCE of the first views' queries against them and
  the queue as it was; the keys (not the queries) enter the queue at its pointer."""
  mesh = sharding.make_mesh()
  config = _tiny()
  setup = trainer.build(config, mesh, num_classes=10, num_train_examples=100)
  params = setup.abstract_state["params"]
  assert "head" not in params  # The backbone without its classifier, plus the projection.
  assert params["projection"]["dense1"]["kernel"].shape == (2048, 64)
  assert params["projection"]["dense2"]["kernel"].shape == (64, 16)
  with jax.set_mesh(mesh):
    state = setup.init(jax.random.key(0))
  embeddings = setup.objective.apply_fn(state["params"], jnp.ones((2, 16, 16, 3)))
  np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
  moco = state["moco"]
  assert moco["queue"].shape == (32, 16) and int(moco["queue_pointer"]) == 0
  for a, b in zip(jax.tree.leaves(moco["key_params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(a, b)  # The key encoder starts as the query encoder.

  embed = jax.jit(setup.objective.apply_fn)
  params, key_params = (jax.device_get(state[k]) for k in ("params", "params"))
  queue = np.array(moco["queue"])
  rng = np.random.default_rng(1)
  for i in range(2):
    views = rng.uniform(-1, 1, (16, 2, 16, 16, 3)).astype(np.float32)
    key_params = objectives.ema(key_params, params, config.moco.momentum)
    keys = np.asarray(embed(key_params, views[:, 1]))
    expected_loss = np.mean(objectives.info_nce(embed(params, views[:, 0]), keys, queue, 0.2))
    batch = {"image": views, "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]}
    with jax.set_mesh(mesh):
      state, metrics = setup.train_step(state, sharding.to_global(batch, mesh))
    np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-5)
    queue[16 * i:16 * (i + 1)] = keys
    # Embedded over 8 devices vs on one: rounding differences (up to 2e-6 seen).
    np.testing.assert_allclose(state["moco"]["queue"], queue, atol=2e-5)
    assert int(state["moco"]["queue_pointer"]) == (16 * (i + 1)) % 32
    for a, b in zip(jax.tree.leaves(state["moco"]["key_params"]), jax.tree.leaves(key_params)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    params = jax.device_get(state["params"])


def test_norm_only_changes_group_norm_and_projection_only(one_device):
  mesh = sharding.make_mesh()
  setup = trainer.build(_tiny(trainable="norm_only"), mesh, num_classes=10,
                        num_train_examples=100)
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    state = setup.init(jax.random.key(0))
    before = _flat(state["params"])
    for _ in range(2):
      batch = {"image": rng.uniform(-1, 1, (16, 2, 16, 16, 3)).astype(np.float32),
               "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]}
      state, metrics = setup.train_step(state, sharding.to_global(batch, mesh))
  after = _flat(state["params"])
  assert np.isfinite(float(metrics["loss"]))
  trained = [k for k in before if "group_norm" in k or "projection" in k]
  assert len(trained) == 2 * 13 + 4  # gamma and beta of 13 GroupNorms; 2 Dense layers.
  for key in before:
    if key in trained:
      assert not np.array_equal(before[key], after[key]), key
    else:
      np.testing.assert_array_equal(before[key], after[key], err_msg=key)
  # Frozen parameters carry no optimizer state (momentum only for the trained ones).
  traces = [s.trace for s in jax.tree.leaves(
      state["opt_state"], is_leaf=lambda x: isinstance(x, optax.TraceState))
             if isinstance(s, optax.TraceState)]
  assert sum(x.size for x in jax.tree.leaves(traces)) == sum(before[k].size for k in trained)


def _checkpoint(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "default"))


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory, data_dir):
  """(workdir, final metrics) of the tiny MoCo run on the digits, 4 steps."""
  workdir = str(tmp_path_factory.mktemp("moco") / "reference")
  with on_devices(1):  # The tests that use it run on one device too: it compiles faster.
    return workdir, trainer.run(_tiny(data_dir=data_dir), workdir)


def test_crashed_moco_run_resumes_bitwise(moco_run, tmp_path, data_dir, monkeypatch,
                                          one_device):
  config = _tiny(data_dir=data_dir)
  reference, result = moco_run
  assert 0 <= result["accuracy"] <= 1 and result["count"] == 360  # The probe's, on test.

  interrupted = str(tmp_path / "interrupted")
  build = trainer.build

  def crash_at_step_3(*args, **kwargs):
    setup = build(*args, **kwargs)
    calls = [0]

    def train_step(state, batch):
      calls[0] += 1
      if calls[0] == 3:
        raise KeyboardInterrupt("killed")
      return setup.train_step(state, batch)
    return dataclasses.replace(setup, train_step=train_step)

  monkeypatch.setattr(trainer, "build", crash_at_step_3)
  with pytest.raises(KeyboardInterrupt):
    trainer.run(config, interrupted)
  monkeypatch.setattr(trainer, "build", build)
  assert sorted(os.listdir(os.path.join(interrupted, "checkpoints"))) == ["2"]
  resumed = trainer.run(config, interrupted)

  expected, actual = _flat(_checkpoint(reference, 4)), _flat(_checkpoint(interrupted, 4))
  assert expected.keys() == actual.keys()
  assert any("queue" in k for k in expected) and any("key_params" in k for k in expected)
  for key in expected:
    np.testing.assert_array_equal(expected[key], actual[key], err_msg=key)
  assert int(expected["['moco']['queue_pointer']"]) == 0  # 4 batches of 16 in a queue of 32.
  assert logged_losses(interrupted) == logged_losses(reference)
  assert resumed == result


def _colour_folder(root, train_per_class: int, test_per_class: int) -> str:
  """root/{train,test}/{a,b,c}/*.jpg: 16x16 noise, each class brighter in its own channel."""
  rng = np.random.default_rng(0)
  for split, count in (("train", train_per_class), ("test", test_per_class)):
    for label, name in enumerate("abc"):
      os.makedirs(root / split / name)
      for i in range(count):
        image = rng.integers(0, 80, (16, 16, 3))
        image[..., label] += 150
        (root / split / name / f"{i}.jpg").write_bytes(
            tf.io.encode_jpeg(tf.constant(image, tf.uint8)).numpy())
  return str(root)


def test_fine_tuning_on_labels_starts_from_the_moco_backbone(moco_run, tmp_path, one_device):
  """The experiment's semi-supervised row: BiT-HyperRule transfer with `init` = a MoCo workdir
  starts from its query encoder's backbone (the projection dropped) and a zero head, and
  trains and evaluates through the same engine."""
  moco_workdir, _ = moco_run
  target = _colour_folder(tmp_path / "target", train_per_class=4, test_per_class=2)
  config = config_common.with_overrides(hpt_cifar10.finetune_config(target, moco_workdir, 2), {
      "shots": 4, "batch_size": 8, "eval_batch_size": 8})
  assert config.init == moco_workdir and config.loss == "softmax_xent"
  resolved = transfer.resolve(config).config
  mesh = sharding.make_mesh()
  setup = trainer.build(resolved, mesh, num_classes=3, num_train_examples=12)
  with jax.set_mesh(mesh):
    state = setup.init(jax.random.key(0), transfer.init_params(
        resolved, 3, setup.state_shardings["params"]))
  params = _flat(state["params"])
  moco = _flat(_checkpoint(moco_workdir, 4)["params"])
  backbone = {k: v for k, v in moco.items() if "projection" not in k}
  assert len(backbone) < len(moco) and not any("projection" in k for k in params)
  head = ["['head']['conv2d']['kernel']", "['head']['conv2d']['bias']"]
  assert set(params) == set(backbone) | set(head)
  for key in backbone:
    np.testing.assert_array_equal(params[key], backbone[key], err_msg=key)
  assert params[head[0]].shape == (2048, 3) and params[head[1]].shape == (3,)
  assert not params[head[0]].any() and not params[head[1]].any()

  result = trainer.run(config, str(tmp_path / "finetune"))
  assert result["count"] == 6 and 0 <= result["accuracy"] <= 1
  assert results.load(str(tmp_path / "finetune"))["init"] == moco_workdir


def test_ridge_probe_separates_separable_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 8)) * 3
  labels = rng.integers(0, 3, 300)
  x = centres[labels] + rng.normal(size=(300, 8))
  result = evaluate.ridge_probe(x[:200], labels[:200], x[200:], labels[200:], 3)
  assert result["accuracy"] > 0.95 and result["count"] == 100 and result["top5"] == 1.0
  chance = evaluate.ridge_probe(x[:200], rng.permutation(labels[:200]), x[200:], labels[200:], 3)
  assert chance["accuracy"] < 0.6
  # One implementation with the few-shot evaluator: a single candidate is its fixed-L2 probe.
  fixed = evaluate.ridge_probe(x[:200], labels[:200], x[200:], labels[200:], 3,
                               l2_candidates=(fewshot_eval.L2_REG,))
  assert fixed["l2"] == fewshot_eval.L2_REG and fixed["accuracy"] == fewshot_eval.accuracy(
      x[:200], labels[:200], x[200:], labels[200:], 3)
  # The held-out choice avoids a strength that flattens every score to the bias.
  assert evaluate.ridge_probe(x[:200], labels[:200], x[200:], labels[200:], 3,
                              l2_candidates=(1e12,))["accuracy"] < 0.6
  assert fewshot_eval.choose_l2(x[:200], labels[:200], 3, (1e12, 1.0)) == 1.0


def test_two_processes_keep_the_queue_and_encoders_of_one(tmp_path):
  """2 processes x 2 devices (jax.distributed on localhost) against 4 of this process's devices,
  3 MoCo steps: the queue (rows in global batch order; after the first step and at the end),
  its pointer, the key encoder and the params agree. To rounding, not bitwise: each process
  compiles its own program (the first step's keys already differ by up to 7e-7) and the
  gradients' all-reduce sums in another order across processes (Gloo); at most 5e-6 seen
  with 2 x 4 devices against 8."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path / "two_processes.npz"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "helpers.moco_processes", str(port), "2", str(i), str(out)],
      cwd=ROOT / "tests", env={**train_env(2), "PYTHONPATH": str(ROOT)},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  with on_devices(4):
    expected = moco_processes.run()
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
  actual = dict(np.load(out))
  assert actual.keys() == expected.keys() and len(expected) > 40
  assert int(actual["moco/queue_pointer"]) == int(expected["moco/queue_pointer"]) == 16
  queue = expected["moco/queue"]  # Rows far apart against the tolerance: a reordering shows.
  assert np.min(np.abs(queue[:, None] - queue[None]).max(-1) + np.eye(32)) > 1e-2
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)
