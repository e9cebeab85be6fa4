"""The embedded default: the BiT upstream recipe scaled down to scikit-learn's 8x8 digits.

    python -m big_transfer.train --config=configs/demo.py --workdir=/tmp/bit_demo

SGD momentum 0.9, lr 0.03 x batch/256, linear warmup, staircase /10 decays, weight decay 1e-4
on kernels, random crop + random flip, pixels in [-1, 1]; a BiT-R14x1 (the real GN+WS
ResNet-v2 with one unit per block) at 24 px. Expected: ~96% test accuracy on the 360 held-out
digits in about 4 minutes on 2 CPU cores. The dataset ships with scikit-learn and is built as
a TFDS dataset on first use (into --config.data_dir, default ~/tensorflow_datasets).
"""

from big_transfer import config_common


def get_config(arg=None):
  del arg
  config = config_common.base()
  config.dataset = "sklearn_digits"
  config.num_classes = 10
  config.train_split, config.eval_split = "train", "test"
  # Digits are 8x8: upsample, then crop and flip as the upstream recipe does.
  config.pp_train = "decode|resize(28)|random_crop(24)|flip_lr|value_range(-1, 1)"
  config.pp_eval = "decode|resize(24)|value_range(-1, 1)"
  config.shuffle_buffer = 2000
  config.cache = True

  config.model.name = "R14x1"
  config.batch_size = 64
  config.total_epochs = 12.0
  config.lr = 0.03
  config.lr_batch_ref = 256
  config.wd = 1e-4
  config.schedule.warmup_steps = 20
  config.schedule.decay_epochs = (6, 9, 11)

  config.log_every_steps = 20
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  return config
