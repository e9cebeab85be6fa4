"""checkpoints.py: the official .npz mapping and the orbax manager's fallback."""

from mutations import Mutation

CKPT = "big_transfer/checkpoints.py"
T = "tests/test_checkpoints.py"
TRUNCATED = "tests/test_resilience.py::test_truncated_latest_checkpoint_falls_back"
BIT_FLIP = ("tests/test_reliability.py::"
            "test_a_bit_flipped_checkpoint_is_moved_aside_and_the_previous_one_used")
RESTORE_FAILS = ("(any failure: try an older one)\n"
                 "        self._quarantine(step, e)\n        continue\n")

MUTATIONS = [
    Mutation("head_kernel_not_reshaped", CKPT,
             "(1, 1, C, N).\n    flat[HEAD_KERNEL] = flat[HEAD_KERNEL][None, None]",
             "(1, 1, C, N).\n    flat[HEAD_KERNEL] = flat[HEAD_KERNEL]",
             (f"{T}::test_load_save_load_is_bitwise_and_reproduces_the_official_file",),
             "head kernel saved as (C, N), not the official (1, 1, C, N)"),
    Mutation("numbered_convs_one_digit", CKPT, r'r"/standardized_conv2d_\d+/"',
             r'r"/standardized_conv2d_\d/"',
             (f"{T}::test_numbered_standardized_conv2d_names_load",),
             "standardized_conv2d_<n> normalised only for n < 10"),
    Mutation("auto_head_keeps_mismatch", CKPT, 'if head == "reset" or num_classes != file_classes:',
             'if head == "reset":', (f"{T}::test_head_reset_for_transfer",),
             "head='auto' keeps a head of the wrong class count"),
    Mutation("transfer_head_random", CKPT,
             "flat[HEAD_KERNEL] = np.zeros((2048 * width, num_classes), np.float32)",
             "flat[HEAD_KERNEL] = np.random.default_rng(0).normal(\n"
             "          0, 0.01, (2048 * width, num_classes)).astype(np.float32)",
             (f"{T}::test_head_reset_for_transfer",), "transfer head not zero-initialised"),
    Mutation("width_from_root", CKPT, "root.shape[-1] // 64 if", "root.shape[-1] // 32 if",
             (f"{T}::test_load_save_load_is_bitwise_and_reproduces_the_official_file",),
             "width read as root channels / 32"),
    Mutation("corrupt_checkpoint_deleted", CKPT,
             'shutil.move(os.path.join(self._workdir, "checkpoints", str(step)), target)',
             'shutil.rmtree(os.path.join(self._workdir, "checkpoints", str(step)))', (TRUNCATED,),
             "an unreadable checkpoint is deleted instead of moved aside"),
    Mutation("no_fallback_to_older_checkpoint", CKPT, RESTORE_FAILS,
             "(any failure: try an older one)\n        raise\n",
             (BIT_FLIP, TRUNCATED), "a corrupt latest checkpoint stops the run"),
    Mutation("checksums_not_verified", CKPT, "        self._verify(step, state)\n", "",
             (BIT_FLIP,), "a bit-flipped checkpoint restores silently"),
]
