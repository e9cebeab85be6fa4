"""Few-shot linear evaluation on frozen pre-logits, as big_vision's `fewshot_lsr` evaluator.

For k shots per class: pick k training examples of every class (seeded), fit a linear map from
their pre-logits to one-hot targets in {-1, +1} by closed-form L2-regularised least squares
(features standardised with the picked examples' mean and std, plus a constant feature of 100
whose weight is nearly unregularised, i.e. a bias), and report the top-1 accuracy of the argmax
over every test example; averaged over seeds. Defaults are big_vision's: shots 1/5/10/25,
l2 = 2^10, 3 seeds (BiT paper §4.1 reports few-shot linear transfer the same way).

Only the picked training examples are read and embedded (not the whole train split). Features
are computed on the device mesh in padded batches and gathered to every process; the solve runs
on the host in float64 numpy, identically on every process.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from big_transfer import metrics, sharding
from big_transfer.data import datasets, pipeline
from big_transfer.errors import UserError

SHOTS = (1, 5, 10, 25)
SEEDS = 3
L2_REG = 2.0 ** 10
BIAS_FEATURE = 100.0  # Large, so its weight (the bias) barely feels the L2 penalty.
STD_EPS = 1e-5


def shot_positions(labels: np.ndarray, num_classes: int, shots: Sequence[int],
                   seed: int) -> dict[int, np.ndarray]:
  """{k: positions of k examples of every class}, for each k in `shots`.

  Stratified (exactly k per class) and seeded: per class one permutation drawn from `seed`, of
  which each k takes the first k, so the 5-shot set contains the 1-shot set (as big_vision).
  UserError if a class has fewer examples than the largest k.
  """
  rng = np.random.default_rng(seed)
  most = max(shots)
  orders = []
  for label in range(num_classes):
    candidates = np.flatnonzero(labels == label)
    if len(candidates) < most:
      raise UserError(f"Class {label} has {len(candidates)} training examples, fewer than "
                      f"{most} shots; lower the shots or use a larger train split.")
    orders.append(rng.permutation(candidates)[:most])
  return {k: np.sort(np.concatenate([order[:k] for order in orders])) for k in shots}


def _design(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  x = (np.asarray(features, np.float64) - mean) / std
  return np.concatenate([x, np.full((len(x), 1), BIAS_FEATURE)], axis=1)


def targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """The regression targets of integer `labels`: one-hot mapped to {-1, +1}."""
  return 2.0 * np.eye(num_classes)[labels] - 1.0


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int, l2_reg: float = L2_REG):
  """The linear classifier: (mean, std, weights) with weights of shape (dim + 1, classes).

  weights = argmin |X W - Y|^2 + l2 |W|^2 for X the standardised features plus the bias
  feature and Y the one-hot labels mapped to {-1, +1}; solved in the smaller of the primal
  (X'X + l2 I) W = X'Y and dual W = X'(XX' + l2 I)^-1 Y forms.
  """
  features = np.asarray(features, np.float64)
  mean = features.mean(axis=0)
  std = features.std(axis=0) + STD_EPS
  x = _design(features, mean, std)
  y = targets(labels, num_classes)
  n, d = x.shape
  if n >= d:
    weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
  else:
    weights = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
  return mean, std, weights


def scores(classifier, features: np.ndarray) -> np.ndarray:
  """The (N, classes) outputs of `classifier` (what `fit` returns) on `features`; their argmax
  is the predicted class."""
  mean, std, weights = classifier
  return _design(features, mean, std) @ weights


def accuracy(train_features, train_labels, test_features, test_labels, num_classes: int,
             l2_reg: float = L2_REG) -> float:
  """Top-1 accuracy on the test examples of the classifier `fit` on the training ones."""
  classifier = fit(train_features, train_labels, num_classes, l2_reg)
  predictions = np.argmax(scores(classifier, test_features), axis=1)
  return float(np.mean(predictions == np.asarray(test_labels)))


def choose_l2(features: np.ndarray, labels: np.ndarray, num_classes: int,
              candidates: Sequence[float]) -> float:
  """The L2 strength among `candidates` whose classifier, fitted to the other examples,
  classifies every 5th example best (ties: the stronger one)."""
  labels = np.asarray(labels)
  held = np.arange(len(labels)) % 5 == 0
  return max(candidates, key=lambda l2: (accuracy(
      features[~held], labels[~held], features[held], labels[held], num_classes, l2), l2))


def _host(x: jax.Array) -> np.ndarray:
  """A replicated array as numpy (also on several processes, where it is not fully
  addressable: every device holds all of it)."""
  return np.asarray(x.addressable_data(0))


@dataclasses.dataclass
class Evaluator:
  """Few-shot linear evaluation of `features_fn(params, images) -> pre-logits` on `dataset`.

  Construction reads the training labels and picks the shots (so a bad dataset, split or
  shot count fails before any training); `run(params)` embeds the picked training examples
  and the whole test split and returns {k: [accuracy per seed]}.
  """
  features_fn: Callable
  dataset: datasets.Dataset
  mesh: jax.sharding.Mesh
  batch_size: int  # Global.
  pp: str
  train_split: str = "train"
  test_split: str = "test"
  name: str = ""  # In metric keys; default: short_name(dataset.name).
  shots: Sequence[int] = SHOTS
  seeds: int = SEEDS
  l2_reg: float = L2_REG

  def __post_init__(self):
    if self.dataset.multi_label:
      raise UserError(f"Few-shot evaluation needs single-label classes; {self.dataset.name!r} "
                      "is multi-label.")
    if not self.shots or min(self.shots) < 1 or self.seeds < 1:
      raise UserError(f"Few-shot evaluation needs shots >= 1 and seeds >= 1, got shots "
                      f"{tuple(self.shots)} and {self.seeds} seeds.")
    self.name = self.name or short_name(self.dataset.name)
    self.dataset.check_split(self.test_split)
    sharding.check_batch_size(self.batch_size, self.mesh.size, "fewshot batch_size")
    labels = self.dataset.labels(self.train_split)
    self.picks = [shot_positions(labels, self.dataset.num_classes, self.shots, seed)
                  for seed in range(self.seeds)]
    self._train_positions = np.unique(np.concatenate([p[max(self.shots)] for p in self.picks]))

    def embed(params, batch):
      return {"features": self.features_fn(params, batch["image"]).astype(jnp.float32),
              "label": jnp.argmax(batch["labels"], axis=-1),
              "position": batch["position"], "mask": batch["mask"]}

    self._embed = jax.jit(embed, out_shardings=sharding.replicated(self.mesh),
                          compiler_options=sharding.compiler_options(self.mesh))

  def _features(self, params, split: str, subset: np.ndarray | None):
    """(features, labels, positions) of every example of `split` (or of `subset`)."""
    kwargs = dict(subset=subset, process_index=jax.process_index(),
                  process_count=jax.process_count())
    local_batch = self.batch_size // jax.process_count()
    positions = pipeline.eval_positions(self.dataset, split, **kwargs)
    outputs = []
    batches = pipeline.eval_iterator(self.dataset, split, self.pp, local_batch, **kwargs)
    for i, batch in enumerate(batches):
      # Padding rows get position -1; the gathered positions say which example each row is.
      batch["position"] = np.full(local_batch, -1, np.int32)
      rows = positions[i * local_batch:(i + 1) * local_batch]
      batch["position"][:len(rows)] = rows
      out = {k: _host(v) for k, v in self._embed(params, sharding.to_global(batch, self.mesh))
             .items()}
      keep = out.pop("mask").astype(bool)
      outputs.append({k: v[keep] for k, v in out.items()})
    return tuple(np.concatenate([o[k] for o in outputs]) for k in ("features", "label",
                                                                  "position"))

  def run(self, params) -> dict[int, list[float]]:
    """{k: [test accuracy of seed 0, 1, ...]} for each k in `shots`."""
    train_x, train_y, train_pos = self._features(params, self.train_split,
                                                 self._train_positions)
    order = np.argsort(train_pos)
    train_x, train_y, train_pos = train_x[order], train_y[order], train_pos[order]
    test_x, test_y, _ = self._features(params, self.test_split, None)
    results = {k: [] for k in self.shots}
    for picks in self.picks:
      for k, positions in picks.items():
        rows = np.searchsorted(train_pos, positions)
        results[k].append(accuracy(train_x[rows], train_y[rows], test_x, test_y,
                                   self.dataset.num_classes, self.l2_reg))
    return results

  def log(self, step: int, params, writer: metrics.Writer) -> dict[int, list[float]]:
    """`run`, then the means over seeds to `writer` as `fewshot/<name>_<k>shot` and one line
    to stdout."""
    results = self.run(params)
    writer.write(step, summarize(results, self.name))
    metrics.log(f"step {step}: {describe(results, self.name)}")
    return results


def short_name(dataset: str) -> str:
  """The dataset's name in metric keys: "cifar10:3.0.2" -> "cifar10", "folder:/a/pets" ->
  "pets"."""
  if dataset.startswith(datasets.FOLDER_PREFIX):
    return dataset[len(datasets.FOLDER_PREFIX):].rstrip("/").split("/")[-1]
  return dataset.split(":")[0].replace("/", "_")


def summarize(results: dict[int, list[float]], name: str) -> dict[str, float]:
  """{"fewshot/<name>_<k>shot": mean accuracy over seeds}."""
  return {f"fewshot/{name}_{k}shot": float(np.mean(v)) for k, v in results.items()}


def describe(results: dict[int, list[float]], name: str) -> str:
  """One line: "fewshot cifar10: 1-shot 31.20%, 5-shot ... (mean of 3 seeds)"."""
  parts = [f"{k}-shot {100 * np.mean(v):.2f}%" for k, v in results.items()]
  seeds = len(next(iter(results.values())))
  return f"fewshot {name}: {', '.join(parts)} (mean of {seeds} seeds)"


def from_config(config: ml_collections.ConfigDict, model, mesh) -> Evaluator | None:
  """The evaluator `config.fewshot` asks for during training (None while its dataset is
  empty), on the pre-logits of `model`; `config.fewshot.every_steps` says when to `log`."""
  fewshot = config.fewshot
  if not fewshot.dataset:
    return None
  return Evaluator(
      lambda params, images: model.apply({"params": params}, images, pre_logits=True),
      datasets.get(fewshot.dataset, config.data_dir), mesh,
      batch_size=fewshot.batch_size or config.eval_batch_size or config.batch_size,
      pp=fewshot.pp or config.pp_eval, train_split=fewshot.train_split,
      test_split=fewshot.test_split, shots=tuple(fewshot.shots), seeds=fewshot.seeds,
      l2_reg=fewshot.l2_reg)
