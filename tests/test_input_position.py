"""The input position in the checkpoint: a run resumed at a late step reads only the input of
the steps it still trains (records counted as they are read, never timed), and stays bitwise
equal to an uninterrupted run, with one and with two processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from big_transfer import checkpoints, config_common, trainer
from big_transfer.data import datasets, pipeline
from configs import demo
from conftest import CIFAR10, ROOT, TINY_CONFIG, train_env
from helpers.input_position import count_reads

BATCH = 16
LATE = 1000  # Step 1000 of batch 16: 11 epochs of the 1437 digits, a third of CIFAR-10's.
# What the pipeline may read beyond the batches taken (parallel map and prefetch buffers); far
# below the LATE x BATCH records a resume that reads its way to the position would need.
READ_AHEAD = 16 * BATCH


@pytest.fixture
def reads(monkeypatch):
  """Every position a train split's `Dataset.reader` reads, as it reads it."""
  positions = []
  monkeypatch.setattr(datasets.Dataset, "reader", datasets.Dataset.reader)  # Restored after.
  count_reads(positions)
  return positions


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_iterator_resumed_late_reads_one_batch(name, data_dir, reads):
  """Image folders and TFDS array_record data (the embedded digits) are read by position."""
  if name == "cifar10" and not CIFAR10.is_dir():
    pytest.skip(f"{CIFAR10} not found")
  dataset = (datasets.get("sklearn_digits", data_dir) if name == "digits" else
             datasets.get(f"folder:{CIFAR10}"))
  assert dataset.builder.info.file_format != tfds.core.FileFormat.TFRECORD
  batches = lambda start=0: pipeline.train_iterator(dataset, "train", "decode", BATCH, seed=0,
                                                    start=start)
  uninterrupted = batches()
  for _ in range(LATE):
    next(uninterrupted)
  position = uninterrupted.position
  expected = next(uninterrupted)
  assert len(reads) >= (LATE + 1) * BATCH
  del uninterrupted  # Stops its read-ahead.
  reads.clear()
  resumed = next(batches(position))
  assert BATCH <= len(reads) <= READ_AHEAD
  for key in expected:
    np.testing.assert_array_equal(resumed[key], expected[key])


@pytest.mark.parametrize("repeats", [1, 3])
def test_tfrecord_data_resumed_late_reads_at_most_an_epoch(repeats, tmp_path, monkeypatch):
  """TFDS tfrecord data is read in sequence: a resume reads its epoch up to its place. With
  repeated augmentation it may resume between the copies of an example."""
  tfds.builder("sklearn_digits", data_dir=str(tmp_path), file_format="tfrecord"
               ).download_and_prepare()
  digits = datasets.get("sklearn_digits", str(tmp_path))
  assert digits.reader("train") is None
  examples = []
  as_dataset = datasets.Dataset.as_dataset
  count = lambda e: {**e, "image": tf.numpy_function(
      lambda image: examples.append(1) or image, [e["image"]], tf.string, stateful=True)}
  monkeypatch.setattr(datasets.Dataset, "as_dataset",
                      lambda *args, **kwargs: as_dataset(*args, **kwargs).map(count))
  late = 370  # Stream index 5920: 172 examples into the fifth epoch of 1437, or with 3 copies
  # each, example 1973 (536 into the second epoch) and its second copy.
  batches = lambda start=0: pipeline.train_iterator(digits, "train", "decode", BATCH, seed=0,
                                                    start=start, shuffle_buffer=100,
                                                    repeats=repeats)
  uninterrupted = batches()
  for _ in range(late):
    next(uninterrupted)
  expected = next(uninterrupted)
  assert len(examples) >= (late + 1) * BATCH // repeats
  del uninterrupted
  examples.clear()
  np.testing.assert_array_equal(next(batches(late * BATCH))["image"], expected["image"])
  example_of_row = (late * BATCH + np.arange(BATCH)) // repeats
  for j in np.unique(example_of_row):  # The copies of an example are the same image.
    copies = expected["image"][example_of_row == j]
    assert all(np.array_equal(copies[0], copy) for copy in copies[1:])
  into_epoch = late * BATCH // repeats % 1437  # Then the shuffle buffer's 100 are read.
  assert into_epoch + BATCH // repeats <= len(examples) <= into_epoch + 100 + READ_AHEAD


def _tiny(total_steps: int, data_dir: str):
  config = demo.get_config()
  return config_common.with_overrides(config, {
      **TINY_CONFIG, "total_steps": total_steps, "checkpoint_every_steps": 100,
      "log_every_steps": total_steps, "data_dir": data_dir})


def test_trainer_resumed_late_reads_its_steps_and_matches(tmp_path, data_dir, reads, monkeypatch,
                                                          one_device):
  """One process, through the trainer: preempted at step 20 of 24, the resumed run restores the
  input position saved with the checkpoint, reads only its 4 steps' records, and ends with
  the same parameters as the uninterrupted run, bit for bit. On one device: two processes are
  the next test's."""
  total, preempt_at = 24, 20
  config = _tiny(total, data_dir)
  trainer.run(config, str(tmp_path / "uninterrupted"))
  assert len(reads) >= total * BATCH
  with monkeypatch.context() as patch:  # A preemption notice (SIGTERM) at step 20.
    patch.setattr(trainer._Preemption, "reached", lambda self, step: step == preempt_at)
    assert trainer.run(config, str(tmp_path / "resumed")) == {}
  saved = tmp_path / "resumed" / "checkpoints" / str(preempt_at) / "input" / "process_0-of-1.json"
  assert json.loads(saved.read_text()) == {"position": preempt_at * BATCH}
  reads.clear()
  trainer.run(config, str(tmp_path / "resumed"))
  assert (total - preempt_at) * BATCH <= len(reads) <= READ_AHEAD < preempt_at * BATCH
  expected, actual = (checkpoints.load_params(str(tmp_path / run))[1]
                      for run in ("uninterrupted", "resumed"))
  for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
    np.testing.assert_array_equal(a, e)


def test_each_of_two_processes_saves_and_restores_its_own_position(tmp_path, data_dir):
  """Two processes (jax.distributed on localhost): each reads its own shard, saves its position
  in the orbax checkpoint (its own file) and, resumed at step 200, reads one batch of records
  and gets the batch an uninterrupted run gets, bit for bit."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  late = 200
  procs = [subprocess.Popen(
      [sys.executable, "-m", "helpers.input_position", data_dir, str(tmp_path / "run"),
       str(port), "2", str(i), str(late)],
      cwd=ROOT / "tests", env={**train_env(1), "PYTHONPATH": str(ROOT)},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  local_batch = BATCH // 2
  for result in results:
    assert result["saved"] == result["restored"] == late * local_batch
    assert result["equal"]
    assert result["read_uninterrupted"] >= (late + 1) * local_batch
    assert local_batch <= result["read_resumed"] <= READ_AHEAD < late * local_batch
  files = os.listdir(tmp_path / "run" / "checkpoints" / str(late) / "input")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(files)
