"""Input position options for resumption: records read to resume, saved state per host, img/s.

    python -m big_transfer.benchmarks.input_resume --data=../shared/data/cifar10 [--cores N]

On DATA/train (an image folder), for a resume at step --steps of batch --batch_size:
- ours (`pipeline.train_iterator`, read by position): records read to give the first batch
  from the saved position, and the saved state (this process's position file);
- a checkpointed tf.data iterator (`tf.train.Checkpoint`) of the sequential pipeline we had
  (files in a seeded order, a shuffle buffer of --shuffle_buffer encoded images, parallel
  decode, prefetch): its checkpoint's size;
- Grain (`grain.MapDataset` over the same files, shuffled by position, our preprocessing per
  example, `ReadOptions(num_threads=cores)`): img/s and its iterator state, when grain is
  importable (it is not a dependency).
img/s of ours and of Grain use the `upstream-224` recipe of benchmarks/input_pipeline.py; the
process is pinned to the first N cores.
"""

import argparse
import json
import os
import tempfile
import time

from big_transfer.benchmarks import input_pipeline

SPEC = input_pipeline.PIPELINES["upstream-224"][0]


def _count_reads(reads: list) -> None:
  """Counts every train-split read by position (as tests/helpers/input_position.py does)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from big_transfer.data import datasets  # pylint: disable=g-import-not-at-top
  reader = datasets.Dataset.reader

  def counting_reader(self, split, decoders=None):
    random_access = reader(self, split, decoders)
    read = lambda i: random_access.read(tf.ensure_shape(tf.numpy_function(
        lambda p: reads.append(1) or p, [i], tf.int64, stateful=True), []))
    return datasets.Reader(random_access.size, read)

  datasets.Dataset.reader = counting_reader


def ours(data: str, batch_size: int, steps: int, seconds: float) -> dict:
  # pylint: disable=g-import-not-at-top
  from etils import epath
  from big_transfer import checkpoints
  from big_transfer.data import datasets, pipeline
  reads = []
  _count_reads(reads)
  dataset = datasets.get(f"folder:{os.path.abspath(data)}")
  batches = lambda start=0: pipeline.train_iterator(dataset, "train", SPEC, batch_size, seed=0,
                                                    start=start)
  started = time.perf_counter()
  next(batches(steps * batch_size))
  first_batch_s = time.perf_counter() - started
  read_to_resume = len(reads)
  with tempfile.TemporaryDirectory() as directory:
    checkpoints.InputPositionHandler().save(epath.Path(directory),
                                            checkpoints.InputPositionSave(steps * batch_size))
    state_bytes = sum(f.stat().st_size for f in os.scandir(directory))
  rate = input_pipeline._throughput(  # pylint: disable=protected-access
      batches(), batch_size, seconds)
  return {"records_read_to_resume": read_to_resume, "first_batch_s": first_batch_s,
          "state_bytes": state_bytes, "img_per_s": rate}


def tf_data_checkpoint(data: str, batch_size: int, shuffle_buffer: int, steps: int,
                       symbolic: bool) -> dict:
  """A `tf.train.Checkpoint` of the sequential pipeline's iterator after `steps` batches;
  `symbolic`: tf.data's symbolic checkpoint (buffers of map and prefetch are not saved)."""
  # pylint: disable=g-import-not-at-top,protected-access
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from big_transfer.data import datasets, pipeline
  dataset = datasets.get(f"folder:{os.path.abspath(data)}")
  examples = dataset.builder.as_dataset(split="train", shuffle_files=True,
                                        decoders=pipeline._ENCODED,
                                        read_config=tfds.ReadConfig(shuffle_seed=0))
  ds = examples.repeat().shuffle(shuffle_buffer, seed=0).enumerate()
  ds = ds.map(pipeline._example_fn(dataset, SPEC, 0), num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.experimental_symbolic_checkpoint = symbolic
  iterator = iter(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(options))
  for _ in range(steps):
    next(iterator)
  with tempfile.TemporaryDirectory() as directory:
    started = time.perf_counter()
    tf.train.Checkpoint(iterator=iterator).write(os.path.join(directory, "input"))
    save_s = time.perf_counter() - started
    state_bytes = sum(f.stat().st_size for f in os.scandir(directory))
  files = [f.stat().st_size for c in os.scandir(os.path.join(data, "train"))
           for f in os.scandir(c.path)]
  return {"state_bytes": state_bytes, "save_s": save_s, "shuffle_buffer": shuffle_buffer,
          "mean_file_bytes": sum(files) / len(files)}


def grain_side(data: str, batch_size: int, steps: int, seconds: float, cores: int) -> dict:
  """Grain over the same files and preprocessing (our ops, one tf.function call an example)."""
  # pylint: disable=g-import-not-at-top
  import grain
  import numpy as np
  import tensorflow as tf
  from big_transfer.data import preprocess
  classes = sorted(os.listdir(os.path.join(data, "train")))
  records = [(os.path.join(data, "train", c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(data, "train", c)))]
  pp = preprocess.parse(SPEC)
  process = tf.function(lambda image, seed: pp({"image": image, "_seed": seed})["image"])
  reads = []

  def load(index, record):
    path, label = record
    reads.append(index)
    with open(path, "rb") as f:
      image = process(tf.constant(f.read()), tf.constant([0, index], tf.int64))
    return {"image": image.numpy(), "labels": np.eye(len(classes), dtype=np.float32)[label]}

  ds = grain.MapDataset.source(records).shuffle(seed=0).repeat().map_with_index(load)
  ds = ds.batch(batch_size, drop_remainder=True)
  options = grain.ReadOptions(num_threads=cores, prefetch_buffer_size=2)
  iterator = iter(ds.to_iter_dataset(options))
  rate = input_pipeline._throughput(  # pylint: disable=protected-access
      iterator, batch_size, seconds)
  state = json.dumps(iterator.get_state())
  resumed = iter(ds.to_iter_dataset(options))
  resumed.set_state({"next_index": steps})  # Grain's position: the index of the next batch.
  reads.clear()
  next(resumed)
  return {"img_per_s": rate, "state_bytes": len(state.encode()), "state": state,
          "records_read_to_resume": len(reads)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="image folder with a train/ split")
  parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=100_000, help="the step to resume at")
  parser.add_argument("--shuffle_buffer", type=int, default=10_000)
  parser.add_argument("--seconds", type=float, default=20, help="per img/s measurement")
  args = parser.parse_args(argv)
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
  results = {"ours": ours(args.data, args.batch_size, args.steps, args.seconds),
             "tf.data checkpoint": tf_data_checkpoint(args.data, args.batch_size,
                                                      args.shuffle_buffer, 20, False),
             "tf.data symbolic checkpoint": tf_data_checkpoint(
                 args.data, args.batch_size, args.shuffle_buffer, 20, True)}
  try:
    results["grain"] = grain_side(args.data, args.batch_size, args.steps, args.seconds,
                                  args.cores)
  except ImportError as e:
    print(f"grain side skipped: {e}")
  print(json.dumps({"cores": args.cores, "batch_size": args.batch_size, "steps": args.steps,
                    **results}, indent=1))


if __name__ == "__main__":
  main()
