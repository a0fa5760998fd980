"""Round 2: EfficientNet fine-tuned end to end on whole fields, through the shared loop.

The SOFTEC AIC'24 write-up's second round (Irfan, SPADES team C): an
EfficientNet-B4 on images rescaled to 512x512 (their 4K images cut into
1600x1600 slices; here MIDOG fields or CSV images, ``fields.py``), in two
steps: (a) train the new top on the frozen ImageNet backbone, (b) unfreeze the
lower layers and fine-tune at a lower learning rate; then both steps again on
the round-2 data. Each stage is one ``python -m midog_jax.main`` run (the
shared loop: jit over the mesh, orbax checkpoints, resume, metrics), the next
stage starting from the previous workdir (``config.init_from``).

The model is ``EfficientNet(num_classes=1)``: the backbone's pooled features,
dropout (the variant's, B4 0.4) and one logit (the ``classifier`` parameters).
``model.train_layers`` says which parameters train (``optim.freeze`` gives
the others exactly zero updates): "head" (the classifier), "all", or
"from:<s>" (stages s..7, the head convolution and the classifier). With
``model.bn_train`` off (default) the backbone's BatchNorm runs in inference
mode in both stages, as Keras fine-tuning does, so frozen layers stay frozen
(statistics included) and small batches do not disturb the statistics.

The method brings its own data and scoring to the loop (the optional hooks
of ``train.py``): ``load_data`` (items by split), ``make_dataset`` (grain
batches of ``image``/``label``) and ``evaluation`` (image-level validation F1
and its threshold, ``eval/<set>/`` with ROC/PR curves and probabilities).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from midog_jax import parallel
from midog_jax.data import pipeline
from midog_jax.detectors.interface import (IMAGENET_MEAN, IMAGENET_STD, compute_dtype,
                                           normalize)
from midog_jax.image_level import datasets, features, heads
from midog_jax.image_level import fields as fields_lib
from midog_jax.image_level import metrics as metrics_lib
from midog_jax.models.efficientnet import EfficientNet, VARIANTS

HEAD = "classifier"
TOP = ("head_conv", "head_bn", HEAD)


def layer_mask(params: dict, spec: str) -> dict:
  """Which top-level parameter scopes train for ``model.train_layers``."""
  if spec == "all":
    ok = lambda name: True
  elif spec == "head":
    ok = lambda name: name == HEAD
  elif spec.startswith("from:") and spec[5:].isdigit():
    first = int(spec[5:])
    ok = lambda name: name in TOP or (name.startswith("stage")
                                      and int(name[5:].split("_")[0]) >= first)
  else:
    raise ValueError(f"model.train_layers must be head, all or from:<stage>, got {spec!r}")
  return {k: jax.tree.map(lambda _, t=ok(k): t, v) for k, v in params.items()}


class ItemMaker:
  """Example ``i`` -> ``image`` uint8, ``label``; a pure function of (seed, i)."""

  def __init__(self, items: Sequence[fields_lib.Item], seed: int, augment: bool,
               balanced: bool):
    if not items:
      raise ValueError("no items to sample from")
    self.items, self.seed, self.augment = list(items), int(seed), augment
    self.domains = sorted({it.domain for it in self.items})
    pos = [i for i, it in enumerate(self.items) if it.label == 1]
    neg = [i for i, it in enumerate(self.items) if it.label != 1]
    self.groups = [pos, neg] if balanced and augment and pos and neg else None

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    if not self.augment:
      k = index % len(self.items)       # validation: every item in order
    elif self.groups:
      g = self.groups[index % 2]        # balanced: even positive, odd negative
      k = g[int(rng.integers(len(g)))]
    else:
      k = int(rng.integers(len(self.items)))
    item = self.items[k]
    image = fields_lib.read_item(item)
    if self.augment:                    # D4: fields have no orientation
      image = np.rot90(image, int(rng.integers(4)))
      if rng.integers(2):
        image = image[:, ::-1]
    # points/classes/mask: empty, so the loop's example-image writer works.
    return dict(image=np.ascontiguousarray(image, np.uint8),
                label=np.float32(item.label == 1), rng=np.int32(index % 2 ** 31),
                domain=np.int32(self.domains.index(item.domain)),
                points=np.zeros((1, 2), np.float32), classes=np.zeros((1,), np.int32),
                mask=np.zeros((1,), bool))


class ItemEvaluation:
  """The loop's ``evaluation`` hook: image-level validation and final scoring."""

  @staticmethod
  def validate(detector, variables, items, config) -> dict:
    labels = np.asarray([it.label for it in items])
    probs = detector.predict(variables, items)
    t = metrics_lib.best_threshold(labels, probs)
    m = metrics_lib.binary_metrics(labels, probs, t)
    return dict(threshold=t, f1=m["f1"], precision=m["precision"], recall=m["recall"])

  @staticmethod
  def evaluate_sets(detector, variables, threshold, sets, config, workdir) -> dict:
    results = {}
    for name, items in sets.items():
      if not items:
        continue
      probs = detector.predict(variables, items)
      results[name] = metrics_lib.write_set(
          Path(workdir) / "eval" / name, [it.name for it in items],
          [it.domain for it in items], np.asarray([it.label for it in items]), probs,
          threshold, name)
    return results

  @staticmethod
  def format_table(results: dict) -> str:
    return metrics_lib.format_table({k: {"finetune": v} for k, v in results.items()})


class Finetune:
  """The round-2 method (``detectors.image_level`` with ``image_level.round = 2``)."""

  name = "image_level"
  input_mean, input_std = IMAGENET_MEAN, IMAGENET_STD
  tile_context = 0
  evaluation = ItemEvaluation

  def __init__(self, config):
    self.config = config
    m = config.model
    variant = str(m.variant)
    self.dropout = VARIANTS[variant][2] if m.dropout < 0 else float(m.dropout)
    self.model = EfficientNet(variant=variant, num_classes=1, dropout=self.dropout,
                              stochastic_depth=float(m.stochastic_depth),
                              dtype=compute_dtype(m))
    self.backbone = self.model.clone(num_classes=0)
    self.patch_size = datasets.out_px(config)
    self._sets = None

  # --- data hooks -------------------------------------------------------------

  def load_data(self) -> datasets.ItemSets:
    if self._sets is None:
      self._sets = datasets.load_sets(self.config, self.patch_size)
    return self._sets

  def make_dataset(self, items, cfg=None, *, seed: int, batch_size: int,
                   augment: bool = True, num_examples: int | None = None,
                   process_index: int = 0, process_count: int = 1,
                   negatives=None) -> grain.MapDataset:
    """``pipeline.make_dataset``'s signature over items (``cfg`` is unused)."""
    del cfg
    if negatives is not None:
      raise ValueError("the image-level method takes no negative pool")
    pipeline.check_global_batch(batch_size, process_count)
    maker = ItemMaker(items, seed, augment, bool(self.config.image_level.balanced))
    return pipeline.batched_stream(maker, batch_size=batch_size, num_examples=num_examples,
                                   process_index=process_index, process_count=process_count)

  # --- the Detector interface ---------------------------------------------------

  def init_variables(self, rng) -> dict:
    """Random weights; without ``init_from``, BatchNorm statistics from training images.

    The new head starts as a Keras ``Dense(1)`` (Glorot-uniform kernel, zero
    bias): torchvision's classifier init, uniform(+-1/sqrt(classes)), is
    uniform(+-1) for one logit, which starts the logits at +-20 and wastes
    the short head-only stage.
    """
    variables = jax.jit(lambda k: self.model.init(k, jnp.zeros((1, 32, 32, 3)),
                                                  train=False))(rng)
    head = variables["params"][HEAD]
    kernel = jax.nn.initializers.glorot_uniform()(jax.random.fold_in(rng, 7),
                                                  head["kernel"].shape)
    variables = dict(variables, params=dict(
        variables["params"], **{HEAD: dict(kernel=kernel, bias=jnp.zeros_like(head["bias"]))}))
    il = self.config.image_level
    if not self.config.init_from and il.bn_calibration:
      items = self.load_data().train
      p = self.patch_size
      windows = features.sample_windows(items, p, p, p, int(il.bn_calibration),
                                        int(self.config.seed))
      body = {k: v for k, v in variables["params"].items() if k != HEAD}
      stats = features.calibrate_batch_stats(
          self.backbone.clone(stochastic_depth=0.0),
          dict(params=body, batch_stats=variables["batch_stats"]), windows)["batch_stats"]
      variables = dict(variables, batch_stats=stats)
    return variables

  def trainable_mask(self, params):
    return layer_mask(params, str(self.config.model.train_layers))

  def logits(self, params, batch_stats, images, train: bool, rng=None):
    """(logits (B,), new batch_stats)."""
    x = normalize(images, self.input_mean, self.input_std)
    body = {k: v for k, v in params.items() if k != HEAD}
    v = {"params": body, "batch_stats": batch_stats}
    if train and self.config.model.bn_train:
      feats, upd = self.backbone.apply(v, x, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": rng})
      batch_stats = upd["batch_stats"]
    else:
      feats = self.backbone.apply(v, x, train=False)
    if train and self.dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, 1), 1.0 - self.dropout,
                                  feats.shape)
      feats = jnp.where(keep, feats / (1.0 - self.dropout), 0.0)
    head = params[HEAD]
    return (feats @ head["kernel"] + head["bias"])[:, 0], batch_stats

  def loss(self, params, batch_stats, batch, train):
    rng = jax.random.key(batch["rng"][0], impl="rbg") if train else None
    logits, new_stats = self.logits(params, batch_stats, batch["image"], train, rng)
    loss = heads.bce(logits, batch["label"])
    acc = jnp.mean((logits >= 0) == (batch["label"] > 0.5))
    return loss, (dict(loss=loss, accuracy=acc), new_stats)

  @functools.cached_property
  def _predict_fn(self):
    mesh = parallel.local_mesh()

    def fn(variables, images):
      x = normalize(images, self.input_mean, self.input_std)
      return jax.nn.sigmoid(self.model.apply(variables, x, train=False)[:, 0])

    return mesh, jax.jit(fn, in_shardings=(parallel.replicated(mesh),
                                           parallel.data_sharding(mesh)))

  def predict_images(self, variables, images: np.ndarray) -> np.ndarray:
    """P(positive) (N,) of uint8 (N, P, P, 3) images."""
    mesh, fn = self._predict_fn
    n_dev = mesh.devices.size
    bs = -(-int(self.config.image_level.predict_batch) // n_dev) * n_dev
    variables = jax.device_put(parallel.to_host(variables), parallel.replicated(mesh))
    out = []
    for i in range(0, len(images), bs):
      chunk = images[i:i + bs]
      n = len(chunk)
      if n < bs:
        chunk = np.concatenate([chunk, np.zeros((bs - n,) + chunk.shape[1:], np.uint8)])
      x = jax.device_put(chunk, parallel.data_sharding(mesh))
      out.append(np.asarray(fn(variables, x))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def predict(self, variables, items: Sequence[fields_lib.Item]) -> np.ndarray:
    """P(positive) (N,) of items, read in chunks."""
    bs = max(1, int(self.config.image_level.predict_batch))
    out = [self.predict_images(variables, np.stack(
        [fields_lib.read_item(it) for it in items[i:i + bs]]))
        for i in range(0, len(items), bs)]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def make_tile_fn(self, score_thresh):
    raise NotImplementedError("the image-level method classifies fields; it has no "
                              "tile detector (use python -m midog_jax.classify)")

  def make_patch_score_fn(self, variables, patch_size):
    """P(the patch holds a mitotic figure), jitted (patches of any size)."""
    v = jax.device_put(parallel.to_host(variables))

    @jax.jit
    def score(patches):
      x = normalize(patches, self.input_mean, self.input_std)
      return jax.nn.sigmoid(self.model.apply(v, x, train=False)[:, 0])
    return score
