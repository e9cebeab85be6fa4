"""data/: preprocessing ops, per-example seeds, few-shot selection, MixUp, evaluation padding."""

from mutations import Mutation

PRE = "big_transfer/data/preprocess.py"
PIPE = "big_transfer/data/pipeline.py"
MIXUP = "big_transfer/data/mixup.py"
REF = "tests/test_reference_data.py"
CROP = f"{REF}::test_random_crop_offsets_vary_with_the_seed_and_repeat_for_a_fixed_one"
FLIP = f"{REF}::test_flip_is_random_per_draw_about_half_the_time"
PER_EXAMPLE = f"{REF}::test_pipeline_augments_each_example_with_its_own_seed"
FEW_SHOT = f"{REF}::test_few_shot_subset_is_stratified_seeded_and_random"
T = "tests/test_data.py"
STEP_MIXUP = ("tests/test_reference_step.py::"
              "test_mixup_step_equals_the_step_on_the_batch_mixed_by_hand")
RANDOM_FLIP = "tf.image.stateless_random_flip_left_right(example[\"image\"], seed)"

MUTATIONS = [
    Mutation("random_crop_is_centre_crop", PRE,
             "crop = tf.image.stateless_random_crop(image, (size, size, tf.shape(image)[-1]), "
             "seed)",
             "crop = tf.image.crop_to_bounding_box(image, (tf.shape(image)[0] - size) // 2, "
             "(tf.shape(image)[1] - size) // 2, size, size)", (CROP, PER_EXAMPLE),
             "random_crop takes the centre crop"),
    Mutation("flip_always", PRE, RANDOM_FLIP, "tf.image.flip_left_right(example[\"image\"])",
             (FLIP, PER_EXAMPLE), "every image flipped (official bug #62)"),
    Mutation("flip_never", PRE, RANDOM_FLIP, "example[\"image\"]", (FLIP, PER_EXAMPLE),
             "flip_lr does nothing"),
    Mutation("value_range_256", PRE, "((vmax - vmin) / 255.0)", "((vmax - vmin) / 256.0)",
             (f"{REF}::test_value_range_maps_0_and_255_to_the_ends",),
             "pixels scaled by 1/256: 255 does not reach 1"),
    Mutation("resize_antialias_inverted", PRE, "tf.reduce_any(tf.shape(image)[:2] > size)",
             "tf.reduce_any(tf.shape(image)[:2] < size)",
             (f"{T}::test_resize_is_antialiased_resize_either_way",),
             "antialiasing only when upscaling"),
    Mutation("one_seed_per_batch", PIPE, "tf.stack([tf.cast(seed, tf.int64), index])",
             "tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])", (PER_EXAMPLE,),
             "every example augmented with the same draw"),
    Mutation("augment_ignores_seed", PIPE, "tf.stack([tf.cast(seed, tf.int64), index])",
             "tf.stack([tf.constant(0, tf.int64), index])", (PER_EXAMPLE,),
             "augmentation does not depend on config.seed"),
    Mutation("resume_skips_steps_not_examples", PIPE, "skip(start_step * local_batch)",
             "skip(start_step)", (f"{T}::test_resumed_iterator_continues_exactly",),
             "resumed input positioned at start_step examples, not batches"),
    Mutation("shuffle_not_per_epoch", PIPE, "reshuffle_each_iteration=True",
             "reshuffle_each_iteration=False",
             (PER_EXAMPLE, f"{T}::test_resumed_iterator_continues_exactly"),
             "the same shuffle order for every pass",
             equivalent="shuffle() runs after repeat(): each iterator makes one endless pass, "
             "never a second one to reshuffle; the flag only changes which seeded permutation "
             "tf.data draws, and no test should pin one permutation"),
    Mutation("few_shot_not_stratified", PIPE, "candidates = np.flatnonzero(labels == label)",
             "candidates = np.arange(len(labels))", (FEW_SHOT,),
             "few-shot draws from the whole split, not per class"),
    Mutation("few_shot_unseeded", PIPE, "rng = np.random.default_rng(seed)",
             "rng = np.random.default_rng()", (FEW_SHOT,), "few-shot subset not seeded"),
    Mutation("few_shot_first_files", PIPE,
             "chosen.append(rng.choice(candidates, shots, replace=False))",
             "chosen.append(candidates[:shots])", (FEW_SHOT,),
             "few-shot takes each class's first files"),
    Mutation("few_shot_with_replacement", PIPE, "rng.choice(candidates, shots, replace=False)",
             "rng.choice(candidates, shots, replace=True)", (FEW_SHOT,),
             "few-shot may pick an example twice"),
    Mutation("multi_hot_counts", PIPE,
             "tf.minimum(tf.reduce_sum(tf.one_hot(label, dataset.num_classes), axis=0), 1)",
             "tf.reduce_sum(tf.one_hot(label, dataset.num_classes), axis=0)",
             (f"{T}::test_multi_hot_labels",), "a repeated label counts twice"),
    Mutation("eval_mask_off_by_one", PIPE, "padded[\"mask\"] = np.arange(size) < n",
             "padded[\"mask\"] = np.arange(size) <= n",
             (f"{T}::test_eval_counts_every_example_once",),
             "one padding row counted per eval batch"),
    Mutation("eval_batches_of_smallest_shard", PIPE,
             "math.ceil(max(_shard_sizes(dataset, split, process_count, subset))",
             "math.ceil(min(_shard_sizes(dataset, split, process_count, subset))",
             (f"{REF}::test_eval_covers_unequal_shards_once_in_equal_batch_counts",
              f"{T}::test_eval_shards_over_processes"),
             "processes run the batch count of the smallest shard"),
    Mutation("mixup_partner_shifted", MIXUP, "(1 - lam) * x[::-1]",
             "(1 - lam) * jax.numpy.roll(x, 1, axis=0)",
             (f"{T}::test_mixup_mixes_images_and_labels_with_one_beta_draw", STEP_MIXUP),
             "MixUp pairs example i with i-1 instead of n-1-i"),
    Mutation("mixup_labels_unmixed", MIXUP, "\"labels\": mix(batch[\"labels\"])",
             "\"labels\": batch[\"labels\"]",
             (f"{T}::test_mixup_mixes_images_and_labels_with_one_beta_draw", STEP_MIXUP),
             "MixUp mixes images but not labels"),
]
