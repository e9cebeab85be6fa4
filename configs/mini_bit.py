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

Upstream, BiT-S (paper §3.3, configs/bit_s.py) scaled down:

| | BiT-S | here | why |
|---|---|---|---|
| data | ILSVRC-2012, 1.28M images, 1000 classes | 5 classes x N (1,000 or 5,000) | CPU |
| model | R50x1 ... R152x4 | R26x1 (13.9M parameters) | CPU |
| images | inception crop 224, flip | inception crop 32 (area 25-100%), flip | CIFAR's 32 px; a 5% crop of 32 px is 7x7 pixels |
| batch, lr | 4096, 0.03 per 256 | 128, 0.1 per 256 | at ~120 updates per epoch the paper's rate learns too slowly in a few epochs |
| length | 90 epochs | 150,000 examples seen (30 epochs of 5,000, 6 of 25,000) | equal compute for both source sizes, ~25 CPU-min |
| warmup, decay | 5000 steps; /10 at epochs 30, 60, 80 | 2% of the steps; /10 at 1/3, 2/3, 8/9 | the same shape, a short warmup |
| weight decay, loss | 1e-4, softmax | 1e-4, softmax | |

Transfer, BiT-HyperRule (configs/transfer.py:task=folder:ROOT,model=R26x1,shots=10, paper §3.3)
scaled down; the rule's regime (< 20k examples: 500 steps, warmup 100, /10 at 40/60/80%, no
MixUp), SGD momentum 0.9, no weight decay and a zero head are kept:

| | HyperRule | here | why |
|---|---|---|---|
| batch | 512 | 50 (the whole 10-shot set) | 50 training images; 512 would repeat each 10 times per step |
| lr | 0.003 per 512 (0.0003 at 50) | 0.01 per 512 | see the README's table: the rule's rate barely moves a 500-step run at batch 50 |
| steps | 500, warmup 100 | 200, warmup 40, /10 at 80/120/160 | CPU; 200 steps = 200 epochs of the 10-shot set |
| resolution | resize 160, random crop 128; eval 128 | resize 40, random crop 32; eval 32 | 128 px costs 16x; 40/32 keeps the rule's 1.25 ratio |
| test-resolution phase | a short final phase at the eval resolution | off (`test_res.steps`) | measured, see the README |

Cost on 2 idle cores: upstream ~25 CPU-min, each transfer run ~1-2 CPU-min.
"""

from big_transfer import config_common

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


def upstream(root: str) -> config_common.ml_collections.ConfigDict:
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
  config.total_examples = 100_000
  config.schedule.warmup_examples = 10_000
  config.schedule.decay_examples = (33_333, 66_667, 88_889)
  config.cache = True  # 25,000 small JPEGs: read once.
  config.shuffle_buffer = 25_000
  config.log_every_steps = 50
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 1
  return config


def transfer(root: str) -> config_common.ml_collections.ConfigDict:
  from configs import transfer as transfer_config  # pylint: disable=g-import-not-at-top
  config = transfer_config.get_config(f"task=folder:{root},model={MODEL},shots=10")
  config.batch_size = 25
  config.lr = 0.003
  config.lr_batch_ref = 0  # The rule's rate per step (see the docstring).
  config.total_steps = 200  # The rule's decays (40/60/80%) scale with it.
  config.schedule.warmup_steps = 40
  config.pp_train = "decode|resize(40)|random_crop(32)|flip_lr|value_range(-1, 1)"
  config.pp_eval = PP_EVAL
  config.eval_batch_size = 200
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000  # Short runs: only at the end.
  config.keep_checkpoints = 1
  return config


def get_config(arg=None):
  kind, options = _parse(arg)
  return upstream(options["root"]) if kind == "upstream" else transfer(options["root"])
