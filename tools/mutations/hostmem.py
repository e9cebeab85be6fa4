"""hostmem.py: the glibc malloc tunables the CPU entry points re-execute with."""

from mutations import Mutation

HOSTMEM = "big_transfer/hostmem.py"
FAULTS = "tests/test_benchmark.py::test_json_figures_are_consistent"
DECISION = "tests/test_hostmem.py"
REUSE = "tests/test_hostmem.py::test_the_tunables_keep_a_threads_freed_buffer_mapped"
ENTRY = "tests/test_hostmem.py::test_entry_points_reexecute_before_loading_jax_or_tensorflow"

MUTATIONS = [
    Mutation("malloc_maps_big_blocks", HOSTMEM, '    "glibc.malloc.mmap_max=0",  #',
             '    "glibc.malloc.mmap_max=65536",  #', (REUSE,),
             "the main arena still maps (and unmaps) each step's big buffers"),
    Mutation("malloc_arena_per_thread", HOSTMEM, '    "glibc.malloc.arena_max=1",  #',
             '    "glibc.malloc.arena_max=8",  #', (REUSE,),
             "XLA's worker threads keep their own arenas, which map big blocks afresh"),
    Mutation("malloc_trims", HOSTMEM, 'f"glibc.malloc.trim_threshold={2**62}",  #',
             '"glibc.malloc.trim_threshold=131072",  #', (REUSE,),
             "the freed top of the heap goes back to the kernel"),
    Mutation("benchmark_not_reexecuted", "big_transfer/benchmark.py",
             '  hostmem.reexec_for_cpu()\n  app.run(main)', '  app.run(main)', (FAULTS,),
             "the benchmark runs with glibc's default malloc"),
    Mutation("predict_reexecuted_after_tensorflow", "big_transfer/predict.py",
             '  hostmem.reexec_for_cpu()\nnative_logs.import_tensorflow()',
             '  native_logs.import_tensorflow()\n  hostmem.reexec_for_cpu()', (f"{ENTRY}[predict]",),
             "predict imports TensorFlow twice: once before re-executing, once after"),
    Mutation("fewshot_not_reexecuted", "big_transfer/fewshot.py",
             '  hostmem.reexec_for_cpu()\n', '  pass\n', (f"{ENTRY}[fewshot]",),
             "few-shot features computed with glibc's default malloc"),
    Mutation("train_not_reexecuted", "big_transfer/train.py",
             '  hostmem.reexec_for_cpu()\n', '  pass\n', (f"{ENTRY}[train]",),
             "training on CPU with glibc's default malloc (page faults every step)"),
    Mutation("any_listed_platform_is_cpu", HOSTMEM,
             'return platforms.split(",")[0].strip() == "cpu"',
             'return "cpu" in platforms.split(",")', (DECISION,),
             "JAX_PLATFORMS=cuda,cpu taken for a CPU run"),
    Mutation("user_tunables_overridden", HOSTMEM,
             'or "GLIBC_TUNABLES" in environ or', 'or environ.get("GLIBC_TUNABLES") or',
             (DECISION,), "an empty GLIBC_TUNABLES (glibc's defaults, by choice) is replaced"),
]
