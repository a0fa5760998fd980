"""Whole-image inference (infer.py): tiling, merging across tiles, invariances.

The invariance tests run the REAL detector (the test-sized RetinaNet of
``configs/retina.py:tiny``, random-init weights, score threshold 0 so that
every tile yields detections) on crops of a synthetic TIFF, read through the
real slide reader. The merge tests use a trivial but real ``TileFn``: a jitted
function that reports the darkest pixel of each tile, so where a figure sits
relative to the tile borders is fully under the test's control.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile

from midog_jax import detectors, evaluation, infer, parallel
from configs import retina as retina_config
from midog_jax.data import slides, synthetic
from midog_jax.detections import Detections
from midog_jax.detectors import interface
from support import REPO, cpu_env


TOPK = 40  # a modest top-k: many points per tile, cheap in-tile suppression


# --------------------------------------------------------------------------
# Tiling geometry.

@pytest.mark.parametrize("length,tile,overlap", [
    (1000, 128, 32), (7215, 512, 64), (5412, 512, 64), (129, 128, 32),
    (300, 128, 32), (513, 512, 0), (97, 16, 15)])
def test_tile_origins_cover_every_pixel_and_end_flush(length, tile, overlap):
  o = infer.tile_origins(length, tile, overlap)
  assert o[0] == 0 and o[-1] == length - tile
  assert np.all(np.diff(o) > 0)
  # Neighbours overlap by at least ``overlap``; so no pixel is missed.
  assert np.all(np.diff(o) <= tile - overlap)
  covered = np.zeros(length, bool)
  for s in o:
    covered[s:s + tile] = True
  assert covered.all()


@pytest.mark.parametrize("length", [1, 50, 128])
def test_tile_origins_short_axis_is_one_tile(length):
  np.testing.assert_array_equal(infer.tile_origins(length, 128, 32), [0])


def test_tile_origins_rejects_overlap_not_below_tile():
  with pytest.raises(ValueError, match="overlap"):
    infer.tile_origins(1000, 128, 128)


@pytest.mark.parametrize("length,tile,overlap", [
    (1000, 128, 32), (7215, 512, 64), (300, 128, 32), (129, 128, 32)])
def test_ownership_partitions_the_axis_inside_the_owning_tile(length, tile, overlap):
  o = infer.tile_origins(length, tile, overlap)
  lo, hi = infer._ownership_bounds(o, tile)
  assert lo[0] == -np.inf and hi[-1] == np.inf
  np.testing.assert_array_equal(hi[:-1], lo[1:])
  centres = np.arange(length) + 0.5
  owners = (centres[:, None] >= lo[None]) & (centres[:, None] < hi[None])
  assert np.all(owners.sum(1) == 1)  # every pixel owned exactly once
  t = owners.argmax(1)
  # ... by a tile that contains it, at least overlap/2 from an interior border.
  assert np.all((centres >= o[t]) & (centres < o[t] + tile))
  inner_lo = np.where(t > 0, o[t], -np.inf)
  inner_hi = np.where(t < len(o) - 1, o[t] + tile, np.inf)
  margin = np.minimum(centres - inner_lo, inner_hi - centres)
  assert margin.min() >= overlap / 2 - 1


# --------------------------------------------------------------------------
# Distance suppression.

def test_suppress_by_distance_worked_example():
  xy = np.array([[0, 0], [10, 0], [30, 0], [100, 100], [101, 100]], np.float32)
  s = np.array([0.9, 0.8, 0.7, 0.1, 0.2], np.float32)
  # (10,0) lies 10 px from the best point: dropped. (30,0) lies 20 px from
  # (10,0), but a dropped point suppresses nothing (greedy): kept, being 30 px
  # from (0,0). (100,100) loses to its higher-scoring neighbour (101,100).
  np.testing.assert_array_equal(infer.suppress_by_distance(xy, s, 25.0), [0, 2, 4])
  np.testing.assert_array_equal(infer.suppress_by_distance(xy, s, 0.0), np.arange(5))
  assert len(infer.suppress_by_distance(np.zeros((0, 2)), np.zeros(0), 25.0)) == 0


def test_suppress_by_distance_ties_do_not_depend_on_input_order():
  xy = np.array([[40, 5], [30, 5], [35, 5]], np.float32)
  s = np.full(3, 0.5, np.float32)
  kept = [tuple(xy[p][infer.suppress_by_distance(xy[p], s, 25.0)][0])
          for p in ([0, 1, 2], [2, 1, 0], [1, 2, 0])]
  assert kept == [(30.0, 5.0)] * 3  # ties go to the smallest x, whatever the order


# --------------------------------------------------------------------------
# Merging across tile borders, with a darkest-pixel "detector".

T, OVERLAP = 64, 16  # on a 112 px wide image: tiles at x=0 and x=48, midline 56


def _darkest_pixel_fn(nudge: float):
  """A real TileFn: one point per tile at its darkest pixel (if dark enough).

  The point is moved ``nudge`` px in x towards the tile's centre (so two tiles
  report one figure at slightly different places, as a real detector does),
  and its score is the distance of the figure to the nearer left/right tile
  border over the tile size: the tile that sees the figure better scores it
  higher, and the score tells which tile a kept detection came from.
  """

  @jax.jit
  def fn(variables, tiles):
    del variables  # a fixed rule, no weights
    g = tiles.astype(jnp.float32).sum(-1)
    b, t = g.shape[0], g.shape[1]
    flat = jnp.argmin(g.reshape(b, -1), axis=1)
    x = (flat % t).astype(jnp.float32) + 0.5
    y = (flat // t).astype(jnp.float32) + 0.5
    score = jnp.minimum(x, t - x) / t
    x = x + jnp.where(x < t / 2, nudge, -nudge)
    pts = jnp.stack([x, y], -1)[:, None]
    valid = (g.reshape(b, -1).min(1) < 100)[:, None]
    return (pts, jnp.where(valid, score[:, None], 0.0),
            jnp.ones((b, 1), jnp.int32), valid)

  return fn


def _image_with_dot(x: int, y: int, width: int = 112, height: int = 64):
  img = np.full((height, width, 3), 255, np.uint8)
  img[y, x] = 0
  return img


def _cfg(radius: float, tile_batch: int = 2) -> infer.TileConfig:
  return infer.TileConfig(tile_size=T, overlap=OVERLAP, tile_batch=tile_batch,
                          merge_radius=radius, score_thresh=0.0)


@pytest.mark.parametrize("dot_x,owner_score", [(50, 13.5 / T), (61, 13.5 / T)])
def test_figure_in_the_overlap_is_kept_once_by_its_owner(dot_x, owner_score):
  # Both tiles see the dot at the same image position; no suppression at all
  # (radius 0), so only ownership can remove the duplicate. The owner is the
  # tile where the dot lies 13.5 px from the border, not the one at 2.5 px.
  assert infer.tile_origins(112, T, OVERLAP).tolist() == [0, 48]
  det = infer.detect(_image_with_dot(dot_x, 20), _darkest_pixel_fn(0.0), {}, _cfg(0.0))
  np.testing.assert_allclose(det.xy, [[dot_x + 0.5, 20.5]])
  np.testing.assert_allclose(det.scores, [owner_score], rtol=1e-6)


def test_figure_straddling_the_ownership_line_is_merged_by_distance():
  # Dot 2.5 px left of the midline (56): the left tile reports it at 49.5
  # (its side), the right tile at 57.5 (its side), so ownership keeps both.
  img = _image_with_dot(53, 30)
  both = infer.detect(img, _darkest_pixel_fn(4.0), {}, _cfg(0.0))
  np.testing.assert_allclose(np.sort(both.xy[:, 0]), [49.5, 57.5])
  one = infer.detect(img, _darkest_pixel_fn(4.0), {}, _cfg(25.0))
  # Distance suppression keeps one: the better view (left tile, 10.5 px in).
  np.testing.assert_allclose(one.xy, [[49.5, 30.5]])
  np.testing.assert_allclose(one.scores, [10.5 / T], rtol=1e-6)


def test_points_outside_the_image_are_dropped():
  # A tile_fn that reports three fixed points in every tile: on a 40x50 image
  # (smaller than one tile, so padded) two of them fall in the padding.
  local = jnp.asarray([[10.0, 10.0], [45.0, 10.0], [10.0, 55.0]])

  @jax.jit
  def fixed(variables, tiles):
    del variables
    b = tiles.shape[0]
    return (jnp.broadcast_to(local, (b, 3, 2)), jnp.full((b, 3), 0.9),
            jnp.ones((b, 3), jnp.int32), jnp.ones((b, 3), bool))

  det = infer.detect(np.zeros((50, 40, 3), np.uint8), fixed, {}, _cfg(25.0))
  np.testing.assert_allclose(det.xy, [[10.0, 10.0]])


# --------------------------------------------------------------------------
# The real detector: invariance to the tile batch and to the device count.

@pytest.fixture(scope="module")
def synthetic_image(tmp_path_factory) -> np.ndarray:
  """One synthetic tiny-preset image (about 512 x 512), read back from its TIFF."""
  root = tmp_path_factory.mktemp("infer")
  synthetic.generate(root / "src", preset="tiny", seed=0, ids=[1], workers=1)
  with slides.Slide(root / "src" / "001.tiff") as s:
    return s.read_all()


@pytest.fixture(scope="module")
def crops(synthetic_image, tmp_path_factory) -> dict[str, Path]:
  """Crops of one synthetic tiny-preset image, written as plain TIFFs."""
  root = tmp_path_factory.mktemp("crops")
  full = synthetic_image
  out = {}
  for name, (w, h) in {"300x260": (300, 260), "301x257": (301, 257),
                       "100x90": (100, 90)}.items():
    out[name] = root / f"{name}.tiff"
    tifffile.imwrite(out[name], np.ascontiguousarray(full[:h, :w]), photometric="rgb")
  return out


@pytest.fixture(scope="module")
def tiny_model():
  cfg = retina_config.get_config("tiny")
  cfg.model.topk = TOPK
  detector = detectors.build(cfg)
  variables = detector.init_variables(jax.random.key(0, impl="rbg"))
  # Score threshold 0: random-init scores are near the 0.01 focal prior, and
  # the test must see many detections to prove anything.
  tile_fn = detector.make_tile_fn(0.0)
  return cfg, tile_fn, variables


def _tcfg(cfg, tile_batch: int) -> infer.TileConfig:
  return infer.TileConfig(tile_size=cfg.eval.tile_size, overlap=cfg.eval.tile_overlap,
                          tile_batch=tile_batch, merge_radius=25.0, score_thresh=0.0)


def _assert_same(a, b):
  assert len(a) == len(b)
  np.testing.assert_allclose(a.xy, b.xy, atol=1e-4)
  np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
  np.testing.assert_array_equal(a.classes, b.classes)


def test_detections_do_not_depend_on_the_tile_batch(crops, tiny_model):
  cfg, tile_fn, variables = tiny_model
  path = crops["300x260"]
  # 3x3 tiles: batches of 1, 3 (exact) and 4 (last batch padded).
  dets = {b: infer.detect(path, tile_fn, variables, _tcfg(cfg, b)) for b in (1, 3, 4)}
  assert len(dets[1]) > 10
  assert len(np.unique(dets[1].scores)) > 10  # not one constant output
  for b in (3, 4):
    _assert_same(dets[b], dets[1])


def test_cpu_compiler_options_do_not_change_detections(crops, tiny_model, monkeypatch):
  # detect() compiles the detector with parallel.CPU_COMPILER_OPTIONS on CPU
  # (XLA's own convolutions, for speed); XLA's defaults must agree.
  cfg, tile_fn, variables = tiny_model
  tuned = infer.detect(crops["300x260"], tile_fn, variables, _tcfg(cfg, 4))
  monkeypatch.setattr(parallel, "CPU_COMPILER_OPTIONS", {})
  assert infer.for_platform(tile_fn) is tile_fn
  default = infer.detect(crops["300x260"], tile_fn, variables, _tcfg(cfg, 4))
  assert len(default) > 10
  _assert_same(tuned, default)


@pytest.mark.parametrize("name", ["301x257", "100x90"])
def test_odd_and_smaller_than_tile_images(crops, tiny_model, name):
  cfg, tile_fn, variables = tiny_model
  w, h = map(int, name.split("x"))
  det = infer.detect(crops[name], tile_fn, variables, _tcfg(cfg, 4))
  assert len(det) > (10 if w > 200 else 0)
  assert np.all((det.xy >= 0) & (det.xy < [w, h]))
  # Merged detections keep their mutual distance (no duplicates survive).
  d = np.linalg.norm(det.xy[:, None] - det.xy[None], axis=-1)
  assert d[np.triu_indices(len(det), 1)].min() > 25.0
  # Same answer from the array path as from the file path.
  with slides.Slide(crops[name]) as s:
    _assert_same(infer.detect(s.read_all(), tile_fn, variables, _tcfg(cfg, 4)), det)


_DEVICE_SCRIPT = """
import sys
import jax, numpy as np
from midog_jax import detectors, infer, parallel
from configs import retina
image, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert jax.device_count() == n, jax.devices()
cfg = retina.get_config("tiny")
cfg.model.topk = {topk}
detector = detectors.build(cfg)
mesh = parallel.local_mesh()
variables = detector.init_variables(jax.random.key(0, impl="rbg"))
variables = parallel.replicate(variables, mesh)
tile_fn = detector.make_tile_fn(0.0)
tcfg = infer.TileConfig(cfg.eval.tile_size, cfg.eval.tile_overlap, 4, 25.0, 0.0)
# Regions: three of 128 x 288 px, one per device per step (with four
# devices, one step and a padding region).
rcfg = infer.TileConfig(overlap=cfg.eval.tile_overlap, merge_radius=25.0, score_thresh=0.0,
                        mode="regions", region_max_mpx=0.037, multiple=32)
assert [len(o) for o in infer.plan(300, 260, rcfg)[:2]] == [3, 1]
out_arrays = {{}}
for mode, c in (("tiles", tcfg), ("regions", rcfg)):
  det = infer.detect(image, tile_fn, variables, c, mesh)
  out_arrays.update({{mode + "_xy": det.xy, mode + "_scores": det.scores,
                     mode + "_classes": det.classes}})
np.savez(out, **out_arrays)
if n > 1:  # a batch that cannot be split evenly over the devices is refused
  try:
    infer.detect(image, tile_fn, variables, infer.TileConfig(128, 32, n + 1, 25.0, 0.0), mesh)
  except ValueError as e:
    print("refused:", e)
""".format(topk=TOPK)


def _run_on_devices(image: Path, out: Path, devices: int) -> dict:
  env = cpu_env(devices)
  r = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT, str(image), str(out),
                      str(devices)], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  if devices > 1:
    assert "refused: tile_batch" in r.stdout, r.stdout
  return dict(np.load(out))


def test_four_devices_give_the_one_device_detections(crops, tmp_path):
  # Tiles (tile_batch 4) and regions (a batch of the device count) alike.
  one = _run_on_devices(crops["300x260"], tmp_path / "d1.npz", 1)
  four = _run_on_devices(crops["300x260"], tmp_path / "d4.npz", 4)
  for mode in ("tiles", "regions"):
    assert len(one[f"{mode}_xy"]) > 5  # regions: top-40 of three large tiles
    assert len(four[f"{mode}_xy"]) == len(one[f"{mode}_xy"])
    np.testing.assert_allclose(four[f"{mode}_xy"], one[f"{mode}_xy"], atol=1e-4)
    np.testing.assert_allclose(four[f"{mode}_scores"], one[f"{mode}_scores"], atol=1e-5)
    np.testing.assert_array_equal(four[f"{mode}_classes"], one[f"{mode}_classes"])



# --------------------------------------------------------------------------
# Regions: the plan.

@pytest.mark.parametrize("width,height,overlap,multiple,max_mpx", [
    (7215, 5412, 64, 32, 12.0), (7215, 5412, 64, 2, 4.0), (300, 260, 32, 32, 0.037),
    (300, 260, 32, 32, 1.0), (150, 130, 8, 2, 0.005), (83, 71, 16, 1, 0.0025),
    (1000, 40, 64, 32, 0.01), (5, 3, 0, 32, 1.0)])
def test_region_plan_covers_the_image_with_one_bounded_shape(width, height, overlap,
                                                             multiple, max_mpx):
  cfg = infer.TileConfig(overlap=overlap, mode="regions", multiple=multiple,
                         region_max_mpx=max_mpx)
  xs, ys, th, tw = infer.plan(width, height, cfg)
  assert th % multiple == 0 and tw % multiple == 0
  assert th * tw <= max_mpx * 1e6
  for o, side, length in ((xs, tw, width), (ys, th, height)):
    assert o[0] == 0 and o[-1] == max(length - side, 0)  # last flush (or one padded)
    assert np.all(np.diff(o) <= side - overlap)  # neighbours overlap >= overlap
    assert side < length + multiple  # padded at most to the multiple
    covered = np.zeros(length, bool)
    for s in o:
      covered[s:s + side] = True
    assert covered.all()
  assert infer.pixels_processed(width, height, cfg) == len(xs) * len(ys) * th * tw


def test_a_midog_image_costs_under_5_percent_extra_pixels_in_regions():
  # The RetinaNet defaults (configs/retina.py): its stride multiple, overlap
  # and region bound. Tiles of 512 px cost 29% extra on 7215 x 5412.
  cfg = retina_config.get_config(None)
  cfg.eval.inference = "regions"
  multiple = interface.hook(detectors.build(cfg), "input_multiple")
  assert multiple == 32
  rcfg = infer.TileConfig.from_config(cfg.eval, multiple=multiple)
  assert (rcfg.mode, rcfg.overlap, rcfg.multiple) == ("regions", 64, 32)
  xs, ys, th, tw = infer.plan(7215, 5412, rcfg)
  assert (len(xs), len(ys), tw, th) == (2, 2, 3648, 2752)
  extra = infer.pixels_processed(7215, 5412, rcfg) / (7215 * 5412) - 1
  assert 0 < extra <= 0.05
  tiles = dataclasses.replace(rcfg, mode="tiles")
  assert infer.pixels_processed(7215, 5412, tiles) / (7215 * 5412) - 1 > 0.28
  # One shape for all regions, hence one compiled program per image size.
  assert th * tw <= rcfg.region_max_mpx * 1e6


def test_region_plan_refuses_a_bound_no_region_fits():
  cfg = infer.TileConfig(overlap=64, mode="regions", multiple=32, region_max_mpx=0.001)
  with pytest.raises(ValueError, match="region_max_mpx"):
    infer.plan(7215, 5412, cfg)
  with pytest.raises(ValueError, match="inference mode"):
    infer.TileConfig(mode="region")


def test_make_tiler_builds_regions_from_the_config(tiny_model):
  cfg, _, variables = tiny_model
  cfg = cfg.copy_and_resolve_references()
  cfg.eval.inference, cfg.eval.region_max_mpx, cfg.eval.skip_blank = "regions", 2.0, True
  tiler = evaluation.make_tiler(detectors.build(cfg), variables, cfg)
  assert (tiler.tile_cfg.mode, tiler.tile_cfg.multiple) == ("regions", 32)
  assert (tiler.tile_cfg.region_max_mpx, tiler.tile_cfg.skip_blank) == (2.0, True)
  # Defaults, and configs saved before the keys existed: tiles.
  del cfg.eval["inference"]
  assert infer.TileConfig.from_config(cfg.eval).mode == "tiles"


# --------------------------------------------------------------------------
# Regions against tiles, with the real detector.
#
# The RetinaNet is "same"-padded, so a detection near a tile border depends on
# where the border is; worse, its heads' GroupNorm normalises over the whole
# tile, so every output depends on the tile's size and content. The network
# of these tests is therefore the tiny RetinaNet WITHOUT its GroupNorm head
# layers (head_depth 0: the heads are the predictor convolutions alone), a
# local function of the image with a receptive field of about 260 px. On a
# 1024 x 640 image (every size and step a multiple of the backbone's stride
# 32, so every grid lies on the image's feature grid), tiles of 512 px with
# an overlap of 448 own only points >= 224 px from their interior borders,
# beyond that receptive field: their detections are those of the whole image
# in one piece, and so must those of regions be. In-tile suppression and the
# merge use a 1 px radius (distinct anchor centres are all kept), and the
# top-k exceeds every tile's candidates, so no merge rule hides a difference.

WIDE = (640, 1024)


@pytest.fixture(scope="module")
def local_model():
  cfg = retina_config.get_config("tiny")
  cfg.model.head_depth = 0  # no GroupNorm: a local network (see above)
  cfg.model.topk = 2000
  cfg.eval.merge_radius_px = 1.0  # in-tile suppression of one centre's anchors only
  detector = detectors.build(cfg)
  variables = detector.init_variables(jax.random.key(0, impl="rbg"))
  return detector, variables


@pytest.fixture(scope="module")
def wide_run(synthetic_image, local_model):
  """(image, tile function, config, the whole image's detections in one piece)."""
  detector, variables = local_model
  image = np.ascontiguousarray(np.pad(
      synthetic_image, ((0, WIDE[0]), (0, WIDE[1]), (0, 0)), mode="reflect")[:WIDE[0], :WIDE[1]])
  whole = infer.TileConfig(overlap=448, merge_radius=1.0, score_thresh=0.0, mode="regions",
                           multiple=32, region_max_mpx=1.0)
  assert infer.plan(WIDE[1], WIDE[0], whole)[2:] == WIDE  # one region: the image
  # A threshold that keeps about 400 candidates, midway between two scores
  # far apart compared with float noise.
  s = np.sort(infer.detect(image, detector.make_tile_fn(0.0), variables, whole).scores)[::-1]
  k = next(k for k in range(400, len(s) - 1) if s[k] - s[k + 1] > 1e-6)
  thresh = float(s[k] + s[k + 1]) / 2
  tile_fn = detector.make_tile_fn(thresh)
  whole = dataclasses.replace(whole, score_thresh=thresh)
  return image, tile_fn, whole, infer.detect(image, tile_fn, variables, whole)


def _sorted(d):
  o = np.lexsort((d.xy[:, 1], d.xy[:, 0]))
  return d.xy[o], d.scores[o], d.classes[o]


def _equal(a, b) -> bool:
  """Same count, positions within 1 px, scores within 1e-4, same classes."""
  if len(a) != len(b):
    return False
  (xa, sa, ca), (xb, sb, cb) = _sorted(a), _sorted(b)
  return bool(np.abs(xa - xb).max() <= 1 and np.abs(sa - sb).max() <= 1e-4
              and (ca == cb).all())


def test_regions_and_tiles_find_the_whole_image_detections(local_model, wide_run):
  _, variables = local_model
  image, tile_fn, whole_cfg, whole = wide_run
  assert len(whole) > 300
  assert len(np.unique(whole.scores)) > 100
  regions = dataclasses.replace(whole_cfg, region_max_mpx=0.5)
  xs, ys, th, tw = infer.plan(WIDE[1], WIDE[0], regions)
  assert (len(xs), len(ys), th, tw) == (2, 1, 640, 736)  # rectangles, not squares
  tiles = dataclasses.replace(whole_cfg, mode="tiles", tile_size=512, tile_batch=4)
  assert len(infer.plan(WIDE[1], WIDE[0], tiles)[0]) == 9
  for cfg in (regions, tiles):
    got = infer.detect(image, tile_fn, variables, cfg)
    assert _equal(got, whole)
    (x, s, _), (xw, sw, _) = _sorted(got), _sorted(whole)
    np.testing.assert_allclose(x, xw, atol=1e-3)
    np.testing.assert_allclose(s, sw, atol=1e-6)


@pytest.mark.parametrize("tile,overlap", [
    (512, 32),    # the overlap is far below the receptive field
    (512, 432)])  # enough overlap, but origins step 80 px: off the stride-32 grid
def test_tiles_near_borders_or_off_the_grid_do_differ(local_model, wide_run, tile, overlap):
  # The case that must fail: the comparison above can see a difference.
  _, variables = local_model
  image, tile_fn, whole_cfg, whole = wide_run
  cfg = dataclasses.replace(whole_cfg, mode="tiles", tile_size=tile, overlap=overlap,
                            tile_batch=4)
  assert not _equal(infer.detect(image, tile_fn, variables, cfg), whole)


# --------------------------------------------------------------------------
# Blank tiles and regions.

def test_blank_rule_sees_any_stained_square_of_the_step():
  big = np.full((2752, 3648, 3), 255, np.uint8)
  assert infer.is_blank(big)
  glass = np.random.default_rng(0).integers(185, 256, big.shape).astype(np.uint8)
  assert infer.is_blank(glass)  # pale glass (all channels > 180) is blank
  # One 20 x 20 px figure in a 10 Mpx region (0.004% of it; a fraction-of-area
  # rule would drop the region), at every phase of the sampling grid; and an
  # 8 x 8 px one, the smallest the rule promises to see.
  for size in (20, infer.BLANK_STEP):
    for off in range(infer.BLANK_STEP):
      one = glass.copy()
      one[1001 + off:1001 + off + size, 2003 + off:2003 + off + size] = (150, 60, 140)
      assert not infer.is_blank(one)
  # Only one channel darker than OD 0.15 (value 180) is enough.
  stained = big.copy()
  stained[::8, ::8] = (255, 179, 255)
  assert not infer.is_blank(stained)
  stained[::8, ::8] = (255, 181, 255)
  assert infer.is_blank(stained)


def _counting(tile_fn, calls: list):
  """``tile_fn`` that records how many tiles each call gets (not jitted
  itself, so ``for_platform`` leaves it as it is)."""
  def fn(variables, tiles):
    calls.append(tiles.shape[0])
    return tile_fn(variables, tiles)
  return fn


@pytest.mark.parametrize("mode", ["tiles", "regions"])
def test_white_half_is_not_computed_and_the_tissue_half_is_unchanged(
    synthetic_image, tiny_model, mode):
  cfg, tile_fn, variables = tiny_model
  img = np.ascontiguousarray(synthetic_image[:260, :300])
  img[:, 150:] = 255  # the right half: glass
  tcfg = _tcfg(cfg, 1)
  if mode == "regions":  # 3 x 1 regions of 128 x 288 px, one per step
    tcfg = dataclasses.replace(tcfg, mode="regions", multiple=32, region_max_mpx=0.037)
  xs, ys, th, tw = infer.plan(300, 260, tcfg)
  white = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs)) if xs[ix] >= 150]
  assert 0 < len(white) < len(xs) * len(ys)
  calls_all, calls_skip = [], []
  full = infer.detect(img, _counting(tile_fn, calls_all), variables, tcfg)
  skip = infer.detect(img, _counting(tile_fn, calls_skip), variables,
                      dataclasses.replace(tcfg, skip_blank=True))
  assert len(calls_all) == len(xs) * len(ys)  # one tile per call (batch 1)
  assert len(calls_skip) == len(xs) * len(ys) - len(white)
  # The white tiles' share (beyond the ownership line in x) is empty; the
  # rest is exactly the unskipped run's.
  lo, _ = infer._ownership_bounds(xs, tw)
  line = lo[np.searchsorted(xs, 150)]
  assert len(full) > 10 and (full.xy[:, 0] >= line).any()
  assert not (skip.xy[:, 0] >= line).any()
  left = full.xy[:, 0] < line
  _assert_same(skip, Detections(full.xy[left], full.scores[left], full.classes[left]))


def test_a_blank_image_computes_nothing(tiny_model):
  cfg, tile_fn, variables = tiny_model
  calls = []
  tcfg = dataclasses.replace(_tcfg(cfg, 4), skip_blank=True)
  det = infer.detect(np.full((300, 400, 3), 240, np.uint8), _counting(tile_fn, calls),
                     variables, tcfg)
  assert calls == [] and len(det) == 0
