"""BiT-S: upstream pretraining on ILSVRC-2012 (1.28M images, 1000 classes), paper §3.3.

    python -m big_transfer.train --config=configs/bit_s.py:R50x1 --workdir=gs://.../bit_s \
        --config.data_dir=gs://.../tensorflow_datasets --distributed

The argument picks the model (R50x1 default; R50x3, R101x1, R101x3, R152x2, R152x4).
90 epochs = 28,151 steps of 4096 (lr 0.48 after 5000 warmup steps, /10 at epochs 30, 60, 80),
softmax cross-entropy. The paper trained on a TPUv3-512 (8 images per core); for R50x1 at
big_vision's ~930 img/s per chip that is ~1 hour on a v3-512. Check memory first:
`python -m big_transfer.plan --config=configs/bit_s.py:R152x4 --topology=v3:16x16`.
Paper result (R152x4): 81.30% top-1 on ILSVRC-2012 after fine-tuning; GN+WS R50x1 upstream
at batch 4096: 76.0% (BN: 75.6%). ImageNet must be prepared with
`tfds build imagenet2012 --manual_dir=...` (TFDS cannot download it).
"""

from big_transfer import config_common


def get_config(arg=None):
  config = config_common.upstream(
      arg or "R50x1", dataset="imagenet2012", num_classes=1000, loss="softmax_xent",
      total_epochs=90, decay_epochs=(30, 60, 80))
  config.train_split, config.eval_split = "train", "validation"
  return config
