"""Kondo's two-stage domain-adversarial detector (MIDOG 2021), ``config.method = "kondo_da"``.

Stage 1: blue-ratio candidates of the image (``midog_jax.candidates``); stage
2: a ResNet-18 classifies the 64x64 patch centred on each candidate, with a
mitosis head and a gradient-reversal scanner head (``models.dann.DANN``,
Ganin et al. 2016). A mitotic-figure detection is a candidate with its
probability of "mitosis" as the score.

Training goes through the shared loop (``train.py``) with the method's data
hooks: ``load_data`` (the experiment's cases, plus the candidate store of the
labelled images, built once), ``make_dataset`` (batches of store patches of
the given cases: ``image``, ``label``, ``domain`` and ``progress``, the
training progress the reversal schedule reads). Whole-image inference is not
tiling: ``make_tiler`` (the hook of ``evaluation.make_tiler``) returns a
:class:`CandidateTiler`, whose ``detect`` extracts the image's candidates and
scores their patches, so validation, ``predict``, ``evaluate`` and ``export``
work unchanged. ``extra_validation`` adds the candidate-level F1 of the
validation candidates to each validation (logged as ``val_candidate_f1``).

The adaptation phase (per target image or domain) is ``adaptation.py``;
its command line is ``python -m midog_jax.adapt``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from midog_jax import candidates as cand_lib
from midog_jax.candidates import extract as extract_lib
from midog_jax.data import experiment, pipeline
from midog_jax.detections import Detections, suppress_by_distance
from midog_jax.detectors.interface import (IMAGENET_MEAN, IMAGENET_STD, compute_dtype,
                                           normalize)
from midog_jax.errors import DataError
from midog_jax.metrics import best_f1_threshold  # noqa: F401 (candidate-level F1)
from midog_jax.models import dann as dann_lib
from midog_jax.models import resnet as resnet_lib
from midog_jax.models.grad_reverse import ganin_lambda



class CandidateMaker:
  """Example ``i`` -> one store patch; a pure function of (seed, i).

  ``balanced``: within each global batch, the first ``mitotic_fraction`` of
  the positions hold mitotic candidates, the rest non-mitotic ones;
  otherwise candidates are drawn uniformly. ``augment``: a random D4
  transform (when ``d4``). ``progress`` = global step / total steps (the
  reversal schedule's input; resumes with the iterator).
  """

  def __init__(self, store, indices: np.ndarray, *, seed: int, batch_size: int,
               total_steps: int, augment: bool, balanced: bool,
               mitotic_fraction: float, d4: bool):
    self.store, self.seed, self.batch = store, int(seed), int(batch_size)
    self.total, self.augment, self.d4 = max(int(total_steps), 1), augment, d4
    self.indices = np.asarray(indices, np.int64)
    if not len(self.indices):
      raise ValueError("no candidates to sample from")
    lab = store.labels[self.indices]
    pos, neg = self.indices[lab == 1], self.indices[lab != 1]
    self.groups = None
    if balanced and len(pos) and len(neg):
      n_pos = min(max(int(round(mitotic_fraction * self.batch)), 1), self.batch - 1)
      self.groups, self.n_pos = (pos, neg), n_pos

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    if self.groups is not None:
      g = self.groups[0 if index % self.batch < self.n_pos else 1]
      k = g[int(rng.integers(len(g)))]
    else:
      k = self.indices[int(rng.integers(len(self.indices)))]
    item = self.store[int(k)]
    patch = item["patch"]
    if self.augment and self.d4:
      patch = np.rot90(patch, int(rng.integers(4)))
      if rng.integers(2):
        patch = patch[:, ::-1]
    c = patch.shape[0] / 2.0
    # points/classes/mask: the candidate at the centre, for the loop's example images.
    return dict(image=np.ascontiguousarray(patch, np.uint8),
                label=np.int32(item["label"] == 1), domain=np.int32(item["domain"]),
                progress=np.float32(min((index // self.batch) / self.total, 1.0)),
                points=np.array([[c, c]], np.float32),
                classes=np.array([1 if item["label"] == 1 else 2], np.int32),
                mask=np.ones((1,), bool))


@dataclasses.dataclass
class CandidateTiler:
  """Whole-image inference of the candidate classifier (``evaluation.Tiler``'s ``detect``)."""

  detector: Any
  variables: Any
  score_thresh: float
  merge_radius: float = 0.0

  def detect(self, source) -> Detections:
    """Candidates of one image scoring at least ``score_thresh`` (pixels)."""
    xy, patches = self.detector.candidates(source)
    probs = self.detector.score_patches(self.variables, patches)
    return self.detector.to_detections(xy, probs, self.score_thresh, self.merge_radius)


class KondoDA:
  """The detector: DANN classifier of blue-ratio candidate patches."""

  name = "kondo_da"
  input_mean, input_std = IMAGENET_MEAN, IMAGENET_STD
  tile_context = 0

  def __init__(self, config):
    self.config = config
    m, k = config.model, config.kondo
    self.model = dann_lib.DANN(
        backbone=str(m.backbone), num_domains=int(m.num_domains),
        hidden=tuple(int(h) for h in m.hidden), backbone_width=int(m.backbone_width),
        norm=str(m.norm), trainable_backbone_layers=int(m.trainable_backbone_layers),
        dtype=compute_dtype(m))
    self.patch_size = int(config.data.patch_size) or 64
    self.settings = cand_lib.Settings(
        k_std=float(k.k_std), min_area_px=int(k.min_area_px),
        max_side_px=int(k.max_side_px), patch_size=self.patch_size,
        tile_px=int(k.tile_px))
    if k.grl not in ("ganin", "constant"):
      raise ValueError(f"kondo.grl must be ganin or constant, got {k.grl!r}")
    if k.sampling not in ("balanced", "uniform"):
      raise ValueError(f"kondo.sampling must be balanced or uniform, got {k.sampling!r}")
    self.score_batch = int(k.score_batch)
    self._data, self._store = None, None
    self._build_fns()

  def _build_fns(self) -> None:
    # Per model (the grown one of the adaptation phase has its own).
    self._probs = jax.jit(self._probs_impl)

  def with_model(self, model) -> "KondoDA":
    """A copy of this detector around ``model`` (e.g. ``model.grown()``)."""
    other = copy.copy(self)
    other.model = model
    other.__dict__.pop("_adapt_steps", None)  # compiled for the other model
    other._build_fns()
    return other

  # --- data hooks --------------------------------------------------------------

  def store_root(self) -> Path:
    """Where candidate stores go (``kondo.store_dir``; "" = beside the data)."""
    k, d = self.config.kondo, self.config.data
    if k.store_dir:
      return Path(k.store_dir)
    return Path(d.root or d.synthetic_dir) / "candidate_stores"

  def load_data(self) -> experiment.ExperimentData:
    """The experiment's cases; builds (or finds) the store of the labelled images."""
    if self._data is None:
      data = experiment.load_experiment(self.config.data)
      self._data = data
      self._store = cand_lib.build_store(data.train + data.val, self.store_root(),
                                         self.settings, int(self.config.kondo.workers))
      n = len(self._store.domain_names)
      if n != self.model.num_domains:
        raise DataError(self._store.path, (
            f"the labelled images have {n} domains ({', '.join(self._store.domain_names)}) "
            f"but model.num_domains is {self.model.num_domains}; set "
            f"--config.model.num_domains={n}"))
    return self._data

  @property
  def store(self):
    """The candidate store of the labelled images (built by :meth:`load_data`)."""
    if self._store is None:
      self.load_data()
    return self._store

  def indices_of(self, cases: Sequence) -> np.ndarray:
    """Store indices of the candidates of ``cases``."""
    ids = np.asarray([c.image_id for c in cases], np.int32)
    return np.flatnonzero(np.isin(self.store.image_ids, ids))

  def make_dataset(self, cases, cfg=None, *, seed: int, batch_size: int,
                   augment: bool = True, num_examples: int | None = None,
                   process_index: int = 0, process_count: int = 1,
                   negatives=None) -> grain.MapDataset:
    """``pipeline.make_dataset``'s signature over the store patches of ``cases``."""
    del cfg
    if negatives is not None:
      raise ValueError("kondo_da samples candidates; it takes no negative pool")
    pipeline.check_global_batch(batch_size, process_count)
    k = self.config.kondo
    maker = CandidateMaker(
        self.store, self.indices_of(cases), seed=seed, batch_size=batch_size,
        total_steps=int(self.config.total_steps), augment=augment,
        balanced=k.sampling == "balanced", mitotic_fraction=float(k.mitotic_fraction),
        d4=bool(self.config.data.d4))
    return pipeline.batched_stream(maker, batch_size=batch_size, num_examples=num_examples,
                                   process_index=process_index, process_count=process_count)

  # --- the Detector interface ----------------------------------------------------

  def init_variables(self, rng) -> dict:
    p = self.patch_size
    return jax.jit(lambda k: self.model.init(k, jnp.zeros((1, p, p, 3)), 0.0,
                                             train=False))(rng)

  def trainable_mask(self, params):
    return resnet_lib.trainable_mask(params, self.model.trainable_backbone_layers,
                                     dann_lib.BACKBONE)

  def grl_lambda(self, progress) -> jax.Array:
    """The reversal strength at training progress ``progress`` in [0, 1]."""
    k = self.config.kondo
    lam = jnp.float32(k.grl_lambda)
    if k.grl == "constant" or progress is None:
      return lam
    return lam * ganin_lambda(progress, float(k.grl_gamma))

  def apply(self, params, batch_stats, images, lam, train: bool):
    """((mitosis logits, domain logits), new batch_stats) of uint8 patches."""
    x = normalize(images, self.input_mean, self.input_std)
    v = {"params": params}
    if batch_stats:
      v["batch_stats"] = batch_stats
    if train and batch_stats:
      out, upd = self.model.apply(v, x, lam, train=True, mutable=["batch_stats"])
      return out, upd["batch_stats"]
    return self.model.apply(v, x, lam, train=train), batch_stats

  def loss(self, params, batch_stats, batch, train: bool):
    """Summed cross-entropies of both heads (``models.dann.dann_loss``)."""
    progress = batch.get("progress")
    lam = self.grl_lambda(None if progress is None else jnp.mean(progress))
    (mit, dom), new_stats = self.apply(params, batch_stats, batch["image"], lam, train)
    ones = jnp.ones(mit.shape[:1], jnp.float32)
    loss, parts = dann_lib.dann_loss(mit, dom, batch["label"], batch["domain"], ones, ones)
    metrics = dict(parts, loss=loss, grl_lambda=lam,
                   mitosis_acc=jnp.mean(jnp.argmax(mit, -1) == batch["label"]),
                   domain_acc=jnp.mean(jnp.argmax(dom, -1) == batch["domain"]))
    return loss, (metrics, new_stats)

  def _probs_impl(self, variables, patches):
    x = normalize(patches, self.input_mean, self.input_std)
    mit, _ = self.model.apply(variables, x, 0.0, train=False)
    return jax.nn.softmax(mit, axis=-1)[:, 1]

  def make_tile_fn(self, score_thresh: float):
    raise NotImplementedError(
        "kondo_da classifies candidate patches, not tiles: whole images go "
        "through make_tiler (evaluation.make_tiler calls it)")

  def make_tiler(self, variables, config=None, *, score_thresh=None, mesh=None
                 ) -> CandidateTiler:
    """The whole-image detector (``evaluation.make_tiler``'s hook)."""
    del mesh
    cfg = (config or self.config).eval
    t = float(cfg.score_thresh) if score_thresh is None else min(
        float(cfg.score_thresh), float(score_thresh))
    return CandidateTiler(self, jax.device_put(variables), t, float(cfg.merge_radius_px))

  @staticmethod
  def to_detections(xy: np.ndarray, probs: np.ndarray, threshold: float,
                    merge_radius: float) -> Detections:
    """Candidates at or above ``threshold``, then the distance suppression
    every method's whole-image output gets (``eval.merge_radius_px``; 0 = off,
    the seed's rule): blue-ratio components split one figure into ~2-3
    candidates, each a false positive under the one-to-one MIDOG matching."""
    dets = Detections(xy, probs).above(threshold)
    return dets.select(suppress_by_distance(dets.xy, dets.scores, merge_radius))

  def make_patch_score_fn(self, variables: dict, patch_size: int):
    del patch_size  # global pooling: any patch side gives one probability
    return functools.partial(self._probs, variables)

  # --- candidates and scores -------------------------------------------------------

  def candidates(self, source) -> tuple[np.ndarray, np.ndarray]:
    """(centres (N, 2) float32 sorted by (y, x), patches (N, P, P, 3) uint8) of one image."""
    xy, patches = [], []
    for x, p in extract_lib.candidates_and_patches(source, self.settings):
      xy.append(x)
      patches.append(p)
    if not xy:
      return (np.zeros((0, 2), np.float32),
              np.zeros((0, self.patch_size, self.patch_size, 3), np.uint8))
    xy, patches = np.concatenate(xy), np.concatenate(patches)
    order = extract_lib.yx_order(xy)
    return xy[order], patches[order]

  def score_patches(self, variables, patches: np.ndarray) -> np.ndarray:
    """P(mitosis) (N,) float32 of uint8 patches, in fixed-size jitted batches."""
    n, b = len(patches), self.score_batch
    out = np.zeros(n, np.float32)
    for s in range(0, n, b):
      chunk = patches[s:s + b]
      pad = b - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.uint8)])
      out[s:s + b] = np.asarray(self._probs(variables, chunk))[:b - pad]
    return out

  def store_patches(self, indices: np.ndarray) -> np.ndarray:
    """Patches of store candidates ``indices`` (N, P, P, 3) uint8."""
    return self.store.patches(indices)

  def extra_validation(self, variables, cases, config) -> dict:
    """Candidate-level F1 of the validation candidates (``evaluation.validate``'s hook)."""
    del config
    idx = self.indices_of(cases)
    probs = self.score_patches(variables, self.store_patches(idx))
    r = best_f1_threshold(self.store.labels[idx], probs)
    return {f"candidate_{k}": v for k, v in r.items()}


DETECTOR = KondoDA
