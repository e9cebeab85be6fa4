"""The config schema: every key the trainer reads, with neutral defaults.

Config files (`configs/*.py`) start from `base()` and set their recipe explicitly, so every
config accepts the same `--config.key=value` overrides and a typo in any of them fails.
"""

import ml_collections
from ml_collections import config_dict


def base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data. `dataset`: a TFDS name (prepared under data_dir) or the embedded sklearn_digits.
  config.dataset = ""
  config.data_dir = config_dict.placeholder(str)
  config.num_classes = config_dict.placeholder(int)  # Checked against the dataset when set.
  # What to predict: "" the `label` (or `labels`) feature; another ClassLabel feature,
  # "FEATURE:N" (its values in N bins) or a derived label (big_transfer/data/labels.py).
  config.label = ""
  config.train_split = "train"
  config.eval_split = "test"
  config.pp_train = ""
  config.pp_eval = ""
  config.shuffle_buffer = 10_000
  config.cache = False
  config.input_sharding = "process"  # Or "global": batches independent of the process count.
  config.mixup_alpha = 0.0  # One lambda ~ Beta(a, a) per batch (HyperRule: 0.1 from 20k images).
  # CutMix, one box per batch; with MixUp also on, CutMix is used on a batch with probability
  # cutmix_switch_prob, else MixUp (ResNet strikes back: alpha 1.0, switch 0.5).
  config.cutmix_alpha = 0.0
  config.cutmix_switch_prob = 0.5
  # Repeated augmentation (Hoffer et al. 2020): each example read comes `repeated_aug` times in a
  # row, each copy augmented with its own draws; epochs count the copies (as timm's sampler).
  config.repeated_aug = 1
  config.shots = config_dict.placeholder(int)  # Train on this many examples per class (seed).

  # Model (big_transfer.models.get_model).
  config.model = ml_collections.ConfigDict()
  config.model.name = "R50x1"
  config.model.dtype = "float32"  # Compute dtype; parameters stay float32.
  config.model.head_zero_init = True
  config.model.head_bias_init = 0.0
  # Training-recipe options (big_transfer/models/bit.py), off for the released architecture.
  config.model.residual_gain = False  # Zero-initialised residual gains (Bag of Tricks §3.1).
  config.model.drop_path_rate = 0.0  # Stochastic depth at the last unit, 0 at the first.
  config.model.avg_down = False  # ResNet-D average-pool shortcuts (Bag of Tricks §4.2).
  # Start from a checkpoint: a BiT .npz or a run's workdir (its newest checkpoint's params).
  # Its model must be config.model.name's. `init_head`: "reset" a zero head of the task's
  # classes (transfer), "keep" the file's head, "auto" keep it when the class counts match.
  config.init = ""
  config.init_head = "reset"

  # What is minimised (big_transfer/objectives.py): "supervised" (`loss` on the labels) or
  # "moco" (MoCo-v2 on two views of each image, labels unused; HPT, configs/hpt.py).
  config.objective = "supervised"
  config.moco = ml_collections.ConfigDict()
  config.moco.queue_size = 65_536  # Negatives: keys of earlier batches (a multiple of batch).
  config.moco.temperature = 0.2
  config.moco.momentum = 0.999  # Of the key encoder's moving average.
  config.moco.proj_hidden = 2048  # The 2-layer MLP projection head: hidden and output width.
  config.moco.proj_dim = 128
  # Self-supervised runs are evaluated by a ridge probe on the pre-logits fitted to this many
  # random `train_split` examples per class (evaluate.ridge_probe).
  config.probe_shots = 100
  # Which parameters train: "all", or "norm_only" (GroupNorm scale/bias, the head and the
  # projection; HPT's BN-only variant). Frozen ones are not updated, nor decayed.
  config.trainable = "all"

  # Optimization. Durations: <name>_steps, _examples or _epochs (the first one set wins).
  config.loss = "softmax_xent"  # Or sigmoid_xent, bce (mean over classes), distill_kl.
  config.label_smoothing = 0.0  # Targets (1 - eps) y + eps / classes.
  # Knowledge distillation (loss distill_kl): the frozen teacher sees the student's images
  # (the same crop and mix) and its logits are the targets. `teacher`: a BiT .npz or a run's
  # workdir whose model is `model` (a released architecture) with the task's classes.
  config.distill = ml_collections.ConfigDict()
  config.distill.teacher = ""
  config.distill.model = ""
  config.distill.temperature = 1.0
  config.batch_size = 4096  # Global, over all devices of all processes.
  config.eval_batch_size = config_dict.placeholder(int)  # Global; unset: batch_size.
  config.batch_split = 1  # Gradient accumulation over this many micro-batches.
  config.state_sharding = "replicated"  # Or "fsdp": parameters split over the devices.
  config.total_steps = config_dict.placeholder(int)
  config.total_examples = config_dict.placeholder(int)
  config.total_epochs = config_dict.placeholder(float)
  config.lr = 0.03
  config.lr_batch_ref = 256  # lr is per this many examples; 0 = no batch scaling.
  config.optimizer = "sgd"  # Or "lamb" (ResNet strikes back), see optim.make_optimizer.
  config.momentum = 0.9  # SGD only.
  # sgd: coupled L2 (grad += wd * param), as in the paper's TF code; lamb: decoupled.
  config.wd = 1e-4
  config.wd_mask = r".*/kernel"
  config.grad_clip_norm = config_dict.placeholder(float)
  config.schedule = ml_collections.ConfigDict()
  config.schedule.kind = "stair"  # Or "cosine".
  config.schedule.warmup_steps = config_dict.placeholder(int)
  config.schedule.warmup_epochs = config_dict.placeholder(float)
  config.schedule.decay_steps = config_dict.placeholder(tuple)
  config.schedule.decay_epochs = config_dict.placeholder(tuple)
  config.schedule.decay_factor = 0.1
  # Test-resolution fine-tuning: `steps` more steps after the schedule at constant lr
  # `test_res.lr` (per lr_batch_ref, as `lr`), training on images preprocessed by
  # `test_res.pp` (the evaluation's resolution). 0 steps: off.
  config.test_res = ml_collections.ConfigDict()
  config.test_res.steps = 0
  config.test_res.lr = config_dict.placeholder(float)
  config.test_res.pp = config_dict.placeholder(str)

  # Few-shot linear evaluation of the pre-logits during training (big_transfer/fewshot_eval.py,
  # big_vision's defaults), logged as fewshot/<dataset>_<k>shot; off while `dataset` is "".
  config.fewshot = ml_collections.ConfigDict()
  config.fewshot.dataset = ""  # TFDS name (in data_dir) or folder:ROOT.
  config.fewshot.train_split = "train"  # The shots are picked from it.
  config.fewshot.test_split = "test"
  config.fewshot.pp = ""  # "": pp_eval.
  config.fewshot.shots = (1, 5, 10, 25)
  config.fewshot.seeds = 3
  config.fewshot.l2_reg = 2.0 ** 10
  config.fewshot.every_steps = 0  # 0: only at the end.
  config.fewshot.batch_size = config_dict.placeholder(int)  # Global; unset: eval batch size.

  # Bookkeeping.
  config.log_every_steps = 50
  config.eval_every_steps = 1000  # 0: only at the end.
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  # TensorBoard events in the workdir. Written through TensorFlow's own file system, which
  # reaches Cloud Storage but no emulator nor other store (docs/cloud_storage.md): turn off to
  # run on such a workdir with metrics.jsonl alone.
  config.tensorboard = True
  return config


def upstream(model: str, *, dataset: str, num_classes: int, loss: str, total_epochs: float,
             decay_epochs: tuple[float, ...]) -> ml_collections.ConfigDict:
  """The BiT upstream recipe (paper arXiv 1912.11370 §3.3): SGD momentum 0.9,
  lr 0.03 x batch/256, batch 4096, 5000 warmup steps, /10 stair decays, wd 1e-4,
  inception crop 224 + random flip, pixels in [-1, 1]."""
  config = base()
  config.dataset = dataset
  config.num_classes = num_classes
  config.pp_train = "decode|inception_crop(224)|flip_lr|value_range(-1, 1)"
  config.pp_eval = "decode|resize(224)|value_range(-1, 1)"
  config.model.name = model
  config.loss = loss
  if loss == "sigmoid_xent":  # Start every binary classifier near "absent" (big_vision BiT-M).
    config.model.head_bias_init = -10.0
  config.batch_size = 4096
  config.lr = 0.03
  config.lr_batch_ref = 256
  config.wd = 1e-4
  config.total_epochs = total_epochs
  config.schedule.warmup_steps = 5000
  config.schedule.decay_epochs = decay_epochs
  return config


def transfer(task, model: str, shots: int | None = None) -> ml_collections.ConfigDict:
  """BiT-HyperRule transfer of `model` to `task` (a data.tasks.Task), paper §3.3: SGD momentum
  0.9, lr 0.003 at batch 512, no weight decay, zero-initialised head, softmax cross-entropy.

  The data-dependent choices (total steps, warmup, decays, MixUp, resolution, the
  test-resolution phase's lr and preprocessing) are left unset here: `transfer.resolve` fills
  those still unset after the command line's overrides from the training set's size and
  image area (big_transfer/hyperrule.py), so any of them can be overridden.
  """
  config = base()
  config.task = task.name
  config.dataset = task.dataset
  config.label = task.label
  config.train_split, config.eval_split = task.train_split, task.eval_split
  config.shots = shots
  config.model.name = model
  config.model.head_zero_init = True
  config.loss = "softmax_xent"
  config.batch_size = 512
  config.lr = 0.003
  config.lr_batch_ref = 512
  config.wd = 0.0
  config.momentum = 0.9

  # Filled by the HyperRule where still unset (None) when the run starts.
  config.mixup_alpha = config_dict.placeholder(float)
  config.pp_train = config_dict.placeholder(str)
  config.pp_eval = config_dict.placeholder(str)
  config.hyperrule = ml_collections.ConfigDict()
  # Where the lr drops, as fractions of the steps: "released" (the released code's table)
  # 40/60/80% below 20k examples, else 30/60/90%; "paper" 30/60/90% in every regime.
  config.hyperrule.decays = "released"
  # Images from 96x96 px: "paper" resize 448, crop 384; "released" 512/480 (smaller: 160/128).
  config.hyperrule.resolution = "paper"
  config.hyperrule.flip = task.flip  # Random horizontal flips (off where they change the label).
  config.hyperrule.crop = task.crop  # Random crops (off where they change the label).
  config.hyperrule.decode = task.decode  # The preprocessing's first op(s).

  config.shuffle_buffer = 50_000
  config.log_every_steps = 25
  config.eval_every_steps = 0  # Only at the end.
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  return config


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set, as `--config.key=value` flags would: the copy is
  locked (as config_flags locks the command line's) so that an unknown key is a KeyError."""
  config = config.copy_and_resolve_references().lock()
  config.update_from_flattened_dict(overrides)
  return config
