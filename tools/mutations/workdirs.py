"""workdirs.py and its use by the trainer: one run per workdir (the lock), resuming only the
run that wrote the checkpoints."""

from mutations import Mutation

WORKDIRS = "big_transfer/workdirs.py"
TRAINER = "big_transfer/trainer.py"
T = "tests/test_reliability.py"
LIVE = f"{T}::test_a_live_lock_refuses_a_second_run_naming_the_owner"
STALE = f"{T}::test_a_stale_lock_is_taken_over"
RESUME = f"{T}::test_a_config_change_that_breaks_resumption_is_refused"
RUN_RESUME = f"{T}::test_run_refuses_to_resume_another_run_and_writes_nothing"
SECOND_RUN = f"{T}::test_fault_matrix_subset"

MUTATIONS = [
    Mutation("lock_not_exclusive", WORKDIRS, "os.O_WRONLY | os.O_CREAT | os.O_EXCL",
             "os.O_WRONLY | os.O_CREAT | os.O_TRUNC", (LIVE,),
             "a second run overwrites the lock of a live one"),
    Mutation("pid_reuse_not_seen", WORKDIRS,
             "return state != \"Z\" and record.get(\"start\") in (None, start)",
             "return state != \"Z\"", (STALE,),
             "a lock whose pid now belongs to another process counts as live"),
    Mutation("remote_lock_never_stale", WORKDIRS,
             "return time.time() - record.get(\"heartbeat\", 0) < STALE_AFTER_S",
             "return True", (STALE,),
             "the lock of a dead run on another host blocks the workdir forever"),
    Mutation("lock_never_released", WORKDIRS,
             "if self._read() == self._record:\n          self._path.unlink()",
             "if self._read() == self._record:\n          pass", (LIVE,),
             "a finished run leaves its lock behind"),
    Mutation("heartbeat_not_renamed", WORKDIRS, "        fresh.replace(self._path)\n", "",
             (f"{T}::test_the_heartbeat_is_refreshed",),
             "the heartbeat is written aside but never replaces the lock"),
    Mutation("batch_size_change_resumes", WORKDIRS,
             "    \"batch_size\": \"the input position and the schedule are counted in steps "
             "of the old batch\",\n", "", (RESUME, RUN_RESUME),
             "a resume with another batch_size is accepted"),
    Mutation("unfinished_checkpoints_count", WORKDIRS,
             "for p in directory.iterdir() if p.name.isdigit())",
             "for p in directory.iterdir() if p.name[0].isdigit())", (RESUME,),
             "a checkpoint orbax is still writing counts as finalized"),
    Mutation("resume_check_without_checkpoints", WORKDIRS,
             "if not finalized_steps(workdir) or not path.exists():", "if not path.exists():",
             (RESUME,), "a workdir whose run wrote no checkpoint yet refuses a new config"),
    Mutation("trainer_skips_resume_check", TRAINER,
             "    workdirs.check_resumable(resolved.config, workdir)  # As config.json records "
             "it.\n", "", (RUN_RESUME,), "the trainer never checks the config it resumes"),
    Mutation("trainer_without_lock", TRAINER, "  with workdirs.Lock(workdir):",
             "  with contextlib.nullcontext():", (SECOND_RUN,),
             "the trainer takes no workdir lock"),
]
