"""Input-pipeline throughput on real JPEGs: images/s per CPU core, ours vs torchvision.

    python -m big_transfer.benchmarks.input_pipeline --data=../shared/data/cifar10 [--cores N]

Reads DATA/train (an image folder) through pipeline.train_iterator for three recipes, then,
when torch is importable by --torch_python, the same crops with torchvision + PIL (DataLoader
workers = cores) and prints our/torch ratios. The process is pinned to the first N cores.
torch is never a dependency: `--framework torch` runs only that side, in a torch venv.
"""

import argparse
import json
import os
import subprocess
import sys
import time

# name: (our preprocessing spec, torchvision (resize, crop) or None for RandomResizedCrop).
PIPELINES = {
    "upstream-224": ("decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)", None),
    "hyperrule-128": ("decode|resize(160)|random_crop(128)|flip_lr|value_range(-1, 1)", (160, 128)),
    "hyperrule-480": ("decode|resize(512)|random_crop(480)|flip_lr|value_range(-1, 1)", (512, 480)),
}


def _throughput(batches, batch_size: int, seconds: float, warmup: int = 5) -> float:
  """Images/s over `seconds`, after `warmup` batches (buffers filled, workers started)."""
  for _ in range(warmup):
    next(batches)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(batches)
    count += batch_size
  return count / (time.perf_counter() - start)


def measure_tf(data: str, batch_size: int, seconds: float) -> dict[str, float]:
  from big_transfer.data import datasets, pipeline  # pylint: disable=g-import-not-at-top
  dataset = datasets.get(f"folder:{os.path.abspath(data)}")
  return {name: _throughput(pipeline.train_iterator(dataset, "train", spec, batch_size, seed=0,
                                                    shuffle_buffer=1000), batch_size, seconds)
          for name, (spec, _) in PIPELINES.items()}


def measure_torch(data: str, batch_size: int, seconds: float, cores: int) -> dict[str, float]:
  # pylint: disable=g-import-not-at-top
  import torch
  from torchvision import datasets as tv_datasets, transforms as T
  results = {}
  for name, (_, sizes) in PIPELINES.items():
    crop = ([T.RandomResizedCrop(224, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3))] if sizes is None
            else [T.Resize((sizes[0], sizes[0])), T.RandomCrop(sizes[1])])
    transform = T.Compose(crop + [T.RandomHorizontalFlip(), T.ToTensor(),
                                  T.Normalize((0.5,) * 3, (0.5,) * 3)])
    loader = torch.utils.data.DataLoader(
        tv_datasets.ImageFolder(os.path.join(data, "train"), transform), batch_size=batch_size,
        shuffle=True, num_workers=cores, drop_last=True, persistent_workers=True)
    results[name] = _throughput(iter(loader), batch_size, seconds)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="image folder with a train/ split")
  parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--seconds", type=float, default=20, help="per measurement")
  parser.add_argument("--framework", choices=("both", "tf", "torch"), default="both")
  parser.add_argument("--torch_python", default=sys.executable,
                      help="interpreter with torch + torchvision for the comparison")
  parser.add_argument("--json", action="store_true", help="print one JSON object (img/s)")
  args = parser.parse_args(argv)
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])

  if args.framework == "torch":
    results = {"torch": measure_torch(args.data, args.batch_size, args.seconds, args.cores)}
  else:
    results = {"tf": measure_tf(args.data, args.batch_size, args.seconds)}
  if args.framework == "both":
    command = [args.torch_python, "-m", "big_transfer.benchmarks.input_pipeline", "--json",
               "--framework=torch", f"--data={args.data}", f"--cores={args.cores}",
               f"--batch_size={args.batch_size}", f"--seconds={args.seconds}"]
    proc = subprocess.run(command, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    if proc.returncode == 0:
      results.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
      print(f"torch side skipped ({args.torch_python}): {proc.stderr.strip().splitlines()[-1]}")
  if args.json:
    print(json.dumps(results))
    return
  print(f"{args.cores} core(s), batch {args.batch_size}, {args.seconds:g} s per measurement, "
        f"{args.data}/train")
  for name in PIPELINES:
    line = f"{name:>14}:"
    for framework, rates in results.items():
      line += f"  {framework} {rates[name]:7.1f} img/s ({rates[name] / args.cores:6.1f}/core)"
    if len(results) == 2:
      line += f"  tf/torch {results['tf'][name] / results['torch'][name]:.2f}x"
    print(line)


if __name__ == "__main__":
  main()
