"""models/bit.py: GroupNorm, weight standardization, the residual unit, root and head."""

from mutations import Mutation

BIT = "big_transfer/models/bit.py"
REF = "tests/test_reference_math.py"
GN = f"{REF}::test_group_norm_matches_numpy_with_variance_near_eps"
GN_BF16 = f"{REF}::test_group_norm_statistics_are_float32_in_a_bfloat16_model"
WS = f"{REF}::test_weight_standardization_matches_numpy_with_variance_near_eps"
TIMM = "tests/test_checkpoints.py::test_logits_and_pre_logits_match_timm"
GN_VJP = ("tests/test_models.py::"
          "test_per_channel_group_norm_gradient_is_autodiff_of_the_grouped_form")
WS_VJP = "tests/test_models.py::test_standardize_for_cpu_gradient_is_autodiff_of_standardize"
CPU_FORM = "tests/test_models.py::test_for_cpu_form_is_the_same_function"
CONV_VJP = ("tests/test_models.py::"
            "test_strided_conv3x3_gradient_by_phases_is_autodiff_of_the_plain_conv")
ROWS_MATMUL = ("tests/test_models.py::"
               "test_rows_matmul_for_cpu_is_autodiff_with_the_narrower_operand_left")
CPU_POOL = "tests/test_models.py::test_root_pool_for_cpu_is_the_padded_max_pool_bit_for_bit"
BF16_PARITY = "tests/test_checkpoints.py::test_bfloat16_compute_stays_close_to_float32"

UNIT_GN = "GroupNorm(dtype=self.dtype, relu=True, for_cpu=self.for_cpu, name=\"group_norm\")"
UNIT_PROJ = ("    if self.projection:\n"
             "      shortcut = Projection(self.projection, self.projection_strides, "
             "dtype=self.dtype,\n"
             "                            avg_down=self.avg_down, for_cpu=self.for_cpu, "
             "name=\"proj\")(x)")

MUTATIONS = [
    Mutation("gn_eps", BIT, "GN_EPS = 1e-5", "GN_EPS = 1e-6", (GN, TIMM),
             "GroupNorm eps 1e-6 (flax's default) instead of 1e-5"),
    Mutation("gn_stats_in_compute_dtype", BIT, "xg = x.astype(jnp.float32).reshape(",
             "xg = x.astype(self.dtype).reshape(", (GN_BF16, GN, BF16_PARITY),
             "GroupNorm statistics in bfloat16 in a bfloat16 model"),
    Mutation("gn_groups", BIT, "GN_GROUPS = 32", "GN_GROUPS = 16", (GN, TIMM),
             "16 GroupNorm groups instead of 32"),
    Mutation("gn_layer_norm", BIT, "axes = (1, 2, 4)", "axes = (1, 2, 3, 4)", (GN, TIMM),
             "statistics over all channels (LayerNorm), not per group"),
    Mutation("gn_interleaved_groups", BIT,
             "(self.groups, c // self.groups))\n    axes = (1, 2, 4)",
             "(c // self.groups, self.groups))\n    axes = (1, 2, 3)", (GN, TIMM),
             "groups of interleaved instead of consecutive channels"),
    Mutation("gn_one_pass_variance", BIT,
             "var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)",
             "var = jnp.mean(jnp.square(xg), axis=axes, keepdims=True) - jnp.square(mean)",
             (GN, TIMM), "one-pass variance E[x^2] - E[x]^2 (cancellation)"),
    Mutation("gn_no_beta", BIT, "out = (xg.reshape(x.shape) * gamma + beta)",
             "out = (xg.reshape(x.shape) * gamma)", (GN, TIMM), "GroupNorm offset dropped"),
    Mutation("gn_cpu_vjp_without_variance_term", BIT,
             "dx = rstd * (gamma * g - mean_g - xhat * mean_gxhat)",
             "dx = rstd * (gamma * g - mean_g)", (GN_VJP, CPU_FORM),
             "CPU form's GroupNorm gradient without the term through the variance"),
    Mutation("gn_cpu_vjp_ignores_relu", BIT, "g = jnp.where(xhat * gamma + beta > 0, g, 0)",
             "g = jnp.where(xhat > 0, g, 0)", (GN_VJP, CPU_FORM),
             "CPU form's ReLU gradient masked by the normalised input, not the output"),
    Mutation("ws_axes_hw", BIT,
             "mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)\n"
             "  var = jnp.mean(jnp.square(kernel - mean), axis=(0, 1, 2), keepdims=True)",
             "mean = jnp.mean(kernel, axis=(0, 1), keepdims=True)\n"
             "  var = jnp.mean(jnp.square(kernel - mean), axis=(0, 1), keepdims=True)",
             (WS, TIMM), "weight standardization over (H, W) instead of (H, W, In)"),
    Mutation("ws_eps", BIT, "WS_EPS = 1e-10", "WS_EPS = 1e-8", (WS, TIMM),
             "weight-standardization eps 1e-8 (timm's) instead of 1e-10"),
    Mutation("ws_unbiased_variance", BIT,
             "var = jnp.mean(jnp.square(kernel - mean), axis=(0, 1, 2), keepdims=True)",
             "var = jnp.var(kernel, axis=(0, 1, 2), ddof=1, keepdims=True)", (WS, TIMM),
             "unbiased (n-1) kernel variance"),
    Mutation("ws_cpu_vjp_without_variance_term", BIT,
             "return (rstd * (g - mean_g - w * mean_gw),)", "return (rstd * (g - mean_g),)",
             (WS_VJP, CPU_FORM),
             "CPU form's weight-standardization gradient without the term through the variance"),
    Mutation("conv3x3_phases_swapped", BIT, "rows.append(jnp.stack(phases, axis=3))",
             "rows.append(jnp.stack(phases[::-1], axis=3))", (CONV_VJP, CPU_FORM),
             "CPU form's strided 3x3 input gradient with the even and odd column phases swapped"),
    Mutation("conv3x3_phase_taps_reversed", BIT,
             "_PHASE_TAPS = (slice(1, 2), slice(None, None, -2))",
             "_PHASE_TAPS = (slice(1, 2), slice(None, None, 2))", (CONV_VJP, CPU_FORM),
             "CPU form's strided 3x3 input gradient: odd rows get g[m] k[0] + g[m + 1] k[2]"),
    Mutation("conv3x3_phase_pads_before", BIT, "[(0, row_parity), (0, col_parity)])",
             "[(row_parity, 0), (col_parity, 0)])", (CONV_VJP, CPU_FORM),
             "CPU form's strided 3x3 input gradient: g padded before instead of after (g[m - 1])"),
    Mutation("root_pool_pads_minus_inf", BIT,
             "x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))\n"
             "    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=\"VALID\")",
             "return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))",
             ("tests/test_models.py::test_root_pool_pads_with_zeros_not_minus_infinity", TIMM),
             "root max-pool padded with -inf instead of zeros"),
    Mutation("root_pool_cpu_pads_minus_inf", BIT,
             "x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))\n  return [jax.lax.slice(",
             "x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)\n"
             "  return [jax.lax.slice(", (CPU_POOL, CPU_FORM, TIMM),
             "CPU form's root max-pool padded with -inf instead of zeros"),
    Mutation("root_pool_cpu_last_maximum", BIT, "for k in reversed(range(len(taps))):",
             "for k in range(len(taps)):", (CPU_POOL, CPU_FORM),
             "CPU form's root pool gradient to the last maximum of a window, not the first"),
    Mutation("root_pool_cpu_columns_swapped", BIT,
             "even_odd = m[5] + _next_along(m[3], 2)", "even_odd = m[3] + _next_along(m[5], 2)",
             (CPU_POOL, CPU_FORM),
             "CPU form's root pool gradient from the wrong column taps to odd columns"),
    Mutation("rows_matmul_without_barrier", BIT,
             "dkernel_t = jax.lax.optimization_barrier(dkernel_t)", "pass", (ROWS_MATMUL,),
             "no barrier: XLA folds the transpose and puts x on the left again"),
    Mutation("rows_matmul_barrier_when_narrower", BIT,
             "if x.shape[1] > kernel.shape[1]:", "if x.shape[1] < kernel.shape[1]:",
             (ROWS_MATMUL,), "the barrier where C < K: the wider operand on the left"),
    Mutation("rows_matmul_dx_unrounded", BIT,
             "return dx.astype(x.dtype), dkernel_t.T.astype(kernel.dtype)",
             "return dx, dkernel_t.T.astype(kernel.dtype)", (ROWS_MATMUL, CPU_FORM),
             "the input gradient left in float32 in a bfloat16 model"),
    Mutation("root_conv_padding", BIT, "StdConv(self.features, 7, 2, padding=3,",
             "StdConv(self.features, 7, 2, padding=2,", (TIMM,),
             "root conv padding 2 (SAME-like) instead of symmetric 3"),
    Mutation("preact_without_relu", BIT, f"x = {UNIT_GN}(x)\n    shortcut = None",
             f"x = {UNIT_GN.replace('relu=True', 'relu=False')}(x)\n    shortcut = None",
             (TIMM,),
             "no ReLU after a unit's GroupNorm"),
    Mutation("projection_of_raw_input", BIT,
             f"x = {UNIT_GN}(x)\n    shortcut = None\n{UNIT_PROJ}",
             f"a = {UNIT_GN}(x)\n    shortcut = None\n{UNIT_PROJ}\n    x = a",
             (TIMM,), "shortcut projection of the unit's input instead of relu(GN(input))"),
    Mutation("stride_on_first_conv", BIT,
             "projection_strides=self.strides, avg_down=self.avg_down,\n"
             "                             name=\"a\", **options)(x)\n"
             "    y, _ = PreActConv(self.mid, 3, self.strides, name=\"b\", **options)(y)",
             "projection_strides=self.strides, avg_down=self.avg_down,\n"
             "                             strides=self.strides, name=\"a\", **options)(x)\n"
             "    y, _ = PreActConv(self.mid, 3, 1, name=\"b\", **options)(y)",
             (TIMM,), "stride on the 1x1 conv instead of the 3x3 (ResNet v1 style)"),
    Mutation("head_not_zero_init", BIT,
             "kernel_init = nn.initializers.zeros if self.zero_init else",
             "kernel_init = nn.initializers.lecun_normal() if self.zero_init else",
             ("tests/test_models.py::test_zero_head_and_pre_logits",),
             "transfer head kernel not zero-initialised"),
]
