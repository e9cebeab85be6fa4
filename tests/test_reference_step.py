"""The real jitted update step (`trainer.build`) against references outside it: `jax.grad` of
the loss written out, a run that never saw the NaN batch, and the batch mixed by hand with
MixUp's documented key and formula.

The step does not depend on the network, so it is built around a one-block BiT ResNet-v2 (the
model classes of R14x1, compiled in a quarter of the time) and started from a random state made
in numpy (no compile of the initialiser).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_transfer import config_common, models, sharding, trainer
from big_transfer.models import bit
from configs import demo

BATCH, SIZE, CLASSES = 8, 16, 10
LR, WARMUP, WD = 1.0, 5, 1e-4  # lr per 256 images.
ALPHA = 0.4


def _config(**overrides):
  """The demo's optimizer (SGD momentum 0.9, coupled wd 1e-4 on kernels) at a larger lr, with
  a warmup: the lr changes every step."""
  config = demo.get_config()
  config.lr = LR
  config.batch_size = BATCH
  config.total_steps = 10
  config.schedule.warmup_steps = WARMUP
  config.schedule.decay_epochs = None
  return config_common.with_overrides(config, overrides)


class Stepper:
  """One compiled step on one device; `run` starts from the same random state every time."""

  def __init__(self, config):
    self.mesh = sharding.make_mesh(jax.devices()[:1])
    one_block = lambda name, num_classes, **options: bit.ResNetV2(num_classes, layers=(1,),
                                                                  **options)
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(models, "get_model", one_block)
      self.setup = trainer.build(config, self.mesh, num_classes=CLASSES, num_train_examples=80)

  def initial_state(self):
    """Random parameters (a non-zero head, so every parameter gets gradients), zero momentum
    and counts as `tx.init` gives."""
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), self.setup.abstract_state)
    state["params"] = jax.tree.map(
        lambda x: rng.normal(0, 0.3, x.shape).astype(x.dtype), state["params"])
    state["bad_step"] = np.full((), -1, np.int32)
    return jax.device_put(state, self.setup.state_shardings)

  def run(self, batches):
    """Host copies of the state after each batch, and the losses."""
    states, losses = [], []
    with jax.set_mesh(self.mesh):
      state = self.initial_state()
      for batch in batches:
        state, metrics = self.setup.train_step(state, sharding.to_global(batch, self.mesh))
        states.append(jax.device_get(state))  # The step donates `state`: keep copies.
        losses.append(float(metrics["loss"]))
    return states, losses


@pytest.fixture(scope="module")
def plain():
  return Stepper(_config())


@pytest.fixture(scope="module")
def plain_with_wheres():
  """The step as TPU and GPU compile it: the non-finite guard as a `where` per leaf, not the
  CPU's `lax.cond` (traced, by a first run, while the choice is patched)."""
  if_finite = trainer._if_finite  # pylint: disable=protected-access
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, "_if_finite", lambda finite, updated, unchanged, branch:
                  if_finite(finite, updated, unchanged, False))
    stepper = Stepper(_config())
    stepper.run(_batches(1))
  return stepper


def _batches(count, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 3)).astype(np.float32),
           "labels": np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, BATCH)]}
          for _ in range(count)]


def test_first_step_is_sgd_on_the_mean_cross_entropy(plain):
  """Against jax.grad of the loss written out: mean over the batch of -sum(labels * log
  softmax), then one SGD step at lr(0) = LR * BATCH / 256 / WARMUP with wd * kernel added."""
  (batch,) = _batches(1, seed=2)
  (after,), (loss,) = plain.run([batch])
  params = jax.device_get(plain.initial_state()["params"])
  model = bit.ResNetV2(CLASSES, layers=(1,))

  def mean_xent(p):
    logits = model.apply({"params": p}, batch["image"])
    return -jnp.mean(jnp.sum(batch["labels"] * jax.nn.log_softmax(logits), axis=-1))

  expected_loss, grads = jax.jit(jax.value_and_grad(mean_xent))(params)
  lr = LR * BATCH / 256 / WARMUP
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)

  def check(path, before, now, grad):
    decay = WD * before if path[-1].key == "kernel" else 0
    np.testing.assert_allclose(now - before, -lr * (grad + decay), rtol=2e-3, atol=2e-7,
                               err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(check, params, after["params"], grads)


def _assert_trees_equal(a, b, what):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y, err_msg=what)


@pytest.mark.parametrize("guard", ["plain", "plain_with_wheres"])
def test_nan_batch_changes_nothing_and_training_continues_as_without_it(guard, request):
  plain = request.getfixturevalue(guard)
  b1, b2, b3 = _batches(3)
  # A NaN in the labels: on XLA:CPU a NaN or Inf image can give finite logits (a ReLU fused
  # after a convolution maps NaN to 0, as it does here), so it may not reach the guard.
  nan = {**b1, "labels": b1["labels"].copy()}
  nan["labels"][3, 0] = np.nan
  with_nan, losses = plain.run([b1, nan, b2, b3])
  without, _ = plain.run([b1, b2, b3])
  assert np.isnan(losses[1]) and np.all(np.isfinite(np.delete(losses, 1)))
  # The NaN step: parameters and every optimizer moment and count bitwise as before it.
  _assert_trees_equal(with_nan[1]["params"], with_nan[0]["params"], "params after NaN")
  _assert_trees_equal(with_nan[1]["opt_state"], with_nan[0]["opt_state"], "opt_state after NaN")
  assert int(with_nan[1]["bad_step"]) == 1 and int(with_nan[1]["step"]) == 2
  # The momentum really is state that a NaN would reach: non-zero after the first step.
  assert any(np.any(x != 0) for x in jax.tree.leaves(with_nan[0]["opt_state"])
             if np.issubdtype(x.dtype, np.floating))
  # Afterwards, exactly the run that never saw it: the optimizer's step count, which sets the
  # warmup lr, did not advance either.
  for after_nan, clean in zip(with_nan[2:], without[1:]):
    _assert_trees_equal(after_nan["params"], clean["params"], "params")
    _assert_trees_equal(after_nan["opt_state"], clean["opt_state"], "opt_state")
  assert int(without[-1]["bad_step"]) == -1


def _mixed_by_hand(batch, seed, step):
  """MixUp's contract (data/mixup.py, trainer.make_train_step): lam ~ Beta(alpha, alpha) drawn
  with fold_in(key(seed), step); example i mixed with example n-1-i, images and labels."""
  lam = float(jax.random.beta(jax.random.fold_in(jax.random.key(seed), step), ALPHA, ALPHA))
  mix = lambda x: (lam * x.astype(np.float64) + (1 - lam) * x[::-1]).astype(np.float32)
  return {"image": mix(batch["image"]), "labels": mix(batch["labels"])}, lam


def test_mixup_step_equals_the_step_on_the_batch_mixed_by_hand(plain):
  # A seed whose two draws are clearly away from 0 and 1 (Beta(0.4, 0.4) often is not).
  seed = next(s for s in range(100)
              if all(0.2 < _mixed_by_hand(_batches(1)[0], s, k)[1] < 0.8 for k in (0, 1)))
  batches = _batches(2, seed=1)
  mixed, mixed_losses = Stepper(_config(mixup_alpha=ALPHA, seed=seed)).run(batches)
  by_hand, by_hand_losses = plain.run([_mixed_by_hand(b, seed, k)[0]
                                       for k, b in enumerate(batches)])
  unmixed, unmixed_losses = plain.run(batches)
  np.testing.assert_allclose(mixed_losses, by_hand_losses, rtol=1e-5)
  for step in range(2):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 mixed[step]["params"], by_hand[step]["params"])
  # And MixUp is not a no-op: alpha 0 trains on other images and labels.
  assert abs(unmixed_losses[0] - mixed_losses[0]) > 1e-2
  head = lambda state: state["params"]["head"]["conv2d"]["kernel"]
  assert np.max(np.abs(head(unmixed[0]) - head(mixed[0]))) > 1e2 * np.max(
      np.abs(head(by_hand[0]) - head(mixed[0])))
