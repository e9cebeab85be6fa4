"""The Colab notebook (notebooks/transfer.ipynb) runs top to bottom, headless: a BiT .npz built
here is fine-tuned on a CIFAR-10 image folder with tiny settings injected after its `parameters`
cell (as papermill does), the curves are drawn and test images predicted. Its kernel is this
python (ipykernel, from the `test` extra) importing this checkout, with one CPU device."""

import json
import os
import re
import shutil
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from conftest import ROOT, train_env

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import compact_npz  # noqa: E402  pylint: disable=g-import-not-at-top

NOTEBOOK = ROOT / "notebooks" / "transfer.ipynb"
CLASSES = ("airplane", "automobile", "bird")
TEST_IMAGES = 4  # Per class.
NUM_IMAGES = 5  # Predicted by the notebook.


def _read_notebook():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  return notebook


def test_committed_notebook_has_no_outputs_and_one_parameters_cell():
  cells = [cell for cell in _read_notebook().cells if cell.cell_type == "code"]
  assert [cell.id for cell in cells if cell.outputs or cell.execution_count is not None] == []
  assert [cell.id for cell in cells if "parameters" in cell.metadata.get("tags", [])] == [
      "parameters"]


def _kernel(tmp_path) -> KernelManager:
  """This python with this checkout first on its path, one CPU device and its own IPython
  profile: a kernel spec of its own, whatever `python3` kernels the machine has installed."""
  spec_dir = tmp_path / "kernels" / "bit_test"
  spec_dir.mkdir(parents=True)
  env = {key: train_env(1)[key] for key in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(PYTHONPATH=str(ROOT), IPYTHONDIR=str(tmp_path / "ipython"), MPLBACKEND="agg")
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "big_transfer test", "language": "python", "env": env}))
  return KernelManager(kernel_name="bit_test", transport="ipc", ip=str(tmp_path / "kernel-ipc"),
                       connection_file=str(tmp_path / "kernel.json"),
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir.parent)]))


@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar10_dir):
  """The notebook executed on a 3-class CIFAR-10 folder from an R14x1 .npz (10-class head)."""
  tmp = tmp_path_factory.mktemp("notebook")
  folder = tmp / "cifar3"
  for split, count in (("train", 6), ("test", TEST_IMAGES)):
    for name in CLASSES:
      (folder / split / name).mkdir(parents=True)
      for path in sorted((cifar10_dir / split / name).iterdir())[:count]:
        shutil.copy(path, folder / split / name)
  npz = str(tmp / "BiT-M-R14x1.npz")
  fixture = compact_npz.load_fixture(compact_npz.fixture_path("timm_bit_r14x1.npz"))
  compact_npz.write_official_npz(fixture["params"], npz)

  workdir = str(tmp / "workdir")
  parameters = {
      "TASK": f"folder:{folder}", "MODEL": "BiT-M-R14x1", "INIT": npz, "SHOTS": 2,
      "DATA_DIR": str(tmp / "tfds"), "WORKDIR": workdir, "NUM_IMAGES": NUM_IMAGES,
      # The CPU budget's warmup (10 steps) stays.
      "OVERRIDES": {"pp_train": "decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)",
                    "pp_eval": "decode|resize(16)|value_range(-1, 1)", "batch_size": 8,
                    "total_steps": 3, "eval_split": "test", "log_every_steps": 1}}
  notebook = _read_notebook()
  index = [cell.id for cell in notebook.cells].index("parameters")
  injected = nbformat.v4.new_code_cell(
      "\n".join(f"{key} = {value!r}" for key, value in parameters.items()),
      metadata={"tags": ["injected-parameters"]})
  notebook.cells.insert(index + 1, injected)
  client = NotebookClient(notebook, km=_kernel(tmp), timeout=300,
                          resources={"metadata": {"path": str(ROOT / "notebooks")}})
  try:
    client.execute(cleanup_kc=True)  # CellExecutionError (with the cell's traceback) on failure.
  finally:
    nbformat.write(notebook, tmp / "executed.ipynb")  # To look at after a failure.
  return {cell.id: cell for cell in notebook.cells}, folder, npz, workdir


def _text(cell) -> str:
  return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def _has_png(cell) -> bool:
  return any("image/png" in out.get("data", {}) for out in cell.outputs)


def test_notebook_fine_tunes_the_npz_through_the_transfer_config(run):
  cells, folder, npz, workdir = run
  out = _text(cells["train"])
  assert (f"python -m big_transfer.train --config=configs/transfer.py:task=folder:{folder},"
          f"model=BiT-M-R14x1,shots=2 --workdir={workdir} --config.batch_size=8") in out
  assert "--config.schedule.warmup_steps=10" in out  # The CPU budget, where not overridden.
  assert "2 shots x 3 classes): 6 examples" in out  # The HyperRule's size.
  assert f"Initialised from {npz}: R14x1 backbone loaded, a zero 3-class head" in out
  assert "step 3/3: loss" in out
  with open(os.path.join(workdir, "results.json")) as f:
    record = json.load(f)
  assert {k: record[k] for k in ("task", "model", "init", "shots", "steps", "eval_count")} == {
      "task": f"folder:{folder}", "model": "BiT-M-R14x1", "init": npz, "shots": 2, "steps": 3,
      "eval_count": len(CLASSES) * TEST_IMAGES}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  # The rule's lr (0.003 per 512 images) for a batch of 8, a tenth of it in warmup step 1 of 10.
  assert (first["step"], first["train/lr"]) == (1, pytest.approx(0.003 * 8 / 512 / 10))


def test_notebook_plots_the_curves(run):
  cells, _, _, workdir = run
  assert _has_png(cells["curves"])
  with open(os.path.join(workdir, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_notebook_predicts_test_images_with_class_names(run):
  cells, folder, _, workdir = run
  lines = _text(cells["predict"]).splitlines()
  rows = [re.fullmatch(r"(\S+) +true (\S+) +top-5: (.*)", line) for line in lines]
  assert len(rows) == NUM_IMAGES and all(rows), lines
  test_files = {path.read_bytes(): path.parent.name for path in (folder / "test").glob("*/*")}
  for image, truth, top in (row.groups() for row in rows):
    # Written as read from the evaluation split, and named by the file's class folder.
    with open(os.path.join(workdir, "samples", image), "rb") as f:
      assert test_files[f.read()] == truth
    names, scores = zip(*(entry.rsplit(" ", 1) for entry in top.split(" | ")))
    assert sorted(names) == sorted(CLASSES)  # Top-5 of 3 classes: each once.
    assert sum(map(float, scores)) == pytest.approx(1.0, abs=2e-3)  # Softmax, 3 decimals.
  assert _has_png(cells["predict"])
