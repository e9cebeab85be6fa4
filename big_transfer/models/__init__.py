"""Model registry: `get_model(name, num_classes, **options)`.

Names: `R{depth}x{width}` for depth in 14/26/50/101/152 and width 1-4, with the released
`BiT-S-`/`BiT-M-` prefixes accepted as aliases (R50x1, R50x3, R101x1, R101x3, R152x2, R152x4
are the released models).
"""

import re

from big_transfer.errors import UserError
from big_transfer.models import bit

RELEASED = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
WIDTHS = (1, 2, 3, 4)
_NAME = re.compile(r"^(?:BiT-[SM]-)?R(\d+)x(\d+)$")


def names() -> list[str]:
  """Every valid model name (without the BiT-S-/BiT-M- aliases)."""
  return [f"R{d}x{w}" for d in bit.DEPTHS for w in WIDTHS]


def parse_name(name: str) -> tuple[tuple[int, ...], int]:
  """`BiT-M-R50x3` -> ((3, 4, 6, 3), 3); UserError naming the valid choices otherwise."""
  match = _NAME.match(name)
  if not match or int(match[1]) not in bit.DEPTHS or int(match[2]) not in WIDTHS:
    raise UserError(f"Unknown model {name!r}; valid: {', '.join(names())} "
                     "(optionally prefixed BiT-S- or BiT-M-).")
  return bit.DEPTHS[int(match[1])], int(match[2])


def get_model(name: str, num_classes: int, **options) -> bit.ResNetV2:
  """The BiT ResNet-v2 `name` with `num_classes` outputs (0: pre-logits only).

  Options: dtype (compute dtype, default float32), head_zero_init (default True),
  head_bias_init (default 0), for_cpu (the same function as XLA:CPU runs it fastest);
  training-recipe options residual_gain, drop_path_rate and avg_down (default off, see
  bit.ResNetV2).
  """
  layers, width = parse_name(name)
  return bit.ResNetV2(num_classes=num_classes, layers=layers, width=width, **options)
