"""BiT-M: upstream pretraining on ImageNet-21k (14.2M images, 21843 classes), paper §3.3.

    python -m big_transfer.train --config=configs/bit_m.py:R50x1 --workdir=gs://.../bit_m \
        --config.dataset=imagenet21k --config.data_dir=gs://.../tensorflow_datasets --distributed

ImageNet-21k is not in the TFDS catalogue: build it as your own TFDS dataset (a `label`
ClassLabel, or a multi-hot `labels` Sequence(ClassLabel) for the full tag sets) and name it in
`--config.dataset`. The argument picks the model (R50x1 default; R50x3 ... R152x4).
90 epochs = 311,948 steps of 4096 at 14,197,122 images (/10 at epochs 30, 60, 80), 5000
warmup steps, lr 0.48, wd 1e-4; sigmoid cross-entropy (a binary classifier per label, the
authors' loss, big_transfer issue #26) with the head bias starting at -10.
Paper results (R152x4): 85.39% ILSVRC-2012, 98.91% CIFAR-10, 70.64 VTAB-1k after transfer.
"""

from big_transfer import config_common


def get_config(arg=None):
  config = config_common.upstream(
      arg or "R50x1", dataset="imagenet21k", num_classes=21843, loss="sigmoid_xent",
      total_epochs=90, decay_epochs=(30, 60, 80))
  config.train_split, config.eval_split = "train", "validation"
  return config
