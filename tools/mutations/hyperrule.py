"""hyperrule.py and transfer.py: BiT-HyperRule's regimes and resolution (paper §3.3), and how a
transfer config's unset fields are filled from the data."""

from mutations import Mutation

RULE = "big_transfer/hyperrule.py"
TRANSFER = "big_transfer/transfer.py"
T = "tests/test_transfer.py"
REGIMES = f"{T}::test_regimes_at_their_boundaries"
RESOLUTION = f"{T}::test_resolution_below_and_from_96x96"
RESOLVE = f"{T}::test_resolve_fills_the_unset_fields_from_the_data"

MUTATIONS = [
    Mutation("regime_threshold_inclusive", RULE, "if num_examples < r.max_examples)",
             "if num_examples <= r.max_examples)", (REGIMES,),
             "exactly 20k (500k) examples fall in the smaller regime"),
    Mutation("medium_bound_dropped_zero", RULE, "Regime(\"medium\", \"20k to < 500k\", 500_000,",
             "Regime(\"medium\", \"20k to < 500k\", 50_000,", (REGIMES,),
             "the large regime from 50k examples (a dropped zero)"),
    Mutation("mixup_in_small_regime", RULE, "(200, 300, 400), 0.0),", "(200, 300, 400), 0.1),",
             (REGIMES, RESOLVE), "MixUp on below 20k examples"),
    Mutation("decays_swapped", RULE,
             "if decays == \"paper\":\n    return PAPER_DECAYS\n  if decays == \"released\":",
             "if decays == \"released\":\n    return PAPER_DECAYS\n  if decays == \"paper\":",
             (REGIMES,), "decays='released' gives the paper's 30/60/90% and vice versa"),
    Mutation("decay_steps_truncated", RULE, "round(f * total_steps)", "int(f * total_steps)",
             (f"{T}::test_short_runs_keep_every_decay",),
             "decay boundaries truncated: a 2-step run decays at step 0"),
    Mutation("override_keeps_table_decays", RULE,
             "decay_steps(decay_fractions(chosen, decays), total)",
             "decay_steps(decay_fractions(chosen, decays), chosen.total_steps)",
             (f"{T}::test_a_total_steps_override_keeps_the_decay_fractions",),
             "a total_steps override keeps the regime's decay steps"),
    Mutation("area_threshold_inclusive", RULE, "SMALL_IMAGE_SIZES if image_area < SMALL_IMAGE_AREA",
             "SMALL_IMAGE_SIZES if image_area <= SMALL_IMAGE_AREA", (RESOLUTION,),
             "96x96 images get the small resolution"),
    Mutation("released_resolution_by_default", RULE, "resolution: str = \"paper\",",
             "resolution: str = \"released\",", (RESOLUTION,),
             "the released code's 512/480 instead of the paper's 448/384 by default"),
    Mutation("shots_not_the_size", TRANSFER,
             "num_examples, source = config.shots * classes,",
             "num_examples, source = dataset.num_examples(config.train_split),",
             (f"{T}::test_shots_times_classes_is_the_rule_s_size",),
             "few-shot runs sized by the whole split, not shots x classes"),
    Mutation("override_overwritten", TRANSFER,
             "configured = configured or ([name] if node[name] is not None else [])",
             "configured = configured", (f"{T}::test_every_overridden_field_wins",),
             "the rule overwrites a field set on the command line"),
    Mutation("test_res_lr_undecayed", TRANSFER,
             "float(f\"{config.lr * schedule.decay_factor:.6g}\")", "config.lr", (RESOLVE,),
             "the test-resolution phase at the initial lr, not the decayed one"),
    Mutation("test_res_crops", TRANSFER,
             "flip=rule.flip,\n                                          crop=False,",
             "flip=rule.flip,\n                                          crop=rule.crop,",
             (RESOLVE, f"{T}::test_test_resolution_phase_switches_preprocessing"),
             "the test-resolution phase still crops randomly"),
]
