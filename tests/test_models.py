"""The BiT ResNet-v2 model (paper arXiv 1912.11370 §2.1; google-research/big_transfer
bit_jax/models.py; timm resnetv2.py)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_transfer import models, sharding
from big_transfer.errors import UserError
from big_transfer.models import bit

# Parameters of the released checkpoints (backbone, +1000 head, +21843 head), from their array
# shapes; timm's resnetv2_*_bit model cards list the same counts in millions.
PARAM_COUNTS = {
    "R50x1": (23_500_352, 25_549_352, 68_256_659),
    "R101x1": (42_492_480, 44_541_480, 87_248_787),
    "R50x3": (211_174_080, 217_319_080, 345_399_315),
    "R101x3": (381_789_888, 387_934_888, 516_015_123),
    "R152x2": (232_238_208, 236_335_208, 321_728_979),
    "R152x4": (928_340_224, 936_533_224, 1_107_299_923),
}
ROUNDED = {  # timm's rounded millions, to tie the exact figures above to them.
    "R50x1": (23.50, 25.55, 68.26), "R101x1": (42.49, 44.54, 87.25),
    "R50x3": (211.17, 217.32, 345.40), "R101x3": (381.79, 387.93, 516.02),
    "R152x2": (232.24, 236.34, 321.73), "R152x4": (928.34, 936.53, 1107.30),
}
KEYS_WITHOUT_HEAD = {50: 151, 101: 304, 152: 457}


def _shapes(name, num_classes):
  model = models.get_model(f"BiT-M-{name}", num_classes)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts_match_released_checkpoints(name):
  for num_classes, expected, rounded in zip((0, 1000, 21843), PARAM_COUNTS[name], ROUNDED[name]):
    shapes = _shapes(name, num_classes)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == expected and round(count / 1e6, 2) == rounded, (name, num_classes, count)
  depth = int(name[1:].split("x")[0])
  assert len(jax.tree.leaves(_shapes(name, 0))) == KEYS_WITHOUT_HEAD[depth]


def test_official_parameter_names_and_shapes():
  shapes = _shapes("R50x1", 1000)
  flat = {"/".join(k.key for k in path): v.shape
          for path, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  assert flat["root_block/standardized_conv2d/kernel"] == (7, 7, 3, 64)
  assert flat["block1/unit01/a/proj/standardized_conv2d/kernel"] == (1, 1, 64, 256)
  assert flat["block1/unit01/a/standardized_conv2d/kernel"] == (1, 1, 64, 64)
  assert flat["block2/unit01/b/standardized_conv2d/kernel"] == (3, 3, 128, 128)
  assert flat["block4/unit03/c/standardized_conv2d/kernel"] == (1, 1, 512, 2048)
  assert flat["block3/unit06/b/group_norm/gamma"] == (256,)
  assert flat["group_norm/beta"] == (2048,)
  assert flat["head/conv2d/kernel"] == (2048, 1000)
  assert "block2/unit02/a/proj/standardized_conv2d/kernel" not in flat


def test_weight_standardization_per_output_channel():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 8, 4)) * 3 + 1
  ws = bit.standardize(kernel)
  np.testing.assert_allclose(ws.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(ws.std(axis=(0, 1, 2)), 1, atol=1e-4)


def test_root_pool_pads_with_zeros_not_minus_infinity():
  root = bit.Root(32)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = root.init(jax.random.key(0), x)
  conv = bit.StdConv(32, 7, 2, padding=3).apply(
      {"params": variables["params"]["standardized_conv2d"]}, x)
  window = ((1, 3, 3, 1), (1, 2, 2, 1))
  zero_padded = jax.lax.reduce_window(jnp.pad(conv, ((0, 0), (1, 1), (1, 1), (0, 0))),
                                      -jnp.inf, jax.lax.max, *window, "VALID")
  inf_padded = jax.lax.reduce_window(conv, -jnp.inf, jax.lax.max, *window,
                                     ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = root.apply(variables, x)
  assert out.shape == (2, 8, 8, 32)
  np.testing.assert_allclose(out, zero_padded, rtol=1e-6)
  assert not np.allclose(out, inf_padded)  # The two paddings really differ on this input.


def test_zero_head_and_pre_logits():
  model = models.get_model("R14x1", 10)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  # Jitted: op by op, the random initialisers alone take seconds each on the CPU.
  variables = jax.jit(model.init)(jax.random.key(0), x)
  np.testing.assert_array_equal(jax.jit(model.apply)(variables, x), np.zeros((2, 10)))
  pre_logits = jax.jit(functools.partial(model.apply, pre_logits=True))(variables, x)
  assert pre_logits.shape == (2, 2048) and np.any(pre_logits != 0)
  biased = models.get_model("R14x1", 10, head_bias_init=-10.0)
  logits = jax.jit(biased.apply)(jax.jit(biased.init)(jax.random.key(0), x), x)
  np.testing.assert_array_equal(logits, -10)


def test_unknown_model_names_valid_choices():
  with pytest.raises(UserError, match=r"Unknown model 'R50x5'; valid: R14x1, .*R152x4"):
    models.get_model("R50x5", 10)


def test_for_cpu_form_is_the_same_function():
  """for_cpu (1x1 convolutions as matmuls, GroupNorm sums per channel first, closed-form
  gradients, the root pool's gradient without a scatter) changes only the summation order: the
  same parameters give the same logits and gradients."""
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  labels = jax.nn.one_hot(jnp.arange(2), 10)
  params = jax.jit(models.get_model("R14x1", 10).init)(jax.random.key(0), x)["params"]
  # A random head (not BiT's zero init), so that the logits depend on every layer.
  params["head"]["conv2d"]["kernel"] = jax.random.normal(jax.random.key(2), (2048, 10)) * 0.1
  outputs = {}
  for for_cpu in (False, True):
    model = models.get_model("R14x1", 10, for_cpu=for_cpu)

    def loss(params, model=model):
      logits = model.apply({"params": params}, x)
      return -jnp.sum(labels * jax.nn.log_softmax(logits)), logits

    convs = str(jax.make_jaxpr(loss)(params)).count("conv_general_dilated")
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    outputs[for_cpu] = logits, grads, convs
  (logits, grads, convs), (cpu_logits, cpu_grads, cpu_convs) = outputs[False], outputs[True]
  # R14x1: root + 4 units x 3 + 4 projections; only the root and the 3x3s stay convolutions.
  assert (convs, cpu_convs) == (1 + 4 * 3 + 4, 1 + 4)
  np.testing.assert_allclose(cpu_logits, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
  for a, b in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def _root_pool_inputs(shape):
  """Normal values; then tie-heavy ones: integers in {-1, 0, 1} (ties between windows' maxima,
  some with the padding's zeros), constant 3x3 blocks (every tap a maximum) and values in
  {-2, -1, 0} (the padding's zeros win or tie on the border)."""
  rng = np.random.default_rng(sum(shape))
  constant = np.repeat(np.repeat(rng.integers(-1, 2, (shape[0], shape[1] // 3 + 1,
                                                      shape[2] // 3 + 1, shape[3])), 3, 1), 3, 2)
  return {"normal": rng.normal(size=shape), "ties": rng.integers(-1, 2, shape),
          "constant": constant[:, :shape[1], :shape[2]], "negative": rng.integers(-2, 1, shape)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 9, 11, 3), (3, 10, 8, 4)])
def test_root_pool_for_cpu_is_the_padded_max_pool_bit_for_bit(shape, dtype):
  """The CPU form's root pool against `nn.max_pool` of the zero-padded input under jax.vjp,
  compiled as the CPU train step is: equal outputs and input gradients, bit for bit, also on
  ties, where a gradient sent to another maximum than JAX's (the first of its window in
  row-major order) moves a whole output's gradient. Odd and even sizes: at odd ones the last
  windows reach the bottom and right padding."""
  def reference(x):
    return nn.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), (2, 2), "VALID")

  def forward_and_gradient(pool, x, g):
    out, vjp = jax.vjp(pool, x)
    return out, vjp(g)[0]

  options = sharding.compiler_options(sharding.make_mesh(jax.devices()[:1]))
  pools = {name: jax.jit(functools.partial(forward_and_gradient, pool), compiler_options=options)
           for name, pool in [("reference", reference), ("cpu", bit.root_pool_for_cpu)]}
  out_shape = (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, shape[3])
  g = jnp.asarray(np.random.default_rng(1).normal(size=out_shape), dtype)
  for kind, x in _root_pool_inputs(shape).items():
    x = jnp.asarray(x, dtype)
    (out, dx), (cpu_out, cpu_dx) = pools["reference"](x, g), pools["cpu"](x, g)
    assert cpu_out.shape == out_shape and cpu_dx.dtype == dtype, kind
    np.testing.assert_array_equal(np.asarray(cpu_out, np.float32), np.asarray(out, np.float32),
                                  err_msg=kind)
    np.testing.assert_array_equal(np.asarray(cpu_dx, np.float32), np.asarray(dx, np.float32),
                                  err_msg=kind)
    if kind == "negative":  # Gradients of windows whose maximum is a padding zero are dropped.
      assert abs(np.sum(np.asarray(dx, np.float64)) - np.sum(np.asarray(g, np.float64))) > 0.1


def test_per_channel_group_norm_matches_a_float64_reference():
  """Two-pass statistics in float32 on activations with a large mean (a one-pass variance,
  E[x^2] - E[x]^2, would lose most digits here), per group of 4 channels."""
  rng = np.random.default_rng(0)
  x = (300 + rng.normal(size=(2, 5, 6, 16)) * rng.uniform(0.01, 2, 16)).astype(np.float32)
  gamma, beta = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
  xg = x.astype(np.float64).reshape(2, 5, 6, 4, 4)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  expected = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * gamma + beta
  out = bit.group_norm_per_channel(jnp.asarray(x), gamma, beta, groups=4, eps=1e-5)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_per_channel_group_norm_gradient_is_autodiff_of_the_grouped_form(dtype, relu):
  """The CPU form's closed-form VJP (custom_vjp) against JAX's autodiff of the grouped form:
  outputs, input gradient and the gamma and beta gradients, on groups whose variance is near
  eps (1e-8 to 1e-3, where the terms through the statistics are largest) and offsets up to 3,
  with gammas of both signs so that a ReLU zeroes part of every group."""
  rng = np.random.default_rng(4)
  groups = (2, 1, 1, bit.GN_GROUPS, 1)
  std = np.exp(rng.uniform(np.log(1e-4), np.log(3e-2), groups))
  x = (rng.uniform(-3, 3, groups) + std * rng.standard_normal((2, 5, 3, bit.GN_GROUPS, 2)))
  x = jnp.asarray(x.reshape(2, 5, 3, 2 * bit.GN_GROUPS), dtype)
  params = {"gamma": jnp.asarray(rng.uniform(-2, 2, 64), jnp.float32),
            "beta": jnp.asarray(rng.uniform(-1, 1, 64), jnp.float32)}
  cotangent = jnp.asarray(rng.standard_normal(x.shape), dtype)
  results = {}
  for for_cpu in (False, True):
    module = bit.GroupNorm(dtype=dtype, relu=relu, for_cpu=for_cpu)
    out, vjp = jax.vjp(lambda x, p, m=module: m.apply({"params": p}, x), x, params)
    results[for_cpu] = out, *vjp(cotangent)
  (out, dx, dparams), (cpu_out, cpu_dx, cpu_dparams) = results[False], results[True]
  assert cpu_out.dtype == cpu_dx.dtype == dtype
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4  # Relative to the largest value.
  for a, b in [(cpu_out, out), (cpu_dx, dx), (cpu_dparams["gamma"], dparams["gamma"]),
               (cpu_dparams["beta"], dparams["beta"])]:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
  # The inputs reach the regime they are meant to: dx through 1 / sqrt(var + eps) ~ 1e2-1e4.
  assert np.abs(np.asarray(dx, np.float32)).max() > 1e3
  if relu:
    assert 0.2 < np.mean(np.asarray(cpu_out) == 0) < 0.8


def test_standardize_for_cpu_gradient_is_autodiff_of_standardize():
  """The CPU form's closed-form weight-standardization VJP against JAX's autodiff of
  `standardize`, on kernels whose per-output-channel variance is around WS's eps 1e-10 (and
  two ordinary ones), under a cotangent that is not orthogonal to the statistics."""
  rng = np.random.default_rng(5)
  spread = np.concatenate([np.exp(rng.uniform(np.log(3e-6), np.log(3e-5), 6)), [0.1, 1.0]])
  kernel = jnp.asarray(rng.uniform(-1e-3, 1e-3, 8) + spread * rng.standard_normal((3, 3, 6, 8)),
                       jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(kernel.shape) + 1.0, jnp.float32)
  out, vjp = jax.vjp(bit.standardize, kernel)
  cpu_out, cpu_vjp = jax.vjp(bit.standardize_for_cpu, kernel)
  np.testing.assert_array_equal(cpu_out, out)
  (grad,), (cpu_grad,) = vjp(cotangent), cpu_vjp(cotangent)
  for o in range(8):  # Per output channel: the scales differ by 1e5.
    np.testing.assert_allclose(cpu_grad[..., o], grad[..., o], rtol=1e-4,
                               atol=1e-4 * np.abs(grad[..., o]).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_strided_conv3x3_gradient_by_phases_is_autodiff_of_the_plain_conv(dtype):
  """The CPU form's 3x3 stride-2 convolution (input gradient by phases, custom_vjp) against
  JAX's autodiff of `lax.conv_general_dilated`: output, input and kernel gradients, on even,
  odd and mixed sizes (the last row or column of the input then has no g[m + 1] term) down to
  a single row. In bfloat16 each input-gradient element is rounded once, as the plain
  convolution's is: within bfloat16's half step of the float32 gradient of the same values."""
  rng = np.random.default_rng(6)
  plain = functools.partial(jax.lax.conv_general_dilated, window_strides=(2, 2),
                            padding=[(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cpu = functools.partial(bit.conv, strides=2, padding=1, for_cpu=True)
  for n, h, w, c, k in [(2, 8, 8, 16, 8), (2, 7, 9, 8, 16), (1, 5, 6, 3, 4), (3, 1, 2, 4, 5)]:
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, c, k)), dtype)
    cotangent = jnp.asarray(rng.standard_normal((n, (h + 1) // 2, (w + 1) // 2, k)), dtype)
    out, vjp = jax.vjp(plain, x, kernel)
    cpu_out, cpu_vjp = jax.vjp(cpu, x, kernel)
    np.testing.assert_array_equal(cpu_out, out)
    (dx, dkernel), (cpu_dx, cpu_dkernel) = vjp(cotangent), cpu_vjp(cotangent)
    assert cpu_dx.dtype == cpu_dkernel.dtype == dtype and cpu_dx.shape == x.shape
    np.testing.assert_array_equal(cpu_dkernel, dkernel)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-6  # Relative to the largest value.
    np.testing.assert_allclose(np.asarray(cpu_dx, np.float32), np.asarray(dx, np.float32),
                               rtol=tol, atol=tol * np.abs(np.asarray(dx, np.float32)).max())
    if dtype == jnp.bfloat16:
      _, vjp32 = jax.vjp(plain, x.astype(jnp.float32), kernel.astype(jnp.float32))
      dx32 = np.asarray(vjp32(cotangent.astype(jnp.float32))[0])
      error = np.abs(np.asarray(cpu_dx, np.float32) - dx32)
      assert np.all(error <= 2.0 ** -8 * np.abs(dx32) + 1e-6), error.max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("channels", [(48, 16), (16, 48), (32, 32)])
def test_rows_matmul_for_cpu_is_autodiff_with_the_narrower_operand_left(channels, dtype):
  """The CPU form's 1x1 matmul gives autodiff's output and gradients, and XLA:CPU computes
  its kernel gradient with the operand of fewer channels on the left of the dot (its output
  (min(C, K), max(C, K)) in memory), where plain autodiff always puts x there."""
  c, k = channels
  rng = np.random.default_rng(c + 2 * k)
  x, kernel, cotangent = (jnp.asarray(rng.standard_normal(shape), dtype)
                          for shape in [(256, c), (c, k), (256, k)])

  def kernel_gradient_dot_shapes(matmul):
    def grads(x, kernel):
      return jax.vjp(lambda x, w: matmul(x, w).astype(dtype), x, kernel)[1](cotangent)
    compiled = jax.jit(grads).lower(x, kernel).compile(
        compiler_options=sharding._CPU_COMPILER_OPTIONS)
    # Each dot's output shape as laid out in memory (major dimension first).
    shapes = [(int(a), int(b)) if layout == "1,0" else (int(b), int(a)) for a, b, layout in
              re.findall(r"f32\[(\d+),(\d+)\]\{(\d,\d)\S* dot\(", compiled.as_text())]
    return grads(x, kernel), [s for s in shapes if s != (256, c)]  # Not dx's dot.

  plain = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  (dx, dkernel), plain_shapes = kernel_gradient_dot_shapes(plain)
  (cpu_dx, cpu_dkernel), cpu_shapes = kernel_gradient_dot_shapes(bit.rows_matmul_for_cpu)
  np.testing.assert_array_equal(bit.rows_matmul_for_cpu(x, kernel), plain(x, kernel))
  assert cpu_dx.dtype == cpu_dkernel.dtype == dtype
  np.testing.assert_array_equal(cpu_dx, dx)
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-6  # Relative to the largest value.
  np.testing.assert_allclose(np.asarray(cpu_dkernel, np.float32), np.asarray(dkernel, np.float32),
                             rtol=tol, atol=tol * np.abs(np.asarray(dkernel, np.float32)).max())
  assert plain_shapes == [(c, k)]
  assert cpu_shapes == [(min(c, k), max(c, k))]
