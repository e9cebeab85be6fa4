"""optim.py and the optimizer defaults of config_common.py: SGD momentum, coupled weight decay
and its mask, gradient clipping, schedules, durations."""

from mutations import Mutation

OPTIM = "big_transfer/optim.py"
CONFIG = "big_transfer/config_common.py"
REF = "tests/test_reference_math.py"
SGD = f"{REF}::test_one_and_two_sgd_steps_match_hand_computation"
REAL_MASK = f"{REF}::test_decay_reaches_exactly_the_kernels_of_the_real_model"
T = "tests/test_optim.py"

DECAY = ("    if config.wd:\n"
         "      chain.append(optax.add_decayed_weights(config.wd, mask=mask))\n")
SGD_LINE = "    chain.append(optax.sgd(schedule, momentum=config.momentum))\n"

MUTATIONS = [
    Mutation("wd_mask_ignored", OPTIM,
             "chain.append(optax.add_decayed_weights(config.wd, mask=mask))",
             "chain.append(optax.add_decayed_weights(config.wd))", (SGD, REAL_MASK),
             "weight decay on every parameter (GN scales, biases) despite the mask"),
    Mutation("wd_mask_inverted", OPTIM, "lambda path, _: bool(regex.fullmatch(",
             "lambda path, _: not bool(regex.fullmatch(",
             (SGD, f"{T}::test_weight_decay_mask_selects_kernels"),
             "decay mask inverted"),
    Mutation("wd_mask_default_all", CONFIG, 'config.wd_mask = r".*/kernel"',
             'config.wd_mask = r".*"', (SGD, REAL_MASK), "default mask decays everything"),
    Mutation("decay_after_lr", OPTIM, DECAY + SGD_LINE, SGD_LINE + DECAY, (SGD,),
             "decay added after momentum and lr scaling (wrong chain order)"),
    # The clip comes first in the chain (before either optimizer): decay put in front of it.
    Mutation("clip_after_decay", OPTIM, DECAY,
             DECAY.replace("chain.append(", "chain.insert(0, "), (SGD,),
             "gradient clipping applied to the decayed gradient"),
    Mutation("nesterov", OPTIM, "optax.sgd(schedule, momentum=config.momentum)",
             "optax.sgd(schedule, momentum=config.momentum, nesterov=True)", (SGD,),
             "Nesterov instead of heavy-ball momentum"),
    Mutation("momentum_default", CONFIG, "config.momentum = 0.9  # SGD only.",
             "config.momentum = 0.95  # SGD only.",
             (SGD,), "momentum 0.95 instead of BiT's 0.9"),
    Mutation("warmup_first_lr_zero", OPTIM, "jnp.minimum(1.0, (s + 1) / warmup) * decay(s)",
             "jnp.minimum(1.0, s / warmup) * decay(s)",
             (f"{T}::test_stair_schedule_at_boundaries", SGD),
             "first update at lr 0 (official bug #58)"),
    Mutation("stair_boundary_late", OPTIM,
             "scales[int(boundary)] = scales.get(int(boundary), 1.0)",
             "scales[int(boundary) + 1] = scales.get(int(boundary) + 1, 1.0)", (f"{T}::test_stair_schedule_at_boundaries",),
             "lr decays one update late"),
    Mutation("lr_scaling_inverted", OPTIM, "(config.batch_size / ref if ref",
             "(ref / config.batch_size if ref",
             (f"{T}::test_stair_schedule_at_boundaries",), "lr scaled by ref / batch"),
    Mutation("durations_truncate", OPTIM, "return max(1, round(examples / self.batch_size))",
             "return max(1, int(examples / self.batch_size))",
             (f"{T}::test_durations_units_and_precedence",), "epochs to steps truncated"),
    Mutation("durations_precedence", OPTIM, 'for unit in ("steps", "examples", "epochs"):',
             'for unit in ("epochs", "examples", "steps"):',
             (f"{T}::test_durations_units_and_precedence",),
             "--config.total_steps does not override epochs"),
    Mutation("cosine_over_warmup", OPTIM,
             "cosine_decay_schedule(base, max(1, total_steps - warmup))",
             "cosine_decay_schedule(base, max(1, total_steps))", (f"{T}::test_cosine_schedule",),
             "cosine decays over the warmup steps too"),
]
