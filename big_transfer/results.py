"""`<workdir>/results.json`: what a finished run reached, one file per run for tabulating.

Keys: task, dataset, model, init, shots, steps, top1 and top5 (fractions of the evaluation
split), eval_loss, eval_count (examples evaluated), train_split, eval_split, wall_s (seconds of
the invocation that finished the run), resumed_from_step (0 unless that invocation resumed)
and config (the resolved config).
"""

import json

import jax
import ml_collections

from big_transfer import files
from big_transfer.errors import UserError

RESULTS_FILE = "results.json"


def write(workdir: str, config: ml_collections.ConfigDict, result: dict[str, float], *,
          steps: int, wall_s: float, resumed_from_step: int) -> dict:
  """Writes the record atomically (process 0) and returns it."""
  record = {
      "task": config.get("task") or config.dataset,
      "dataset": config.dataset,
      "model": config.model.name,
      "init": config.init or None,
      "shots": config.shots,
      "steps": steps,
      "top1": result["accuracy"],
      "top5": result["top5"],
      "eval_loss": result["loss"],
      "eval_count": int(result["count"]),
      "train_split": config.train_split,
      "eval_split": config.eval_split,
      "wall_s": round(wall_s, 1),
      "resumed_from_step": resumed_from_step,
      "config": json.loads(config.to_json()),
  }
  if jax.process_index() == 0:
    files.write_atomic(files.path(workdir) / RESULTS_FILE,
                       json.dumps(record, indent=2, sort_keys=True) + "\n")
  return record


def load(path: str) -> dict:
  """A results.json (or the one in workdir `path`)."""
  path = files.path(path)
  try:
    if path.is_dir():
      path = path / RESULTS_FILE
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"Cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0]}); rerun "
                    "that run to write it again.") from None
