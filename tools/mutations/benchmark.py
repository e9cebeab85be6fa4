"""benchmark.py: the comparison with timm."""

from mutations import Mutation

BENCHMARK = "big_transfer/benchmark.py"
PAIRED = "tests/test_benchmark.py::test_steps_are_paired_by_turn_against_timm"

MUTATIONS = [
    Mutation("faster_steps_count_ties", BENCHMARK,
             "return sum(a < b for a, b in zip(ours.step_times, timm.step_times))",
             "return sum(a <= b for a, b in zip(ours.step_times, timm.step_times))", (PAIRED,),
             "a step as slow as timm's counted as faster"),
    Mutation("faster_steps_unpaired", BENCHMARK,
             "return sum(a < b for a, b in zip(ours.step_times, timm.step_times))",
             "return sum(a < b for a, b in zip(sorted(ours.step_times), sorted(timm.step_times)))",
             (PAIRED,), "steps compared by rank, not by the turn they ran in"),
]
