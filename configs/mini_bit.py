"""The miniature BiT experiment: BiT-S upstream and BiT-HyperRule transfer, scaled to CIFAR-10 on
two CPU cores. Run all of it (data subsets, upstream, linear probes, fine-tuning, scratch
baselines, table) with

    python -m big_transfer.experiments.mini_bit --data_root=DATA --workdir=DIR \
        [--source_per_class=5000] [--seeds=3]

DATA holds CIFAR-10 as train/<class>/*.jpg and test/<class>/*.jpg (classes in CIFAR-10's order
when sorted by name: airplane ... truck). The experiment writes image folders of symlinks:
source = classes 0-4 (airplane, automobile, bird, cat, deer), N training images each;
target = classes 5-9 (dog, frog, horse, ship, truck). The configs alone:

    python -m big_transfer.train --config=configs/mini_bit.py:upstream,root=DIR/data/source5000 \
        --workdir=DIR/upstream5000
    python -m big_transfer.train --config=configs/mini_bit.py:transfer,root=DIR/data/target \
        --config.init=DIR/upstream5000 --config.seed=0 --workdir=DIR/finetune/seed0

(scratch: the transfer config without `init`, at its own `lr`).

Upstream: BiT-S (paper §3.3, configs/bit_s.py) scaled down. "paper -> here: why".
- Data: ILSVRC-2012 (1.28M images, 1000 classes) -> 5 classes x 5,000 (or 1,000): CPU.
- Model: R50x1 ... R152x4 -> R26x1 (13.9M parameters): CPU.
- Images: inception crop 224 (5-100% of the area) + flip -> inception crop 32 (25-100%) + flip:
  a 5% crop of a 32 px image is 7x7 pixels.
- Batch 4096, lr 0.03 per 256 -> batch 128, the same rate (0.015): 0.1 per 256 diverged (loss
  19 at step 50).
- Length 90 epochs (28k steps) -> 50,000 examples (391 steps; 2 epochs of 25,000 or 10 of
  5,000): 13 min on 2 cores, the same compute for both source sizes, so that the whole
  experiment fits 45 minutes with room for a loaded machine.
- Warmup 5000 steps (18%) -> 5,000 examples (10%); lr /10 at epochs 30, 60, 80 of 90 -> at
  1/3, 2/3, 8/9 of the examples (the same shape); weight decay 1e-4 and softmax kept.

Transfer: BiT-HyperRule (configs/transfer.py:task=folder:ROOT,model=R26x1,shots=10, paper
§3.3) scaled down. Kept: the small regime (< 20k examples: warmup 20% of the steps, lr /10 at
40/60/80%, no MixUp), SGD momentum 0.9, no weight decay, the zero head, the 1.25 resize/crop
ratio.
- Batch 512 -> 25: CPU (512 would show each of the 50 images ~10 times per step).
- lr 0.003 at batch 512 -> 0.003 per step (`lr_batch_ref=0`): with 50 training images, a batch
  of 512 and one of 25 average the gradients of the same images, so the linear scaling to the
  batch (0.00015 at 25) does not apply.
- 500 steps, warmup 100 -> 100 steps (50 passes over the 50 images), warmup 20: CPU. The
  rule's small-regime length is a fixed step count, not tied to the dataset's size (§3.3), so
  it is scaled like the compute: 9 transfer runs (3 seeds x fine-tune + 2 scratch rates) share
  the 45 minutes with the upstream.
- Resize 160, random crop 128, eval 128 -> resize 40, random crop 32, eval 32: 128 px costs
  16x the compute.
- Test-resolution phase: off (`test_res.steps=0`; at 32 px when set with
  `--config.test_res.steps=N`); not part of the measured table.

Cost, measured on 2 cores (2026-11-27, other jobs at nice 19): 13 min for the upstream (~78
img/s), ~80 s per transfer run (100 steps of 25 images at 32 px, compile and the 1,000 test
images included); the whole experiment 25.4 min wall, 32.5 CPU-min.
"""

import ml_collections

from big_transfer import config_common
from configs import transfer as transfer_config  # Run from the repository root, as train.

MODEL = "R26x1"
SOURCE_CLASSES = 5
PP_EVAL = "decode|resize(32)|value_range(-1, 1)"


def _parse(arg: str) -> tuple[str, dict]:
  kind, *items = (arg or "").split(",")
  options = dict(item.split("=", 1) for item in items if "=" in item)
  if kind not in ("upstream", "transfer") or "root" not in options:
    raise ValueError(f"configs/mini_bit.py:{arg}: expected upstream,root=DIR or "
                     "transfer,root=DIR.")
  return kind, options


def upstream(root: str) -> ml_collections.ConfigDict:
  config = config_common.base()
  config.dataset = f"folder:{root}"
  config.num_classes = SOURCE_CLASSES
  config.pp_train = "decode|inception_crop(32, 0.25)|flip_lr|value_range(-1, 1)"
  config.pp_eval = PP_EVAL
  config.model.name = MODEL
  config.loss = "softmax_xent"
  config.batch_size = 128
  config.lr = 0.03
  config.lr_batch_ref = 256
  config.wd = 1e-4
  config.total_examples = 50_000
  config.schedule.warmup_examples = 5_000
  config.schedule.decay_examples = (16_667, 33_333, 44_444)
  config.cache = True  # 25,000 small JPEGs: read once.
  config.shuffle_buffer = 25_000
  config.log_every_steps = 50
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 1
  return config


def transfer(root: str) -> ml_collections.ConfigDict:
  config = transfer_config.get_config(f"task=folder:{root},model={MODEL},shots=10")
  config.batch_size = 25
  config.lr = 0.003
  config.lr_batch_ref = 0  # The rule's rate per step (see the docstring).
  config.total_steps = 100  # The rule's decays (40/60/80%) scale with it.
  config.schedule.warmup_steps = 20
  config.pp_train = "decode|resize(40)|random_crop(32)|flip_lr|value_range(-1, 1)"
  config.pp_eval = PP_EVAL
  config.test_res.pp = "decode|resize(32)|flip_lr|value_range(-1, 1)"  # For test_res.steps > 0.
  config.eval_batch_size = 200
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000  # Short runs: only at the end.
  config.keep_checkpoints = 1
  return config


def get_config(arg=None):
  kind, options = _parse(arg)
  return upstream(options["root"]) if kind == "upstream" else transfer(options["root"])
