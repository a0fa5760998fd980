"""Sliding-window EfficientNet features of whole fields, and their cache.

Round 1 of the SOFTEC AIC'24 write-up (Irfan, SPADES team C): an ImageNet
EfficientNet-B0 runs as a sliding window with overlap over the whole field;
each window gives its globally pooled 1,280-vector, and the vectors are
concatenated in a fixed window order into one image vector (their 4K images:
352 windows, 450,560 features). Here the window order is row-major: windows
top to bottom, and left to right within a row (:func:`window_origins`), so
vector slice ``k * D:(k + 1) * D`` always belongs to window ``k``.

The extraction is one jitted function over a fixed-size batch of uint8
windows (normalisation inside), sharded over this process's devices
(``parallel.local_mesh``); windows of several fields share a batch. Features
are computed once per (item, settings, weights) and kept in a
:class:`FeatureCache` (one ``.npy`` per item, written atomically), so the heads
train in seconds and reruns read the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from midog_jax import parallel
from midog_jax.data import slides as slides_lib
from midog_jax.detectors.interface import IMAGENET_MEAN, IMAGENET_STD, normalize
from midog_jax.fileio import atomic_path, write_json_atomic
from midog_jax.image_level import fields as fields_lib

CACHE_VERSION = 1


def window_origins(field_px: int, window: int, stride: int) -> np.ndarray:
  """(K, 2) window origins (x, y) covering a ``field_px`` square, row-major.

  Along each axis ``slides.grid_origins``: every ``stride`` pixels, plus one
  window flush with the far border, so the windows cover the whole field.
  """
  if not 0 < window <= field_px:
    raise ValueError(f"window {window} must be in (0, field side {field_px}]")
  axis = slides_lib.grid_origins(field_px, window, stride)
  return np.asarray([(x, y) for y in axis for x in axis], np.int64)


def cut_windows(field: np.ndarray, origins: np.ndarray, window: int) -> np.ndarray:
  """(K, window, window, 3) windows of one (F, F, 3) field, in ``origins`` order."""
  return np.stack([field[y:y + window, x:x + window] for x, y in origins])


def weights_digest(variables: Any) -> str:
  """sha256 of every array (path, dtype, shape, bytes): the weights' cache key."""
  h = hashlib.sha256()
  flat = traverse_util.flatten_dict(parallel.to_host(variables), sep="/")
  for k in sorted(flat):
    a = np.ascontiguousarray(np.asarray(flat[k]))
    h.update(f"{k}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def calibrate_batch_stats(model, variables: dict, windows: np.ndarray) -> dict:
  """``variables`` with every BatchNorm's running statistics set to those of ``windows``.

  A randomly initialised EfficientNet in inference mode (running mean 0,
  variance 1) shrinks its signal block after block until the pooled features
  are ~1e-14 and all alike; setting the statistics from a batch of training
  windows (a data-dependent initialisation) gives useful random features.
  Flax updates ``r <- m r + (1 - m) b`` per training-mode call, and the batch
  statistics ``b`` do not depend on ``r``. From ``r = 0`` two calls give
  ``r1 = (1 - m) b`` and ``r2 - r1 = m r1``: the momentum, then ``b``, for any
  momentum and without cancellation. ``model`` must be deterministic in
  training mode (no stochastic depth or dropout).
  """
  @jax.jit
  def step(v, x):
    _, upd = model.apply(v, normalize(x, IMAGENET_MEAN, IMAGENET_STD), train=True,
                         mutable=["batch_stats"])
    return upd["batch_stats"]

  x = jnp.asarray(windows, jnp.uint8)
  s0 = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  s1 = step(dict(variables, batch_stats=s0), x)
  s2 = step(dict(variables, batch_stats=s1), x)
  num = sum(jnp.vdot(b - a, a) for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)))
  den = sum(jnp.vdot(a, a) for a in jax.tree.leaves(s1))
  m = float(num / jnp.maximum(den, 1e-30))
  stats = jax.tree.map(lambda r1: r1 / (1.0 - m), s1)
  return dict(variables, batch_stats=jax.device_get(stats))


def sample_windows(items: Sequence[fields_lib.Item], field_px: int, window: int,
                   stride: int, n: int, seed: int) -> np.ndarray:
  """``n`` windows of the items' window grid, drawn uniformly (seeded)."""
  rng = np.random.default_rng(seed)
  origins = window_origins(field_px, window, stride)
  picks = sorted(zip(rng.integers(len(items), size=n).tolist(),
                     rng.integers(len(origins), size=n).tolist()))
  out, fields = [], {}
  for i, k in picks:
    if i not in fields:
      fields[i] = fields_lib.read_item(items[i])
    x, y = origins[k]
    out.append(fields[i][y:y + window, x:x + window])
  return np.stack(out)


@functools.lru_cache(maxsize=8)
def _extract_fn(model, mesh) -> Callable:
  """(variables, uint8 windows (B, w, w, 3)) -> float32 (B, D), jitted, sharded."""
  def fn(variables, windows):
    x = normalize(windows, IMAGENET_MEAN, IMAGENET_STD)
    return model.apply(variables, x, train=False)

  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                 out_shardings=parallel.data_sharding(mesh))


class Extractor:
  """A feature model with its weights and window grid, ready to run.

  Args:
    model: a Flax module mapping normalised NHWC images to (B, D) features
      (``EfficientNet(num_classes=0)``).
    variables: its ``params`` (and ``batch_stats``).
    field_px, window, stride: the field side and the window grid.
    batch: windows per call (rounded up to a multiple of the device count).
    mesh: default ``parallel.local_mesh()``.
  """

  def __init__(self, model, variables: dict, field_px: int, window: int, stride: int,
               batch: int = 32, mesh=None):
    self.model, self.field_px, self.window, self.stride = model, field_px, window, stride
    self.origins = window_origins(field_px, window, stride)
    self.mesh = mesh if mesh is not None else parallel.local_mesh()
    n_dev = self.mesh.devices.size
    self.batch = -(-max(1, int(batch)) // n_dev) * n_dev
    host = parallel.to_host(variables)
    self.digest = weights_digest(host)
    self.variables = jax.device_put(host, parallel.replicated(self.mesh))
    self._fn = _extract_fn(model, self.mesh)
    self.feature_dim = None  # D, known after the first call

  @property
  def num_windows(self) -> int:
    return len(self.origins)

  def settings(self) -> dict:
    """What the features depend on besides the pixels (the cache key)."""
    return dict(version=CACHE_VERSION, model=repr(self.model), field_px=self.field_px,
                window=self.window, stride=self.stride, weights=self.digest)

  def window_features(self, windows: np.ndarray) -> np.ndarray:
    """float32 (N, D) pooled features of uint8 (N, w, w, 3) windows."""
    out = []
    for start in range(0, len(windows), self.batch):
      chunk = windows[start:start + self.batch]
      n = len(chunk)
      if n < self.batch:  # fixed shapes: one compiled program
        chunk = np.concatenate([chunk, np.zeros((self.batch - n,) + chunk.shape[1:],
                                                chunk.dtype)])
      x = jax.device_put(np.ascontiguousarray(chunk, np.uint8),
                         parallel.data_sharding(self.mesh))
      out.append(np.asarray(self._fn(self.variables, x), np.float32)[:n])
    feats = np.concatenate(out)
    self.feature_dim = feats.shape[1]
    return feats

  def __call__(self, fields: np.ndarray) -> np.ndarray:
    """(N, K * D) image vectors of uint8 (N, F, F, 3) fields (row-major windows)."""
    fields = np.asarray(fields)
    if fields.shape[1:3] != (self.field_px, self.field_px):
      raise ValueError(f"fields must be {self.field_px} px square, got {fields.shape}")
    windows = np.concatenate([cut_windows(f, self.origins, self.window) for f in fields])
    feats = self.window_features(windows)
    return feats.reshape(len(fields), -1)


class FeatureCache:
  """One ``.npy`` per item under ``root/<settings key>/``, written atomically.

  The settings key hashes the extractor's settings (model, field size, window
  grid, weights digest); the item key hashes its identity (real path, file
  size and modification time, region, output size), so a changed image, other
  windows or other weights never read stale features.
  """

  def __init__(self, root: str | os.PathLike, settings: dict):
    text = json.dumps(settings, sort_keys=True)
    self.dir = Path(root) / hashlib.sha256(text.encode()).hexdigest()[:16]
    if not (self.dir / "settings.json").exists():
      write_json_atomic(settings, self.dir / "settings.json")

  def path(self, item: fields_lib.Item) -> Path:
    text = json.dumps(item.identity(), sort_keys=True)
    return self.dir / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.npy"

  def get(self, item: fields_lib.Item) -> np.ndarray | None:
    p = self.path(item)
    return np.load(p) if p.exists() else None

  def put(self, item: fields_lib.Item, vector: np.ndarray) -> None:
    with atomic_path(self.path(item)) as tmp:
      np.save(tmp, np.asarray(vector, np.float32))


def extract(items: Sequence[fields_lib.Item], extractor: Extractor,
            cache: FeatureCache | None = None, log: Callable = lambda *_: None
            ) -> np.ndarray:
  """float32 (len(items), K * D) features, from the cache where present."""
  vectors: list[np.ndarray | None] = [cache.get(it) if cache else None for it in items]
  todo = [i for i, v in enumerate(vectors) if v is None]
  if todo:
    log(f"extracting features of {len(todo)} of {len(items)} fields "
        f"({extractor.num_windows} windows each)")
  per_call = max(1, extractor.batch // extractor.num_windows)
  for start in range(0, len(todo), per_call):
    idx = todo[start:start + per_call]
    got = extractor(np.stack([fields_lib.read_item(items[i]) for i in idx]))
    for i, v in zip(idx, got):
      vectors[i] = v
      if cache:
        cache.put(items[i], v)
  if not items:
    return np.zeros((0, 0), np.float32)
  return np.stack(vectors).astype(np.float32, copy=False)
