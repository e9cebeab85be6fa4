"""A run's weights as an official BiT .npz.

    python -m big_transfer.export --workdir=DIR --out=FILE.npz [--overwrite]

Reads the newest checkpoint of the workdir (only its parameters; any device count or sharding
it was saved with) and writes them in the layout of the released `BiT-{S,M}-R*.npz` files, so
timm (`timm.models.resnetv2._load_weights`), the official google-research/big_transfer code and
this project read them. The file is written whole or not at all (locally a temporary file and a
rename, on Cloud Storage one upload); an existing `--out` is kept unless `--overwrite` is given.

The way back needs no converter: every tool that takes a checkpoint reads the `.npz` itself
(`checkpoints.load_params`): fine-tune from it with `--config.init=F.npz`, predict with
`python -m big_transfer.predict --init=F.npz`. A workdir checkpoint is resumable training state
(optimizer momentum, step, input position) that an `.npz` does not hold, so an `.npz` turned
into one could only start a new run, which is what `config.init` does.
"""

import sys

from absl import app, flags, logging

from big_transfer import checkpoints, errors, files

WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (its newest checkpoint).",
                              allow_override=True)  # train.py defines it too (tests import both).
# allow_override: plot also names its output --out, and the tests import both modules.
OUT = flags.DEFINE_string("out", None, "The .npz file to write.", allow_override=True)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def export(workdir: str, out: str, *, overwrite: bool = False) -> str:
  """Writes the workdir's newest parameters to `out`; returns the model's description."""
  target = files.path(out)
  if target.exists() and not overwrite:
    raise errors.UserError(f"{out} exists; pass --overwrite to replace it or choose another "
                           "--out.")
  files.check_bucket(target)
  if not files.is_remote(target) and not target.parent.is_dir():  # A bucket has no folders.
    raise errors.UserError(f"The folder of {out} does not exist; create it first.")
  model_name, params = checkpoints.load_params(workdir)
  checkpoints.save_bit_npz(params, out)
  if "head" not in params:
    return f"{model_name} without a head"
  return f"{model_name} with a {params['head']['conv2d']['bias'].shape[0]}-class head"


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}; use --workdir=DIR --out=FILE.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  if not WORKDIR.value or not OUT.value:
    sys.exit("error: --workdir=DIR and --out=FILE.npz are both required.")
  try:
    what = export(WORKDIR.value, OUT.value, overwrite=OVERWRITE.value)
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  print(f"Wrote {what} from {WORKDIR.value} to {OUT.value}.")


if __name__ == "__main__":
  app.run(main)
