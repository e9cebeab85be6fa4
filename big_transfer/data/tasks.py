"""Transfer tasks as data: TFDS name and version, splits, label, flip/crop safety, VTAB group.

`get(name)` knows the BiT paper's standard tasks (CIFAR-10/100, Oxford-IIIT Pets, Oxford
Flowers-102, ILSVRC-2012), the 19 VTAB-1k tasks (`vtab/<task>`) and any image folder
(`folder:ROOT`, ROOT/<split>/<class>/*.jpg, train on `train`, evaluate on `test`).

VTAB-1k (Zhai et al. 2019, arXiv 1910.04867) as google-research/task_adaptation defines it
(`task_adaptation/data/*.py`): each task trains on `train800val200` (the first 800 training
examples and 200 held-out ones, 1000 in all) and is evaluated on its `test` split. Those
splits are slices of the TFDS splits whose bounds depend on the split sizes, so they are
named here (`VtabSplits`) and turned into TFDS split strings once the data's counts are known
(`VtabSplits.tfds_splits`, called by `transfer.resolve`). Labels that are not the dataset's
`label` feature are named in `Task.label` (data/labels.py). BiT turns random cropping or
flipping off where they change the label (paper §3.3): no flip where orientation or
left-right position is the label (dSprites orientation and location, SmallNORB azimuth), no
crop where position, count or size is (Clevr count and distance, DMLab, KITTI distance,
dSprites location).
"""

import dataclasses

from big_transfer.errors import UserError

FOLDER_PREFIX = "folder:"  # As datasets.FOLDER_PREFIX; kept here so configs load without TF.
VTAB_PREFIX = "vtab/"
VTAB_GROUPS = ("natural", "specialized", "structured")
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


@dataclasses.dataclass(frozen=True)
class VtabSplits:
  """Where VTAB-1k takes its splits from the TFDS ones.

  train800 = train[:800]; val200 = 200 examples of `val_source` from count * val_percent // 100;
  test = `test`, or with `test_percents` (P, Q) the rest of `train` after P% + Q% of it
  (datasets that ship one split, cut into train / val / test by percentages).
  """
  val_source: str = "validation"
  val_percent: int = 0
  test: str = "test"
  test_percents: tuple[int, int] | None = None

  def tfds_splits(self, counts: dict[str, int]) -> dict[str, str]:
    """{VTAB split name: TFDS split} from the TFDS splits' example counts."""
    start = counts[self.val_source] * self.val_percent // 100
    val200 = f"{self.val_source}[{start or ''}:{start + 200}]"
    test = self.test
    if self.test_percents:
      total = counts["train"]
      test = f"train[{sum(total * p // 100 for p in self.test_percents)}:]"
    return {"train800": "train[:800]", "val200": val200,
            "train800val200": f"train[:800]+{val200}", "test": test}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  dataset: str  # TFDS `name[/config][:version]` or `folder:ROOT`.
  train_split: str  # A TFDS split, or a VTAB split name when `vtab` is set.
  eval_split: str
  label: str = ""  # See data/labels.py: "" is the `label` feature.
  flip: bool = True
  crop: bool = True
  decode: str = "decode"  # The first preprocessing op(s).
  group: str = ""  # VTAB-1k group.
  vtab: VtabSplits | None = None


_STANDARD = (
    Task("cifar10", "cifar10", "train", "test"),
    Task("cifar100", "cifar100", "train", "test"),
    Task("oxford_iiit_pet", "oxford_iiit_pet", "train", "test"),  # TFDS train = trainval.
    Task("oxford_flowers102", "oxford_flowers102", "train+validation", "test"),
    Task("imagenet2012", "imagenet2012", "train", "validation"),
)


def _vtab(name, dataset, group, splits, **kwargs) -> Task:
  return Task(VTAB_PREFIX + name, dataset, "train800val200", "test", group=group, vtab=splits,
              **kwargs)


_HOLDOUT_90 = VtabSplits("train", 90)
_VALIDATION = VtabSplits()
_SIXTY_TWENTY_TWENTY = VtabSplits("train", 60, test_percents=(60, 20))

VTAB = (
    # Natural.
    _vtab("caltech101", "caltech101:3.*.*", "natural", _HOLDOUT_90),
    _vtab("cifar100", "cifar100:3.*.*", "natural", _HOLDOUT_90),
    _vtab("dtd", "dtd:3.*.*", "natural", _VALIDATION),
    _vtab("oxford_flowers102", "oxford_flowers102:2.*.*", "natural", _VALIDATION),
    _vtab("oxford_iiit_pet", "oxford_iiit_pet:3.*.*", "natural", VtabSplits("train", 80)),
    _vtab("sun397", "sun397/tfds:4.*.*", "natural", _VALIDATION),
    _vtab("svhn", "svhn_cropped:3.*.*", "natural", _HOLDOUT_90),
    # Specialized.
    _vtab("patch_camelyon", "patch_camelyon:2.*.*", "specialized", _VALIDATION),
    _vtab("eurosat", "eurosat/rgb:2.*.*", "specialized", _SIXTY_TWENTY_TWENTY),
    _vtab("resisc45", "resisc45:3.*.*", "specialized", _SIXTY_TWENTY_TWENTY),
    _vtab("diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300:3.*.*",
          "specialized", _VALIDATION),
    # Structured.
    _vtab("clevr_count", "clevr:3.*.*", "structured", VtabSplits("train", 90, "validation"),
          label="clevr_count_all", crop=False),
    _vtab("clevr_distance", "clevr:3.*.*", "structured", VtabSplits("train", 90, "validation"),
          label="clevr_closest_object_distance", crop=False),
    _vtab("dmlab", "dmlab:2.0.1", "structured", _VALIDATION, crop=False),
    _vtab("kitti_distance", "kitti:3.1.0", "structured", _VALIDATION,
          label="kitti_closest_vehicle_distance", crop=False),
    _vtab("dsprites_location", "dsprites:2.*.*", "structured",
          VtabSplits("train", 80, test_percents=(80, 10)), label="label_x_position:16",
          flip=False, crop=False, decode="decode|scale(255)"),
    _vtab("dsprites_orientation", "dsprites:2.*.*", "structured",
          VtabSplits("train", 80, test_percents=(80, 10)), label="label_orientation:16",
          flip=False, decode="decode|scale(255)"),
    _vtab("smallnorb_azimuth", "smallnorb:2.*.*", "structured",
          VtabSplits("test", 0, "test[50%:]"), label="label_azimuth", flip=False),
    _vtab("smallnorb_elevation", "smallnorb:2.*.*", "structured",
          VtabSplits("test", 0, "test[50%:]"), label="label_elevation"),
)

TASKS = {task.name: task for task in _STANDARD + VTAB}


def names() -> list[str]:
  return list(TASKS)


def get(name: str) -> Task:
  """The task `name`: a registered one or `folder:ROOT`; UserError names the valid ones."""
  if name.startswith(FOLDER_PREFIX):
    return Task(name, name, "train", "test")
  if name not in TASKS:
    raise UserError(f"Unknown task {name!r}; valid: {', '.join(TASKS)} or folder:ROOT "
                     "(an image folder ROOT/<split>/<class>/*.jpg).")
  return TASKS[name]


def vtab_group(name: str) -> str:
  """The VTAB-1k group of task `name`, "" for a task outside VTAB-1k."""
  task = TASKS.get(name)
  return task.group if task else ""
