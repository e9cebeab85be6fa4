"""BiT-HyperRule transfer of a BiT checkpoint to a task (paper §3.3).

    python -m big_transfer.train \
        --config=configs/transfer.py:task=cifar10,model=BiT-M-R50x1[,shots=10] \
        --config.init=BiT-M-R50x1.npz --workdir=DIR [--config.data_dir=~/tensorflow_datasets]

`task`: cifar10, cifar100, oxford_iiit_pet, oxford_flowers102, imagenet2012, the 19 VTAB-1k
tasks `vtab/<name>` (big_transfer/data/tasks.py) or `folder:ROOT` (ROOT/{train,test}/<class>/
images); default cifar10. `model`: the checkpoint's model (default BiT-M-R50x1). `shots=k`:
train on k random examples per class (drawn with --config.seed). `--config.init` is a released
.npz or the workdir of one of our runs; without it the model starts from random weights (the
"from scratch" baseline under the same rule).

SGD momentum 0.9, lr 0.003 at batch 512, no weight decay, zero head; the run picks the steps,
warmup, decays, MixUp and resolution from the training set's size and image size, unless set
here or on the command line (`--print_config` shows what it chose and why). A rerun resumes
from the workdir's checkpoint. Results: `results.json` in the workdir; tabulate many runs with
`python -m big_transfer.tabulate DIR...`. Cost for R50x1 in training FLOPs (as
`big_transfer.plan` counts them): a task under 20k images (VTAB-1k, few-shot) 500 steps x 512
at 128 px = 2 PFLOP; CIFAR-10 10k steps at 384 px = 370 PFLOP; ImageNet 20k steps at 384 px
= 740 PFLOP (R152x4: about 45x these).
"""

from big_transfer import config_common
from big_transfer.data import tasks
from big_transfer.errors import UserError

DEFAULTS = {"task": "cifar10", "model": "BiT-M-R50x1", "shots": None}


def _parse(arg: str | None) -> dict:
  """"task=cifar10,model=BiT-M-R50x1,shots=10" -> a dict over DEFAULTS."""
  values = dict(DEFAULTS)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in DEFAULTS or not value:
      raise UserError(f"Bad config argument {item!r}; expected comma-separated "
                      f"{', '.join(f'{k}=...' for k in DEFAULTS)}.")
    values[key] = value
  if values["shots"] is not None:
    if not str(values["shots"]).isdigit() or int(values["shots"]) < 1:
      raise UserError(f"shots={values['shots']} must be a positive integer.")
    values["shots"] = int(values["shots"])
  return values


def get_config(arg=None):
  values = _parse(arg)
  return config_common.transfer(tasks.get(values["task"]), values["model"], values["shots"])
