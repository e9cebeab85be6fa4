"""plan.py: per-device capacity and peak from the chip table, the memory total, the verdict."""

from mutations import Mutation

PLAN = "big_transfer/plan.py"
REF = "tests/test_plan_memory.py"
PER_DEVICE = f"{REF}::test_capacity_and_peak_are_per_device"
TOTAL = f"{REF}::test_total_counts_aliased_outputs_once"
REPORT = f"{REF}::test_report_on_a_v3_core"
COMPILER = f"{REF}::test_compiler_numbers_reach_the_plan"
T = "tests/test_plan.py"

MUTATIONS = [
    Mutation("total_ignores_aliasing", PLAN,
             "self.arguments + self.outputs - self.aliased + self.temporaries",
             "self.arguments + self.outputs + self.temporaries", (TOTAL, REPORT),
             "Memory.total counts outputs aliased to donated inputs twice"),
    Mutation("hbm_per_chip", PLAN, "hbm = hbm_bytes or (chip.hbm_bytes // per_chip if chip",
             "hbm = hbm_bytes or (chip.hbm_bytes if chip", (PER_DEVICE, REPORT),
             "a v3 core planned against the whole chip's 32 GiB"),
    Mutation("peak_per_chip", PLAN, "peak = chip.peak_bf16_flops / per_chip if chip",
             "peak = chip.peak_bf16_flops if chip", (PER_DEVICE, REPORT),
             "per-device peak FLOP/s of the whole chip"),
    Mutation("one_device_per_chip", PLAN, "return len(devices) // len(chips)", "return 1",
             (PER_DEVICE,), "every device assumed to be a whole chip"),
    Mutation("hbm_flag_loses", PLAN,
             "hbm = hbm_bytes or (chip.hbm_bytes // per_chip if chip else None)",
             "hbm = (chip.hbm_bytes // per_chip if chip else None) or hbm_bytes", (PER_DEVICE,),
             "--hbm_gib ignored on known TPUs"),
    Mutation("fits_strictly_below", PLAN, "self.memory.total <= capacity",
             "self.memory.total < capacity", (TOTAL,), "a plan using exactly the capacity fails"),
    Mutation("tight_threshold", PLAN, "TIGHT_HEADROOM = 0.05", "TIGHT_HEADROOM = 0.02", (REPORT,),
             "TIGHT warning only under 2% headroom"),
    Mutation("micro_batch_flops_once", PLAN, "flops and flops * config.batch_split",
             "flops", (COMPILER, f"{T}::test_compiler_flops_count_every_micro_batch"),
             "the FLOPs of one micro-batch reported for the whole step"),
    Mutation("memory_fields_swapped", PLAN,
             "stats.alias_size_in_bytes, stats.temp_size_in_bytes,",
             "stats.temp_size_in_bytes, stats.alias_size_in_bytes,", (COMPILER,),
             "compiler's aliased and temporary sizes swapped"),
    Mutation("out_of_memory_crashes", PLAN,
             "if \"RESOURCE_EXHAUSTED\" not in str(e):\n      raise",
             "raise", (COMPILER,), "the compiler's out-of-memory refusal is a crash"),
    Mutation("analytic_forward_only", PLAN, "return 2.0 * 3 * macs", "return 2.0 * macs",
             (f"{T}::test_analytic_flops_match_the_resnet50_reference",),
             "analytic FLOPs without the backward pass"),
    Mutation("bfloat16_before_batch_split", PLAN,
             "key=lambda g: (len(g[0]), \"model.dtype\" in g[0], \"batch_split\" in g[0])",
             "key=lambda g: (len(g[0]), \"batch_split\" in g[0], \"model.dtype\" in g[0])",
             (f"{T}::test_candidate_changes_fewest_first_and_exact_math_before_bfloat16",),
             "bfloat16 suggested before exact-math batch_split"),
]
