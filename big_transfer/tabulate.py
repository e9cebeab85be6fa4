"""Tabulate finished runs: `python -m big_transfer.tabulate DIR... [--csv=FILE]`.

Each DIR is a run's workdir or a folder searched for them (every `results.json` below it).
Prints a Markdown table, one row per run (top-1 and top-5 in %), and for each (model, init,
shots) with VTAB-1k runs the benchmark's summary rows: the mean of each group (natural,
specialized, structured) and the VTAB-1k score, the mean over the 19 tasks (Zhai et al. 2019).
A summary over fewer tasks than the benchmark has says so in its name ("12/19 tasks").
`--csv` writes the same table as CSV.
"""

import csv
import os
import sys

from absl import app, flags
from etils import epath

from big_transfer import files, results
from big_transfer.data import tasks
from big_transfer.errors import UserError

CSV = flags.DEFINE_string("csv", None, "Also write the table to this CSV file.")

COLUMNS = ("task", "group", "model", "init", "shots", "steps", "top1_%", "top5_%", "wall_s",
           "workdir")


def find(paths: list[str]) -> list[str]:
  """The results.json files of `paths` (workdirs, or folders holding workdirs), sorted."""
  found = []
  for path in paths:
    if (epath.Path(path) / results.RESULTS_FILE).is_file():
      found.append(os.fspath(epath.Path(path) / results.RESULTS_FILE))
      continue
    below = sorted(os.fspath(folder / results.RESULTS_FILE)
                   for folder, _, names in epath.Path(path).walk() if results.RESULTS_FILE in names)
    if not below:
      raise UserError(f"No {results.RESULTS_FILE} in or below {path}; pass finished runs' "
                      "workdirs (a run writes it after its final evaluation).")
    found += below
  return found


def _percent(value: float | None) -> str:
  return "" if value is None else f"{100 * value:.2f}"


def rows(records: dict[str, dict]) -> list[dict[str, str]]:
  """The table: one row per run ({workdir: record}), then the VTAB-1k summary rows."""
  table = []
  for workdir, record in sorted(records.items(), key=lambda item: (
      item[1]["model"], str(item[1]["init"]), str(item[1]["shots"]), item[1]["task"])):
    table.append({
        "task": record["task"], "group": tasks.vtab_group(record["task"]),
        "model": record["model"], "init": record["init"] or "", "shots": record["shots"] or "",
        "steps": record["steps"], "top1_%": _percent(record["top1"]),
        "top5_%": _percent(record["top5"]), "wall_s": record["wall_s"], "workdir": workdir})
  return table + vtab_summaries(records.values())


def vtab_summaries(records) -> list[dict[str, str]]:
  """Group means and the VTAB-1k mean (top-1) per (model, init, shots) with VTAB-1k runs."""
  runs = {}  # (model, init, shots) -> {task: top1}
  for record in records:
    if tasks.vtab_group(record["task"]):
      key = (record["model"], record["init"] or "", record["shots"] or "")
      runs.setdefault(key, {})[record["task"]] = record["top1"]
  summaries = []
  for (model, init, shots), top1 in sorted(runs.items()):
    for group in tasks.VTAB_GROUPS + ("",):
      names = [t.name for t in tasks.VTAB if group in ("", t.group)]
      present = [top1[name] for name in names if name in top1]
      if not present:
        continue
      label = f"VTAB-1k {group or 'mean'}"
      if len(present) < len(names):
        label += f" ({len(present)}/{len(names)} tasks)"
      summaries.append({
          "task": label, "group": group, "model": model, "init": init, "shots": shots,
          "steps": "", "top1_%": _percent(sum(present) / len(present)), "top5_%": "",
          "wall_s": "", "workdir": ""})
  return summaries


def markdown(table: list[dict]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in table]
  return "\n".join(lines)


def write_csv(table: list[dict], path: str) -> None:
  with files.atomic_writer(path) as f:
    writer = csv.DictWriter(f, COLUMNS)
    writer.writeheader()
    writer.writerows(table)


def main(argv):
  if len(argv) < 2:
    sys.exit("error: pass one or more workdirs (or folders holding them).")
  try:
    table = rows({os.fspath(epath.Path(path).parent): results.load(path)
                  for path in find(argv[1:])})
  except UserError as e:
    sys.exit(f"error: {e}")
  print(markdown(table))
  if CSV.value:
    write_csv(table, CSV.value)


if __name__ == "__main__":
  app.run(main)
