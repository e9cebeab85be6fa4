"""One process of a multi-process input-position check (tests/test_input_position.py).

    python -m helpers.input_position DATA_DIR WORKDIR PORT NUM_PROCESSES PROCESS_ID LATE

Each process reads its shard of the digits for LATE batches (global batch 16), saves its input
position with a checkpoint (checkpoints.Manager, orbax), takes one more batch, then restores
the position from that checkpoint into a new iterator, takes one batch, and prints one JSON line:
its saved and restored positions, whether the two batches are bitwise equal, and the records
read by each iterator (counted per read, see `count_reads`).
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from big_transfer import checkpoints
from big_transfer.data import datasets, pipeline

GLOBAL_BATCH = 16
PP = "decode|resize(10)|random_crop(8)|flip_lr"


def count_reads(reads: list[int]) -> None:
  """Makes every train-split `Dataset.reader` append each position it reads to `reads`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = datasets.Dataset.reader

  def counting_reader(self, split, decoders=None):
    random_access = reader(self, split, decoders)
    if random_access is None or getattr(split, "split", split) != "train":  # Or a shard.
      return random_access

    def read(position):
      counted = tf.numpy_function(lambda p: reads.append(int(p)) or p, [position], tf.int64,
                                  stateful=True)
      return random_access.read(tf.ensure_shape(counted, []))

    return datasets.Reader(random_access.size, read)

  datasets.Dataset.reader = counting_reader


def main(data_dir, workdir, port, num_processes, process_id, late):
  jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id))
  late = int(late)
  reads = []
  count_reads(reads)
  digits = datasets.get("sklearn_digits", data_dir)
  local_batch = GLOBAL_BATCH // jax.process_count()

  def batches(start=0):
    return pipeline.train_iterator(digits, "train", PP, local_batch, seed=0, start=start,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())

  replicated = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), P())
  state = {"step": jax.make_array_from_callback((), replicated, lambda _: np.int32(late))}
  uninterrupted = batches()
  for _ in range(late):
    next(uninterrupted)
  saved = uninterrupted.position
  manager = checkpoints.Manager(workdir, every_steps=late, keep=1)
  manager.save(late, state, saved)
  manager.close()
  expected = next(uninterrupted)
  read_uninterrupted = len(reads)
  del uninterrupted  # Stops its read-ahead before counting the resumed iterator's reads.

  manager = checkpoints.Manager(workdir, every_steps=late, keep=1)
  manager.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                              sharding=x.sharding), state))
  manager.close()
  reads.clear()
  resumed = next(batches(manager.input_position))
  print(json.dumps({
      "saved": saved, "restored": manager.input_position,
      "equal": all(np.array_equal(resumed[k], expected[k]) for k in expected),
      "read_uninterrupted": read_uninterrupted, "read_resumed": len(reads)}), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
