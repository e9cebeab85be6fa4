"""Training curves: `python -m big_transfer.plot WORKDIR... --out=curves.png`.

Three panels from each run's `metrics.jsonl`: loss (train solid, eval dashed), eval accuracy,
and the learning rate (log scale), against the step. Several workdirs are overlaid, one colour
each, labelled by the workdir as given. A resumed run logs some steps twice; the last value
logged for a step is the one drawn. A last line cut short (a run killed mid-write) is skipped.
Bad input ends with one `error: ...` line.
"""

import json
import sys

import matplotlib
from absl import app, flags
from etils import epath
from matplotlib import figure

from big_transfer import errors, files

# allow_override: export also names its output --out, and the tests import both modules.
OUT = flags.DEFINE_string("out", None, "The image to write (.png, .svg or .pdf).",
                          allow_override=True)
TITLE = flags.DEFINE_string("title", None, "A title above the panels.")

METRICS_FILE = "metrics.jsonl"
# (panel title, [(metric key, line style, y scale factor)], y axis label, y scale).
PANELS = (
    ("Loss", [("train/loss", "-", 1.0), ("eval/loss", "--", 1.0)], "loss", "linear"),
    ("Accuracy", [("eval/accuracy", "o-", 100.0)], "eval accuracy (%)", "linear"),
    ("Learning rate", [("train/lr", "-", 1.0)], "learning rate", "log"),
)


def read_metrics(workdir: str) -> dict[str, dict[int, float]]:
  """{metric: {step: value}} from `<workdir>/metrics.jsonl`, later lines winning per step."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    raise errors.UserError(f"{path} does not exist; pass the workdir of a run that has logged "
                           "at least one step.")
  lines = path.read_text().splitlines()
  series: dict[str, dict[int, float]] = {}
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
      if number == len(lines):  # Cut short by a kill mid-write; the run rewrites that step.
        continue
      raise errors.UserError(f"{path}:{number} is not a metrics record ({line[:80]!r}); remove "
                             "the line or restore the file.") from None
    for key, value in record.items():
      if key != "step":
        series.setdefault(key, {})[step] = float(value)
  if not series:
    raise errors.UserError(f"{path} holds no metrics yet; plot it once the run has logged.")
  return series


def plot(workdirs: list[str], out: str, title: str | None = None) -> figure.Figure:
  """Draws the panels for `workdirs` into `out`; returns the figure."""
  runs = [(workdir, read_metrics(workdir)) for workdir in workdirs]
  fig = figure.Figure(figsize=(5 * len(PANELS), 4), layout="constrained")
  axes = fig.subplots(1, len(PANELS))
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, (panel, curves, ylabel, yscale) in zip(axes, PANELS):
    drawn = False
    for i, (workdir, series) in enumerate(runs):
      for key, style, factor in curves:
        points = sorted(series.get(key, {}).items())
        if not points:
          continue
        steps, values = zip(*points)
        label = workdir if len(curves) == 1 else f"{workdir} ({key.split('/')[0]})"
        ax.plot(steps, [v * factor for v in values], style, color=colors[i % len(colors)],
                label=label, markersize=3)
        drawn = True
    ax.set_title(panel)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
      ax.set_yscale(yscale)
      ax.legend(fontsize="small")
    else:
      ax.text(0.5, 0.5, "not logged yet", ha="center", va="center", transform=ax.transAxes)
  if title:
    fig.suptitle(title)
  try:
    files.save_figure(fig, out, dpi=100)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"Cannot write {out} ({e}); check the folder and the extension "
                           "(.png, .svg, .pdf).") from None
  return fig


def main(argv):
  workdirs = [w.rstrip("/") or w for w in argv[1:]]
  if not workdirs:
    sys.exit("error: no workdir given; usage: python -m big_transfer.plot WORKDIR... "
             "--out=FILE.png.")
  if not OUT.value:
    sys.exit("error: --out=FILE.png is required.")
  try:
    plot(workdirs, OUT.value, TITLE.value)
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  print(f"Wrote {OUT.value} ({len(workdirs)} run{'s' if len(workdirs) > 1 else ''}).")


if __name__ == "__main__":
  app.run(main)
