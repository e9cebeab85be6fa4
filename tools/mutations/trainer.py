"""trainer.py (the update step, the loop), losses.py and evaluate.py."""

from mutations import Mutation

TRAINER = "big_transfer/trainer.py"
LOSSES = "big_transfer/losses.py"
EVALUATE = "big_transfer/evaluate.py"
OBJECTIVES = "big_transfer/objectives.py"
STEP = "tests/test_reference_step.py"
SGD_STEP = f"{STEP}::test_first_step_is_sgd_on_the_mean_cross_entropy"
NAN = f"{STEP}::test_nan_batch_changes_nothing_and_training_continues_as_without_it"
MIXUP = f"{STEP}::test_mixup_step_equals_the_step_on_the_batch_mixed_by_hand"
ENGINE = "tests/test_engine.py"
RESILIENCE = "tests/test_resilience.py"

MUTATIONS = [
    Mutation("mixup_ignored", TRAINER,
             "batch,\n                      mixup_alpha, cutmix_alpha, cutmix_switch_prob)",
             "batch,\n                      0.0, cutmix_alpha, cutmix_switch_prob)", (MIXUP,),
             "the train step ignores mixup_alpha"),
    Mutation("mixup_key_fixed", TRAINER,
             "jax.random.fold_in(jax.random.key(seed), state[\"step\"])",
             "jax.random.fold_in(jax.random.key(seed), 0)", (MIXUP,),
             "the same MixUp lambda at every step"),
    Mutation("nan_guard_skips_opt_state", TRAINER,
             "unchanged = lambda: (params, state[\"opt_state\"],",
             "unchanged = lambda: (params, tx.update(grads, state[\"opt_state\"], params)[1],",
             (NAN,), "the NaN guard keeps params but lets the momentum take the NaN"),
    Mutation("nan_guard_skips_params", TRAINER,
             "unchanged = lambda: (params, state[\"opt_state\"],",
             "unchanged = lambda: (updated()[0], state[\"opt_state\"],",
             (NAN, f"{ENGINE}::test_non_finite_loss_never_reaches_the_state"),
             "a NaN step updates the parameters"),
    Mutation("nan_guard_cond_always_updates", TRAINER,
             "return jax.lax.cond(finite, updated, unchanged)", "return updated()", (NAN,),
             "the CPU's branch takes the update whatever the loss"),
    Mutation("nan_guard_wheres_always_update", TRAINER,
             "return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated(), "
             "unchanged())", "return updated()", (NAN,),
             "the TPU/GPU per-leaf wheres take the update whatever the loss"),
    Mutation("bad_step_records_last", TRAINER,
             "jnp.where(finite | (state[\"bad_step\"] >= 0), state[\"bad_step\"],",
             "jnp.where(finite, state[\"bad_step\"],",
             (f"{ENGINE}::test_non_finite_loss_never_reaches_the_state",),
             "bad_step reports the last non-finite step, not the first"),
    Mutation("loss_summed_over_batch", OBJECTIVES,
             'return jnp.mean(loss_fn(apply_fn(params, batch["image"], rng), batch["labels"]))',
             'return jnp.sum(loss_fn(apply_fn(params, batch["image"], rng), batch["labels"]))',
             (SGD_STEP,),
             "loss and gradient summed over the batch, not averaged"),
    Mutation("micro_batch_gradients_summed", TRAINER,
             "jax.tree.map(lambda x: x / batch_split, (loss, grads))",
             "(loss / batch_split, grads)",
             (f"{ENGINE}::test_batch_split_equals_whole_batch",),
             "batch_split sums the micro-batch gradients"),
    Mutation("devices_psum", TRAINER, "lambda params, micro, rng: jax.lax.pmean(",
             "lambda params, micro, rng: jax.lax.psum(",
             (f"{ENGINE}::test_batch_split_equals_whole_batch",),
             "gradients summed over devices, not averaged"),
    Mutation("no_checkpoint_on_preemption", TRAINER,
             "if step % ckpt.every_steps == 0 or is_last or preempted:",
             "if step % ckpt.every_steps == 0 or is_last:",
             (f"{RESILIENCE}::test_sigterm_saves_and_exits_zero",),
             "SIGTERM exits without saving"),
    Mutation("resume_reads_from_start", TRAINER,
             "test_res_start,\n                                 ckpt.input_position)",
             "test_res_start,\n                                 0)",
             (f"{RESILIENCE}::test_kill_9_five_times_then_resume_is_bitwise_identical",),
             "a resumed run reads the input from the start"),
    Mutation("sigmoid_mean_over_classes", LOSSES,
             "sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)",
             "sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)",
             ("tests/test_reference_math.py::test_losses_match_numpy",),
             "sigmoid loss averaged over classes instead of summed"),
    Mutation("eval_counts_padding", EVALUATE, "\"count\": jnp.sum(mask)}",
             "\"count\": jnp.sum(jnp.ones_like(mask))}",
             (f"{ENGINE}::test_evaluation_counts_every_cifar10_test_image",),
             "padding rows counted as evaluated images"),
    Mutation("every_process_prints", "big_transfer/metrics.py",
             "def log(message: str) -> None:\n  if jax.process_index() == 0:",
             "def log(message: str) -> None:\n  if True:",
             ("tests/test_upstream.py::test_two_processes_match_one",),
             "every process prints the progress lines, not only process 0"),
]
