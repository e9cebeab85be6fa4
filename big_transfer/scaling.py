"""Communication, step time and scaling efficiency of a compiled training step.

The planner compiles the exact training step for a TPU topology; this module reads what the
compiled program holds and turns it into time:

- `collectives(hlo_text)`: every all-reduce, all-gather, reduce-scatter, all-to-all and
  collective-permute of one step, with its bytes, its replica-group size and how often it runs
  (loop bodies, e.g. the micro-batch scan, count their trip count).
- `step_time(...)`: a per-device model. Compute at the chip's peak and at a model FLOPs
  utilization (MFU); HBM traffic (the compiler's bytes accessed) at the chip's bandwidth;
  collectives at the interconnect's bandwidth with ring costs; overlapped (the largest of the
  three) and serial (compute or HBM, then communication). The largest term names the bound.
- `scaling_rows(...)`: img/s, efficiency against the generation's smallest topology, time
  and chip-hours of a whole schedule; `table` and `plot` show them.

Bytes convention (per device, what `Collective.bytes` holds): the whole buffer of the
collective, i.e. the all-reduced buffer, the gathered result of an all-gather, the unreduced
input of a reduce-scatter, the buffer of an all-to-all or collective-permute. A ring over n
devices then moves, per device, 2 (n-1)/n of it for an all-reduce, (n-1)/n for an all-gather,
reduce-scatter or all-to-all, and all of it for a collective-permute.
"""

import collections
import dataclasses
import functools
import math
import re

from big_transfer import files

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# Bytes per element of HLO primitive types; f8 variants take 1, others (tokens, sub-byte) 0.
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"([a-z][a-z0-9\-]*)\(")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # One of KINDS.
  bytes: int  # Per device, per execution; see the module docstring.
  group_size: int  # Devices in each replica group.
  count: int = 1  # Executions per step.

  @property
  def ring_bytes(self) -> float:
    """Bytes each device sends per execution with a ring algorithm over its group."""
    n = self.group_size
    if n <= 1:
      return 0.0
    factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(self.kind,
                                                                            (n - 1) / n)
    return factor * self.bytes


def _array_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _split_shape(text: str) -> tuple[str, str]:
  """(result shape, rest) of an instruction's right-hand side `SHAPE opcode(...)...`."""
  if text.startswith("("):  # A tuple shape: up to the matching parenthesis.
    depth = 0
    for i, char in enumerate(text):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        return text[:i + 1], text[i + 1:].lstrip()
  shape, _, rest = text.partition(" ")
  return shape, rest


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape `(a, (b, c), d)`."""
  inner, elements, depth, start = shape[1:-1], [], 0, 0
  for i, char in enumerate(inner):
    depth += {"(": 1, ")": -1, "[": 1, "]": -1, "{": 1, "}": -1}.get(char, 0)
    if char == "," and depth == 0:
      elements.append(inner[start:i])
      start = i + 1
  return elements + [inner[start:]]


def _group_size(attributes: str, num_devices: int | None) -> int:
  """Devices per replica group: `{{0,1},{2,3}}`, iota `[2,4]<=[8]`, or mesh axes
  `mesh['a'=2,'b'=4] {'b'}`; all devices when the groups are empty or absent."""
  match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if match:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", match.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", match.group(2)))
  match = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
  if match:
    return int(match.group(2))
  match = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
  if match:
    return len(match.group(1).split(","))
  match = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attributes)
  if match:  # collective-permute: the devices taking part.
    return len(set(re.findall(r"\d+", match.group(1))))
  if num_devices is None:
    raise ValueError(f"No replica groups in {attributes[:200]!r}; pass num_devices.")
  return num_devices


def _collective(opcode: str, shape: str, attributes: str, num_devices: int | None):
  kind = opcode.removesuffix("-start")
  if kind not in KINDS:
    return None
  n = _group_size(attributes, num_devices)
  if opcode.endswith("-start") and kind != "all-reduce" and shape.startswith("("):
    shape = _tuple_elements(shape)[1]  # Asynchronous: (operands, results, context...).
  result = _array_bytes(shape)
  return Collective(kind, result * n if kind == "reduce-scatter" else result, n)


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  computations, name, entry = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      name = header.group(1)
      computations[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif name is not None and line.strip() != "}":
      computations[name].append(line)
  if entry is None:
    raise ValueError("No ENTRY computation in the HLO text.")
  return computations, entry


def _trip_count(line: str, computations: dict[str, list[str]]) -> int:
  """Iterations of a while loop: the compiler's known_trip_count, else the loop condition's
  `i < constant` (JAX loops count from 0 by 1); 1 if neither is there."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
  if known:
    return int(known.group(1))
  condition = re.search(r"condition=%?([\w.\-]+)", line)
  lines = computations.get(condition.group(1), []) if condition else []
  constants = dict(re.findall(r"%?([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(lines)))
  for cond_line in lines:
    compare = re.search(r"compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT", cond_line)
    if compare and compare.group(1) in constants:
      return int(constants[compare.group(1)])
  return 1


def collectives(hlo_text: str, num_devices: int | None = None) -> list[Collective]:
  """The collectives of a compiled module (`compiled.as_text()`), each with the number of
  times one execution of the module runs it. `num_devices` sizes groups the text leaves
  implicit (an all-reduce over every device may print no replica_groups)."""
  computations, entry = _computations(hlo_text)
  found, callers = [], collections.defaultdict(list)  # callee -> [(caller, times per call)]
  for name, lines in computations.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      shape, rest = _split_shape(match.group(2))
      opcode = _OPCODE.match(rest)
      opcode = opcode.group(1) if opcode else ""
      collective = _collective(opcode, shape, rest, num_devices)
      if collective:
        found.append((name, collective))
      trips = _trip_count(line, computations) if opcode == "while" else 1
      for attribute, callees in re.findall(
          r"\b(calls|to_apply|body|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)", rest):
        for callee in re.findall(r"[\w.\-]+", callees):
          callers[callee].append((name, trips if attribute == "body" else 1))

  @functools.cache
  def runs(name: str) -> int:
    if name == entry:
      return 1
    return sum(runs(caller) * times for caller, times in callers[name])

  return [dataclasses.replace(c, count=runs(name)) for name, c in found if runs(name)]


@dataclasses.dataclass(frozen=True)
class Traffic:
  """One kind of collective summed over a step."""
  kind: str
  bytes: int  # Per device per step (count x bytes).
  ring_bytes: float  # Sent per device per step with ring algorithms.
  executions: int
  group_sizes: tuple[int, ...]


def summarize(found: list[Collective]) -> list[Traffic]:
  """Per kind (in KINDS order, kinds present only): totals per step."""
  rows = []
  for kind in KINDS:
    of_kind = [c for c in found if c.kind == kind]
    if of_kind:
      rows.append(Traffic(kind, sum(c.bytes * c.count for c in of_kind),
                          sum(c.ring_bytes * c.count for c in of_kind),
                          sum(c.count for c in of_kind),
                          tuple(sorted({c.group_size for c in of_kind}))))
  return rows


@dataclasses.dataclass(frozen=True)
class Link:
  """Per-chip bandwidths from Google's Cloud TPU documentation pages (named in TPU_LINKS)."""
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # What one chip's collectives move per second; see TPU_LINKS.


# Keyed by the planner's `Chip.generation`. HBM bandwidth: the pages' per-chip figure. ICI:
# the pages' "All-reduce bandwidth per Pod" divided by the Pod's chips where given (v3: 340 TB/s
# over 1024 chips; v4: 1.1 PB/s over 4096; v5e: 51.2 TB/s over 256; v6e: 102.4 TB/s over 256).
# The v5p page gives none; there the assumption is half its bidirectional ICI bandwidth per chip
# (1200 GBps), the ratio between the two figures on the v5e and v6e pages (400 and 800 GBps
# bidirectional per chip); it equals the older page's "Interchip Interconnect BW 4800 Gbps".
TPU_LINKS = {
    "v3": Link(900e9, 340e12 / 1024),  # "TPU v3": HBM2 900 GBps; 2D torus.
    "v4": Link(1200e9, 1.1e15 / 4096),  # "TPU v4": HBM2 1200 GBps; 3D mesh/torus.
    "v5e": Link(819e9, 51.2e12 / 256),  # "TPU v5e": HBM2 819 GBps; 2D torus.
    "v5p": Link(2765e9, 1200e9 / 2),  # "TPU v5p": HBM2e 2765 GBps; 3D torus.
    "v6e": Link(1638e9, 102.4e12 / 256),  # "TPU v6e": HBM 1638 GBps; 2D torus.
}

# big_vision's BiT-R50x1 (configs/bit_i1k.py: "~32min on v3-128", 90 epochs of 99% of
# ILSVRC-2012's 1,281,167 images) runs 929 img/s per chip; at the analytic 24.5 GFLOPs per
# 224 px training image that is 22.8 TFLOP/s, 18.5% of a v3 chip's 123 TFLOP/s. Its 32 minutes
# include evaluations, so a steady step is a little faster: a conservative default.
DEFAULT_MFU = 0.185


@dataclasses.dataclass(frozen=True)
class StepTime:
  """Seconds per step on one device, by what bounds it."""
  compute_at_peak: float
  compute: float  # At the MFU.
  hbm: float
  communication: float

  @property
  def overlapped(self) -> float:
    """Communication hidden behind compute (XLA's asynchronous collectives): the largest."""
    return max(self.compute, self.hbm, self.communication)

  @property
  def serial(self) -> float:
    """Nothing hidden: compute or HBM traffic, then communication."""
    return max(self.compute, self.hbm) + self.communication

  @property
  def bound(self) -> str:
    terms = {"compute": self.compute, "HBM": self.hbm, "interconnect": self.communication}
    return max(terms, key=terms.get)


def step_time(flops: float, bytes_accessed: float, ring_bytes: float, peak_flops: float,
              hbm_bytes_per_s: float, ici_bytes_per_s: float, mfu: float) -> StepTime:
  """The per-device step-time model; every argument is per device (a v3 device is one of the
  chip's two cores: the caller divides the chip's figures)."""
  if not 0 < mfu <= 1:
    raise ValueError(f"MFU must be in (0, 1], got {mfu}.")
  return StepTime(flops / peak_flops, flops / (peak_flops * mfu),
                  bytes_accessed / hbm_bytes_per_s, ring_bytes / ici_bytes_per_s)


@dataclasses.dataclass(frozen=True)
class Point:
  """One compiled step on one topology: the inputs of a table row, per device."""
  topology: str
  generation: str
  devices: int
  chips: int
  batch_per_device: int
  memory_bytes: int | None  # The compiler's total; None: it refused (out of memory).
  capacity_bytes: int | None
  flops: float | None = None
  bytes_accessed: float | None = None
  traffic: tuple[Traffic, ...] = ()
  time: StepTime | None = None

  @property
  def fits(self) -> bool:
    return self.memory_bytes is not None and (self.capacity_bytes is None
                                              or self.memory_bytes <= self.capacity_bytes)


@dataclasses.dataclass(frozen=True)
class Row:
  point: Point
  img_per_s: float  # Global, overlapped model; NaN where the step did not compile.
  img_per_s_serial: float
  efficiency: float  # Per-device img/s against the generation's first compiled point.
  schedule_hours: float  # Wall time of the schedule's images (overlapped); NaN: unknown.
  chip_hours: float


def scaling_rows(points: list[Point], schedule_images: float | None) -> list[Row]:
  """Throughput, efficiency and the time of `schedule_images` training images, for weak or
  strong scaling alike: efficiency is per-device throughput relative to the smallest
  topology of the same generation (1.0 when nothing but the device count changes)."""
  rows, base = [], {}
  for p in points:
    if p.time is None:
      rows.append(Row(p, *[math.nan] * 5))
      continue
    batch = p.batch_per_device * p.devices
    img_per_s = batch / p.time.overlapped
    per_device = img_per_s / p.devices
    base.setdefault(p.generation, per_device)
    hours = schedule_images / img_per_s / 3600 if schedule_images else math.nan
    rows.append(Row(p, img_per_s, batch / p.time.serial, per_device / base[p.generation],
                    hours, hours * p.chips))
  return rows


_SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
          "collective-permute": "CP"}


def _collective_cell(traffic: tuple[Traffic, ...]) -> str:
  if not traffic:
    return "none"
  return ", ".join(f"{_SHORT[t.kind]} {t.bytes / 1e6:,.0f} MB/{'|'.join(map(str, t.group_sizes))}"
                   for t in traffic)


def _ms(seconds: float) -> str:
  milliseconds = 1e3 * seconds
  return f"{milliseconds:,.0f}" if milliseconds >= 100 else f"{milliseconds:.3g}"


def table(rows: list[Row]) -> str:
  """A Markdown table, one row per topology."""
  head = ("| topology | devices (chips) | batch/device | memory GiB | TFLOPs | HBM GB | "
          "collectives (bytes/group) | compute ms (peak/MFU) | HBM ms | ICI ms | "
          "step ms (serial) | bound | img/s | efficiency | days | chip-hours |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for row in rows:
    p = row.point
    memory = "OOM" if p.memory_bytes is None else f"{p.memory_bytes / 2 ** 30:.2f}"
    if p.memory_bytes is not None and not p.fits:
      memory += " (over)"
    cells = [p.topology, f"{p.devices} ({p.chips})", str(p.batch_per_device), memory]
    if p.time is None:
      cells += ["-"] * 12
    else:
      t = p.time
      cells += [f"{p.flops / 1e12:.2f}", f"{p.bytes_accessed / 1e9:.1f}",
                _collective_cell(p.traffic), f"{_ms(t.compute_at_peak)}/{_ms(t.compute)}",
                _ms(t.hbm), _ms(t.communication),
                f"{_ms(t.overlapped)} ({_ms(t.serial)})",
                t.bound, f"{row.img_per_s:,.0f}", f"{row.efficiency:.2f}",
                "-" if math.isnan(row.schedule_hours) else f"{row.schedule_hours / 24:.3g}",
                "-" if math.isnan(row.chip_hours) else f"{row.chip_hours:,.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(curves: dict[str, list[Row]], path: str, title: str) -> None:
  """img/s and efficiency against devices, one line per (scaling, generation)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  figure, (speed, efficiency) = pyplot.subplots(1, 2, figsize=(11, 4.2))
  generations = list(dict.fromkeys(r.point.generation for rows in curves.values() for r in rows))
  for (label, rows), linestyle in zip(curves.items(), ("-", "--", ":", "-.")):
    for generation in generations:
      ran = [r for r in rows if r.point.generation == generation and r.point.time is not None]
      if not ran:
        continue
      devices = [r.point.devices for r in ran]
      style = dict(marker="o", linestyle=linestyle, color=f"C{generations.index(generation)}",
                   label=f"{generation}, {label}")
      speed.plot(devices, [r.img_per_s for r in ran], **style)
      efficiency.plot(devices, [r.efficiency for r in ran], **style)
  for axes, name in ((speed, "img/s (overlapped model)"), (efficiency, "scaling efficiency")):
    axes.set_xscale("log", base=2)
    axes.set_xlabel("devices")
    axes.set_ylabel(name)
    axes.grid(True, alpha=0.3)
  speed.set_yscale("log")
  efficiency.set_ylim(0, 1.1)
  efficiency.legend(fontsize=8)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  files.save_figure(figure, path, dpi=110)
  pyplot.close(figure)
