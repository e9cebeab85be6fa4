"""HPT: hierarchical pretraining (Reed et al. 2021, arXiv 2103.12718) of a BiT model with
MoCo-v2 (Chen et al. 2020, arXiv 2003.04297), on the same engine as upstream and transfer.

Continue a base model self-supervised on a source, then on the target, then transfer:

    python -m big_transfer.train --config=configs/hpt.py \
        --config.init=BiT-M-R50x1.npz --config.dataset=folder:ROOT --workdir=DIR \
        [--config.trainable=norm_only]

`--config.init` is the base: a released .npz or the workdir of one of our runs (supervised or
an earlier HPT stage; its projection head is dropped and a fresh one starts); without it the
model starts from random weights (self-supervised from scratch). `--config.dataset` is the
data (images only; ROOT/train/<class>/*.jpg, or a TFDS name): the source stage, then a second
run with the target and `--config.init=` the first run's workdir. `trainable=norm_only` trains
only the GroupNorm scale/bias and the projection (HPT's BN-only variant). The result, the
workdir, loads as `--config.init` of configs/transfer.py.

Recipe (HPT §3 / MoCo-v2): SGD momentum 0.9, lr 0.03 at batch 256, cosine, wd 1e-4 (on
kernels, BiT's convention), queue 65,536, temperature 0.2, key encoder momentum 0.999, 2-layer
MLP projection 2048-2048-128, 5000 steps (HPT: enough, and longer overfits small targets).
Views: random resized crop (20-100% of the area), colour jitter (p 0.8), grayscale (p 0.2),
Gaussian blur (p 0.5), flip. Evaluated at the end by a ridge probe on the frozen pre-logits of
`probe_shots` train images per class. Cost for R50x1 in training FLOPs: 5000 steps x 256 images
x 2 views at 224 px = 42 PFLOP (a query forward and backward and a key forward per image).

`get_config("cpu")`: the CPU experiment of docs/hpt.md (R14x1 at 16 px, batch 64, queue 4096,
200 steps; no blur, as SimCLR on CIFAR, at 16 px it would wipe the image): `python -m
big_transfer.experiments.hpt_cifar10 --data_root=.../cifar10 --workdir=DIR` runs it all.
"""

from big_transfer import config_common
from big_transfer.errors import UserError

VIEWS = ("decode|views(2)|inception_crop({size}, 0.2)|color_jitter(0.4, 0.4, 0.4, 0.1, 0.8)|"
         "random_grayscale(0.2)|{blur}flip_lr|value_range(-1, 1)")


def get_config(arg=None):
  config = config_common.base()
  config.objective = "moco"
  config.dataset = ""  # Set --config.dataset (folder:ROOT or a TFDS name).
  config.train_split, config.eval_split = "train", "test"
  config.model.name = "BiT-M-R50x1"
  config.pp_train = VIEWS.format(size=224, blur="gaussian_blur(0.5, 0.1, 2.0)|")
  config.pp_eval = "decode|resize(224)|value_range(-1, 1)"
  config.batch_size = 256
  config.total_steps = 5000
  config.lr = 0.03
  config.lr_batch_ref = 256
  config.wd = 1e-4
  config.schedule.kind = "cosine"
  config.moco.queue_size = 65_536
  config.moco.temperature = 0.2
  config.moco.momentum = 0.999
  config.probe_shots = 100
  config.eval_every_steps = 0  # The probe at the end.
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  if arg == "cpu":
    config.model.name = "R14x1"
    config.pp_train = VIEWS.format(size=16, blur="")
    config.pp_eval = "decode|resize(16)|value_range(-1, 1)"
    config.batch_size = 64
    config.total_steps = 200
    config.moco.queue_size = 4096
    config.cache = True
    config.log_every_steps = 25
    config.checkpoint_every_steps = 100
  elif arg:
    raise UserError(f"Unknown configs/hpt.py argument {arg!r}; valid: cpu (or none).")
  return config
