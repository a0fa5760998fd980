"""Sliding-window features with the real EfficientNet-B0: grid, order, cache, BN statistics."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile

from midog_jax.image_level import features as Fe
from midog_jax.image_level import fields as F
from midog_jax.models.efficientnet import FEATURES, EfficientNet

MODEL = EfficientNet("b0", num_classes=0)


@pytest.fixture(scope="module")
def variables():
  v = jax.jit(lambda k: MODEL.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.key(0, impl="rbg"))
  rng = np.random.default_rng(0)
  windows = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  return Fe.calibrate_batch_stats(MODEL.clone(stochastic_depth=0.0), v, windows)


def test_window_grid_covers_the_field_in_row_major_order():
  o = Fe.window_origins(100, 32, 24)
  axis = [0, 24, 48, 68]  # every 24 px, the last flush with the border
  assert o.tolist() == [[x, y] for y in axis for x in axis]
  covered = np.zeros((100, 100), bool)
  for x, y in o:
    covered[y:y + 32, x:x + 32] = True
  assert covered.all()
  with pytest.raises(ValueError):
    Fe.window_origins(20, 32, 8)


def test_random_weights_give_vanishing_features_until_calibrated(variables):
  raw = jax.jit(lambda k: MODEL.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.key(0, impl="rbg"))
  x = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
  assert np.abs(MODEL.apply(raw, x)).max() < 1e-6
  out = np.asarray(MODEL.apply(variables, x))
  assert out.std(axis=0).mean() > 1e-2  # distinct images, distinct features


def test_calibrated_statistics_are_the_batch_statistics(variables):
  # A training-mode pass moves the running statistics towards the batch's;
  # after calibration on that batch they are already there.
  m = MODEL.clone(stochastic_depth=0.0)
  windows = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  cal = Fe.calibrate_batch_stats(m, variables, windows)
  x = np.asarray(Fe.normalize(windows, Fe.IMAGENET_MEAN, Fe.IMAGENET_STD))
  _, upd = m.apply(cal, x, train=True, mutable=["batch_stats"])
  before = jax.tree.leaves(cal["batch_stats"])
  after = jax.tree.leaves(upd["batch_stats"])
  assert len(before) == len(after) > 50
  for a, b in zip(before, after):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)
  # ... whereas the initial statistics (mean 0, variance 1) were far off.
  _, upd0 = m.apply(variables, x, train=True, mutable=["batch_stats"])
  moved = [np.abs(np.asarray(b) - np.asarray(a)).max()
           for a, b in zip(jax.tree.leaves(variables["batch_stats"]),
                           jax.tree.leaves(upd0["batch_stats"]))]
  assert max(moved) > 1e-2


def test_concatenation_order_follows_the_windows(variables):
  ex = Fe.Extractor(MODEL, variables, field_px=64, window=32, stride=32, batch=8)
  rng = np.random.default_rng(3)
  field = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  # Swap the top-left and bottom-right quadrants (windows 0 and 3).
  swapped = field.copy()
  swapped[:32, :32], swapped[32:, 32:] = field[32:, 32:], field[:32, :32]
  v, w = ex(np.stack([field, swapped]))
  d = FEATURES["b0"]
  assert v.shape == (4 * d,) and ex.num_windows == 4
  seg = lambda a, k: a[k * d:(k + 1) * d]
  np.testing.assert_allclose(seg(w, 0), seg(v, 3), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(seg(w, 3), seg(v, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(seg(w, 1), seg(v, 1), rtol=1e-5, atol=1e-5)
  assert not np.allclose(seg(v, 0), seg(v, 3), atol=1e-3)


def _tiff(path, seed, size=120):
  img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  tifffile.imwrite(path, img, photometric="rgb", resolution=(40000, 40000),
                   resolutionunit="CENTIMETER")
  return str(path)


def test_cached_features_equal_fresh_ones(tmp_path, variables):
  items = [F.Item(_tiff(tmp_path / f"{i}.tif", i), 10 * i, 5, 100, 100, 48, i % 2, "A",
                  f"i{i}") for i in range(3)]
  ex = Fe.Extractor(MODEL, variables, field_px=48, window=32, stride=16, batch=8)
  cache = Fe.FeatureCache(tmp_path / "cache", ex.settings())
  first = Fe.extract(items, ex, cache)
  assert first.shape == (3, 4 * FEATURES["b0"])
  assert all(cache.path(it).exists() for it in items)
  fresh = Fe.extract(items, Fe.Extractor(MODEL, variables, 48, 32, 16, batch=4))
  np.testing.assert_array_equal(Fe.extract(items, ex, cache), first)
  np.testing.assert_allclose(fresh, first, rtol=1e-5, atol=1e-5)
  # Poison the cache: a hit must be read, not recomputed.
  cache.put(items[1], np.zeros_like(first[1]))
  assert not Fe.extract(items, ex, cache)[1].any()


def test_cache_keys_follow_weights_windows_and_pixels(tmp_path, variables):
  path = _tiff(tmp_path / "a.tif", 0)
  item = F.Item(path, 0, 0, 100, 100, 48, 1, "A", "a")
  ex = Fe.Extractor(MODEL, variables, 48, 32, 16)
  base = Fe.FeatureCache(tmp_path, ex.settings())
  other_grid = Fe.FeatureCache(tmp_path, Fe.Extractor(MODEL, variables, 48, 32, 8).settings())
  changed = jax.tree.map(lambda a: a, variables)
  changed["params"]["head_conv"]["kernel"] = changed["params"]["head_conv"]["kernel"] * 2
  other_weights = Fe.FeatureCache(tmp_path, Fe.Extractor(MODEL, changed, 48, 32, 16).settings())
  assert len({base.dir, other_grid.dir, other_weights.dir}) == 3
  key = base.path(item)
  assert base.path(F.Item(path, 1, 0, 100, 100, 48, 0, "B", "z")) != key  # region
  assert base.path(F.Item(path, 0, 0, 100, 100, 48, 0, "B", "z")) == key  # label, name: no
  _tiff(tmp_path / "a.tif", 1)
  os.utime(path, ns=(1, 1))
  assert base.path(item) != key  # the file changed
