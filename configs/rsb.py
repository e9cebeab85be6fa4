"""ResNet strikes back (Wightman, Touvron, Jégou 2021, arXiv 2110.00476, Table 1): the A1, A2
and A3 ImageNet training procedures of timm, on the BiT ResNet-v2 (GN+WS) models.

    python -m big_transfer.train --config=configs/rsb.py:A2,model=R50x1 \
        --workdir=gs://.../rsb_a2 --config.data_dir=gs://.../tensorflow_datasets --distributed

The argument: the procedure (A1, A2 or A3; default A2), then `model=` (default R50x1) and
`local` (a few minutes on a laptop, below). Every procedure: LAMB at batch 2048 (trust ratio
and decoupled weight decay on kernels only, global gradient norm clipped at 1.0), cosine decay
after 5 warmup epochs, BCE (mean over classes, losses.bce), MixUp + CutMix (alpha 1.0, switched
per batch with probability 0.5), RandAugment (2 ops, magnitude std 0.5), inception crop (8-100%
of the area) and flip, evaluation at 224 px with a 0.95 centre crop (resize 235, crop 224).

    procedure  epochs  lr    wd    smoothing  mixup  RandAug  repeats  drop path  train/test
    A1         600     5e-3  0.01  0.1        0.2    m7       3        0.05       224/224
    A2         300     5e-3  0.02  -          0.1    m7       3        0.05       224/224
    A3         100     8e-3  0.02  -          0.1    m6       -        -          160/224

The paper's ResNet-50 (BN, torchvision layout) reaches 80.4 / 79.8 / 78.1% top-1 on ImageNet
(A1 / A2 / A3); these configs train BiT's GN+WS ResNet-v2, to which the numbers are a target,
not a promise. Differences from timm, on purpose: pixels in [-1, 1] (BiT's models) rather than
ImageNet mean/std; the learning rate scales linearly with the batch (lr_batch_ref 2048; timm
scales LAMB's by the square root when it derives it).

Cost (R50x1, ~24.6 GFLOPs per 224 px training image): A1 769M images = 19 EFLOP, A2 384M =
9.5 EFLOP, A3 128M at 160 px = 1.6 EFLOP. At big_vision's ~930 img/s per TPU v3 chip for
BiT-R50x1: A1 ~230, A2 ~115, A3 ~20 chip-hours (v3-32: 16 chips). Check memory first:
`python -m big_transfer.plan --config=configs/rsb.py:A2,model=R50x1 --topology=v3:4x4` (R50x1:
3.6 of 16 GiB per core at 64 images per core, float32).

`local`: the same procedure on the embedded sklearn digits (1437 train images, 8x8 px
upsampled): R14x1 (unless `model=`), 24 px training (A3: 20) and a 0.95 crop of 25 px for
evaluation, batch 64 at the procedure's lr without batch scaling, 1/25 of the epochs (A1 24,
A2 12, A3 4): about 2-8 minutes on 2 CPU cores.

    python -m big_transfer.train --config=configs/rsb.py:A3,local --workdir=/tmp/rsb_a3
"""

import math

from big_transfer import config_common
from big_transfer.errors import UserError

PROCEDURES = {
    # epochs, lr, wd, label smoothing, mixup alpha, RandAugment magnitude, repeats,
    # drop path rate, train / test resolution.
    "A1": dict(epochs=600, lr=5e-3, wd=0.01, smoothing=0.1, mixup=0.2, magnitude=7,
               repeats=3, drop_path=0.05, train_res=224, test_res=224),
    "A2": dict(epochs=300, lr=5e-3, wd=0.02, smoothing=0.0, mixup=0.1, magnitude=7,
               repeats=3, drop_path=0.05, train_res=224, test_res=224),
    "A3": dict(epochs=100, lr=8e-3, wd=0.02, smoothing=0.0, mixup=0.1, magnitude=6,
               repeats=1, drop_path=0.0, train_res=160, test_res=224),
}
TEST_CROP = 0.95
LOCAL_EPOCH_DIVISOR = 25


def _parse(arg):
  """"A2,model=R50x1,local" -> ("A2", {"model": "R50x1", "local": True})."""
  procedure, *options = [a.strip() for a in (arg or "A2").split(",")]
  if procedure not in PROCEDURES:
    raise UserError(f"Unknown procedure {procedure!r} in configs/rsb.py:{arg}; valid: "
                    f"{', '.join(PROCEDURES)} (e.g. configs/rsb.py:A2,model=R50x1).")
  values = {"model": None, "local": False}
  for option in options:
    key, sep, value = option.partition("=")
    if key == "model" and sep and value:
      values["model"] = value
    elif option == "local":
      values["local"] = True
    else:
      raise UserError(f"Bad option {option!r} in configs/rsb.py:{arg}; expected model=NAME "
                      "or local.")
  return procedure, values


def _pp(train_res: int, test_res: int, magnitude: int, decode_and_crop: bool):
  """(pp_train, pp_eval): inception crop (8-100%), flip, RandAugment; eval crop 0.95."""
  crop = (f"decode_jpeg_and_inception_crop({train_res}, 0.08)" if decode_and_crop
          else f"decode|inception_crop({train_res}, 0.08)")
  train = f"{crop}|flip_lr|randaug(2, {magnitude}, 0.5)|value_range(-1, 1)"
  resize = math.floor(test_res / TEST_CROP)  # timm: int(math.floor(img_size / crop_pct)).
  return train, f"decode|resize_small({resize})|central_crop({test_res})|value_range(-1, 1)"


def get_config(arg=None):
  procedure, values = _parse(arg)
  recipe = PROCEDURES[procedure]
  config = config_common.base()
  config.dataset = "imagenet2012"
  config.num_classes = 1000
  config.train_split, config.eval_split = "train", "validation"
  config.model.name = values["model"] or "R50x1"
  config.model.drop_path_rate = recipe["drop_path"]
  # A random head (timm's): LAMB scales each update by the parameter's norm, so a zero head
  # (BiT's transfer init) would never grow.
  config.model.head_zero_init = False

  config.optimizer = "lamb"
  config.batch_size = 2048
  config.lr = recipe["lr"]
  config.lr_batch_ref = 2048
  config.wd = recipe["wd"]
  config.wd_mask = r".*/kernel"  # No decay (nor trust ratio) on biases and GroupNorm params.
  config.grad_clip_norm = 1.0
  config.schedule.kind = "cosine"
  config.schedule.warmup_epochs = 5
  config.total_epochs = recipe["epochs"]

  config.loss = "bce"
  config.label_smoothing = recipe["smoothing"]
  config.mixup_alpha = recipe["mixup"]
  config.cutmix_alpha = 1.0
  config.cutmix_switch_prob = 0.5
  config.repeated_aug = recipe["repeats"]
  config.pp_train, config.pp_eval = _pp(recipe["train_res"], recipe["test_res"],
                                        recipe["magnitude"], decode_and_crop=True)
  config.shuffle_buffer = 50_000
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2000

  if values["local"]:
    config.dataset = "sklearn_digits"
    config.num_classes = 10
    config.train_split, config.eval_split = "train", "test"
    config.model.name = values["model"] or "R14x1"
    config.batch_size = 64
    config.lr_batch_ref = 0
    config.total_epochs = recipe["epochs"] / LOCAL_EPOCH_DIVISOR
    config.schedule.warmup_epochs = 5 / LOCAL_EPOCH_DIVISOR
    scale = 24 / 224  # The procedure's resolutions scaled to the 24 px of configs/demo.py.
    config.pp_train, config.pp_eval = _pp(round(recipe["train_res"] * scale),
                                          round(recipe["test_res"] * scale),
                                          recipe["magnitude"], decode_and_crop=False)
    config.shuffle_buffer = 2000
    config.cache = True
    config.log_every_steps = 20
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 2
  return config
