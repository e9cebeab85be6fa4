"""Official BiT .npz interop: parity with timm, exact round trips, heads, one-line errors."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_transfer import checkpoints, models
from big_transfer.errors import UserError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import compact_npz  # noqa: E402  pylint: disable=g-import-not-at-top

FIXTURES = {"R14x1": "timm_bit_r14x1.npz", "R26x1": "timm_bit_r26x1.npz"}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def fixture(request):
  """(model name, timm fixture) for each reference model."""
  return request.param, compact_npz.load_fixture(compact_npz.fixture_path(FIXTURES[request.param]))


@pytest.fixture(scope="module")
def r26():
  return compact_npz.load_fixture(compact_npz.fixture_path(FIXTURES["R26x1"]))


def _official_file(tmp_path, params, name="official.npz"):
  path = str(tmp_path / name)
  compact_npz.write_official_npz(params, path)
  return path


def _relative_error(ours, ref):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _flat(tree):
  return {"/".join(k.key for k in key_path): np.asarray(leaf)
          for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_bitwise_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype == np.float32, key
    assert a[key].shape == b[key].shape, key
    assert np.array_equal(a[key].view(np.uint32), b[key].view(np.uint32)), key


@pytest.mark.parametrize("for_cpu", [False, True])  # True: the form the trainer runs on CPUs.
def test_logits_and_pre_logits_match_timm(fixture, tmp_path, for_cpu):
  name, fx = fixture
  params = checkpoints.load_bit_npz(_official_file(tmp_path, fx["params"]), name, 10)
  model = models.get_model(name, 10, for_cpu=for_cpu)
  logits = model.apply({"params": params}, fx["inputs"])
  pre_logits = model.apply({"params": params}, fx["inputs"], pre_logits=True)
  assert logits.dtype == jnp.float32
  assert _relative_error(logits, fx["logits"]) <= 1e-4
  assert _relative_error(pre_logits, fx["pre_logits"]) <= 1e-4


def test_load_save_load_is_bitwise_and_reproduces_the_official_file(fixture, tmp_path):
  name, fx = fixture
  params = checkpoints.load_bit_npz(_official_file(tmp_path, fx["params"]), name)
  saved = str(tmp_path / "saved.npz")
  checkpoints.save_bit_npz(params, saved)
  with np.load(saved) as archive:
    written = {k: archive[k] for k in archive.files}
  _assert_bitwise_equal(written, fx["params"])
  assert written["resnet/head/conv2d/kernel"].shape == (1, 1, 2048, 10)
  _assert_bitwise_equal(_flat(checkpoints.load_bit_npz(saved, name)), _flat(params))


def test_bfloat16_compute_stays_close_to_float32(r26, tmp_path):
  """bf16 may not change the answer beyond what this random network amplifies bf16 rounding to.

  The fixture's random weights make the network sensitive: rounding only the inputs to bf16
  in float32 compute moves its logits ~0.9% and bf16 compute as a whole ~8%, so the tolerance
  is 0.12, not the 1e-2 a trained network would allow. It still fails when bf16 is ignored
  (error 0) or diverges (NaN, overflow).
  """
  params = checkpoints.load_bit_npz(_official_file(tmp_path, r26["params"]), "R26x1", 10)
  f32 = models.get_model("R26x1", 10).apply({"params": params}, r26["inputs"])
  bf16 = models.get_model("R26x1", 10, dtype=jnp.bfloat16).apply({"params": params},
                                                                  r26["inputs"])
  assert bf16.dtype == jnp.float32 and np.all(np.isfinite(bf16))
  assert 1e-4 < _relative_error(bf16, f32) <= 0.12


def test_numbered_standardized_conv2d_names_load(r26, tmp_path):
  """Some released files number their convs (`standardized_conv2d_<n>`) like TF scopes do."""
  numbered, n = {}, 0
  for key, value in sorted(r26["params"].items()):
    if "/standardized_conv2d/" in key:
      n += 1
      key = key.replace("/standardized_conv2d/", f"/standardized_conv2d_{n}/")
    numbered[key] = value
  assert n > 20 and set(numbered) != set(r26["params"])
  loaded = checkpoints.load_bit_npz(_official_file(tmp_path, numbered), "R26x1", 10)
  reference = checkpoints.load_bit_npz(_official_file(tmp_path, r26["params"], "plain.npz"))
  _assert_bitwise_equal(_flat(loaded), _flat(reference))


def _edited(params, drop=(), add=None):
  out = {k: v for k, v in params.items() if k not in drop}
  out.update(add or {})
  return out


CONV3 = "resnet/block2/unit01/b/standardized_conv2d/kernel"  # (3, 3, 128, 128)
GAMMA = "resnet/block3/unit02/a/group_norm/gamma"  # (1024,)


@pytest.mark.parametrize("edit, message", [
    (lambda p: _edited(p, drop=[GAMMA]),
     rf"missing key {GAMMA} \(expected shape \(1024,\)\) for R26x1"),
    (lambda p: _edited(p, add={"resnet/block2/unit01/extra/w": np.zeros(3, np.float32)}),
     r"unexpected key resnet/block2/unit01/extra/w \(shape \(3,\)\) for R26x1"),
    (lambda p: _edited(p, add={CONV3: np.zeros((1, 1, 128, 128), np.float32)}),
     rf"key {CONV3} has shape \(1, 1, 128, 128\), expected \(3, 3, 128, 128\)"),
    (lambda p: _edited(p, add={"resnet/head/conv2d/bias": np.zeros(7, np.float32)}),
     r"key resnet/head/conv2d/bias has shape \(7,\), expected \(10,\)"),
    (lambda p: _edited(p, add={CONV3.replace("conv2d/", "conv2d_3/"): p[CONV3]}),
     rf"two keys map to {CONV3}"),
    (lambda p: _edited(p, add={"step": np.zeros((), np.float32)}), r"unexpected key step"),
])
def test_layout_errors_are_one_line_and_name_the_key(r26, tmp_path, edit, message):
  path = _official_file(tmp_path, edit(r26["params"]))
  with pytest.raises(UserError, match=message) as error:
    checkpoints.load_bit_npz(path)
  assert "\n" not in str(error.value) and path in str(error.value)


def _truncated(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def _corrupted(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 3:len(data) // 3 + 4096] = os.urandom(4096)
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", [
    _truncated,
    _corrupted,
    lambda path: open(path, "w").write("not a checkpoint\n"),
    lambda path: np.save(open(path, "wb"), np.zeros(3, np.float32)),
    os.remove,
], ids=["truncated", "corrupt", "text", "npy", "missing"])
def test_unreadable_files_give_one_line_naming_the_file(r26, tmp_path, damage):
  path = _official_file(tmp_path, r26["params"])
  damage(path)
  with pytest.raises(UserError, match=re.escape(path)) as error:
    checkpoints.load_bit_npz(path)
  assert "\n" not in str(error.value)


def test_head_reset_for_transfer(r26, tmp_path, capsys):
  path = _official_file(tmp_path, r26["params"])
  kept = checkpoints.load_bit_npz(path, "R26x1", 10, head="auto")
  np.testing.assert_array_equal(kept["head"]["conv2d"]["kernel"],
                                r26["params"]["resnet/head/conv2d/kernel"][0, 0])
  assert capsys.readouterr().out == ""

  transfer = checkpoints.load_bit_npz(path, "R26x1", 5)
  assert capsys.readouterr().out.count("\n") == 1  # One line says the head was re-initialised.
  for name, shape in (("kernel", (2048, 5)), ("bias", (5,))):
    np.testing.assert_array_equal(transfer["head"]["conv2d"][name], np.zeros(shape))
  _assert_bitwise_equal(_flat({k: v for k, v in transfer.items() if k != "head"}),
                        _flat({k: v for k, v in kept.items() if k != "head"}))
  logits = models.get_model("R26x1", 5).apply({"params": transfer}, r26["inputs"])
  np.testing.assert_array_equal(logits, np.zeros((4, 5)))

  reset = checkpoints.load_bit_npz(path, num_classes=10, head="reset")
  for name, shape in (("kernel", (2048, 10)), ("bias", (10,))):
    np.testing.assert_array_equal(reset["head"]["conv2d"][name], np.zeros(shape))
  with pytest.raises(UserError, match=r"has a 10-class head but num_classes=5 was requested"):
    checkpoints.load_bit_npz(path, num_classes=5, head="keep")
  with pytest.raises(UserError, match=r"head='zero' is not one of auto, keep, reset"):
    checkpoints.load_bit_npz(path, head="zero")


def test_backbone_only_files(r26, tmp_path):
  backbone = {k: v for k, v in r26["params"].items() if "/head/" not in k}
  path = _official_file(tmp_path, backbone)
  params = checkpoints.load_bit_npz(path, "BiT-M-R26x1")
  assert "head" not in params
  pre_logits = models.get_model("R26x1", 0).apply({"params": params}, r26["inputs"])
  assert _relative_error(pre_logits, r26["pre_logits"]) <= 1e-4
  assert checkpoints.load_bit_npz(path, num_classes=3)["head"]["conv2d"]["kernel"].shape == (
      2048, 3)
  assert "head" not in checkpoints.load_bit_npz(_official_file(tmp_path, r26["params"], "h.npz"),
                                                num_classes=0)
  saved = str(tmp_path / "saved.npz")
  checkpoints.save_bit_npz(params, saved)
  with np.load(saved) as archive:
    _assert_bitwise_equal({k: archive[k] for k in archive.files}, backbone)


@pytest.mark.parametrize("requested, holds", [
    ("R14x1", r"holds R26x1 \(layers 2,2,2,2, width 1\) but model R14x1 was requested"),
    ("BiT-M-R26x2", r"holds R26x1 \(layers 2,2,2,2, width 1\) but model BiT-M-R26x2 was "),
])
def test_model_and_file_mismatch(r26, tmp_path, requested, holds):
  with pytest.raises(UserError, match=holds) as error:
    checkpoints.load_bit_npz(_official_file(tmp_path, r26["params"]), requested, 10)
  assert "\n" not in str(error.value)


def test_save_is_atomic(r26, tmp_path, monkeypatch):
  """A save that dies mid-write leaves the previous file intact and no temporary file."""
  path = _official_file(tmp_path, r26["params"])
  before = open(path, "rb").read()
  params = checkpoints.load_bit_npz(path)

  def crash(file, **arrays):
    file.write(b"half a file")
    raise KeyboardInterrupt

  monkeypatch.setattr(np, "savez", crash)
  with pytest.raises(KeyboardInterrupt):
    checkpoints.save_bit_npz(params, path)
  assert open(path, "rb").read() == before
  assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_save_rejects_params_of_another_layout(r26, tmp_path):
  params = checkpoints.load_bit_npz(_official_file(tmp_path, r26["params"]))
  del params["block3"]["unit02"]["b"]
  with pytest.raises(UserError, match=r"params: missing key resnet/block3/unit02/b/group_norm"):
    checkpoints.save_bit_npz(params, str(tmp_path / "bad.npz"))
  assert not os.path.exists(tmp_path / "bad.npz")


def test_load_params_from_an_npz_or_a_workdir_saved_on_other_devices(r26, tmp_path, capsys):
  """`load_params` (what `config.init` takes): an official file gives load_bit_npz's params; a
  workdir gives its newest checkpoint's params, here saved FSDP-sharded over 8 devices, with the
  same head handling."""
  path = _official_file(tmp_path, r26["params"])
  name, params = checkpoints.load_params(path, 3)
  assert name == "R26x1"
  _assert_bitwise_equal(_flat(params), _flat(checkpoints.load_bit_npz(path, num_classes=3)))

  from big_transfer import sharding  # pylint: disable=g-import-not-at-top
  model = models.get_model("R14x1", 7)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  rng = np.random.default_rng(0)
  host = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  mesh = sharding.make_mesh()
  placed = jax.device_put(host, sharding.state_shardings(shapes, mesh, "fsdp"))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed))
  workdir = str(tmp_path / "run")
  manager = checkpoints.Manager(workdir, every_steps=1, keep=2)
  manager.save(1, {"step": 1, "params": jax.tree.map(lambda x: -x, placed)})
  manager.save(2, {"step": 2, "params": placed})  # The newest one is loaded.
  manager.close()
  expected = host

  name, params = checkpoints.load_params(workdir)
  assert name == "R14x1"
  _assert_bitwise_equal(_flat(params), _flat(expected))
  capsys.readouterr()
  _, transfer = checkpoints.load_params(workdir, 4)
  assert f"{workdir} (workdir) has a 7-class head, 4 classes requested" in capsys.readouterr().out
  assert not np.any(transfer["head"]["conv2d"]["kernel"]) and transfer["head"]["conv2d"][
      "kernel"].shape == (2048, 4)
  backbone = lambda tree: {k: v for k, v in _flat(tree).items() if not k.startswith("head/")}
  _assert_bitwise_equal(backbone(transfer), backbone(expected))
  with pytest.raises(UserError, match=r"holds no checkpoint .* pass a run's workdir or a BiT"):
    checkpoints.load_params(str(tmp_path))
