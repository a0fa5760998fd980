"""The P4 detector (Lafarge & Koelzer, MIDOG 2022): patch labels, dense maxima, tiling, training and rotation.

The rotation contract (last test) runs through the real CLIs: a tiny P4 workdir
trained by ``python -m midog_jax.main`` and ``python -m midog_jax.predict`` on
a TIFF and its ``np.rot90`` copy. Size rule for exactness: image height and
width EVEN, tile size and overlap even (every tile origin is then even and
each tile's map is an exact crop of the whole-image map on the stride-2 grid
whose centres ``2j + 0.5`` map onto themselves under rot90), overlap at least
``4 * (peak_window // 2) + 4`` px (owned points see their whole local-maximum
window) and ``topk`` above the number of maxima per tile.

Ties: a briefly trained width-2 model outputs exactly constant values over
regions where all its last features are rectified to zero. With maxima
"equal to the window max" every member of such a plateau became a candidate
with the same score, and ``infer``'s distance suppression, which breaks equal
scores by position, kept a different member in the rotated image (seen
here: 1 of 43 points). The method therefore keeps only STRICT maxima (larger
than every neighbour), a rule that treats a plateau the same in every
orientation. The test images also carry per-pixel noise, so no flat image
region makes a plateau either.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tifffile

from midog_jax import infer
from configs import p4_resnet
from midog_jax.data import slides as slides_lib
from midog_jax.detections import IMPOSTER, MITOSIS
from midog_jax.detectors import interface
from midog_jax.detectors import p4 as p4m
from midog_jax.models import p4_resnet as pr
from support import REPO, cpu_env, train_workdir

SPACING_UM = 0.25


def _tiny_method(**eval_overrides):
  config = p4_resnet.get_config("tiny")
  config.model.topk = 4096  # more than any tile here has maxima
  for k, v in eval_overrides.items():
    setattr(config.eval, k, v)
  return p4m.P4Detector(config), config


def _norm(images):
  """The P4 detector's input normalisation."""
  return interface.normalize(images, p4m.P4Detector.input_mean, p4m.P4Detector.input_std)


def _random_variables(method, patch, seed):
  """Initial weights with random batch-norm affine maps and statistics.

  At initialisation (BN the identity) most of the tiny net's last features
  are rectified to zero and its map is largely one plateau; random BN
  parameters make a map with many distinct maxima, as a trained net has.
  """
  v = method.init_variables(jax.random.key(seed))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "mean":
      return rng.normal(0, 0.3, leaf.shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name == "scale":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name == "bias":
      return rng.normal(0, 0.3, leaf.shape).astype(np.float32)
    return leaf

  return jax.tree_util.tree_map_with_path(fill, v)


def _noisy_image(h, w, seed):
  """Smooth blobs plus per-pixel noise: no flat regions, hence no exact ties."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.full((h, w), 200.0)
  for _ in range(6):
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    img -= 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0 ** 2))
  rgb = img[..., None] * np.asarray([0.9, 0.7, 1.0]) + rng.normal(0, 6, (h, w, 3))
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ labels


def test_patch_labels_by_hand():
  p = 78
  c = (p - 1) / 2  # 38.5: the centre of output (k, k) of a 78 + 4k patch
  pts = np.zeros((7, 2, 2), np.float32)
  cls = np.full((7, 2), MITOSIS, np.int32)
  mask = np.zeros((7, 2), bool)
  mask[:, 0] = True
  pts[0, 0] = (c, c)                 # mitosis at the centre -> 1
  pts[1, 0] = (c + 20, c)            # 20 px away -> 0
  pts[2, 0], cls[2, 0] = (c, c), IMPOSTER   # imposter at the centre -> 0
  pts[3, 0], mask[3, 0] = (c, c), False     # padding row at the centre -> 0
  pts[4, 0] = (c, c - 8)             # exactly 8 px (inclusive) -> 1
  pts[5, 0] = (c + 30, c)            # far mitosis, and an imposter near...
  pts[5, 1], cls[5, 1], mask[5, 1] = (c + 1, c), IMPOSTER, True  # ... -> 0
  pts[6, 0] = (c + 8.25, c)          # just outside -> 0
  got = p4m.patch_labels(jnp.asarray(pts), jnp.asarray(cls), jnp.asarray(mask), p, 8.0)
  np.testing.assert_array_equal(np.asarray(got), [1, 0, 0, 0, 1, 0, 0])


def test_loss_uses_the_centre_output_and_those_labels():
  method, config = _tiny_method()
  rf = pr.receptive_field(method.plan)  # 12
  p = rf + 8                             # 5x5 output map, centre (2, 2)
  assert method.centre_index(p) == 2
  np.testing.assert_allclose(np.asarray(p4m.output_to_pixels(2, 2, rf)),
                             [(p - 1) / 2] * 2)
  variables = method.init_variables(jax.random.key(0))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, p, p, 3)).astype(np.uint8)
  c = (p - 1) / 2
  points = np.asarray([[[c, c]], [[c + 20, c]], [[c, c]], [[c + 1, c - 2]]], np.float32)
  batch = dict(image=images, points=points,
               classes=np.asarray([[MITOSIS], [MITOSIS], [IMPOSTER], [MITOSIS]]),
               mask=np.ones((4, 1), bool))
  labels = np.asarray([1, 0, 0, 1], np.float32)
  loss, (metrics, stats) = method.loss(variables["params"], variables["batch_stats"],
                                       batch, train=False)
  full = method.model.apply(variables, _norm(images), train=False)
  logit = full[:, 2, 2, 0]
  want = optax.sigmoid_binary_cross_entropy(logit, labels).mean()
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  assert float(metrics["pos_fraction"]) == 0.5
  assert float(metrics["accuracy"]) == float(np.mean((np.asarray(logit) > 0) == labels))
  # Train mode updates the batch-norm statistics.
  _, (_, new_stats) = method.loss(variables["params"], variables["batch_stats"],
                                  batch, train=True)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_stats,
                       variables["batch_stats"])
  assert max(jax.tree.leaves(moved)) > 0


def test_output_centre_convention_by_influence():
  """A pixel only moves outputs whose window, centred per the convention, holds it."""
  method, _ = _tiny_method()
  rf = pr.receptive_field(method.plan)
  variables = method.init_variables(jax.random.key(1))
  img = _noisy_image(40, 40, 3)
  r, c = 17, 22
  bumped = img.copy()
  bumped[r, c] = 255 - bumped[r, c]
  apply = lambda x: method.model.apply(variables, _norm(x[None]))[0, ..., 0]
  diff = np.abs(np.asarray(apply(bumped)) - np.asarray(apply(img))) > 0
  oh, ow = diff.shape
  ii, jj = np.mgrid[0:oh, 0:ow]
  xy = np.asarray(p4m.output_to_pixels(jnp.asarray(ii), jnp.asarray(jj), rf))
  half = rf / 2 - 0.5  # window = centre +- (RF/2 - 0.5) pixel indices
  inside = (np.abs(xy[..., 0] - c) <= half) & (np.abs(xy[..., 1] - r) <= half)
  assert diff.any() and not (diff & ~inside).any()
  # The output whose centre is nearest the pixel does move.
  near = np.unravel_index(np.argmin(np.abs(xy[..., 0] - c) + np.abs(xy[..., 1] - r)),
                          diff.shape)
  assert diff[near]


# ------------------------------------------------------------------ dense maxima


def test_tile_fn_returns_thresholded_local_maxima_inside_the_tile():
  method, _ = _tiny_method()
  rf = pr.receptive_field(method.plan)
  variables = _random_variables(method, rf, 2)
  tiles = np.stack([_noisy_image(60, 60, s) for s in (4, 5)])
  logit = np.asarray(method.model.apply(variables, _norm(tiles)))[..., 0]
  prob = 1 / (1 + np.exp(-logit.astype(np.float64)))
  _, oh, ow = logit.shape
  pad = np.pad(logit, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  neigh = np.stack([pad[:, dy:dy + oh, dx:dx + ow] for dy in range(3) for dx in range(3)
                    if (dy, dx) != (1, 1)])
  strict = logit > neigh.max(0)
  thresh = float(np.median(prob[strict]))  # so the threshold matters
  pts, scores, classes, valid = map(np.asarray, method.make_tile_fn(thresh)(
      variables, tiles))
  for b in range(2):
    want = strict[b] & (prob[b] >= thresh)
    assert 0 < want.sum() < strict[b].sum()
    assert valid[b].sum() == want.sum()
    p = pts[b][valid[b]]
    assert ((p >= 0) & (p <= 59)).all()
    # Back to map indices through the documented convention.
    jj = (p[:, 0] - (rf / 2 - 0.5)) / 2
    ii = (p[:, 1] - (rf / 2 - 0.5)) / 2
    np.testing.assert_array_equal(jj, np.round(jj))
    ii, jj = ii.astype(int), jj.astype(int)
    assert want[ii, jj].all()
    np.testing.assert_allclose(scores[b][valid[b]], prob[b][ii, jj], rtol=1e-5)
    assert (classes[b][valid[b]] == MITOSIS).all()
    # Sorted by score, invalid slots last.
    s = scores[b][valid[b]]
    assert (np.diff(s) <= 0).all() and not valid[b][valid[b].sum():].any()


def _regions(cfg: infer.TileConfig, method, max_px: int) -> infer.TileConfig:
  """``cfg`` in regions mode: regions of at most ``max_px`` px, sides a
  multiple of the detector's ``input_multiple``."""
  cfg = dataclasses.replace(cfg, mode="regions", region_max_mpx=max_px / 1e6,
                            multiple=interface.hook(method, "input_multiple"))
  xs, ys, th, tw = infer.plan(150, 130, cfg)
  assert len(xs) * len(ys) > 1 and th * tw <= max_px and th != tw
  return cfg


@pytest.mark.parametrize("tile,overlap,mode", [(48, 8, "tiles"), (64, 20, "tiles"),
                                               (48, 8, "regions"), (64, 20, "regions")])
def test_tiled_detect_equals_whole_image_maxima(tile, overlap, mode):
  # Regions (several rectangles, even sides: the P4 input_multiple) are big
  # tiles: the VALID dense map makes them exact too.
  method, config = _tiny_method(tile_size=tile, tile_overlap=overlap)
  rf = pr.receptive_field(method.plan)
  ctx = method.tile_context
  assert ctx == rf // 2 - 1
  assert interface.hook(method, "input_multiple") == pr.STRIDE
  variables = _random_variables(method, rf, 3)
  image = _noisy_image(130, 150, 7)  # even sides; several tiles each way
  tile_fn = method.make_tile_fn(0.0)
  cfg = infer.TileConfig(tile_size=tile, overlap=overlap, tile_batch=4,
                         merge_radius=0.0, score_thresh=0.0, context=ctx)
  if mode == "regions":
    cfg = _regions(cfg, method, 5000)
  got = infer.detect(image, tile_fn, variables, cfg)

  # Reference: the whole image padded by the context (white, as the tile
  # reader pads), one application, local maxima, back to image pixels.
  padded = np.pad(image, ((ctx, ctx), (ctx, ctx), (0, 0)), constant_values=255)
  logit = np.asarray(method.model.apply(variables, _norm(padded[None])))[0, ..., 0]
  oh, ow = logit.shape
  assert (oh, ow) == (65, 75)  # centres 0.5, 2.5, ..., side - 1.5
  peaks = np.asarray(p4m.local_maxima(jnp.asarray(logit[None]), 3))[0]
  ii, jj = np.nonzero(peaks)
  ref = np.asarray(p4m.output_to_pixels(jnp.asarray(ii), jnp.asarray(jj), rf)) - ctx
  ref_s = 1 / (1 + np.exp(-logit[ii, jj]))
  order = lambda xy: np.lexsort((xy[:, 1], xy[:, 0]))
  assert len(got) == len(ref) > 20
  np.testing.assert_array_equal(got.xy[order(got.xy)], ref[order(ref)])
  np.testing.assert_allclose(got.scores[order(got.xy)], ref_s[order(ref)], rtol=1e-4)
  # With a merge radius the tiles' merge equals suppression on the whole map.
  cfg = dataclasses.replace(cfg, merge_radius=6.0)
  got = infer.detect(image, tile_fn, variables, cfg)
  keep = infer.suppress_by_distance(ref, ref_s, 6.0)
  assert 0 < len(keep) < len(ref)
  np.testing.assert_array_equal(np.sort(got.xy, axis=0), np.sort(ref[keep], axis=0))


def _rotated_matches(method, config, image, variables):
  """(detections on image, rotated back; detections on rot90(image)), sorted."""
  cfg = infer.TileConfig.from_config(config.eval, context=method.tile_context)
  cfg = dataclasses.replace(cfg, score_thresh=0.0, merge_radius=0.0, tile_batch=4)
  tile_fn = method.make_tile_fn(0.0)
  d = infer.detect(image, tile_fn, variables, cfg)
  d_r = infer.detect(np.rot90(image), tile_fn, variables, cfg)
  w = image.shape[1]
  # np.rot90: pixel (x, y) of the original lands at (y, W - 1 - x).
  want = np.stack([d.xy[:, 1], (w - 1) - d.xy[:, 0]], axis=1)
  order = lambda xy: np.lexsort((xy[:, 1], xy[:, 0]))
  return ((want[order(want)], d.scores[order(want)]),
          (d_r.xy[order(d_r.xy)], d_r.scores[order(d_r.xy)]))


@pytest.mark.parametrize("h,w", [(77, 91), (95, 81), (141, 157)])
def test_exact_rotation_is_exact_for_any_image_size(h, w):
  # Odd sides, smaller than a tile (77 x 91) and over several tiles (141 x 157).
  method, config = _tiny_method(tile_size=128, tile_overlap=24, exact_rotation=True)
  assert method.tile_context == method.rf // 2 + 2  # RF/2 + r, peak_window 3
  variables = _random_variables(method, method.rf, 0)
  (xy, s), (xy_r, s_r) = _rotated_matches(method, config, _noisy_image(h, w, 1), variables)
  assert len(xy) > 50
  np.testing.assert_array_equal(xy_r, xy)
  np.testing.assert_allclose(s_r, s, rtol=1e-5)
  # Every point lies on the stride-1 half-pixel grid, inside the image.
  assert np.all(np.abs(xy - np.floor(xy) - 0.5) < 1e-6)
  assert xy.min() >= 0 and xy[:, 0].max() <= h - 1 and xy[:, 1].max() <= w - 1  # rotated


def test_the_stride_2_map_is_not_rotation_exact_on_odd_sizes():
  # The case the option exists for: an odd-sided image (inside one tile).
  method, config = _tiny_method(tile_size=128, tile_overlap=24)
  variables = _random_variables(method, method.rf, 0)
  (xy, _), (xy_r, _) = _rotated_matches(method, config, _noisy_image(77, 91, 1), variables)
  assert len(xy) != len(xy_r) or not np.array_equal(xy, xy_r)


@pytest.mark.parametrize("mode", ["tiles", "regions"])
def test_exact_rotation_tiles_equal_the_whole_image_map(mode):
  # Stride-1 map by hand: the network on the four one-pixel shifts of the
  # padded image, interleaved; strict maxima with the same radius in pixels.
  # Regions: rectangles at odd origins (the stride-1 map needs no multiple).
  method, config = _tiny_method(tile_size=48, tile_overlap=16, exact_rotation=True)
  rf, ctx = method.rf, method.tile_context
  assert interface.hook(method, "input_multiple") == 1
  variables = _random_variables(method, rf, 3)
  image = _noisy_image(71, 83, 7)  # odd sides; several odd tile origins
  cfg = infer.TileConfig(tile_size=48, overlap=16, tile_batch=4, merge_radius=0.0,
                         score_thresh=0.0, context=ctx)
  if mode == "regions":
    cfg = dataclasses.replace(cfg, mode="regions", region_max_mpx=0.0025, multiple=1)
    xs, ys, th, tw = infer.plan(83, 71, cfg)
    assert len(xs) * len(ys) > 1 and th != tw and (xs % 2).any() and (ys % 2).any()
  got = infer.detect(image, method.make_tile_fn(0.0), variables, cfg)
  padded = np.pad(image, ((ctx, ctx + 1), (ctx, ctx + 1), (0, 0)), constant_values=255)
  full = np.full((padded.shape[0] - rf + 1, padded.shape[1] - rf + 1), np.nan, np.float32)
  for dy in (0, 1):
    for dx in (0, 1):
      out = np.asarray(method.model.apply(variables, _norm(padded[None, dy:, dx:])))[0, ..., 0]
      full[dy::2, dx::2][:out.shape[0], :out.shape[1]] = out[:full[dy::2].shape[0],
                                                             :full[:, dx::2].shape[1]]
  assert not np.isnan(full).any()
  peaks = np.asarray(p4m.local_maxima(jnp.asarray(full[None]), 5))[0]
  ii, jj = np.nonzero(peaks)
  ref = np.asarray(p4m.output_to_pixels(jnp.asarray(ii), jnp.asarray(jj), rf, 1)) - ctx
  inside = ((ref >= 0) & (ref <= np.asarray([83, 71]) - 1)).all(1)
  ref, ref_s = ref[inside], 1 / (1 + np.exp(-full[ii, jj][inside]))
  order = lambda xy: np.lexsort((xy[:, 1], xy[:, 0]))
  assert len(got) == len(ref) > 50
  np.testing.assert_array_equal(got.xy[order(got.xy)], ref[order(ref)])
  np.testing.assert_allclose(got.scores[order(got.xy)], ref_s[order(ref)], rtol=1e-4)


def test_odd_tiles_are_refused():
  with pytest.raises(ValueError, match="even"):
    _tiny_method(tile_size=49)
  with pytest.raises(ValueError, match="too small"):
    _tiny_method(tile_overlap=4)


# ------------------------------------------------------------------ CLI


# Session scope: trained once per worker even when other modules' tests run
# in between (a module fixture is torn down and rebuilt then).
@pytest.fixture(scope="session")
def workdir(tiny_dataset, tmp_path_factory) -> Path:
  """A tiny P4 workdir trained 3 steps, validated after each (lowest val loss kept)."""
  return train_workdir("configs/p4_resnet.py:tiny", tiny_dataset,
                       tmp_path_factory.mktemp("p4") / "work",
                       "--config.total_steps=3", "--config.eval_every=1",
                       "--config.checkpoint_every=3")


@pytest.mark.e2e
def test_training_run_writes_eval_and_keeps_lowest_val_loss(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "accuracy" in r]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert all(0 <= r["pos_fraction"] <= 1 and np.isfinite(r["loss"]) for r in train)
  val = {r["step"]: r for r in rows if "val_loss" in r}
  assert sorted(val) == [1, 2, 3]
  summary = json.loads((workdir / "eval" / "summary.json").read_text())
  best_step = min(val, key=lambda s: val[s]["val_loss"])
  assert summary["best"]["step"] == best_step
  assert summary["best"]["val_loss"] == pytest.approx(val[best_step]["val_loss"])
  # Its threshold is the F1-best one of that validation.
  assert summary["best"]["threshold"] == pytest.approx(val[best_step]["val_threshold"])
  assert (workdir / "eval" / "val" / "metrics.json").exists()
  assert (workdir / "eval" / "heldout_domain" / "metrics.json").exists()


def _write_tiff(path, image):
  ppcm = 1e4 / SPACING_UM
  tifffile.imwrite(path, image, photometric="rgb", resolution=(ppcm, ppcm),
                   resolutionunit="CENTIMETER")


def _read_points(path):
  obj = json.loads(Path(path).read_text())
  xy = np.asarray([p["point"][:2] for p in obj["points"]], np.float64).reshape(-1, 2)
  return xy, np.asarray([p["probability"] for p in obj["points"]], np.float64)


@pytest.mark.e2e
@pytest.mark.parametrize("w,h,flags", [(210, 168, ()), (209, 167, ("--exact_rotation",))],
                         ids=["even", "odd-exact"])
def test_rotation_contract_through_predict(workdir, tiny_dataset, tmp_path, w, h, flags):
  """predict(rot90(image)) == rot90(predict(image)): points (1e-4 mm) and scores.

  Even sides with the stride-2 map; odd sides with ``--exact_rotation``.
  """
  tissue = slides_lib.Slide(tiny_dataset / "001.tiff").read(100, 60, w, h)
  noise = np.random.default_rng(0).integers(-3, 4, tissue.shape)
  image = np.clip(tissue.astype(int) + noise, 0, 255).astype(np.uint8)
  _write_tiff(tmp_path / "a.tiff", image)
  _write_tiff(tmp_path / "a_rot.tiff", np.rot90(image))
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", "midog_jax.predict", "--workdir", str(workdir),
                      "--images", str(tmp_path / "a.tiff"), str(tmp_path / "a_rot.tiff"),
                      "--out", str(out), "--threshold", "0.01", *flags],
                     cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  xy, s = _read_points(out / "a.json")
  xy_r, s_r = _read_points(out / "a_rot.json")
  assert len(xy) >= 5 and len(xy) == len(xy_r)
  # np.rot90: pixel (x, y) of the original lands at (y, W - 1 - x).
  mm = SPACING_UM / 1000
  want = np.stack([xy[:, 1], (w - 1) * mm - xy[:, 0]], axis=1)
  # Pair the points up by their (half-pixel) grid positions, then compare.
  key = lambda p: np.lexsort(np.round(p / mm * 2).astype(np.int64).T[::-1])
  order, order_r = key(want), key(xy_r)
  np.testing.assert_allclose(xy_r[order_r], want[order], rtol=0, atol=1e-4)
  np.testing.assert_allclose(s_r[order_r], s[order], rtol=0, atol=1e-4)
