"""GroupNorm, weight standardization and the optimizer against independent references: plain
numpy loops and SGD momentum written out by hand.

The inputs are chosen so that every constant shows: group variances around GroupNorm's eps
1e-5, kernel variances around WS's 1e-10 (official BiT: PyTorch's GroupNorm(32, c) default eps
1e-5, StdConv2d `(w - m) / sqrt(v + 1e-10)`), distinct statistics per group and per input
channel, a weight decay large enough to move parameters visibly.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_transfer import config_common, losses, models, optim
from big_transfer.models import bit

GROUPS, GN_EPS, WS_EPS = 32, 1e-5, 1e-10


def group_norm_reference(x, gamma, beta):
  """Per image and group of consecutive channels: (x - mean) / sqrt(biased var + eps)."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  size = x.shape[-1] // GROUPS
  for image in range(x.shape[0]):
    for group in range(GROUPS):
      channels = slice(group * size, (group + 1) * size)
      values = x[image, :, :, channels]
      out[image, :, :, channels] = (values - values.mean()) / np.sqrt(values.var() + GN_EPS)
  return out * gamma + beta


def standardize_reference(kernel):
  """Per output channel of an HWIO kernel, over all its (H, W, In) weights."""
  kernel = np.asarray(kernel, np.float64)
  out = np.empty_like(kernel)
  for o in range(kernel.shape[-1]):
    w = kernel[..., o]
    out[..., o] = (w - w.mean()) / np.sqrt(w.var() + WS_EPS)
  return out


def _grouped_input(rng, shape, std_range, offset_range):
  """Values whose mean and spread differ per (image, group): log-uniform std, uniform offset."""
  n, h, w, c = shape
  stats = (n, 1, 1, GROUPS, 1)
  std = np.exp(rng.uniform(*np.log(std_range), stats))
  offset = rng.uniform(*offset_range, stats)
  x = offset + std * rng.standard_normal((n, h, w, GROUPS, c // GROUPS))
  return x.reshape(shape)


def _apply_group_norm(x, gamma, beta, dtype=jnp.float32):
  module = bit.GroupNorm(dtype=dtype)  # The model's defaults: groups, eps.
  return module.apply({"params": {"gamma": gamma, "beta": beta}}, x)


def test_group_norm_matches_numpy_with_variance_near_eps():
  rng = np.random.default_rng(0)
  # Group variances from 1e-7 to 1e-3, around eps: eps = 1e-6 instead of 1e-5 changes the
  # output of a group with variance 1e-5 by 35%. Offsets up to 3 punish a one-pass variance.
  x = _grouped_input(rng, (2, 3, 3, 64), (3e-4, 3e-2), (-3, 3)).astype(np.float32)
  gamma = rng.uniform(0.5, 2, 64).astype(np.float32)
  beta = rng.uniform(-1, 1, 64).astype(np.float32)
  expected = group_norm_reference(x, gamma, beta)
  out = np.asarray(_apply_group_norm(x, gamma, beta))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


def test_group_norm_statistics_are_float32_in_a_bfloat16_model():
  """bfloat16 activations in, exact statistics: the mean of a group near 3 rounded to bfloat16
  (spacing 1/64) would shift every value by up to a third of the group's spread."""
  rng = np.random.default_rng(1)
  x = _grouped_input(rng, (2, 4, 4, 64), (0.03, 0.06), (2, 4)).astype(jnp.bfloat16)
  gamma = rng.uniform(0.5, 2, 64).astype(np.float32)
  beta = rng.uniform(-1, 1, 64).astype(np.float32)
  expected = group_norm_reference(np.asarray(x, np.float32), gamma, beta)
  out = _apply_group_norm(x, gamma, beta, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  # The output is rounded to bfloat16 once: 2^-8 relative, ~0.016 at |y| ~ 4.
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=8e-3, atol=8e-3)


def test_weight_standardization_matches_numpy_with_variance_near_eps():
  rng = np.random.default_rng(2)
  # Per output channel a mean and a spread of 3e-6 to 3e-5, so the variance over (H, W, In)
  # is 2e-11 to 2e-9, around eps 1e-10; the mean of each input channel's 3x3 slice is off by
  # about a spread, so statistics over (H, W) alone differ from those over (H, W, In).
  mean = rng.uniform(-1e-3, 1e-3, (1, 1, 1, 8))
  spread = np.exp(rng.uniform(np.log(3e-6), np.log(3e-5), (1, 1, 1, 8)))
  per_input = spread * rng.standard_normal((1, 1, 6, 8))
  kernel = (mean + per_input + spread * rng.standard_normal((3, 3, 6, 8))).astype(np.float32)
  variance = kernel.astype(np.float64).reshape(-1, 8).var(0)
  assert variance.min() < 1e-10 < variance.max() < 1e-8
  expected = standardize_reference(kernel)
  np.testing.assert_allclose(bit.standardize(kernel), expected, rtol=1e-3, atol=1e-3)
  # StdConv convolves with exactly that kernel.
  x = rng.uniform(-1, 1, (1, 5, 5, 6)).astype(np.float32)
  conv = bit.StdConv(8, 3, padding=1).apply({"params": {"kernel": kernel}}, x)
  direct = jax.lax.conv_general_dilated(x, expected.astype(np.float32), (1, 1), [(1, 1)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv, direct, rtol=1e-3, atol=1e-3)


# ---- SGD momentum with coupled L2 weight decay ------------------------------------------------

NAMES = ("root_block/standardized_conv2d/kernel", "block1/unit01/a/group_norm/gamma",
         "block1/unit01/a/group_norm/beta", "block1/unit01/a/proj/standardized_conv2d/kernel",
         "block4/unit01/c/standardized_conv2d/kernel", "group_norm/gamma", "group_norm/beta",
         "head/conv2d/kernel", "head/conv2d/bias")
# BiT decays conv and head kernels only: not GroupNorm scales and offsets, not the head bias.
DECAYED = {n for n in NAMES if n.endswith("/kernel")}
LR, WD, MOMENTUM, WARMUP = 0.2, 0.05, 0.9, 2


def _nest(flat):
  tree = {}
  for name, value in flat.items():
    *scopes, leaf = name.split("/")
    node = tree
    for scope in scopes:
      node = node.setdefault(scope, {})
    node[leaf] = value
  return tree


def _flatten(tree):
  return {"/".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _optimizer_config(**overrides):
  """The project's defaults (momentum, wd_mask, coupled decay) with a visible wd and warmup."""
  config = config_common.base()
  config.update(lr=LR, lr_batch_ref=0, batch_size=8, wd=WD, total_steps=10)
  config.schedule.warmup_steps = WARMUP
  return config_common.with_overrides(config, overrides)


def _sgd_reference(params, grads_per_step, clip_norm=None):
  """Hand-written: [clip] -> g + wd * p on kernels -> m = 0.9 m + g -> p -= lr_s * m, with
  lr_s = LR * (s + 1) / WARMUP during warmup. float64."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  momentum = {k: np.zeros_like(v) for k, v in params.items()}
  history = []
  for step, grads in enumerate(grads_per_step):
    if clip_norm is not None:
      norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values()))
      grads = {k: g * min(1.0, clip_norm / norm) for k, g in grads.items()}
    lr = LR * min(1.0, (step + 1) / WARMUP)
    for k in params:
      g = grads[k] + (WD * params[k] if k in DECAYED else 0)
      momentum[k] = MOMENTUM * momentum[k] + g
      params[k] = params[k] - lr * momentum[k]
    history.append(dict(params))
  return history


def _run_optimizer(config, params, grads_per_step):
  schedule = optim.make_schedule(config, optim.Durations(80, config.batch_size),
                                 config.total_steps)
  tx = optim.make_optimizer(config, schedule)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  tree, state, history = _nest(params), tx.init(_nest(params)), []
  for grads in grads_per_step:
    updates, state = update(_nest(grads), state, tree)
    tree = jax.tree.map(lambda p, u: p + u, tree, updates)
    history.append(_flatten(tree))
  return history


def _params_and_grads(seed, steps=2, grad_scale=0.1):
  rng = np.random.default_rng(seed)
  shape = lambda name: (3, 4) if name.endswith("kernel") else (4,)
  params = {n: rng.uniform(0.5, 1.5, shape(n)).astype(np.float32) for n in NAMES}
  grads = [{n: (grad_scale * rng.standard_normal(shape(n))).astype(np.float32) for n in NAMES}
           for _ in range(steps)]
  return params, grads


@pytest.mark.parametrize("clip", [None, 0.3])
def test_one_and_two_sgd_steps_match_hand_computation(clip):
  params, grads = _params_and_grads(seed=3)
  config = _optimizer_config(grad_clip_norm=clip)
  expected = _sgd_reference(params, grads, clip)
  actual = _run_optimizer(config, params, grads)
  for step in range(2):
    for name in NAMES:
      np.testing.assert_allclose(actual[step][name], expected[step][name], rtol=1e-6, atol=1e-7,
                                 err_msg=f"step {step + 1} {name}")
  if clip:  # The clip really acted: the raw gradients are longer than it.
    assert np.sqrt(sum(np.sum(g ** 2) for g in grads[0].values())) > 2 * clip


def test_decay_reaches_exactly_the_kernels_of_the_real_model():
  """Zero gradients: one step scales every kernel of R14x1 by 1 - lr wd, nothing else moves."""
  shapes = jax.eval_shape(models.get_model("R14x1", 10).init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  names = list(_flatten(jax.tree.map(lambda _: 0, shapes)))
  params = {n: np.ones((), np.float32) for n in names}
  zeros = {n: np.zeros((), np.float32) for n in names}
  (after,) = _run_optimizer(_optimizer_config(), params, [zeros])
  decayed = {n for n in names if after[n] != 1}
  assert decayed == {n for n in names if n.endswith("/kernel")}
  assert len(decayed) == 18  # Root, 4 x (3 convs + projection), head.
  for name in decayed:
    np.testing.assert_allclose(after[name], 1 - LR / WARMUP * WD, rtol=1e-6)


def test_losses_match_numpy():
  """Softmax: -sum(labels * log softmax) per example; sigmoid: the binary cross-entropies of
  every class summed (BiT's multi-label loss), on soft and multi-hot labels."""
  rng = np.random.default_rng(4)
  logits = (3 * rng.standard_normal((6, 5))).astype(np.float32)
  soft = rng.dirichlet(np.ones(5), 6).astype(np.float32)
  multi_hot = (rng.uniform(size=(6, 5)) < 0.4).astype(np.float32)
  z = logits.astype(np.float64)
  log_softmax = z - np.log(np.exp(z).sum(-1, keepdims=True))
  np.testing.assert_allclose(losses.get("softmax_xent")(logits, soft),
                             -(soft * log_softmax).sum(-1), rtol=1e-5)
  log_sigmoid = lambda v: -np.log1p(np.exp(-v))
  expected = -(multi_hot * log_sigmoid(z) + (1 - multi_hot) * log_sigmoid(-z)).sum(-1)
  np.testing.assert_allclose(losses.get("sigmoid_xent")(logits, multi_hot), expected, rtol=1e-5)
