"""BiT-L: upstream pretraining at JFT-300M scale (18291 classes, ~1.26 labels/image), §3.3.

    python -m big_transfer.train --config=configs/bit_l.py --workdir=gs://.../bit_l \
        --config.dataset=my_jft --config.data_dir=gs://.../tensorflow_datasets --distributed

JFT is private: bring any large multi-label dataset as a TFDS dataset (a multi-hot `labels`
Sequence(ClassLabel) feature) and set --config.dataset and --config.num_classes. Default model
R152x4 (928M backbone parameters, 1.1B with the 18291-class head), argument picks another.
40 epochs (/10 at 10, 23, 30, 37), 5000 warmup steps, batch 4096 (8 per core on a TPUv3-512),
lr 0.48, wd 1e-4, sigmoid cross-entropy with head bias -10. Parameters and optimizer state are
FSDP-sharded over the devices; check it fits before renting the pod:
`python -m big_transfer.plan --config=configs/bit_l.py --topology=v3:16x16`.
At 300M images: ~2.93M steps. Paper results (R152x4): 87.54% ILSVRC-2012, 99.37% CIFAR-10,
76.29 VTAB-1k after transfer.
"""

from big_transfer import config_common


def get_config(arg=None):
  config = config_common.upstream(
      arg or "R152x4", dataset="jft", num_classes=18291, loss="sigmoid_xent",
      total_epochs=40, decay_epochs=(10, 23, 30, 37))
  config.train_split, config.eval_split = "train", "validation"
  config.state_sharding = "fsdp"
  return config
