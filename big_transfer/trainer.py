"""The training loop: state, the jitted update step, evaluation, checkpoints and metrics.

`run(config, workdir)` is everything `python -m big_transfer.train` does; `build(...)` makes
the model, optimizer, sharded state and update step without touching data, so the TPU
planner compiles exactly the step that training runs. Every process runs the same code;
only process 0 writes logs and metrics, all take part in checkpoints.
"""

import contextlib
import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from big_transfer import (checkpoints, evaluate, fewshot_eval, losses, metrics, models,
                          objectives, optim, results, sharding, transfer, validate, workdirs)
from big_transfer.data import mixup, pipeline
from big_transfer.errors import TrainingError, UserError


def _all_gather(x, spec):
  """Inside shard_map: the whole of a parameter split as `spec` (FSDP)."""
  if sharding.DATA not in spec:
    return x
  return jax.lax.all_gather(x, sharding.DATA, axis=spec.index(sharding.DATA), tiled=True)


_MODEL_RNG = np.uint32(2**32 - 1)  # The model's stream: no step folds in this value.


def _if_finite(finite, updated: Callable, unchanged: Callable, branch: bool):
  """`updated()` where `finite`, else `unchanged()`: a non-finite step leaves the state as it was.

  `branch`: one `lax.cond`, for XLA:CPU, where a `where` per leaf made XLA copy every parameter
  and momentum first (R50x1's update 63 vs 24 ms, docs/performance.md). Elsewhere a `where` per
  leaf: a GPU conditional waits on the host for its predicate, and TPU programs stay as they were.
  """
  if branch:
    return jax.lax.cond(finite, updated, unchanged)
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated(), unchanged())


def make_train_step(objective, tx, schedule, mesh, batch_split: int = 1,
                    mixup_alpha: float = 0.0, seed: int = 0,
                    state_sharding: str = "replicated", param_shardings=None, *,
                    cutmix_alpha: float = 0.0, cutmix_switch_prob: float = 0.5,
                    teacher_fn=None, extra_keys: tuple[str, ...] = ()):
  """The update step (state, batch) -> (state, metrics), to be jitted with donation.

  `objective.loss` (big_transfer/objectives.py) is what is minimised; the state entries
  `extra_keys` are the objective's own (MoCo's key encoder and queue), passed to it and
  replaced by what it returns.

  MixUp / CutMix (alpha > 0) draw from fold_in(key(seed), step) and the objective's model
  (stochastic depth) from a stream of its own, folded with the micro-batch and the device: no
  RNG state to checkpoint, and a resumed run draws exactly as an uninterrupted one.

  Distillation: `teacher_fn(state["teacher"], images)` gives the targets of the objective's
  loss, the frozen teacher's logits on the images the student sees (the same crop and mix);
  the teacher is carried through the state unchanged.

  With `batch_split` k the batch is processed as k micro-batches whose mean gradients are
  averaged, equal to one pass over the whole batch. With replicated parameters each device
  accumulates the gradients of its own rows and they are averaged over the devices once per
  step (left to the partitioner, the all-reduce would run once per micro-batch).

  FSDP (`param_shardings` split over the devices) is written out per device: each
  micro-batch all-gathers the split parameters and reduce-scatters their gradients (the
  transpose of the gather); the small replicated ones are averaged once per step. XLA may
  still move them (e.g. gather once per step, or all-reduce a sum accumulated over the
  micro-batches). Left to the partitioner, the step mixed strategies instead: activations
  gathered over the whole global batch, convolutions split over channels.

  A non-finite loss or gradient leaves params and optimizer state unchanged and records the
  step in `state["bad_step"]`, so the state (and every checkpoint of it) stays finite.
  """

  def loss_and_grads(params, extra, batch, rng, gather=lambda p: p):
    """((loss, the objective's new extra state), grads)."""
    loss = lambda p: objective.loss(gather(p), extra, batch, rng)
    return jax.value_and_grad(loss, has_aux=True)(params)

  def mean_over_micro_batches(params, micro, rng, gather=lambda p: p):
    """The mean (loss, grads) over micro-batches stacked on the leading axis (objectives
    without extra state: objectives.py refuses batch_split for the others)."""
    def add(total, mb_index):
      mb, index = mb_index
      (loss, _), grads = loss_and_grads(params, {}, mb, jax.random.fold_in(rng, index), gather)
      return jax.tree.map(jnp.add, total, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(add, zeros, (micro, jnp.arange(batch_split)))
    return jax.tree.map(lambda x: x / batch_split, (loss, grads))

  per_device = lambda rng: jax.random.fold_in(rng, jax.lax.axis_index(sharding.DATA))

  # Per device: the mean over its rows of each micro-batch (the same count on every device),
  # so the mean over devices is the global mean.
  micro_spec = P(None, sharding.DATA)
  accumulate = mean_over_micro_batches
  if state_sharding == "replicated":
    accumulate = jax.shard_map(
        lambda params, micro, rng: jax.lax.pmean(
            mean_over_micro_batches(params, micro, per_device(rng)), sharding.DATA),
        mesh=mesh, in_specs=(P(), micro_spec, P()), out_specs=P(), check_vma=False)
  elif state_sharding == "fsdp":
    specs = jax.tree.map(lambda s: s.spec, param_shardings)
    gather = lambda params: jax.tree.map(_all_gather, params, specs)

    def fsdp_mean(params, micro, rng):
      loss, grads = mean_over_micro_batches(params, micro, per_device(rng), gather)
      # all_gather's transpose summed the split gradients over the devices (reduce-scatter).
      grads = jax.tree.map(lambda g, spec: g / mesh.size if sharding.DATA in spec
                           else jax.lax.pmean(g, sharding.DATA), grads, specs)
      return jax.lax.pmean(loss, sharding.DATA), grads

    accumulate = jax.shard_map(fsdp_mean, mesh=mesh, in_specs=(specs, micro_spec, P()),
                               out_specs=(P(), specs), check_vma=False)

  def step(state, batch):
    params = state["params"]
    extra = {key: state[key] for key in extra_keys}
    batch = mixup.mix(jax.random.fold_in(jax.random.key(seed), state["step"]), batch,
                      mixup_alpha, cutmix_alpha, cutmix_switch_prob)
    if teacher_fn is not None:
      batch = {**batch, "labels": teacher_fn(state["teacher"], batch["image"])}
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _MODEL_RNG), state["step"])
    if batch_split == 1 and state_sharding != "fsdp":
      (loss, extra), grads = loss_and_grads(params, extra, batch, rng)
    else:
      # Micro-batch j takes rows j, j+k, ...: each device keeps its own rows, no transfers.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape((-1, batch_split) + x.shape[1:]), 0, 1), batch)
      micro = jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, micro_spec))
      loss, grads = accumulate(params, micro, rng)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def updated():
      updates, opt_state = tx.update(grads, state["opt_state"], params)
      return optax.apply_updates(params, updates), opt_state, extra

    unchanged = lambda: (params, state["opt_state"], {key: state[key] for key in extra_keys})
    new_params, new_opt_state, new_extra = _if_finite(finite, updated, unchanged,
                                                      sharding.runs_on_cpu(mesh))
    new_state = {
        **state,  # Frozen parts (a distillation teacher) as they are.
        "step": state["step"] + 1,
        "params": new_params,
        "opt_state": new_opt_state,
        "bad_step": jnp.where(finite | (state["bad_step"] >= 0), state["bad_step"],
                              state["step"]),
        **new_extra,
    }
    return new_state, {"loss": loss, "lr": schedule(state["step"]), "grad_norm": grad_norm}

  return step


@dataclasses.dataclass
class Setup:
  """Everything about a run that does not need data."""
  model: Any
  objective: objectives.Objective  # Its apply_fn gives logits (or embeddings) from params.
  loss_fn: Callable  # Evaluation's loss against the labels (losses.eval_loss).
  schedule: optax.Schedule
  total_steps: int
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs carrying the shardings.
  init: Callable  # rng -> sharded state.
  train_step: Callable  # Jitted (state, global batch) -> (state, metrics); donates state.


def build(config: ml_collections.ConfigDict, mesh, num_classes: int,
          num_train_examples: int) -> Setup:
  sharding.check_batch_size(config.batch_size, mesh.size)
  if (config.batch_size // mesh.size) % config.batch_split:
    raise UserError(f"batch_split {config.batch_split} must divide the per-device batch "
                    f"{config.batch_size // mesh.size}.")
  durations = optim.Durations(num_train_examples, config.batch_size)
  total_steps = durations(config, "total")
  # CPUs get the same model in the form XLA:CPU runs fastest; TPU and GPU programs are unchanged.
  # A self-supervised objective trains the backbone without the classifier head.
  model = models.get_model(
      config.model.name, num_classes if config.objective == "supervised" else 0,
      dtype=jnp.dtype(config.model.dtype),
      head_zero_init=config.model.head_zero_init, head_bias_init=config.model.head_bias_init,
      residual_gain=config.model.residual_gain, drop_path_rate=config.model.drop_path_rate,
      avg_down=config.model.avg_down, for_cpu=sharding.runs_on_cpu(mesh))
  schedule = optim.make_schedule(config, durations, total_steps)
  # ---- Transfer: the test-resolution phase, test_res.steps more at constant test_res.lr ----
  test_res = config.test_res
  if test_res.steps:
    if test_res.lr is None or not test_res.pp:
      raise UserError("test_res.steps needs --config.test_res.lr and --config.test_res.pp "
                      "(configs/transfer.py's HyperRule fills both).")
    schedule = optim.then_constant(schedule, total_steps, optim.base_lr(config, test_res.lr))
    total_steps += test_res.steps
  tx = optim.make_optimizer(config, schedule)
  train_loss = losses.get(config.loss, label_smoothing=config.label_smoothing,
                          temperature=config.distill.temperature)
  loss_fn = losses.eval_loss(config.loss)
  objective = objectives.get(config, model, train_loss, mesh)

  teacher = teacher_fn = None
  if losses.uses_teacher(config.loss):
    teacher = models.get_model(config.distill.model, num_classes,
                               dtype=jnp.dtype(config.model.dtype),
                               for_cpu=sharding.runs_on_cpu(mesh))
    teacher_fn = lambda params, images: teacher.apply({"params": params}, images)

  def init_state(rng, loaded=None):
    """The state at step 0; `loaded` (config.init's params) replaces the fresh parameters it
    names (SGD's momentum starts at zero whatever the params) before the objective's extra
    state is derived from them."""
    # Parameter shapes do not depend on the resolution (global pooling before the head).
    images = jnp.zeros((1, 32, 32, 3), jnp.float32)
    params = {**objective.init_params(rng, images), **(loaded or {})}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "bad_step": jnp.full((), -1, jnp.int32),
             **objective.init_extra(params, jax.random.fold_in(rng, 1))}
    if teacher is not None:  # Placeholder weights: a new run loads config.distill.teacher.
      state["teacher"] = teacher.init(rng, images)["params"]
    return state

  shapes = jax.eval_shape(init_state, jax.random.key(0))
  shardings = sharding.state_shardings(shapes, mesh, config.state_sharding)
  shardings["step"] = shardings["bad_step"] = sharding.replicated(mesh)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  extra_keys = tuple(sorted(jax.eval_shape(objective.init_extra, shapes["params"],
                                           jax.random.key(0))))
  step = make_train_step(objective, tx, schedule, mesh, config.batch_split,
                         config.mixup_alpha, config.seed, config.state_sharding,
                         shardings["params"], cutmix_alpha=config.cutmix_alpha,
                         cutmix_switch_prob=config.cutmix_switch_prob, teacher_fn=teacher_fn,
                         extra_keys=extra_keys)
  train_step = jax.jit(
      step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
      compiler_options=sharding.compiler_options(mesh))
  return Setup(model, objective, loss_fn, schedule, total_steps, shardings,
               abstract_state, jax.jit(init_state, out_shardings=shardings), train_step)


class _Preemption(contextlib.AbstractContextManager):
  """SIGTERM (a preemption notice) -> save and exit cleanly at a step all processes agree on.

  The previous handler is restored on exit, so `run` called from a notebook or a test leaves
  the process's signal handling as it found it.
  """

  def __init__(self):
    self._signalled = False
    self._previous = None
    if jax.process_count() == 1:  # Multi-process: jax.distributed's sync manager has it.
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def __exit__(self, *exc_info):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._signalled
    return multihost_utils.reached_preemption_sync_point(step)


def _check_finite(state, last_checkpoint: int | None) -> None:
  bad_step = int(jax.device_get(state["bad_step"]))
  if bad_step >= 0:
    where = (f"checkpoint at step {last_checkpoint} is intact" if last_checkpoint is not None
             else "no checkpoint was written")
    raise TrainingError(f"Loss or gradient became NaN/Inf at step {bad_step}; the {where}. "
                        "Lower --config.lr or check the data, then rerun.")


def _train_batches(config, dataset, local_batch: int, start_step: int, subset=None,
                   test_res_start: int | None = None,
                   position: int | None = None) -> pipeline.TrainIterator:
  """This process's share of each global batch, from input `position` (saved with the
  checkpoint; None: the start of step `start_step + 1`).

  `input_sharding="process"` (default): each process reads its own shard of the split.
  `"global"`: every process reads the whole stream and keeps its rows of each global batch,
  so the batches do not depend on the process count (reproducibility checks; data read only
  in sequence is read whole by every process).
  `subset`: few-shot positions. From step `test_res_start` on, images are preprocessed with
  `test_res.pp` (the test-resolution phase).
  """
  if config.input_sharding not in ("process", "global"):
    raise UserError(f"Unknown input_sharding {config.input_sharding!r}; valid: process, global.")
  if config.input_sharding == "process":
    batch, rows = local_batch, None
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
  else:
    batch, rows, shard = config.batch_size, (jax.process_index() * local_batch,
                                             (jax.process_index() + 1) * local_batch), {}
  then = None if test_res_start is None else (test_res_start * batch, config.test_res.pp)
  return pipeline.train_iterator(
      dataset, config.train_split, config.pp_train, batch, seed=config.seed,
      start=start_step * batch if position is None else position, rows=rows, then=then,
      shuffle_buffer=config.shuffle_buffer, cache=config.cache, subset=subset,
      repeats=config.repeated_aug, **shard)


def _num_classes(config, dataset) -> int:
  expected = config.get("num_classes")
  if expected is not None and expected != dataset.num_classes:
    raise UserError(f"Config expects {expected} classes but dataset {dataset.name!r} has "
                    f"{dataset.num_classes}; set --config.num_classes={dataset.num_classes}.")
  return dataset.num_classes


def _linear_probe(config, dataset, setup, local_batch: int, mesh):
  """(params, eval batches) -> the metrics of a ridge probe on the pre-logits, fitted to
  `probe_shots` random training examples per class (self-supervised objectives)."""
  subset = pipeline.few_shot_subset(dataset, config.train_split, config.probe_shots, config.seed)
  step = evaluate.make_features_step(setup.objective.features_fn, mesh)

  def probe(params, eval_batches):
    train_batches = pipeline.eval_iterator(
        dataset, config.train_split, config.pp_eval, local_batch, subset=subset,
        process_index=jax.process_index(), process_count=jax.process_count())
    train = evaluate.features(step, params, train_batches, mesh)
    test = evaluate.features(step, params, eval_batches, mesh)
    return evaluate.ridge_probe(*train, *test, dataset.num_classes)

  return probe


def _train_loop(config, setup, state, batches, mesh, ckpt, writer, evaluators):
  """Steps from the state's step to the end; returns (state, preempted). `evaluators`:
  (every_steps, fn(step, params)) pairs, run every that many steps (0: never) before the
  last; the caller evaluates at the end."""
  start_step = int(jax.device_get(state["step"]))
  progress = metrics.Progress(setup.total_steps, config.batch_size, start_step)
  with _Preemption() as preemption:
    for step in range(start_step + 1, setup.total_steps + 1):
      state, step_metrics = setup.train_step(state, sharding.to_global(next(batches), mesh))
      is_last = step == setup.total_steps
      if step == start_step + 1 and step % config.log_every_steps and not is_last:
        # This step compiled: the throughput counts from its end (unless it is logged itself).
        jax.block_until_ready(step_metrics)
        progress.restart(step)
      if step % config.log_every_steps == 0 or is_last:
        _check_finite(state, ckpt.latest_step())
        scalars = {f"train/{k}": v for k, v in jax.device_get(step_metrics).items()}
        scalars.update(progress.report(step))
        writer.write(step, scalars)
        metrics.log(f"step {step}/{setup.total_steps}: loss {scalars['train/loss']:.4f} "
                    f"lr {scalars['train/lr']:.4g} {scalars['img_per_sec']:.1f} img/s "
                    f"ETA {metrics.format_eta(scalars['eta_sec'])}")
      preempted = preemption.reached(step)
      if step % ckpt.every_steps == 0 or is_last or preempted:
        _check_finite(state, ckpt.latest_step())
        ckpt.save(step, state, batches.position)
      if preempted:
        metrics.log(f"Preempted (SIGTERM): saved step {step}; rerun the same command to "
                    "resume.")
        return state, True
      for every_steps, evaluate_fn in evaluators:
        if every_steps and step % every_steps == 0 and not is_last:
          jax.block_until_ready(state)  # Steps still running count as training, not eval.
          with progress.paused():
            evaluate_fn(step, state["params"])
  return state, False


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Checks the config, resolves its data (and a transfer config's HyperRule), locks the
  workdir (one run at a time) and trains or resumes: `_run`. Nothing is written before the
  lock, so a refused config or unprepared dataset leaves the workdir as it was."""
  started = time.monotonic()
  validate.check_config(config)
  # ---- Transfer: the data, VTAB splits, HyperRule fields (transfer.py) ----
  resolved = transfer.resolve(config)
  for note in resolved.notes:
    metrics.log(note)
  validate.check_config(resolved.config)  # Now with the HyperRule's choices.
  with workdirs.Lock(workdir):
    workdirs.check_resumable(resolved.config, workdir)  # As config.json records it.
    return _run(resolved.config, resolved.dataset, workdir, started)


def _run(config: ml_collections.ConfigDict, dataset, workdir: str,
         started: float) -> dict[str, float]:
  """Trains (or resumes) to `total_*` steps, then evaluates; returns the final eval metrics
  (empty when preempted). Checkpoints being written are completed whatever happens."""
  mesh = sharding.make_mesh()
  subset = transfer.train_subset(config, dataset)
  num_train = dataset.num_examples(config.train_split) if subset is None else len(subset)
  num_classes = _num_classes(config, dataset)
  setup = build(config, mesh, num_classes, num_train)
  local_batch = config.batch_size // jax.process_count()
  eval_batch = config.eval_batch_size or config.batch_size
  sharding.check_batch_size(eval_batch, mesh.size, "eval_batch_size")
  local_eval_batch = eval_batch // jax.process_count()
  fewshot = fewshot_eval.from_config(config, setup.model, mesh)  # Its data checked up front.

  with jax.set_mesh(mesh):
    ckpt = checkpoints.Manager(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
    writer = metrics.Writer(workdir, config.tensorboard)
    try:
      state = ckpt.restore(setup.abstract_state)
      if state is None:
        # ---- Transfer: config.init's backbone, the head as config.init_head says ----
        params = (transfer.init_params(config, setup.model.num_classes,
                                       setup.state_shardings["params"]) if config.init else None)
        state = setup.init(jax.random.key(config.seed), params)
        if "teacher" in state:
          state["teacher"] = transfer.teacher_params(config, num_classes,
                                                     setup.state_shardings["teacher"])
        workdirs.record_config(config, dataset.class_names(), workdir)
      start_step = int(jax.device_get(state["step"]))
      num_params = sum(np.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"]))
      shots = f" ({config.shots} per class)" if config.shots else ""
      metrics.log(f"{config.model.name}: {num_params:,} parameters; {dataset.name} "
                  f"{num_train:,} train images{shots}, "
                  f"{dataset.num_classes} classes; batch {config.batch_size} over "
                  f"{jax.device_count()} devices ({jax.process_count()} processes); "
                  f"{setup.total_steps} steps.")
      if setup.objective.evaluator == "linear_probe":
        score = _linear_probe(config, dataset, setup, local_eval_batch, mesh)
      else:
        eval_step = evaluate.make_classification_step(setup.objective.apply_fn,
                                                       setup.loss_fn, mesh)
        score = lambda params, batches: evaluate.classification(eval_step, params, batches, mesh)

      def run_eval(step, params):
        batches = pipeline.eval_iterator(
            dataset, config.eval_split, config.pp_eval, local_eval_batch,
            process_index=jax.process_index(), process_count=jax.process_count())
        result = score(params, batches)
        writer.write(step, {f"eval/{k}": v for k, v in result.items()})
        metrics.log(f"step {step}: eval {config.eval_split} accuracy "
                    f"{100 * result['accuracy']:.2f}% (top-5 {100 * result['top5']:.2f}%) over "
                    f"{int(result['count'])} images, loss {result['loss']:.4f}")
        return result

      # Periodic evaluators: classification, then the optional extras (config.fewshot).
      evaluators = [(config.eval_every_steps, run_eval)]
      if fewshot:
        evaluators.append((config.fewshot.every_steps,
                           lambda step, params: fewshot.log(step, params, writer)))

      if start_step >= setup.total_steps:
        metrics.log(f"Run already finished ({start_step}/{setup.total_steps} steps); "
                    "not retraining.")
      else:
        test_res_start = (setup.total_steps - config.test_res.steps if config.test_res.steps
                          else None)
        batches = _train_batches(config, dataset, local_batch, start_step, subset, test_res_start,
                                 ckpt.input_position)
        state, preempted = _train_loop(config, setup, state, batches, mesh, ckpt, writer,
                                       evaluators)
        if preempted:
          return {}
      result = run_eval(setup.total_steps, state["params"])
      for _, evaluate_fn in evaluators[1:]:
        evaluate_fn(setup.total_steps, state["params"])
    finally:
      ckpt.close()
      writer.close()
  # ---- Transfer: results.json, read by big_transfer.tabulate ----
  results.write(workdir, config, result, steps=setup.total_steps,
                wall_s=time.monotonic() - started, resumed_from_step=start_step)
  metrics.log(f"Final {config.eval_split} accuracy: {100 * result['accuracy']:.2f}% (top-5 "
              f"{100 * result['top5']:.2f}%)")
  return result
