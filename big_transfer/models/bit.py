"""BiT ResNet-v2: pre-activation bottlenecks with GroupNorm + Weight Standardization.

Exact to the released BiT checkpoints (paper arXiv 1912.11370 §2.1, official
google-research/big_transfer bit_jax/models.py). Parameter names follow the
official `.npz` key scheme (`root_block/standardized_conv2d/kernel`,
`block1/unit01/a/group_norm/gamma`, ..., `head/conv2d/kernel`), so mapping a checkpoint is a
rename of the `resnet/` prefix plus the head kernel's (1, 1, C, N) <-> (C, N) reshape.

`for_cpu=True` computes the same function in the form XLA:CPU runs fastest (1x1 convolutions
as matmuls with their kernel gradients' narrower operand on the left, GroupNorm statistics per
channel first, closed-form gradients of GroupNorm + ReLU and of weight standardization, the
input gradient of stride-2 3x3 convolutions by phases, the root's max pool with an elementwise
gradient; docs/performance.md has the measurements).
The trainer sets it when its devices are CPUs, so TPU and GPU programs are not affected.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Residual units per block for each depth; 14 and 26 are small variants for tests and demos.
DEPTHS = {
    14: (1, 1, 1, 1),
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

WS_EPS = 1e-10  # Official BiT weight-standardization epsilon (timm uses 1e-8).
GN_EPS = 1e-5
GN_GROUPS = 32


def _kernel_stats(kernel: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Per output channel of an HWIO kernel: mean and 1 / sqrt(biased variance + eps)."""
  mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  var = jnp.mean(jnp.square(kernel - mean), axis=(0, 1, 2), keepdims=True)
  return mean, jax.lax.rsqrt(var + eps)


def standardize(kernel: jax.Array, eps: float = WS_EPS) -> jax.Array:
  """Weight standardization of an HWIO kernel per output channel (biased variance)."""
  mean, rstd = _kernel_stats(kernel, eps)
  return (kernel - mean) * rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def standardize_for_cpu(kernel: jax.Array, eps: float = WS_EPS) -> jax.Array:
  """`standardize` with the closed-form gradient: with w = (kernel - mean) * rstd, per output
  channel d kernel = rstd (g - mean(g) - w mean(g w)), two reductions where XLA:CPU's
  autodiff of the forward takes three and more passes."""
  return standardize(kernel, eps)


def _standardize_fwd(kernel, eps):
  mean, rstd = _kernel_stats(kernel, eps)
  return (kernel - mean) * rstd, (kernel, mean, rstd)


def _standardize_bwd(eps, residuals, g):
  del eps
  kernel, mean, rstd = residuals
  w = (kernel - mean) * rstd
  axes = (0, 1, 2)
  mean_g, mean_gw = jnp.mean(g, axis=axes, keepdims=True), jnp.mean(g * w, axis=axes,
                                                                    keepdims=True)
  return (rstd * (g - mean_g - w * mean_gw),)


standardize_for_cpu.defvjp(_standardize_fwd, _standardize_bwd)


def _plain_conv(x: jax.Array, kernel: jax.Array, strides: int, padding) -> jax.Array:
  """NHWC x HWIO convolution; `padding`: an int for both sides, or (before, after) per axis."""
  if isinstance(padding, int):
    padding = [(padding, padding)] * 2
  return jax.lax.conv_general_dilated(x, kernel, (strides, strides), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int,
         for_cpu: bool = False) -> jax.Array:
  """NHWC x HWIO convolution with symmetric zero padding.

  `for_cpu`: an unpadded 1x1 convolution runs as a matmul of (N*H*W, C) rows by the (C, K)
  kernel (after a strided slice at stride 2), the same sums. XLA:CPU computes the weight
  gradient of a 1x1 convolution as a convolution whose window is the whole image, between
  transposes, several times slower than the matmul it is; the 2-D form also spares the
  transposed copy of the gradient that a 4-D dot_general gets. bfloat16 operands are
  accumulated in float32 (YNNPACK's fast bfloat16 path), rounded to bfloat16 once at the end
  as the convolution's output is. A 3x3 convolution with stride 2 and padding 1 is the plain
  convolution with the input gradient by phases (`conv3x3_stride2_for_cpu`).
  """
  if for_cpu and kernel.shape[:2] == (1, 1) and not padding:
    x = x[:, ::strides, ::strides]
    out = rows_matmul_for_cpu(x.reshape(-1, x.shape[-1]), kernel[0, 0])
    return out.astype(x.dtype).reshape(x.shape[:-1] + kernel.shape[-1:])
  if for_cpu and kernel.shape[:2] == (3, 3) and (strides, padding) == (2, 1):
    return conv3x3_stride2_for_cpu(x, kernel)
  return _plain_conv(x, kernel, strides, padding)


@jax.custom_vjp
def rows_matmul_for_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """(M, C) rows times a (C, K) kernel, accumulated in float32; the gradients autodiff's,
  with the kernel gradient's operands kept in the faster order.

  That gradient contracts the M rows of x and of the output gradient g. XLA folds autodiff's
  transpose of g^T x into x^T g, always x on the left; XLA:CPU's dot (YNNPACK) transposes its
  left operand, so it runs faster with the narrower of the two there (R50x1's shapes with
  C > K: 1.3-1.5x, docs/performance.md). Where C > K an optimization barrier keeps g^T x.
  """
  return jnp.matmul(x, kernel, preferred_element_type=jnp.float32)


def _rows_matmul_fwd(x, kernel):
  return rows_matmul_for_cpu(x, kernel), (x, kernel)


def _rows_matmul_bwd(residuals, g):
  x, kernel = residuals
  rows = (((0,), (0,)), ((), ()))
  dx = jax.lax.dot_general(g, kernel, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)
  dkernel_t = jax.lax.dot_general(g, x, rows, preferred_element_type=jnp.float32)
  if x.shape[1] > kernel.shape[1]:
    dkernel_t = jax.lax.optimization_barrier(dkernel_t)
  return dx.astype(x.dtype), dkernel_t.T.astype(kernel.dtype)


rows_matmul_for_cpu.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


@jax.custom_vjp
def conv3x3_stride2_for_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The 3x3 convolution with stride 2 and padding 1, its input gradient computed by phases.

  XLA:CPU computes that gradient as a convolution over the output gradient dilated with
  zeros to the input's size, 4x the multiplications needed. By parity of the input row (and
  likewise column), with x padded by one, output row i reads input rows 2i - 1, 2i, 2i + 1
  through kernel rows 0, 1, 2: input row 2m gets g[m] k[1], row 2m + 1 gets g[m] k[2] +
  g[m + 1] k[0]. Each of the four (row, column) parities is then a stride-1 convolution of
  the output gradient with the 1x1, 1x2, 2x1 or 2x2 sub-kernel of its taps, the results
  interleaved (and cropped to odd sizes): the same products, each summed once, rounded to
  the compute dtype once as the plain convolution's gradient is. The weight gradient is
  XLA's own (faster here than the same decomposition of the input: docs/performance.md).
  """
  return _plain_conv(x, kernel, 2, 1)


def _conv3x3_stride2_fwd(x, kernel):
  return _plain_conv(x, kernel, 2, 1), (x, kernel)


# The kernel taps (in the order applied to g[m], g[m + 1]) reaching even and odd input rows.
_PHASE_TAPS = (slice(1, 2), slice(None, None, -2))


def _conv3x3_stride2_bwd(residuals, g):
  x, kernel = residuals
  n, h, w, c = x.shape
  transposed = jnp.swapaxes(kernel, 2, 3)  # (3, 3, K, C): maps g's K channels to x's C.
  rows = []
  for row_parity, row_taps in enumerate(_PHASE_TAPS):
    phases = [_plain_conv(g, transposed[row_taps, col_taps], 1,
                          [(0, row_parity), (0, col_parity)])  # g[m + 1] = 0 past the end.
              for col_parity, col_taps in enumerate(_PHASE_TAPS)]
    rows.append(jnp.stack(phases, axis=3))  # (N, Ho, Wo, column parity, C)
  interleaved = jnp.stack(rows, axis=2).reshape(n, 2 * g.shape[1], 2 * g.shape[2], c)
  _, kernel_vjp = jax.vjp(lambda k: _plain_conv(x, k, 2, 1), kernel)
  return interleaved[:, :h, :w], kernel_vjp(g)[0]


conv3x3_stride2_for_cpu.defvjp(_conv3x3_stride2_fwd, _conv3x3_stride2_bwd)


class StdConv(nn.Module):
  """Bias-free convolution whose raw float32 kernel is standardized on every forward pass."""
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0  # Symmetric zero padding: `SAME` is asymmetric at stride 2.
  dtype: Any = jnp.float32
  for_cpu: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.he_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    kernel = (standardize_for_cpu if self.for_cpu else standardize)(kernel).astype(self.dtype)
    return conv(x.astype(self.dtype), kernel, self.strides, self.padding, self.for_cpu)


def _group_mean(per_channel_sums: jax.Array, groups: int, count: int) -> jax.Array:
  """(n, c) sums over H and W -> (n, 1, 1, c): each channel its group's mean over `count`."""
  n, c = per_channel_sums.shape
  sums = per_channel_sums.reshape(n, groups, c // groups).sum(axis=-1, keepdims=True)
  return jnp.broadcast_to(sums / count, (n, groups, c // groups)).reshape(n, 1, 1, c)


def _group_stats(x: jax.Array, groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
  """Per channel, its group's two-pass mean and 1 / sqrt(var + eps), each (n, 1, 1, c)."""
  count = x.size // (x.shape[0] * groups)
  mean = _group_mean(jnp.sum(x, axis=(1, 2)), groups, count)
  var = _group_mean(jnp.sum(jnp.square(x - mean), axis=(1, 2)), groups, count)
  return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm_per_channel(x: jax.Array, gamma: jax.Array, beta: jax.Array, groups: int,
                           eps: float, relu: bool = False) -> jax.Array:
  """GroupNorm of NHWC float32 `x` (then a ReLU if `relu`) with the grouped form's two-pass
  statistics, each sum taken over H and W per channel first and then over the channels of a
  group.

  The same mean and variance in another summation order: XLA:CPU reduces a group's
  interleaved (H, W, channel) elements several times slower than it reduces H and W. The
  gradient is the closed form (`_group_norm_bwd`), which XLA:CPU runs in fewer thunks than
  autodiff of the forward (docs/performance.md).
  """
  return _group_norm_fwd(x, gamma, beta, groups, eps, relu)[0]


def _group_norm_fwd(x, gamma, beta, groups, eps, relu):
  mean, rstd = _group_stats(x, groups, eps)
  y = (x - mean) * (rstd * gamma) + beta
  return jnp.maximum(y, 0) if relu else y, (x, gamma, beta, mean, rstd)


def _group_norm_bwd(groups, eps, relu, residuals, g):
  """With xhat = (x - mean) * rstd and y = gamma xhat + beta, per image and group:
  dx = rstd (gamma g - mean(gamma g) - xhat mean(gamma g xhat)), each mean over the group's
  elements, from the per-channel sums of g and g xhat that also give dbeta and dgamma.
  Under a ReLU, g is zero where y <= 0 (jax.nn.relu's gradient); y is recomputed from x."""
  del eps
  x, gamma, beta, mean, rstd = residuals
  count = x.size // (x.shape[0] * groups)
  xhat = (x - mean) * rstd
  if relu:
    g = jnp.where(xhat * gamma + beta > 0, g, 0)
  sum_g, sum_gxhat = jnp.sum(g, axis=(1, 2)), jnp.sum(g * xhat, axis=(1, 2))
  mean_g = _group_mean(sum_g * gamma, groups, count)
  mean_gxhat = _group_mean(sum_gxhat * gamma, groups, count)
  dx = rstd * (gamma * g - mean_g - xhat * mean_gxhat)
  return dx, jnp.sum(sum_gxhat, axis=0), jnp.sum(sum_g, axis=0)


group_norm_per_channel.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """GroupNorm with two-pass variance and the official `gamma`/`beta` names.

  Statistics are taken in float32 whatever the compute dtype: the released weights were
  trained with exact statistics (big_vision warns that other variance formulas shift results).
  `relu`: a ReLU on the output (the model has one after every GroupNorm; in the CPU form it is
  part of the closed-form gradient, so its mask is recomputed rather than saved).
  """
  groups: int = GN_GROUPS
  eps: float = GN_EPS
  dtype: Any = jnp.float32
  for_cpu: bool = False
  relu: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.groups} groups.")
    gamma = self.param("gamma", nn.initializers.ones, (c,), jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, (c,), jnp.float32)
    if self.for_cpu:
      return group_norm_per_channel(x.astype(jnp.float32), gamma, beta, self.groups, self.eps,
                                    self.relu).astype(self.dtype)
    xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.groups, c // self.groups))
    axes = (1, 2, 4)  # H, W and the channels of one group.
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + self.eps)
    out = (xg.reshape(x.shape) * gamma + beta).astype(self.dtype)
    return nn.relu(out) if self.relu else out


class Projection(nn.Module):
  """A block's 1x1 shortcut projection (official scope `a/proj`).

  `avg_down`: ResNet-D (Bag of Tricks, He et al. 2019, arXiv 1812.01187, §4.2): a strided
  projection becomes a 2x2 average pool with the stride, then a 1x1 conv with stride 1, so no
  activation is skipped. Odd sizes pool the last partial window over its valid pixels (timm's
  ceil_mode, count_include_pad=False), matching the 3x3 branch's ceil(size / stride). Same
  parameters either way.
  """
  features: int
  strides: int
  dtype: Any = jnp.float32
  avg_down: bool = False
  for_cpu: bool = False

  @nn.compact
  def __call__(self, x):
    strides = self.strides
    if self.avg_down and strides > 1:
      pad = [(0, -size % strides) for size in x.shape[1:3]]
      x = nn.avg_pool(x, (strides, strides), (strides, strides), pad, count_include_pad=False)
      strides = 1
    return StdConv(self.features, 1, strides, dtype=self.dtype, for_cpu=self.for_cpu,
                   name="standardized_conv2d")(x)


class PreActConv(nn.Module):
  """relu(GN(x)) -> StdConv: one of a unit's three stages (official scopes `a`, `b`, `c`).

  With `projection` channels set it also returns the shortcut projection of its activation
  (official `a/proj/standardized_conv2d`), else None.
  """
  features: int
  kernel_size: int
  strides: int = 1
  projection: int = 0
  projection_strides: int = 1
  dtype: Any = jnp.float32
  avg_down: bool = False
  for_cpu: bool = False

  @nn.compact
  def __call__(self, x):
    x = GroupNorm(dtype=self.dtype, relu=True, for_cpu=self.for_cpu, name="group_norm")(x)
    shortcut = None
    if self.projection:
      shortcut = Projection(self.projection, self.projection_strides, dtype=self.dtype,
                            avg_down=self.avg_down, for_cpu=self.for_cpu, name="proj")(x)
    y = StdConv(self.features, self.kernel_size, self.strides, self.kernel_size // 2,
                dtype=self.dtype, for_cpu=self.for_cpu, name="standardized_conv2d")(x)
    return y, shortcut


class Unit(nn.Module):
  """Pre-activation bottleneck unit.

  a = relu(GN(x)); shortcut = proj(a) in a block's first unit, else x;
  y = conv1x1(a) -> relu(GN) -> conv3x3 with the stride -> relu(GN) -> conv1x1; y + shortcut.

  Options (all off by default, the released architecture):
    residual_gain: y is multiplied by a per-channel `residual_gain` parameter starting at
      zero, so each unit starts as its shortcut: Bag of Tricks' zero-gamma (§3.1) for a
      pre-activation GN+WS unit, whose branch ends in a WS conv (zeroing that kernel is
      degenerate: standardization divides by sqrt(eps)); SkipInit (De & Smith 2020) with a
      vector. Not weight-decayed under the default `wd_mask` (kernels only).
    drop_rate: stochastic depth (Huang et al. 2016): in training (`deterministic` False) the
      branch of each example is dropped with this probability and scaled by 1/(1 - rate)
      otherwise (timm's DropPath); draws from the "drop_path" rng.
    avg_down: ResNet-D shortcut, see Projection.
  """
  mid: int
  strides: int = 1
  projection: bool = False
  dtype: Any = jnp.float32
  residual_gain: bool = False
  drop_rate: float = 0.0
  avg_down: bool = False
  for_cpu: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    out = 4 * self.mid
    options = dict(dtype=self.dtype, for_cpu=self.for_cpu)
    y, shortcut = PreActConv(self.mid, 1, projection=out if self.projection else 0,
                             projection_strides=self.strides, avg_down=self.avg_down,
                             name="a", **options)(x)
    y, _ = PreActConv(self.mid, 3, self.strides, name="b", **options)(y)
    y, _ = PreActConv(out, 1, name="c", **options)(y)
    if self.residual_gain:
      y = y * self.param("residual_gain", nn.initializers.zeros, (out,), jnp.float32
                         ).astype(y.dtype)
    if self.drop_rate and not deterministic:
      keep = jax.random.bernoulli(self.make_rng("drop_path"), 1.0 - self.drop_rate,
                                  (y.shape[0], 1, 1, 1))
      y = jnp.where(keep, y / (1.0 - self.drop_rate), 0).astype(y.dtype)
    return y + (x if shortcut is None else shortcut)


class Block(nn.Module):
  """`units` bottleneck units; the first projects the shortcut and carries the stride.

  `drop_rates`: each unit's stochastic-depth rate (empty: none); the other options as Unit's.
  """
  units: int
  mid: int
  strides: int
  dtype: Any = jnp.float32
  residual_gain: bool = False
  drop_rates: Sequence[float] = ()
  avg_down: bool = False
  for_cpu: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    for u in range(1, self.units + 1):
      x = Unit(self.mid, self.strides if u == 1 else 1, projection=(u == 1),
               dtype=self.dtype, residual_gain=self.residual_gain,
               drop_rate=self.drop_rates[u - 1] if self.drop_rates else 0.0,
               avg_down=self.avg_down, for_cpu=self.for_cpu, name=f"unit{u:02d}")(x, deterministic)
    return x


def _root_pool_taps(x: jax.Array) -> list[jax.Array]:
  """The 9 taps of the root's pool, in row-major window order: x zero-padded by 1 on each
  side, sliced at stride 2 from offset (i, j), each (n, ceil(h / 2), ceil(w / 2), c)."""
  n, h, w, c = x.shape
  rows, cols = (h + 1) // 2, (w + 1) // 2
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [jax.lax.slice(x, (0, i, j, 0), (n, i + 2 * rows - 1, j + 2 * cols - 1, c), (1, 2, 2, 1))
          for i in range(3) for j in range(3)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _root_pool_for_cpu(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  del size
  return functools.reduce(jnp.maximum, _root_pool_taps(x))


def _root_pool_fwd(x, size):
  del size
  taps = _root_pool_taps(x)
  out = functools.reduce(jnp.maximum, taps)
  first = jnp.full(out.shape, len(taps), jnp.int8)  # Index of the first tap equal to the max.
  for k in reversed(range(len(taps))):
    first = jnp.where(taps[k] == out, jnp.int8(k), first)
  return out, first


def _next_along(a: jax.Array, axis: int) -> jax.Array:
  """a[t + 1] along `axis`, zero past the end."""
  shifted = jax.lax.slice_in_dim(a, 1, a.shape[axis], axis=axis)
  padding = [(0, 0, 0)] * a.ndim
  padding[axis] = (0, 1, 0)
  return jax.lax.pad(shifted, jnp.zeros((), a.dtype), padding)


def _root_pool_bwd(size, first, g):
  n, rows, cols, c = g.shape
  m = [jnp.where(first == k, g, jnp.zeros((), g.dtype)) for k in range(9)]  # m[3 * i + j]
  # Input row 2t is padded row 2t + 1: tap row i = 1 of output row t. Input row 2t + 1 is
  # padded row 2t + 2: tap row 2 of output row t, then tap row 0 of output row t + 1. The
  # same for columns; terms added in the row-major order of their windows, as the scatter.
  even_even = m[4]
  even_odd = m[5] + _next_along(m[3], 2)
  odd_even = m[7] + _next_along(m[1], 1)
  odd_odd = (m[8] + _next_along(m[6], 2) + _next_along(m[2], 1)
             + _next_along(_next_along(m[0], 1), 2))
  even = jnp.stack([even_even, even_odd], axis=3).reshape(n, rows, 2 * cols, c)
  odd = jnp.stack([odd_even, odd_odd], axis=3).reshape(n, rows, 2 * cols, c)
  dx = jnp.stack([even, odd], axis=2).reshape(n, 2 * rows, 2 * cols, c)
  return (dx[:, :size[0], :size[1]],)


_root_pool_for_cpu.defvjp(_root_pool_fwd, _root_pool_bwd)


def root_pool_for_cpu(x: jax.Array) -> jax.Array:
  """The root's zero pad 1 and 3x3/2 VALID max pool of NHWC `x`, with the same output and
  gradient as `nn.max_pool` of the padded `x` under `jax.vjp`, bit for bit.

  XLA:CPU differentiates reduce_window's max as a select-and-scatter, which it expands into
  iotas, a variadic reduce-window and a scatter over the padded input (10% of an R50x1 step's
  thunk time at 128 px, 2.5% in this form; the pool alone 4x less CPU time, docs/performance.md).
  Here the forward is the maximum of the 9 strided taps and the backward is elementwise: each
  output's gradient goes to the first tap of its window that equals the maximum, in row-major
  order (the tie rule of JAX's gradient, `>=` in select-and-scatter: tested on ties and on
  windows where a padding zero wins), placed by the parity of the input's rows and columns
  (each parity receives from known taps) and interleaved, instead of scattered. Gradients
  that land on the padding are dropped. (A window holding a NaN sends its gradient nowhere,
  JAX's to the NaN; its output is NaN either way, and so is the loss, whose step the
  trainer's guard discards.)
  """
  return _root_pool_for_cpu(x, x.shape[1:3])


class Root(nn.Module):
  """pad 3 -> 7x7/2 conv -> zero pad 1 -> 3x3/2 VALID max-pool; no norm, no ReLU.

  The pool pads with zeros, not -inf: the conv output can be negative and the released
  weights were trained this way. `for_cpu`: the pad and pool as `root_pool_for_cpu` (the same
  output and gradient, without XLA:CPU's scatter).
  """
  features: int
  dtype: Any = jnp.float32
  for_cpu: bool = False

  @nn.compact
  def __call__(self, x):
    x = StdConv(self.features, 7, 2, padding=3, dtype=self.dtype, for_cpu=self.for_cpu,
                name="standardized_conv2d")(x)
    if self.for_cpu:
      return root_pool_for_cpu(x)
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Head(nn.Module):
  """Dense classifier over pooled features; official scope `head/conv2d` (a 1x1 conv there)."""
  num_classes: int
  zero_init: bool = True
  bias_init: float = 0.0

  @nn.compact
  def __call__(self, features):
    kernel_init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    return nn.Dense(self.num_classes, kernel_init=kernel_init,
                    bias_init=nn.initializers.constant(self.bias_init), name="conv2d")(features)


def drop_path_rates(layers: Sequence[int], rate: float) -> list[tuple[float, ...]]:
  """Per block, each unit's stochastic-depth rate: linear over all units from 0 to `rate`
  (timm's ResNets; Huang et al. 2016's linear decay rule). [] when `rate` is 0."""
  if not rate:
    return []
  total = sum(layers)
  rates = [rate * i / max(total - 1, 1) for i in range(total)]
  starts = [sum(layers[:b]) for b in range(len(layers))]
  return [tuple(rates[s:s + n]) for s, n in zip(starts, layers)]


class ResNetV2(nn.Module):
  """BiT ResNet-v2 mapping NHWC images in [-1, 1] to float32 logits.

  `model.apply(variables, images, pre_logits=True)` returns the pooled pre-logits instead
  (for linear evaluation and few-shot probes). `train=True` turns stochastic depth on (then
  pass `rngs={"drop_path": key}`); without it the output is deterministic.

  Attributes:
    num_classes: head outputs; 0 builds no head and returns pre-logits.
    layers: residual units per block (see DEPTHS).
    width: width factor: the root has 64*width channels, block b 64*width*2^(b-1) mid channels.
    dtype: compute dtype; parameters and GroupNorm statistics stay float32.
    head_zero_init: zero head kernel (BiT transfer). The bias is `head_bias_init`, e.g. -10
      for sigmoid pretraining on many labels.
    Training-recipe options, off by default (see Unit): residual_gain (zero-initialised
    residual gains), drop_path_rate (stochastic depth rising linearly over the units from 0
    at the first to this rate at the last, as timm's ResNets), avg_down (ResNet-D shortcuts).
    for_cpu: the same function in the form XLA:CPU runs fastest (see the module docstring).
  """
  num_classes: int
  layers: Sequence[int] = DEPTHS[50]
  width: int = 1
  dtype: Any = jnp.float32
  head_zero_init: bool = True
  head_bias_init: float = 0.0
  residual_gain: bool = False
  drop_path_rate: float = 0.0
  avg_down: bool = False
  for_cpu: bool = False

  @nn.compact
  def __call__(self, x, *, pre_logits: bool = False, train: bool = False):
    root = 64 * self.width
    x = Root(root, dtype=self.dtype, for_cpu=self.for_cpu, name="root_block")(x)
    rates = drop_path_rates(self.layers, self.drop_path_rate)
    for b, units in enumerate(self.layers, start=1):
      x = Block(units, root * 2 ** (b - 1), 1 if b == 1 else 2, dtype=self.dtype,
                residual_gain=self.residual_gain, drop_rates=rates[b - 1] if rates else (),
                avg_down=self.avg_down, for_cpu=self.for_cpu, name=f"block{b}")(x, not train)
    x = GroupNorm(dtype=self.dtype, relu=True, for_cpu=self.for_cpu, name="group_norm")(x)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if pre_logits or not self.num_classes:
      return features
    return Head(self.num_classes, self.head_zero_init, self.head_bias_init, name="head")(features)
