"""Bad input: each mistake ends in one `error: ...` line naming the problem and the fix, exit 1,
before any dataset is prepared or program compiled, and nothing is written.

The CLI runs in this process (conftest.run_cli); test_the_cli_prints_the_line_and_exits_1 shows
the same line from a real subprocess.
"""

import io
import itertools
import os

import numpy as np
import PIL.Image
import pytest

from big_transfer import checkpoints, native_logs
from big_transfer.data import datasets, pipeline
from big_transfer.errors import UserError
from conftest import ROOT, TINY, error_line, run_cli, run_train

tf = native_logs.import_tensorflow()

PP = "decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)"
PP_EVAL = "decode|resize(16)|value_range(-1, 1)"


@pytest.fixture
def cli(tmp_path, data_dir):
  """Runs the demo config with TINY and `flags`; returns its error line (after checking it is
  the only one, exit 1) and checks the workdir was not even created."""
  workdir = tmp_path / "run"

  def run(*flags, config=f"{ROOT}/configs/demo.py"):
    proc = run_cli(f"--config={config}", *TINY, f"--config.data_dir={data_dir}",
                   f"--workdir={workdir}", *flags)
    assert proc.returncode == 1
    line = error_line(proc)
    assert not workdir.exists() or not any(workdir.iterdir())
    return line[len("error: "):]

  return run


@pytest.mark.parametrize("flag, message", [
    # Optimization.
    ("--config.lr=-0.1", "lr -0.1 must be a positive number; e.g. --config.lr=0.003."),
    ("--config.lr=0.0", "lr 0.0 must be a positive number"),
    ("--config.momentum=1.0", "momentum 1.0 must be in [0, 1); BiT uses 0.9."),
    ("--config.wd=-0.0001", "wd -0.0001 must be >= 0; BiT uses 1e-4"),
    ("--config.wd_mask=(kernel", "wd_mask '(kernel' is not a regular expression"),
    ("--config.grad_clip_norm=0.0", "grad_clip_norm 0.0 must be a positive number"),
    ("--config.mixup_alpha=-0.5", "mixup_alpha -0.5 must be >= 0 (0: no MixUp"),
    ("--config.lr_batch_ref=-256", "lr_batch_ref -256 must be >= 0"),
    ("--config.schedule.decay_factor=0.0", "schedule.decay_factor 0.0 must be a positive number"),
    ("--config.schedule.kind=linear", "Unknown schedule.kind 'linear'; valid: stair, cosine"),
    ("--config.loss=hinge", "Unknown loss 'hinge'; valid: softmax_xent, sigmoid_xent"),
    # Batches over the 8 devices the tests see.
    ("--config.batch_size=0", "batch_size 0 must be a positive multiple of the 8 devices; e.g. "
                              "--config.batch_size=64."),
    ("--config.batch_size=-16", "batch_size -16 must be a positive multiple of the 8 devices"),
    ("--config.batch_size=12", "batch_size 12 is not divisible by the 8 devices; use a multiple "
                               "of 8 (e.g. --config.batch_size=8)."),
    ("--config.eval_batch_size=0", "eval_batch_size 0 must be a positive multiple of the 8"),
    ("--config.batch_split=0", "batch_split 0 must be at least 1"),
    ("--config.batch_split=3", "batch_split 3 must divide the per-device batch 2"),
    # Durations.
    ("--config.total_steps=0", "total_steps 0 must be positive: there would be nothing to "
                               "train; e.g. --config.total_steps=1000."),
    ("--config.total_steps=-5", "total_steps -5 must be positive"),
    ("--config.schedule.warmup_steps=-1", "schedule.warmup_steps -1 must be >= 0."),
    # Choices.
    ("--config.model.name=R51x1", "Unknown model 'R51x1'; valid: R14x1,"),
    ("--config.model.dtype=float8", "Unknown model.dtype 'float8'; valid: float32, bfloat16"),
    ("--config.state_sharding=zero3", "Unknown state_sharding 'zero3'; valid: replicated, fsdp"),
    ("--config.input_sharding=host", "Unknown input_sharding 'host'; valid: process, global"),
    ("--config.num_classes=0", "num_classes 0 must be at least 1"),
    ("--config.dataset=", "No dataset: set --config.dataset"),
    # Bookkeeping.
    ("--config.log_every_steps=0", "log_every_steps 0 must be at least 1"),
    ("--config.checkpoint_every_steps=0", "checkpoint_every_steps 0 must be at least 1"),
    ("--config.keep_checkpoints=0", "keep_checkpoints 0 must be at least 1"),
    ("--config.eval_every_steps=-1", "eval_every_steps -1 must be at least 0"),
    ("--config.shuffle_buffer=0", "shuffle_buffer 0 must be at least 1"),
    # Preprocessing: ops and their arguments, run on dummy images.
    ("--config.pp_train=decode|rezise(16)", "Unknown preprocessing op 'rezise' in "),
    ("--config.pp_train=decode|resize(1, 2, 3)",
     "Bad arguments in 'resize(1, 2, 3)' of 'decode|resize(1, 2, 3)' (resize() takes from 1 to "
     "2 positional arguments but 3 were given); write Python literals matching resize(size: "
     "int, method: str = 'bilinear')."),
    ("--config.pp_train=decode|resize(size)", "Bad arguments in 'resize(size)'"),
    ("--config.pp_train=decode|inception_crop(16, 2.0)|value_range(-1, 1)",
     "fails on a 521x524 image: Area range must be less then or equal to 1.0"),
    ("--config.pp_train=decode|resize(16)|random_crop(32)|value_range(-1, 1)",
     "fails on a 521x524 image: "),
    ("--config.pp_train=decode|resize(0)|value_range(-1, 1)",
     "fails on a 521x524 image: output dimensions must be positive"),
    ("--config.pp_train=decode|random_crop(0)|value_range(-1, 1)",
     "gives 0x0 images; the model needs at least 1x1 pixels"),
    ("--config.pp_eval=decode|resize(16)", "gives uint8 pixels; end it with value_range(-1, 1)"),
    ("--config.pp_eval=decode(1)|resize(16)|value_range(-1, 1)",
     "gives 1-channel images; the model takes RGB"),
    ("--config.pp_eval=", "pp_eval is empty; set it"),
    # Flags the config cannot take.
    ("--config.no_such_key=1", "Unknown config key 'no_such_key'; valid: batch_size, batch_split,"),
    ("--config.batch_size=sixteen", "Bad config flag:"),
])
def test_bad_config_value(cli, flag, message):
  assert message in cli(flag)


def test_checked_in_this_order_before_the_data(cli, tmp_path):
  # An unknown dataset is only looked up after every config value is valid.
  assert cli("--config.dataset=mnsit", "--config.lr=-1.0").startswith("lr -1.0 must be")
  assert cli("--config.dataset=mnsit").startswith("Unknown dataset 'mnsit'")
  assert cli("--config.eval_split=validation").startswith(
      "Dataset 'sklearn_digits' has no split 'validation'; valid: train, test.")
  assert cli("--config.num_classes=7") == (
      "Config expects 7 classes but dataset 'sklearn_digits' has 10; set "
      "--config.num_classes=10.")


def test_config_files_that_fail(cli, tmp_path):
  raises = tmp_path / "raises.py"
  raises.write_text("def get_config(arg=None):\n  x = 1\n  raise ValueError('no recipe for ' + "
                    "str(arg))\n")
  assert cli(config=f"{raises}:cifar") == (
      f"Config file '{raises}' raised ValueError (line 3): no recipe for cifar; fix the file (it "
      "must define get_config(arg=None) returning a ConfigDict).")
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  assert cli(config=str(broken)).startswith(f"Config file '{broken}' raised SyntaxError")
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  assert cli(config=str(empty)).startswith(f"Config file '{empty}' raised AttributeError")
  assert cli(config=str(tmp_path / "missing.py")) == (
      f"Config file '{tmp_path / 'missing.py'}' not found.")


def test_workdir_that_cannot_be_created(tmp_path, data_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  proc = run_cli(f"--config={ROOT}/configs/demo.py", *TINY, f"--config.data_dir={data_dir}",
                 f"--workdir={blocker}/run")
  assert error_line(proc) == (f"error: Cannot create the workdir {blocker}/run (Not a "
                              "directory); pass a writable --workdir.")
  assert run_cli(f"--config={ROOT}/configs/demo.py").stderr == (
      "error: --workdir=DIR is required (checkpoints and metrics go there).\n")


def test_the_cli_prints_the_line_and_exits_1(tmp_path, data_dir):
  """The in-process runner's mapping, shown by a real process (TF's notices present)."""
  proc = run_train(str(tmp_path / "run"), *TINY, f"--config.data_dir={data_dir}",
                   "--config.lr=-0.1", check=False)
  assert proc.returncode == 1
  assert error_line(proc) == "error: lr -0.1 must be a positive number; e.g. --config.lr=0.003."
  assert not os.path.exists(tmp_path / "run")


# ---- Image folders: what decodes, and what is named as the file to fix ----------------------

def _jpeg(shape=(12, 10, 3), seed=0) -> bytes:
  image = np.random.default_rng(seed).integers(0, 256, shape, np.uint8)
  return tf.io.encode_jpeg(image).numpy()


def _folder(root, files: dict[str, bytes] = ()) -> str:
  """root/{train,test}/{a,b}/ with two 12x10 RGB JPEGs each, plus `files`."""
  for split in ("train", "test"):
    for label in ("a", "b"):
      (root / split / label).mkdir(parents=True, exist_ok=True)
      for i in range(2):
        (root / split / label / f"{i}.jpg").write_bytes(_jpeg(seed=i))
  for path, data in dict(files).items():
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_bytes(data)
  return f"folder:{root}"


def _cmyk_jpeg() -> bytes:
  out = io.BytesIO()
  PIL.Image.new("RGB", (10, 12), (200, 40, 10)).convert("CMYK").save(out, "JPEG")
  return out.getvalue()


def test_grayscale_rgba_cmyk_png_and_non_ascii_names_all_decode_to_rgb(tmp_path):
  """Documented recovery: every kind of image becomes RGB; other files are ignored."""
  gray = tf.io.encode_jpeg(np.full((9, 7, 1), 90, np.uint8)).numpy()
  rgba = tf.io.encode_png(np.full((8, 8, 4), 30, np.uint8)).numpy()
  dataset = datasets.get(_folder(tmp_path, {
      "test/a/gray.jpg": gray, "test/a/rgba.png": rgba, "test/b/cmyk.jpg": _cmyk_jpeg(),
      "test/b/png_named.jpg": rgba, "test/chat_é/猫.JPG": _jpeg(),
      "test/a/notes.txt": b"not an image", "test/b/Thumbs.db": b"\0\1"}))
  assert dataset.class_names() == ["a", "b", "chat_é"] and dataset.num_examples("test") == 9
  batches = list(pipeline.eval_iterator(dataset, "test", PP_EVAL, 16, with_ids=True))
  images = batches[0]["image"][batches[0]["mask"]]
  assert images.shape == (9, 16, 16, 3) and images.dtype == np.float32
  assert any(i.decode().endswith("test/chat_é/猫.JPG") for i in batches[0]["id"])


@pytest.mark.parametrize("name, data", [
    ("zero.jpg", b""),
    ("truncated.jpg", _jpeg((40, 40, 3))[:300]),
    ("text.jpg", b"this is not an image\n"),
    ("zero_猫.png", b""),
])
def test_undecodable_files_are_named(tmp_path, name, data):
  dataset = datasets.get(_folder(tmp_path, {f"train/b/{name}": data}))
  with pytest.raises(UserError) as error:
    list(itertools.islice(pipeline.train_iterator(dataset, "train", PP, 4, seed=0), 4))
  assert str(error.value) == (f"Cannot decode image {tmp_path}/train/b/{name} (corrupt or not an "
                              "image); replace or delete it.")


def test_zero_byte_first_image_is_named_by_the_hyperrule_probe(tmp_path):
  """Was a TensorFlow "Input is empty" traceback (the resolution probe decodes one image)."""
  dataset = datasets.get(_folder(tmp_path, {f"train/{c}/{i}.jpg": b"" for c in "ab"
                                            for i in range(2)}))
  with pytest.raises(UserError, match=r"^Cannot decode image .*/train/[ab]/[01]\.jpg, the first of "
                                      r"'train' \(corrupt or not an image\); replace or delete"):
    dataset.image_area("train")


def test_crop_larger_than_the_images_names_a_file(tmp_path):
  dataset = datasets.get(_folder(tmp_path))
  with pytest.raises(UserError, match=r"^Preprocessing fails on image .*/test/[ab]/[01]\.jpg "
                                      r"\(12x10\): Need value\.shape >= size, got 12, 10, 3 11, "
                                      r"11, 3; make the ops fit the images \(e\.g\. resize "
                                      r"before random_crop\)\.$"):
    list(pipeline.eval_iterator(dataset, "test", "decode|random_crop(11)", 4))


@pytest.mark.parametrize("layout, message", [
    ({"train/c/notes.txt": b"x"}, r"Class folder '.*/train/c' has no \.jpg/\.jpeg/\.png images; "
                                  r"add images or remove the folder\."),
    ({"train/b/more/1.jpg": _jpeg()}, r"Folder '.*/train/b/more' holds images one level too deep"
                                      r", where they would be ignored; expected ROOT/<split>/"),
    ({"valid/readme.txt": b"x"}, r"Split folder '.*/valid' has no class folders; expected ROOT/"),
])
def test_folder_layout_errors(tmp_path, layout, message):
  with pytest.raises(UserError, match=message):
    datasets.get(_folder(tmp_path, layout))


def test_nested_folders_without_images_are_ignored(tmp_path):
  dataset = datasets.get(_folder(tmp_path, {"train/a/.ipynb_checkpoints/notes.txt": b"x"}))
  assert dataset.num_examples("train") == 4


def test_more_shots_than_a_class_has(tmp_path):
  dataset = datasets.get(_folder(tmp_path))
  with pytest.raises(UserError, match=r"^Class 'a' has 2 examples in 'train', fewer than 3 shots;"
                                      r" lower the shots or use a larger split\.$"):
    pipeline.few_shot_subset(dataset, "train", 3, seed=0)


# ---- .npz checkpoints (missing, extra, misshapen keys and unreadable files: test_checkpoints) ---

class _Tripwire:
  """Unpickling it would create `path`: proof that a file's objects were unpickled."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_npz_holding_pickled_objects_is_refused_unread(tmp_path):
  path = str(tmp_path / "BiT-M-R50x1.npz")
  tripwire = tmp_path / "unpickled"
  objects = np.empty(1, object)
  objects[0] = _Tripwire(str(tripwire))
  np.savez(path, **{"resnet/root_block/standardized_conv2d/kernel": objects})
  with pytest.raises(UserError, match=r"^Cannot read .*BiT-M-R50x1\.npz as a BiT \.npz "
                                      r"checkpoint \(Object arrays cannot be loaded when "
                                      r"allow_pickle=False\)"):
    checkpoints.load_bit_npz(path)
  assert not tripwire.exists()
