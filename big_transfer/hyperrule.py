"""BiT-HyperRule (Kolesnikov et al. 2020, §3.3): the transfer recipe chosen from the data alone.

From the number of training examples (the split's count, or shots x classes) and the images'
area it picks:

| regime (examples) | warmup steps | lr /10 after step    | total steps | MixUp alpha |
|-------------------|--------------|----------------------|-------------|-------------|
| small  (< 20k)    | 100          | 200, 300, 400        | 500         | 0           |
| medium (< 500k)   | 500          | 3000, 6000, 9000     | 10,000      | 0.1         |
| large  (>= 500k)  | 500          | 6000, 12,000, 18,000 | 20,000      | 0.1         |

(the released code's table, google-research/big_transfer `bit_hyperrule.py`) and the
resolution: images under 96x96 pixels are resized to 160 and randomly cropped to 128, larger
ones to 448/384 (paper) or 512/480 (released code). Fixed by the rule, not by the data: SGD with
momentum 0.9, lr 0.003 at batch 512, no weight decay, a zero-initialised head, softmax
cross-entropy (set in `config_common.transfer`).

The decay boundaries are fractions of the total steps: `decays="released"` uses the table's
(40/60/80% in the small regime, 30/60/90% above), `decays="paper"` the paper's text, 30/60/90%
in every regime (small regime: 150/300/450). Overriding `total_steps` scales them.
"""

import dataclasses
from typing import Sequence

from big_transfer.errors import UserError

SMALL_IMAGE_AREA = 96 * 96  # Below it: resize 160, crop 128.
SMALL_IMAGE_SIZES = (160, 128)
LARGE_IMAGE_SIZES = {"paper": (448, 384), "released": (512, 480)}  # (resize, crop).
PAPER_DECAYS = (0.3, 0.6, 0.9)
DECAYS = ("released", "paper")


@dataclasses.dataclass(frozen=True)
class Regime:
  name: str
  examples: str  # Its range, for messages.
  max_examples: float  # Exclusive upper bound on the training examples.
  warmup_steps: int
  total_steps: int
  decay_steps: tuple[int, ...]  # The released code's boundaries.
  mixup_alpha: float


REGIMES = (
    Regime("small", "< 20k", 20_000, 100, 500, (200, 300, 400), 0.0),
    Regime("medium", "20k to < 500k", 500_000, 500, 10_000, (3000, 6000, 9000), 0.1),
    Regime("large", ">= 500k", float("inf"), 500, 20_000, (6000, 12_000, 18_000), 0.1),
)


def regime(num_examples: int) -> Regime:
  return next(r for r in REGIMES if num_examples < r.max_examples)


def decay_fractions(chosen: Regime, decays: str = "released") -> tuple[float, ...]:
  """Where the lr drops, as fractions of the total steps."""
  if decays == "paper":
    return PAPER_DECAYS
  if decays == "released":
    return tuple(b / chosen.total_steps for b in chosen.decay_steps)
  raise UserError(f"hyperrule.decays={decays!r}; valid: {', '.join(DECAYS)}.")


def decay_steps(fractions: Sequence[float], total_steps: int) -> tuple[int, ...]:
  return tuple(round(f * total_steps) for f in fractions)


def image_sizes(image_area: int,
                large: Sequence[int] = LARGE_IMAGE_SIZES["paper"]) -> tuple[int, int]:
  """(resize, crop) for images of `image_area` pixels; evaluation resizes to the crop."""
  return SMALL_IMAGE_SIZES if image_area < SMALL_IMAGE_AREA else tuple(large)


@dataclasses.dataclass(frozen=True)
class Choice:
  """What the rule picks for one task, and the inputs it picked it from."""
  num_examples: int
  image_area: int
  regime: Regime
  warmup_steps: int
  decay_steps: tuple[int, ...]
  total_steps: int
  mixup_alpha: float
  resize_size: int
  crop_size: int
  decays: str
  resolution: str

  def explain(self) -> str:
    small = self.image_area < SMALL_IMAGE_AREA
    fractions = "/".join(f"{100 * b / self.total_steps:g}" for b in self.decay_steps)
    return (f"{self.num_examples:,} examples -> {self.regime.name} regime "
            f"({self.regime.examples}): {self.total_steps} steps, warmup {self.warmup_steps}, "
            f"lr /10 after {', '.join(map(str, self.decay_steps))} ({fractions}%, "
            f"{self.decays} decays), MixUp alpha {self.mixup_alpha:g}; image area "
            f"{self.image_area:,} px {'<' if small else '>='} 96x96 -> resize "
            f"{self.resize_size}, crop {self.crop_size}"
            f"{'' if small else f' ({self.resolution} resolution)'}.")


def choose(num_examples: int, image_area: int, *, decays: str = "released",
           resolution: str = "paper", total_steps: int | None = None) -> Choice:
  """The rule's choices for `num_examples` training images of `image_area` pixels.

  `total_steps` (an override) replaces the regime's; the decays keep their fractions of it.
  """
  if num_examples < 1:
    raise UserError(f"HyperRule needs at least one training example, got {num_examples}.")
  if resolution not in LARGE_IMAGE_SIZES:
    raise UserError(f"hyperrule.resolution={resolution!r}; valid: "
                    f"{', '.join(LARGE_IMAGE_SIZES)}.")
  chosen = regime(num_examples)
  total = total_steps or chosen.total_steps
  resize, crop = image_sizes(image_area, LARGE_IMAGE_SIZES[resolution])
  return Choice(num_examples, image_area, chosen, chosen.warmup_steps,
                decay_steps(decay_fractions(chosen, decays), total), total, chosen.mixup_alpha,
                resize, crop, decays, resolution)
