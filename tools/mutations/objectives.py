"""objectives.py (MoCo-v2: InfoNCE, the EMA key encoder, the queue) and optim.py's
`trainable=norm_only` (HPT, tests/test_hpt.py)."""

from mutations import Mutation

OBJECTIVES = "big_transfer/objectives.py"
OPTIM = "big_transfer/optim.py"
T = "tests/test_hpt.py"
INFO_NCE = f"{T}::test_info_nce_equals_a_hand_computation"
EMA = f"{T}::test_ema_update"
QUEUE = f"{T}::test_queue_takes_the_keys_of_every_device_in_global_order"
BY_HAND = f"{T}::test_projection_head_and_two_moco_steps_by_hand"
NORM_ONLY = f"{T}::test_norm_only_changes_group_norm_and_projection_only"
GATHER = "keys = jax.lax.all_gather(local_keys, sharding.DATA, tiled=True)"

MUTATIONS = [
    Mutation("moco_queue_offset", OBJECTIVES,
             "keys.astype(queue.dtype), (pointer, 0))",
             "keys.astype(queue.dtype), ((pointer + keys.shape[0]) % queue.shape[0], 0))",
             (QUEUE, BY_HAND), "keys written one batch past the pointer (not the oldest rows)"),
    Mutation("moco_queue_device_order", OBJECTIVES, GATHER,
             "keys = jax.lax.all_gather(local_keys, sharding.DATA, axis=1, tiled=True)"
             ".reshape(-1, local_keys.shape[-1])", (QUEUE,),
             "keys gathered interleaved (row i of every device, then row i + 1), not in global "
             "batch order"),
    Mutation("moco_queue_local_keys", OBJECTIVES, GATHER, "keys = local_keys", (QUEUE,),
             "each device enqueues its own keys only (no all-gather)"),
    Mutation("moco_ema_momentum_swapped", OBJECTIVES,
             "lambda t, o: momentum * t + (1 - momentum) * o",
             "lambda t, o: (1 - momentum) * t + momentum * o", (EMA, BY_HAND),
             "EMA with m and 1 - m swapped (the key encoder follows the query encoder at once)"),
    Mutation("moco_ema_arguments_swapped", OBJECTIVES,
             'ema(state["key_params"], params, settings.momentum)',
             'ema(params, state["key_params"], settings.momentum)', (BY_HAND,),
             "the query encoder moves towards the key encoder"),
    Mutation("moco_keys_from_stale_encoder", OBJECTIVES,
             "apply_fn(key_params, views[:, 1])", 'apply_fn(state["key_params"], views[:, 1])',
             (BY_HAND,), "keys embedded by the key encoder before its momentum update"),
    Mutation("moco_enqueue_queries", OBJECTIVES,
             'enqueue(state["queue"], state["queue_pointer"], keys, mesh)',
             'enqueue(state["queue"], state["queue_pointer"], queries, mesh)', (BY_HAND,),
             "the queries, not the keys, enter the queue"),
    Mutation("moco_views_swapped", OBJECTIVES, "queries = apply_fn(params, views[:, 0])",
             "queries = apply_fn(params, views[:, 1])", (BY_HAND,),
             "query and key embed the same view"),
    Mutation("info_nce_no_temperature", OBJECTIVES,
             "logits = jnp.concatenate([positive, negatives], axis=-1) / temperature",
             "logits = jnp.concatenate([positive, negatives], axis=-1)", (INFO_NCE, BY_HAND),
             "InfoNCE without the temperature (T = 1)"),
    Mutation("moco_temperature_not_passed", OBJECTIVES,
             'info_nce(queries, keys, state["queue"], settings.temperature)',
             'info_nce(queries, keys, state["queue"], 1.0)', (BY_HAND,),
             "moco.temperature ignored by the loss"),
    Mutation("moco_embeddings_not_normalised", OBJECTIVES,
             "return l2_normalize(head.apply({\"params\": params[PROJECTION]}, "
             "features_fn(params, images)))",
             "return head.apply({\"params\": params[PROJECTION]}, features_fn(params, images))",
             (BY_HAND,), "InfoNCE on unnormalised projections"),
    Mutation("norm_only_trains_conv_kernels", OPTIM,
             r'"norm_only": r"(.*/)?group_norm/(gamma|beta)|head/.*|projection/.*"',
             r'"norm_only": r"(.*/)?group_norm/(gamma|beta)|.*conv.*/kernel|head/.*|'
             r'projection/.*"', (NORM_ONLY,),
             "the norm_only mask also matches the convolution kernels"),
    Mutation("norm_only_frozen_get_gradients", OPTIM,
             '{"train": tx, "freeze": optax.set_to_zero()}',
             '{"train": tx, "freeze": optax.identity()}', (NORM_ONLY,),
             "frozen parameters updated by their raw gradients"),
]
