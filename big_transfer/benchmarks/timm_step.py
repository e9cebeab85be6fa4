"""timm's BiT training step, timed on request: the PyTorch side of `benchmark --vs_timm`.

Runs in an interpreter with torch + timm (torch is never a dependency of this project):

    TIMM_PYTHON big_transfer/benchmarks/timm_step.py    # commands on stdin, replies on stdout

One JSON object per line each way. `{"op": "init", ...}` builds timm's ResNet-v2 BiT model
(`resnetv2_50x1_bit` etc.: GroupNorm + weight-standardised convs, the same network as ours),
SGD with momentum and coupled weight decay (torch's `weight_decay` is grad += wd * param, as
ours), softmax cross-entropy, and loads the benchmark's batch from an .npz (NHWC images,
one-hot labels) so both frameworks see the same inputs. `{"op": "steps", "n": k}` runs k
training steps and replies with each one's wall and CPU seconds and minor page faults;
`{"op": "matmul_peak"}` measures torch's matmul FLOP/s in the compute dtype; `{"op": "exit"}`
ends. bfloat16 runs under `torch.autocast` (float32 parameters, as ours with
model.dtype=bfloat16); `compile` wraps the model in `torch.compile` (forward and backward; the
optimizer stays eager). This file imports only torch, timm and numpy.
"""

import json
import os
import resource
import sys
import time
from functools import partial



class _Step:
  """timm model + optimizer + batch, ready to step."""

  def __init__(self, layers: list[int], width: int, num_classes: int, batch_path: str,
               dtype: str, lr: float, momentum: float, wd: float, channels_last: bool,
               compile: bool = False):  # pylint: disable=redefined-builtin
    # pylint: disable=g-import-not-at-top
    import numpy as np
    import timm
    import torch
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2
    self.torch = torch
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    depth = 2 + 3 * sum(layers)
    self.name = f"resnetv2_{depth}x{width}_bit"
    if self.name in timm.list_models(self.name):
      net = timm.create_model(self.name, pretrained=False, num_classes=num_classes)
    else:  # R14/R26: timm's BiT construction (_create_resnetv2_bit) with our unit counts.
      self.name = f"ResNetV2(layers={layers}, width_factor={width}) as timm builds BiT"
      net = ResNetV2(layers=layers, width_factor=width, num_classes=num_classes,
                     stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8),
                     norm_layer=partial(GroupNormAct, num_groups=32))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.memory_format = memory_format
    net = net.to(self.device, memory_format=memory_format).train()
    self.num_params = sum(p.numel() for p in net.parameters())
    decay = [p for n, p in net.named_parameters() if n.endswith("weight") and p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
    # torch.compile (TorchInductor) compiles at the first step, which the warm-up absorbs.
    self.model = torch.compile(net) if compile else net
    self.compiled = compile
    self.optimizer = torch.optim.SGD([{"params": decay, "weight_decay": wd},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, momentum=momentum)
    with np.load(batch_path) as batch:
      images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)  # NHWC -> NCHW.
      self.images = images.contiguous(memory_format=memory_format).to(self.device)
      self.labels = torch.from_numpy(batch["labels"].argmax(-1)).to(self.device)
    self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                     if dtype == "bfloat16" else None)
    self.dtype = dtype

  def _sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def step(self) -> tuple[float, float, int]:
    """(wall seconds, this process's CPU seconds, its minor page faults) of one training step."""
    torch = self.torch
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, cpu = time.perf_counter(), time.process_time()
    self.optimizer.zero_grad(set_to_none=True)
    if self.autocast is not None:
      with self.autocast:
        loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
    else:
      loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
    loss.backward()
    self.optimizer.step()
    self._sync()
    return (time.perf_counter() - start, time.process_time() - cpu,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

  def peak_bytes(self) -> int:
    if self.device.type == "cuda":
      return int(self.torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Process peak RSS.

  def matmul_peak(self, seconds: float = 1.0) -> float:
    """Best FLOP/s of square matmuls in the compute dtype, the size grown until one takes
    10 ms (or 8192)."""
    torch = self.torch
    dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
    n = 512
    while True:
      a = torch.randn(n, n, device=self.device, dtype=dtype)
      b = torch.randn(n, n, device=self.device, dtype=dtype)
      torch.matmul(a, b)
      self._sync()
      start = time.perf_counter()
      torch.matmul(a, b)
      self._sync()
      if time.perf_counter() - start > 0.01 or n >= 8192:
        break
      n *= 2
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
      start = time.perf_counter()
      torch.matmul(a, b)
      self._sync()
      best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def main():
  reply_to = os.fdopen(os.dup(sys.stdout.fileno()), "w")
  sys.stdout = sys.stderr  # Whatever a library prints must not corrupt the replies.
  step = None
  for line in sys.stdin:
    command = json.loads(line)
    try:
      op = command.pop("op")
      if op == "init":
        step = _Step(**command)
        torch = step.torch
        reply = {"model": step.name, "params": step.num_params, "device": str(step.device),
                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "timm": sys.modules["timm"].__version__,
                 "channels_last": step.memory_format == torch.channels_last,
                 "compiled": step.compiled}
      elif op == "steps":
        times, cpu_times, faults = zip(*[step.step() for _ in range(command["n"])])
        reply = {"times": times, "cpu_times": cpu_times, "page_faults": faults}
      elif op == "peak_bytes":
        reply = {"peak_bytes": step.peak_bytes()}
      elif op == "matmul_peak":
        reply = {"flops_per_sec": step.matmul_peak()}
      elif op == "exit":
        return
      else:
        reply = {"error": f"unknown op {op!r}"}
    except Exception as e:  # pylint: disable=broad-except
      reply = {"error": f"{type(e).__name__}: {e}"}
    reply_to.write(json.dumps(reply) + "\n")
    reply_to.flush()


if __name__ == "__main__":
  main()
