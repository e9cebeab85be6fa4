"""data/tasks.py and the transfer config: the VTAB-1k tasks' splits and their exceptions (no
random flip or crop where it changes the label, paper §3.3)."""

from mutations import Mutation

TASKS = "big_transfer/data/tasks.py"
CONFIG = "big_transfer/config_common.py"
T = "tests/test_tasks.py"
PAPER = f"{T}::test_the_19_vtab_tasks_are_the_paper_s"
SPLITS = f"{T}::test_vtab_splits_follow_task_adaptation"
AUGMENTATION = f"{T}::test_vtab_augmentation_exceptions_reach_the_preprocessing"

MUTATIONS = [
    Mutation("dsprites_orientation_flips", TASKS,
             "label=\"label_orientation:16\",\n          flip=False,",
             "label=\"label_orientation:16\",", (PAPER, AUGMENTATION),
             "dSprites orientation trained with random flips (they change the label)"),
    Mutation("smallnorb_azimuth_flips", TASKS, "label=\"label_azimuth\", flip=False)",
             "label=\"label_azimuth\")", (PAPER, AUGMENTATION),
             "SmallNORB azimuth trained with random flips"),
    Mutation("clevr_count_crops", TASKS, "label=\"clevr_count_all\", crop=False)",
             "label=\"clevr_count_all\")", (PAPER, AUGMENTATION),
             "Clevr count trained with random crops (they can cut objects out)"),
    Mutation("config_ignores_task_flip", CONFIG, "config.hyperrule.flip = task.flip",
             "config.hyperrule.flip = True", (AUGMENTATION,),
             "the transfer config flips whatever the task says"),
    Mutation("config_ignores_task_crop", CONFIG, "config.hyperrule.crop = task.crop",
             "config.hyperrule.crop = True", (AUGMENTATION,),
             "the transfer config crops whatever the task says"),
    Mutation("dsprites_pixels_unscaled", TASKS,
             "label=\"label_orientation:16\",\n          flip=False, decode=\"decode|scale(255)\")",
             "label=\"label_orientation:16\",\n          flip=False)", (AUGMENTATION,),
             "dSprites' 0/1 pixels fed unscaled (an almost black image)"),
    Mutation("val200_overlaps_train800", TASKS,
             "val200 = f\"{self.val_source}[{start or ''}:{start + 200}]\"",
             "val200 = f\"{self.val_source}[:200]\"", (SPLITS,),
             "val200 taken from the start of train: the same images as train800"),
    Mutation("test_after_first_percent", TASKS,
             "test = f\"train[{sum(total * p // 100 for p in self.test_percents)}:]\"",
             "test = f\"train[{total * self.test_percents[0] // 100}:]\"", (SPLITS,),
             "the test slice starts after train only, overlapping validation"),
]
