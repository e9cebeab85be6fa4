"""Training checkpoints (orbax) in `<workdir>/checkpoints/<step>`.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-write leaves the earlier checkpoints as they were, and old checkpoints are
deleted only after a newer one is finalized. Orbax checksums its metadata but not the array
data (a flipped bit restores silently), so each checkpoint also carries a checksum of every
array of the state, computed on the devices when saved and verified after restoring. A
checkpoint that fails to restore or to verify (truncated or corrupted after the fact) is moved
to `<workdir>/corrupt_checkpoints/` and the previous one is used, with a warning; nothing is
deleted. A checkpoint of another model or class count is refused (UserError), not moved: the
config is wrong, not the file. A failed write is a TrainingError naming the intact checkpoint.

Next to the state (item `default`), a checkpoint holds each process's input position (item
`input`, one `process_<i>-of-<n>.json` per process, Grain's layout): resuming reads from there
instead of reading the input again up to the saved step.

Released BiT checkpoints (`BiT-{S,M}-R*.npz`) are read by `load_bit_npz` and written by
`save_bit_npz` in the official flat layout: keys `resnet/<flax param path>`, conv kernels HWIO,
GroupNorm `gamma`/`beta` 1-D, head kernel (1, 1, C, N), all float32.
"""

import contextlib
import dataclasses
import json
import os
import re
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from big_transfer import files, metrics, models
from big_transfer.errors import TrainingError, UserError
from big_transfer.models import bit


class Manager:
  """Saves asynchronously, keeps the `keep` newest; the trainer saves every `every_steps`.

  `input_position`: this process's input position saved with the checkpoint that `restore`
  returned; None if there was none, or it was saved by another number of processes.
  """

  def __init__(self, workdir: str, every_steps: int, keep: int):
    self.every_steps = every_steps
    self._workdir = files.path(workdir)
    self._manager = self._open(keep)
    self._keep = keep
    self.input_position = None

  def _open(self, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self._workdir / "checkpoints",
        # The standard handler reads metadata before any restore.
        item_handlers={"default": ocp.StandardCheckpointHandler(),
                       "input": InputPositionHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, abstract_state):
    """The newest checkpoint that restores and verifies, placed like `abstract_state`; None if
    none. UserError if the newest readable one holds another model's state."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        stored = self._manager.item_metadata(step)["default"]
      except Exception as e:  # pylint: disable=broad-except  (unreadable: try an older one)
        self._quarantine(step, e)
        continue
      self._check_structure(step, stored, abstract_state)
      try:
        state = self._manager.restore(step, args=ocp.args.Composite(
            default=ocp.args.StandardRestore(abstract_state)))["default"]
        self._verify(step, state)
        input_position = None
        if (self._manager.directory / str(step) / "input").exists():
          input_position = self._manager.restore(step, args=ocp.args.Composite(
              input=InputPositionRestore()))["input"]
      except Exception as e:  # pylint: disable=broad-except  (any failure: try an older one)
        self._quarantine(step, e)
        continue
      metrics.log(f"Resuming from checkpoint at step {step}.")
      self.input_position = input_position
      return state
    return None

  def _check_structure(self, step: int, stored, abstract_state) -> None:
    """UserError naming the first array whose path or shape differs from the config's."""
    on_disk = _shapes(stored)
    wanted = _shapes(abstract_state)
    if on_disk == wanted:
      return
    differing = sorted(set(on_disk) ^ set(wanted)) or sorted(
        k for k in wanted if on_disk[k] != wanted[k])
    # Parameters first: a different model or class count shows there.
    key = min(differing, key=lambda k: (not k.startswith("params/"), k))
    found = f"shape {on_disk[key]}" if key in on_disk else "no such array"
    needed = f"shape {wanted[key]}" if key in wanted else "no such array"
    raise UserError(
        f"Workdir {self._workdir} holds checkpoints of another model or optimizer: step {step} "
        f"has {found} for {key}, this config needs {needed}. Resume with the config that wrote "
        "them (config.json in the workdir) or pass a new --workdir.")

  def _verify(self, step: int, state) -> None:
    expected = self._manager.metadata(step).custom_metadata.get(CHECKSUMS)
    if expected is None:  # Written before checksums were stored.
      return
    actual = checksums(state)
    if expected != actual:
      bad = sum(a != b for a, b in zip(expected, actual))
      raise ValueError(f"{bad} array(s) differ from their checksums at save time")

  def _quarantine(self, step: int, error: Exception) -> None:
    """Moves an unreadable checkpoint aside (so training can write that step again)."""
    target = self._workdir / "corrupt_checkpoints" / str(step)
    metrics.log(f"WARNING: checkpoint at step {step} does not restore "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); moved to "
                f"{target}, trying the previous one.")
    if jax.process_index() == 0:
      files.move_folder(self._workdir / "checkpoints" / str(step), target)
    multihost_utils.sync_global_devices("bit_quarantine_checkpoint")
    self._manager.close()
    self._manager = self._open(self._keep)

  def save(self, step: int, state, input_position: int | None = None) -> None:
    """Starts an asynchronous save (returns once the arrays are copied off the devices) of
    `state` and this process's `input_position`; a failure of the previous save surfaces here
    or in `close`."""
    if step not in self._manager.all_steps():
      sums = checksums(state)
      items = {"default": ocp.args.StandardSave(state)}
      if input_position is not None:
        items["input"] = InputPositionSave(input_position)
      with self._failures():
        self._manager.save(step, args=ocp.args.Composite(**items),
                           custom_metadata={CHECKSUMS: sums})

  def close(self) -> None:
    with self._failures():
      self._manager.wait_until_finished()
    self._manager.close()

  @contextlib.contextmanager
  def _failures(self):
    """A failed write (disk full, read-only or vanished workdir) as one TrainingError line."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many)
      code = re.search(r"os_error_code='(\d+)'", str(e))  # Tensorstore's wording.
      if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
      else:
        reason = os.strerror(int(code[1])) if code else " ".join(str(e).split())[:200]
      directory = self._workdir / "checkpoints"
      kept = ocp.utils.checkpoint_steps(directory)
      intact = (f"the newest complete checkpoint, step {max(kept)}, is intact" if kept
                else "no complete checkpoint was written")
      raise TrainingError(f"Saving a checkpoint to {directory} failed ({reason}); {intact}. "
                          "Free disk space or make the workdir writable, then rerun the same "
                          "command to resume.") from None


class InputPositionHandler(ocp.CheckpointHandler):
  """Every process writes and reads its own input position: `process_<i>-of-<n>.json`, as
  Grain's checkpoint handler does (orbax's JSON handler writes from process 0 only)."""

  def save(self, directory: epath.Path, args: "InputPositionSave"):
    (directory / _position_file()).write_text(json.dumps({"position": args.position}))

  def restore(self, directory: epath.Path, args: "InputPositionRestore | None" = None):
    del args
    path = directory / _position_file()
    return json.loads(path.read_text())["position"] if path.exists() else None

  def metadata(self, directory: epath.Path):
    del directory

  def finalize(self, directory: epath.Path):
    del directory

  def close(self):
    pass


def _position_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(InputPositionHandler, for_save=True)
@dataclasses.dataclass
class InputPositionSave(ocp.args.CheckpointArgs):
  position: int


@ocp.args.register_with_handler(InputPositionHandler, for_restore=True)
@dataclasses.dataclass
class InputPositionRestore(ocp.args.CheckpointArgs):
  pass


CHECKSUMS = "bit_checksums"


@jax.jit
def _checksums(state) -> jax.Array:
  """Per array, the sum of its 32-bit words weighted by 2i+1 (mod 2^32): any single flipped
  bit changes it (an odd weight times 2^k is never 0 mod 2^32), whatever the sharding."""
  def checksum(x):
    if x.dtype.itemsize < 4:
      words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
      words = words.astype(jnp.uint32).ravel()
    else:  # 64-bit values become two words each.
      words = jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
    weights = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
    return jnp.sum(words * weights, dtype=jnp.uint32)
  return jnp.stack([checksum(x) for x in jax.tree.leaves(state)])


def checksums(state) -> list[int]:
  """The checksum of every array of `state`, in tree order (stored with each checkpoint)."""
  return [int(x) for x in np.asarray(jax.device_get(_checksums(state)))]


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{"params/block1/...": shape} for a state, an abstract state or orbax's metadata of one."""
  def name(entry):
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))
  return {"/".join(name(e) for e in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


PREFIX = "resnet/"
HEAD_KERNEL = "head/conv2d/kernel"
HEAD_BIAS = "head/conv2d/bias"
HEAD_MODES = ("auto", "keep", "reset")
_NUMBERED_CONV = re.compile(r"/standardized_conv2d_\d+/")
_UNIT = re.compile(r"^block([1-4])/unit(\d+)/")


def load_bit_npz(path: str, model_name: str | None = None, num_classes: int | None = None, *,
                 head: str = "auto") -> dict:
  """Flax `params` (float32 numpy) for `get_model(name, num_classes)` from an official BiT .npz.

  Depth and width are read from the file (units per block, root width); `model_name` (e.g.
  "BiT-M-R50x1") is only checked against them. The head depends on `num_classes` (None: the
  file's class count, 0: no head) and `head`:
    "auto":  keep the file's head when its class count equals `num_classes`, else start a
             zero head (kernel and bias) of `num_classes` for transfer and log one line;
    "keep":  the file's head, UserError if its class count differs from `num_classes`;
    "reset": always a zero head of `num_classes`.
  Backbone-only files (no `resnet/head/...`) load too; their head counts as 0 classes.
  Raises UserError (one line) for unreadable files and for missing, unexpected, duplicate or
  wrongly shaped keys.
  """
  flat = _official_to_flat(_read_npz(path), path)
  layers, width = _architecture(flat, path)
  if model_name is not None:
    wanted = models.parse_name(model_name)
    if wanted != (layers, width):
      raise UserError(f"{path} holds {_describe(layers, width)} but model {model_name} was "
                      f"requested; load it as {_model_name(layers, width)} or pick the file "
                      f"of {model_name}.")
  file_classes = _head_classes(flat, path)
  _check_layout(flat, layers, width, file_classes, path)
  return _unflatten(_with_head(flat, width, file_classes, num_classes, head, path))


def _with_head(flat: dict, width: int, file_classes: int, num_classes: int | None, head: str,
               source: str) -> dict:
  """`flat` with the head `load_bit_npz` documents for (num_classes, head)."""
  if head not in HEAD_MODES:
    raise UserError(f"head={head!r} is not one of {', '.join(HEAD_MODES)}; "
                    "use 'auto' to keep a matching head and zero-init otherwise.")
  if num_classes is None:
    num_classes = file_classes
  if head == "keep" and num_classes != file_classes:
    raise UserError(f"{source} has a {file_classes}-class head but num_classes={num_classes} "
                    "was requested with head='keep'; pass head='auto' or 'reset' to start a "
                    "zero head for transfer.")
  if head == "reset" or num_classes != file_classes:
    if head == "auto":
      found = f"a {file_classes}-class head" if file_classes else "no head"
      action = f"starting a zero {num_classes}-class head" if num_classes else "dropping it"
      metrics.log(f"{source} has {found}, {num_classes} classes requested: {action}.")
    flat = {k: v for k, v in flat.items() if not k.startswith("head/")}
    if num_classes:
      flat[HEAD_KERNEL] = np.zeros((2048 * width, num_classes), np.float32)
      flat[HEAD_BIAS] = np.zeros((num_classes,), np.float32)
  return flat


def load_params(path: str, num_classes: int | None = None, *,
                head: str = "auto") -> tuple[str, dict]:
  """(model name, flax `params` as float32 numpy) from an official BiT `.npz` or from the
  workdir of one of our runs (its newest checkpoint); the model is read from the shapes.

  `num_classes` and `head` as in `load_bit_npz`. This is what `config.init` and the tools
  that take "a checkpoint" accept.
  """
  if files.path(path).is_dir():
    flat, source = _workdir_params(path), f"{path} (workdir)"
  else:
    flat, source = _official_to_flat(_read_npz(path), path), path
  layers, width = _architecture(flat, source)
  file_classes = _head_classes(flat, source)
  _check_layout(flat, layers, width, file_classes, source)
  flat = _with_head(flat, width, file_classes, num_classes, head, source)
  return _model_name(layers, width), _unflatten(flat)


def _workdir_params(workdir: str) -> dict[str, np.ndarray]:
  """The newest checkpoint's params of a run's workdir, flat with the official head shape."""
  directory = files.path(workdir) / "checkpoints"
  steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
  if not steps:
    raise UserError(f"{workdir} holds no checkpoint (expected {directory}/<step>/); pass a "
                    "run's workdir or a BiT .npz file.")
  path = directory / str(max(steps))
  try:
    params = _restore_params(path / "default")
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
    raise UserError(f"Checkpoint {path} does not restore ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); resume the run once to quarantine it, "
                    "or pass another checkpoint.") from None
  # A self-supervised run's projection head (objectives.py) is no part of the BiT model.
  flat = {k: v for k, v in _flatten(params).items() if not k.startswith("projection/")}
  if HEAD_KERNEL in flat:
    flat[HEAD_KERNEL] = flat[HEAD_KERNEL][None, None]
  return flat


def _restore_params(path: epath.Path):
  """Only the `params` of a training-state checkpoint, as host numpy arrays: no optimizer
  state is read, and any device count or sharding it was saved with restores."""
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(path).item_metadata.tree["params"]
  item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item={"params": item}, restore_args={"params": restore_args}, partial_restore=True))["params"]


def _flatten(params) -> dict[str, np.ndarray]:
  """{"a": {"b": x}} -> {"a/b": float32 numpy x}."""
  return {k: np.asarray(jax.device_get(v), np.float32)
          for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def save_bit_npz(params, path: str) -> None:
  """Writes flax `params` of a BiT model as an official BiT .npz (timm and the official code
  read it), atomically: a crash mid-write leaves any previous file at `path` intact.

  The name is used as given (numpy would append `.npz` to a bare path, this does not).
  """
  flat = _flatten(params)
  if HEAD_KERNEL in flat:  # Flax Dense (C, N) is the official 1x1 conv (1, 1, C, N).
    flat[HEAD_KERNEL] = flat[HEAD_KERNEL][None, None]
  layers, width = _architecture(flat, "params")
  _check_layout(flat, layers, width, _head_classes(flat, "params"), "params")
  with files.atomic_writer(path, "wb") as f:
    np.savez(f, **{PREFIX + k: flat[k] for k in sorted(flat)})


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of the file, read eagerly so that corruption anywhere surfaces here."""
  if not files.path(path).is_file():
    raise UserError(f"Checkpoint {path} does not exist; check the path (released files are "
                    "BiT-{S,M}-R*.npz from the public bit_models bucket).")
  try:
    with files.path(path).open("rb") as f:
      archive = np.load(f, allow_pickle=False)
      if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError("a single .npy array, not an .npz archive")
      with archive:
        return {k: archive[k] for k in archive.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    reason = " ".join(str(e).split()) or type(e).__name__
    raise UserError(f"Cannot read {path} as a BiT .npz checkpoint ({reason}); the file is "
                    "corrupt, truncated or not an .npz: download or save it again.") from None


def _official_to_flat(arrays: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
  """Official keys -> flax paths, `standardized_conv2d_<n>` normalised, float32 values."""
  flat = {}
  for key, value in arrays.items():
    if not key.startswith(PREFIX):
      raise UserError(f"{path}: unexpected key {key} (shape {value.shape}) outside "
                      f"'{PREFIX}'; is this a BiT ResNet-v2 checkpoint?")
    name = _NUMBERED_CONV.sub("/standardized_conv2d/", key[len(PREFIX):])
    if name in flat:
      raise UserError(f"{path}: two keys map to {PREFIX}{name} (one is {key}); keep one.")
    if not np.issubdtype(value.dtype, np.floating):
      raise UserError(f"{path}: key {key} has dtype {value.dtype}, expected float32.")
    flat[name] = value.astype(np.float32, copy=False)
  return flat


def _architecture(flat: dict, source: str) -> tuple[tuple[int, ...], int]:
  """(units per block, width) from the highest unit number per block and the root width."""
  root = flat.get("root_block/standardized_conv2d/kernel")
  if root is None:
    raise UserError(f"{source}: missing key {PREFIX}root_block/standardized_conv2d/kernel "
                    "(expected shape (7, 7, 3, 64*width)); not a BiT ResNet-v2 checkpoint.")
  layers = [0, 0, 0, 0]
  for name in flat:
    if match := _UNIT.match(name):
      block = int(match[1]) - 1
      layers[block] = max(layers[block], int(match[2]))
  if 0 in layers:
    raise UserError(f"{source}: missing every key of {PREFIX}block{layers.index(0) + 1}/; "
                    "the file is incomplete (a BiT ResNet-v2 has 4 blocks).")
  return tuple(layers), max(1, root.shape[-1] // 64 if root.ndim else 1)


def _head_classes(flat: dict, source: str) -> int:
  """The head's class count (0 without a head); the kernel decides, its shape is checked later."""
  if HEAD_KERNEL in flat:
    return int(flat[HEAD_KERNEL].shape[-1]) if flat[HEAD_KERNEL].ndim else 0
  if HEAD_BIAS in flat:
    raise UserError(f"{source}: missing key {PREFIX}{HEAD_KERNEL} next to {PREFIX}{HEAD_BIAS}; "
                    "keep both head keys or neither.")
  return 0


def _check_layout(flat: dict, layers, width: int, num_classes: int, source: str) -> None:
  """UserError for the first missing, unexpected or wrongly shaped key (official names)."""
  model = bit.ResNetV2(num_classes=num_classes, layers=layers, width=width)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  expected = {"/".join(k.key for k in key_path): leaf.shape
              for key_path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  if HEAD_KERNEL in expected:
    expected[HEAD_KERNEL] = (1, 1) + expected[HEAD_KERNEL]
  what = _describe(layers, width) + (f" with a {num_classes}-class head" if num_classes else "")
  missing = sorted(set(expected) - set(flat))
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise UserError(f"{source}: missing key {PREFIX}{missing[0]} (expected shape "
                    f"{expected[missing[0]]}){more} for {what}; the file is incomplete.")
  unexpected = sorted(set(flat) - set(expected))
  if unexpected:
    key = unexpected[0]
    raise UserError(f"{source}: unexpected key {PREFIX}{key} (shape {flat[key].shape}) for "
                    f"{what}; remove it or use an unmodified checkpoint.")
  for key, shape in expected.items():
    if flat[key].shape != shape:
      raise UserError(f"{source}: key {PREFIX}{key} has shape {flat[key].shape}, expected "
                      f"{shape} for {what}.")


def _unflatten(flat: dict) -> dict:
  """{"a/b/c": x} -> {"a": {"b": {"c": x}}}, with the head kernel as flax's (C, N)."""
  if HEAD_KERNEL in flat and flat[HEAD_KERNEL].ndim == 4:
    flat = {**flat, HEAD_KERNEL: flat[HEAD_KERNEL].reshape(flat[HEAD_KERNEL].shape[2:])}
  return traverse_util.unflatten_dict(flat, sep="/")


def _model_name(layers, width: int) -> str:
  depth = {v: k for k, v in bit.DEPTHS.items()}.get(tuple(layers))
  return f"R{depth}x{width}" if depth else "a custom ResNetV2"


def _describe(layers, width: int) -> str:
  """"R50x1 (layers 3,4,6,3, width 1)", the wording of every architecture message."""
  return f"{_model_name(layers, width)} (layers {','.join(map(str, layers))}, width {width})"
