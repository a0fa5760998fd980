"""Blue-ratio candidates: the exact component set, tiling invariance, labels.

Hand-made images have a pale background and dark-blue blobs (high blue
ratio) at known places, so the expected candidates are known by hand; the
streamed extraction is run with tiles far smaller than the image, so blobs
cross tile borders and corners.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from midog_jax import metrics
from midog_jax.candidates import (Settings, find_candidates, find_candidates_many,
                                  find_candidates_whole, label_candidates, patches_for)
from midog_jax.candidates import extract
from midog_jax.data import midog, sampling, slides, stain

BG, INK = (230, 150, 200), (60, 40, 130)  # blue ratio about 23 and 143


def _canvas(h=320, w=320):
  return np.full((h, w, 3), BG, np.uint8)


def _rect(img, x0, y0, w, h):
  """Paints a w x h rectangle; returns its centroid (x, y)."""
  img[y0:y0 + h, x0:x0 + w] = INK
  return ((2 * x0 + w - 1) / 2, (2 * y0 + h - 1) / 2)


def _handmade():
  """(image, expected centres) for tiles of 64 px (borders at 64, 128, ...)."""
  img, keep = _canvas(), []
  keep.append(_rect(img, 10, 10, 3, 3))          # inside one tile
  keep.append(_rect(img, 58, 20, 12, 6))         # split across the x = 64 border
  keep.append(_rect(img, 124, 124, 9, 9))        # across the corner (128, 128)
  img[40, 100] = INK                             # 1 px: dropped
  keep.append(_rect(img, 100, 60, 2, 1))         # 2 px: kept
  img[80, 20] = img[81, 21] = INK                # diagonal pair: one 8-connected 2 px
  keep.append((20.5, 80.5))
  _rect(img, 100, 150, 51, 3)                    # 51 px wide across x = 128: dropped
  keep.append(_rect(img, 170, 150, 50, 3))       # 50 px wide across x = 192: kept
  _rect(img, 250, 100, 3, 51)                    # 51 px tall across y = 128: dropped
  keep.append(_rect(img, 290, 100, 3, 50))       # 50 px tall across y = 128: kept
  # A U taller than the window margin: its arms are separate pieces in the
  # tile row above, joined only below it; never kept, never split.
  _rect(img, 10, 190, 3, 120)
  _rect(img, 30, 190, 3, 120)
  _rect(img, 10, 307, 23, 3)
  # 50 px from the last column / row of a core: needs the whole margin.
  keep.append(_rect(img, 127, 230, 50, 2))
  keep.append(_rect(img, 230, 191, 2, 50))
  keep.append(_rect(img, 317, 317, 3, 3))        # at the image's corner
  keep.append(_rect(img, 0, 140, 4, 4))          # at the left border
  keep = np.array(keep, np.float32)
  return img, keep[np.lexsort((keep[:, 0], keep[:, 1]))]


@pytest.mark.parametrize("tile_px", [64, 50, 33, 1000])
def test_handmade_components_exact(tile_px):
  img, want = _handmade()
  got = find_candidates(img, Settings(tile_px=tile_px))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(find_candidates_whole(img), want)


def test_four_connected_would_differ():
  # The diagonal pair is the only thing telling 8- from 4-connectivity here.
  img = _canvas(100, 100)
  img[50, 50] = img[51, 51] = INK
  np.testing.assert_array_equal(find_candidates(img, Settings(tile_px=51)), [[50.5, 50.5]])


def test_size_filter_settings():
  img = _canvas()
  _rect(img, 20, 20, 51, 3)
  _rect(img, 100, 100, 1, 1)
  assert len(find_candidates(img, Settings(tile_px=64))) == 0
  got = find_candidates(img, Settings(tile_px=64, max_side_px=51, min_area_px=1))
  np.testing.assert_array_equal(got, [[45, 21], [100, 100]])


def _random_blobs(seed, h=300, w=340):
  """Many blobs of random shapes and sizes (some over 50 px, some touching).

  Kept to a few percent of the image, so the blobs stay above the threshold.
  """
  rng = np.random.default_rng(seed)
  img = _canvas(h, w)
  for _ in range(40):
    x, y = int(rng.integers(-10, w)), int(rng.integers(-10, h))
    big = rng.random() < 0.25
    bw, bh = (int(v) for v in rng.integers(1, 70 if big else 14, 2))
    sub = img[max(y, 0):y + bh, max(x, 0):x + bw]
    if not big:
      sub[:] = INK
    else:  # a sparse scatter: diagonal links, holes, fragments, oversize
      sub[rng.random(sub.shape[:2]) < 0.12] = INK
  for _ in range(4):  # thin bars, most over 50 px long, at random places
    x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
    n, t = int(rng.integers(45, 90)), int(rng.integers(1, 3))
    if rng.random() < 0.5:
      img[y:y + t, x:x + n] = INK
    else:
      img[y:y + n, x:x + t] = INK
  return img


@pytest.mark.parametrize("seed", range(4))
def test_streamed_equals_whole_on_random_blobs(seed):
  img = _random_blobs(seed)
  whole = find_candidates_whole(img)
  assert len(whole) > 20
  # Oversize components are there to be dropped (some cross tile borders).
  assert len(find_candidates_whole(img, Settings(max_side_px=400))) > len(whole)
  for tile_px in (17, 40, 64, 129):
    np.testing.assert_array_equal(find_candidates(img, Settings(tile_px=tile_px)), whole)


def test_whole_reference_against_plain_scipy(tiny_dataset):
  """The reference definition against an independent computation."""
  rgb = slides.Slide(tiny_dataset / "001.tiff").read_all()
  br = stain.blue_ratio(rgb).astype(np.float64)
  mask = br > br.mean() + 3 * br.std()
  lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
  want = []
  for i, sl in enumerate(ndimage.find_objects(lab), 1):
    area = int((lab[sl] == i).sum())
    if area >= 2 and sl[0].stop - sl[0].start <= 50 and sl[1].stop - sl[1].start <= 50:
      cy, cx = ndimage.center_of_mass(lab == i)
      want.append((cx, cy))
  want = np.array(want)
  want = want[np.lexsort((want[:, 0], want[:, 1]))]
  got = find_candidates_whole(rgb)
  assert len(got) == len(want) > 10
  np.testing.assert_allclose(got, want, atol=1e-3)


def test_streamed_equals_whole_on_synthetic_image(tiny_dataset):
  path = tiny_dataset / "052.tiff"
  whole = find_candidates_whole(slides.Slide(path).read_all())
  assert len(whole) > 10
  for tile_px in (100, 256):
    np.testing.assert_array_equal(find_candidates(path, Settings(tile_px=tile_px)), whole)
  with slides.Slide(path) as s:  # a Slide works as the source too
    np.testing.assert_array_equal(find_candidates(s, Settings(tile_px=128)), whole)


def test_threshold_does_not_depend_on_bands():
  img = _random_blobs(7, 500, 433)
  br = stain.blue_ratio(img).astype(np.float64)
  thr = {extract.image_threshold(extract._ArraySource(img), Settings(tile_px=t))
         for t in (1, 20, 64, 500)}
  assert len(thr) == 1  # bit-identical whatever the band height
  np.testing.assert_allclose(thr.pop(), br.mean() + 3 * br.std(), rtol=1e-12)


def test_parallel_over_images_keeps_order(tiny_dataset):
  paths = [tiny_dataset / f"{i:03d}.tiff" for i in (1, 2, 51, 52)]
  one = [find_candidates(p) for p in paths]
  many = find_candidates_many(paths, workers=2)
  assert [len(a) for a in many] == [len(a) for a in one]
  for a, b in zip(one, many):
    np.testing.assert_array_equal(a, b)


def test_patches_for_centring_and_white_border():
  img = _random_blobs(3, 200, 260)
  xy = np.array([[100.4, 50.6], [0.0, 0.0], [259.0, 199.0], [130.5, 80.5], [-5.0, 3.0]])
  got = patches_for(img, xy, patch_size=16, tile_px=64)
  padded = np.pad(img, ((40, 40), (40, 40), (0, 0)), constant_values=255)
  for (x, y), patch in zip(xy, got):
    r = sampling.centred_request(0, x, y, 16, "random")
    np.testing.assert_array_equal(patch, padded[r.y0 + 40:r.y0 + 56, r.x0 + 40:r.x0 + 56])
  assert (got[1][:8, :8] == 255).all()  # above-left of the image: white


@pytest.mark.parametrize("tile_px", [64, 37])
def test_streamed_patches_equal_patches_for(tile_px):
  img, want = _handmade()
  xy, patches = zip(*extract.candidates_and_patches(img, Settings(tile_px=tile_px)))
  xy, patches = np.concatenate(xy), np.concatenate(patches)
  order = extract.yx_order(xy)
  np.testing.assert_array_equal(xy[order], want)
  np.testing.assert_array_equal(patches[order], patches_for(img, want, 64))
  assert (patches[order][-1][40:] == 255).all()  # the corner blob: white below


def test_settings_are_checked():
  with pytest.raises(ValueError, match="tile_px"):
    Settings(tile_px=0)
  with pytest.raises(ValueError, match="k_std"):
    Settings(k_std=float("nan"))


# ----------------------------------------------------------------------------
# Labels: the MIDOG radius, in millimetres, as the matching computes it.


def test_label_rule_at_the_radius():
  # 0.25 um/px: 7.5 um = 30 px. At exactly 30 px the float64 millimetres
  # decide, as in the matching: (3, 0) to (33, 0) is 0.007500000000000001 mm,
  # a miss; (101, 0) to (131, 0) is 0.0075 mm, a hit.
  figs = np.array([[3.0, 0.0], [101.0, 500.0]])
  cands = np.array([[33.0, 0.0], [32.9, 0.0], [131.0, 500.0], [131.1, 500.0],
                    [101.0, 470.0]], np.float32)
  lab, found = label_candidates(cands, figs, 0.25)
  np.testing.assert_array_equal(lab, [0, 1, 1, 0, 1])
  assert found == 2
  for c, l in zip(cands, lab):  # the matching agrees pair by pair
    f = figs[np.argmin(((figs - c) ** 2).sum(1))]
    assert metrics.match(f[None] * 0.25e-3, c[None].astype(np.float64) * 0.25e-3)[0].tp == l
  lab, _ = label_candidates(cands, figs, 0.2)  # 30 px at 0.2 um/px is 6 um: inside
  np.testing.assert_array_equal(lab, [1, 1, 1, 1, 1])


def test_labels_agree_with_the_matching_near_the_boundary():
  rng = np.random.default_rng(0)
  for spacing in (0.23, 0.25):
    r_px = metrics.RADIUS_MM * 1000 / spacing
    fig = np.array([[500.0, 400.0]])
    ang = rng.uniform(0, 2 * np.pi, 400)
    rad = r_px + rng.uniform(-1e-3, 1e-3, 400)
    cands = (fig + np.stack([np.cos(ang), np.sin(ang)], 1) * rad[:, None]).astype(np.float32)
    lab, _ = label_candidates(cands, fig, spacing)
    want = [metrics.match(fig * spacing / 1000, c[None].astype(np.float64) * spacing / 1000)[0].tp
            for c in cands]
    np.testing.assert_array_equal(lab, want)
    assert 0 < lab.sum() < len(lab)


def test_recall_counts_figures_not_candidates():
  figs = np.array([[10.0, 10.0], [300.0, 300.0], [12.0, 12.0]])
  cands = np.array([[11.0, 11.0], [13.0, 13.0]])
  lab, found = label_candidates(cands, figs, 0.25)
  np.testing.assert_array_equal(lab, [1, 1])
  assert found == 2  # the far figure has none
  lab, found = label_candidates(np.zeros((0, 2)), figs, 0.25)
  assert lab.shape == (0,) and found == 0


def test_tiny_dataset_candidates_cover_its_figures(tiny_dataset):
  ds = midog.load_midog(tiny_dataset / "MIDOG.json")
  c = ds.labeled[0]
  _, found = label_candidates(find_candidates(c.path), c.mitoses, c.spacing_um)
  assert found >= len(c.mitoses) - 1
