"""Round 1: frozen sliding-window features, a dense head, a random forest, their ensemble.

``python -m midog_jax.main --config=configs/image_level.py`` reaches
:meth:`Round1.fit` through the training loop's ``fit`` hook (``train.py``): it
takes the workdir lock and the resume-config check like every method, then
hands the run over (there are no gradient steps of the backbone to loop over).

A round-1 workdir holds ``config.json``, ``image_level/`` (``backbone.safetensors``:
the feature extractor's weights, ``dense_head.safetensors``, ``forest.npz``,
``model.json``: thresholds, ensemble weight, data balance), ``eval/<set>/<head>/``
(``metrics.json``, ``probabilities.csv``, ``roc.png``, ``pr.png``) and
``eval/summary.json``. :func:`load` reads it back for ``midog_jax.classify``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from midog_jax import checkpoint as ckpt_lib
from midog_jax import parallel
from midog_jax import pretrained as pretrained_lib
from midog_jax.detectors.interface import IMAGENET_MEAN, IMAGENET_STD, compute_dtype
from midog_jax.errors import DataError
from midog_jax.fileio import atomic_path, read_json, write_json_atomic
from midog_jax.image_level import datasets, features, heads
from midog_jax.image_level import metrics as metrics_lib
from midog_jax.image_level.fields import Item
from midog_jax.models.efficientnet import EfficientNet

HEADS = ("dense", "forest", "ensemble")
SUBDIR = "image_level"


def save_tree(tree: dict, path: str | Path) -> Path:
  """A nested dict of arrays as ``.safetensors`` (keys ``a/b/c``), atomically."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(parallel.to_host(tree), sep="/")
  with atomic_path(path) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(tmp))
  return Path(path)


def feature_model(config) -> EfficientNet:
  m = config.model
  return EfficientNet(variant=str(m.variant), num_classes=0,
                      dtype=compute_dtype(m))


def init_backbone(config, log: Callable = lambda *_: None,
                  items: Sequence[Item] = ()) -> dict:
  """The extractor's variables: ``config.init_from``, else seeded random.

  ``init_from`` loads through ``pretrained.load_into`` (strict, as the
  trainer; a converted file's ImageNet classifier is dropped). Random weights get BatchNorm
  statistics from ``image_level.bn_calibration`` windows of ``items``
  (``features.calibrate_batch_stats``).
  """
  model = feature_model(config)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.key(config.seed, impl="rbg"))
  il = config.image_level
  if not config.init_from and il.bn_calibration and items:
    windows = features.sample_windows(items, datasets.out_px(config), il.window,
                                      il.window_stride, il.bn_calibration, config.seed)
    variables = features.calibrate_batch_stats(model.clone(stochastic_depth=0.0),
                                               variables, windows)
    log(f"feature extractor: random weights, BatchNorm statistics of {len(windows)} "
        "training windows")
  if config.init_from:
    # The trainer's strict loader: a converted file's ImageNet classifier is
    # a class head the feature extractor lacks ("dropped").
    variables, notes = pretrained_lib.load_into(variables, config.init_from, config)
    for line in notes:
      log(f"init_from {config.init_from}: {line}")
  return jax.device_get(variables)


@dataclasses.dataclass
class Heads:
  """The trained heads of a round-1 workdir, with their thresholds."""

  dense_cfg: heads.DenseConfig
  dense_params: dict
  forest: heads.Forest
  t_dense: float
  t_forest: float
  weight: float
  mean: np.ndarray | None = None  # the dense head's input standardisation
  std: np.ndarray | None = None

  def dense_input(self, x: np.ndarray) -> np.ndarray:
    return x if self.mean is None else (x - self.mean) / self.std

  def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
    """Scores per head (the ensemble's score is >= 0.5 exactly when positive)."""
    p_d = heads.predict_dense(self.dense_params, self.dense_input(x), self.dense_cfg)
    p_f = self.forest.predict(x)
    score, _ = heads.ensemble(p_d, p_f, self.t_dense, self.t_forest, self.weight)
    return dict(dense=p_d, forest=p_f, ensemble=score)

  def thresholds(self) -> dict[str, float]:
    return dict(dense=self.t_dense, forest=self.t_forest, ensemble=0.5)


def choose_weight(p_d, p_f, t_d, t_f, labels) -> float:
  """The dense-head weight with the best validation F1 (then AUC, then the smallest)."""
  best, key = heads.WEIGHT_GRID[0], None
  for w in heads.WEIGHT_GRID:
    score, label = heads.ensemble(p_d, p_f, t_d, t_f, w)
    m = metrics_lib.binary_metrics(labels, score, 0.5)
    k = (m["f1"], m["auc"] or 0.0)
    if key is None or k > key:
      best, key = w, k
  return float(best)


def fit_heads(x_train, y_train, x_val, y_val, config, log: Callable = lambda *_: None,
              writer=None) -> Heads:
  """Trains both heads, picks their thresholds and the ensemble weight on validation."""
  il = config.image_level
  dense_cfg = heads.DenseConfig.from_config(dict(il.dense.to_dict(), seed=config.seed))
  mean = std = None
  if il.standardize:
    mean, std = heads.standardizer(x_train)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
  params, history = heads.train_dense(x_train, y_train, x_val, y_val, dense_cfg, log)
  if mean is not None:
    x_train, x_val = x_train * std + mean, x_val * std + mean
  if writer is not None:
    for row in history:
      writer.write_scalars(row["epoch"], {f"dense/{k}": v for k, v in row.items()
                                          if isinstance(v, float)})
  t0 = time.perf_counter()
  rf = heads.train_forest(x_train, y_train, il.forest.trees, il.forest.bootstrap,
                          config.seed, il.forest.n_jobs, il.forest.max_features)
  forest = heads.forest_arrays(rf)
  log(f"random forest: {il.forest.trees} trees in {time.perf_counter() - t0:.1f} s")
  fitted = Heads(dense_cfg, params, forest, 0.5, 0.5,
                 float(il.ensemble_weight or heads.WEIGHT_GRID[0]),
                 mean, std)
  if len(x_val):
    got = fitted.predict(x_val)
    fitted.t_dense = metrics_lib.best_threshold(y_val, got["dense"])
    fitted.t_forest = metrics_lib.best_threshold(y_val, got["forest"])
    if not il.ensemble_weight:
      fitted.weight = choose_weight(got["dense"], got["forest"], fitted.t_dense,
                                    fitted.t_forest, y_val)
  log(f"thresholds: dense {fitted.t_dense:.4f}, forest {fitted.t_forest:.4f}; "
      f"ensemble dense weight {fitted.weight}")
  return fitted


def evaluate_heads(fitted: Heads, sets: dict[str, tuple[Sequence[Item], np.ndarray]],
                   out: Path) -> dict:
  """Every head on every set; writes ``out/<set>/<head>/``."""
  results = {}
  for name, (items, x) in sets.items():
    if not len(items):
      continue
    scores = fitted.predict(x)
    labels = np.asarray([it.label for it in items])
    names, doms = [it.name for it in items], [it.domain for it in items]
    results[name] = {h: metrics_lib.write_set(out / name / h, names, doms, labels, scores[h],
                                              fitted.thresholds()[h], f"{name} {h}")
                     for h in HEADS}
  return results


class Round1:
  """The round-1 method as the training loop sees it (``detectors.image_level``)."""

  name = "image_level"
  input_mean, input_std = IMAGENET_MEAN, IMAGENET_STD
  tile_context = 0

  def __init__(self, config):
    self.config = config
    self.model = feature_model(config)
    self.patch_size = datasets.out_px(config)

  def init_variables(self, rng) -> dict:
    return self.model.init(rng, jnp.zeros((1, 32, 32, 3)), train=False)

  def trainable_mask(self, params):
    return jax.tree.map(lambda _: False, params)

  def loss(self, params, batch_stats, batch, train):
    raise NotImplementedError("round 1 trains its heads in fit(), not by gradient steps")

  def make_tile_fn(self, score_thresh):
    raise NotImplementedError("the image-level method classifies fields; it has no "
                              "tile detector (use python -m midog_jax.classify)")

  def make_patch_score_fn(self, variables, patch_size):
    raise NotImplementedError("round 1 scores fields with its heads, not patches")

  def fit(self, workdir: str | Path, writer=None, log: Callable = print) -> dict:
    """Features, both heads, the ensemble and their evaluation (see module docstring)."""
    config, il, workdir = self.config, self.config.image_level, Path(workdir)
    t_start = time.perf_counter()
    sets = datasets.load_sets(config, self.patch_size)
    log(f"data: {sets.describe()}")
    variables = init_backbone(config, log, sets.train)
    save_tree(variables, workdir / SUBDIR / "backbone.safetensors")
    extractor = features.Extractor(self.model, variables, self.patch_size, il.window,
                                   il.window_stride, il.extract_batch)
    cache = features.FeatureCache(il.cache_dir or workdir / "feature_cache",
                                  extractor.settings())
    t0 = time.perf_counter()
    x = {k: features.extract(v, extractor, cache, log) for k, v in sets.sets().items()}
    extract_s = time.perf_counter() - t0
    y = {k: np.asarray([it.label for it in v], np.int64) for k, v in sets.sets().items()}
    empty = np.zeros((0, x["train"].shape[1]), np.float32)
    log(f"features: {x['train'].shape[1]} per field ({extractor.num_windows} windows x "
        f"{x['train'].shape[1] // extractor.num_windows}), {extract_s:.1f} s")
    t0 = time.perf_counter()
    fitted = fit_heads(x["train"], y["train"], x.get("val", empty),
                       y.get("val", np.zeros((0,), np.int64)), config, log, writer)
    heads_s = time.perf_counter() - t0
    norm = {} if fitted.mean is None else {"norm": dict(mean=fitted.mean, std=fitted.std)}
    save_tree({"params": fitted.dense_params, **norm},
              workdir / SUBDIR / "dense_head.safetensors")
    fitted.forest.save(workdir / SUBDIR / "forest.npz")
    write_json_atomic(dict(
        round=1, out_px=self.patch_size, feature_dim=int(x["train"].shape[1]),
        windows=extractor.num_windows, thresholds=fitted.thresholds(),
        ensemble_weight=fitted.weight, dense=dataclasses.asdict(fitted.dense_cfg),
        weights_digest=extractor.digest, **sets.balance()),
        workdir / SUBDIR / "model.json")
    eval_sets = {k: (v, x[k]) for k, v in sets.sets().items() if k != "train"}
    results = evaluate_heads(fitted, eval_sets, workdir / "eval")
    log(metrics_lib.format_table(results))
    write_json_atomic(dict(results=results, thresholds=fitted.thresholds(),
                           ensemble_weight=fitted.weight, extract_seconds=extract_s,
                           heads_seconds=heads_s,
                           train_seconds=time.perf_counter() - t_start),
                      workdir / "eval" / "summary.json")
    if writer is not None:
      writer.close()
    return results


@dataclasses.dataclass
class Trained:
  """A round-1 workdir loaded for inference."""

  config: object
  extractor: features.Extractor
  heads: Heads
  out_px: int

  def predict(self, items: Sequence[Item]) -> dict[str, np.ndarray]:
    return self.heads.predict(features.extract(items, self.extractor))


def load(workdir: str | Path, config) -> Trained:
  """The feature extractor and heads of a round-1 workdir."""
  d = Path(workdir) / SUBDIR
  info = read_json(d / "model.json", "round-1 model file")
  model = feature_model(config)
  backbone = ckpt_lib.load_pretrained(d / "backbone.safetensors")
  dense = ckpt_lib.load_pretrained(d / "dense_head.safetensors")
  if not (d / "forest.npz").exists():
    raise DataError(d / "forest.npz", "random forest file not found")
  il = config.image_level
  extractor = features.Extractor(model, backbone, int(info["out_px"]), il.window,
                                 il.window_stride, il.extract_batch)
  t = info["thresholds"]
  norm = dense.get("norm", {})
  fitted = Heads(heads.DenseConfig(**info["dense"]), dense["params"],
                 heads.Forest.load(d / "forest.npz"), float(t["dense"]), float(t["forest"]),
                 float(info["ensemble_weight"]), norm.get("mean"), norm.get("std"))
  return Trained(config, extractor, fitted, int(info["out_px"]))
