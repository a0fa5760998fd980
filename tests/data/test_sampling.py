"""Patch sampling: Sheta's mitosis-centred sampler (MIDOG 2021), Lafarge &
Koelzer's balanced examples (MIDOG 2022), negatives far from mitoses, the
points-in-window rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from midog_jax.data import midog
from midog_jax.data import sampling as S
from midog_jax.errors import DataError


def _case(mitoses=(), imposters=(), width=1000, height=800, domain="A",
          image_id=1) -> midog.Case:
  return midog.Case(
      image_id=image_id, file_name=f"{image_id:03d}.tiff",
      path=Path(f"/data/{image_id:03d}.tiff"), width=width, height=height,
      scanner=domain, tumor_type="", lab="", species="", domain=domain,
      spacing_um=0.25, labeled=True,
      mitoses=np.asarray(mitoses, np.float32).reshape(-1, 2),
      imposters=np.asarray(imposters, np.float32).reshape(-1, 2))


def _window_pts(case, r, attr="mitoses"):
  return S.points_in_window(getattr(case, attr), r.x0, r.y0, r.size)[0]


def test_mitosis_centred_p1_holds_a_figure_inside_the_margin():
  case = _case([[10, 10], [500.5, 400], [990, 790]])
  rng = np.random.default_rng(0)
  offsets = set()
  for _ in range(300):
    r = S.sample_mitosis_centred(case, 3, 128, rng, p=1.0, margin=25)
    assert r.kind == "mitosis" and r.case_index == 3 and r.size == 128
    pts = _window_pts(case, r)
    inner = np.all((pts >= 25 - 0.5) & (pts <= 128 - 1 - 25 + 0.5), axis=1)
    assert inner.any(), (r, pts)
    offsets.add((r.x0, r.y0))
  # Not always dead centre: the figure's position in the patch varies.
  assert len(offsets) > 100


def test_mitosis_centred_p0_is_uniform_inside_the_image():
  case = _case([[500, 400]], width=1000, height=800)
  rng = np.random.default_rng(2)
  rs = [S.sample_mitosis_centred(case, 0, 200, rng, p=0.0) for _ in range(2000)]
  assert {r.kind for r in rs} == {"random"}
  x0 = np.array([r.x0 for r in rs])
  y0 = np.array([r.y0 for r in rs])
  assert x0.min() >= 0 and x0.max() <= 800 and y0.min() >= 0 and y0.max() <= 600
  # Uniform on [0, 800]: mean 400 (std of the mean ~5), both ends reached.
  assert abs(x0.mean() - 400) < 25 and abs(y0.mean() - 300) < 20
  assert x0.min() < 40 and x0.max() > 760
  # Each tenth of the range gets about a tenth of the draws.
  hist = np.histogram(x0, bins=10, range=(0, 801))[0]
  assert hist.min() > 140 and hist.max() < 260


def test_mitosis_centred_p_half_fraction():
  case = _case([[500, 400]])
  rng = np.random.default_rng(3)
  kinds = [S.sample_mitosis_centred(case, 0, 128, rng, p=0.5).kind
           for _ in range(2000)]
  frac = np.mean([k == "mitosis" for k in kinds])
  # Binomial std is 0.011; 4.5 std.
  assert abs(frac - 0.5) < 0.05


def test_case_without_figures_falls_back_to_random_and_small_images():
  rng = np.random.default_rng(4)
  empty = _case([], width=300, height=200)
  r = S.sample_mitosis_centred(empty, 0, 128, rng, p=1.0)
  assert r.kind == "random" and 0 <= r.x0 <= 172 and 0 <= r.y0 <= 72
  # An image smaller than the patch: the window holds the whole image.
  small = _case([], width=50, height=40)
  for _ in range(20):
    r = S.sample_random(small, 0, 64, rng)
    assert r.x0 <= 0 and r.x0 + 64 >= 50 and r.y0 <= 0 and r.y0 + 64 >= 40


def test_imposter_centred():
  case = _case([[100, 100]], [[700, 600]])
  rng = np.random.default_rng(5)
  r = S.sample_imposter_centred(case, 0, 100, rng, p=1.0)
  assert r.kind == "imposter"
  assert len(_window_pts(case, r, "imposters")) == 1
  assert len(_window_pts(case, r, "mitoses")) == 0


def test_negative_centres_respect_min_distance_and_fail_clearly():
  mit = np.array([[100, 100], [500, 400], [501, 402], [900, 700]], np.float32)
  case = _case(mit)
  rng = np.random.default_rng(6)
  pts = np.array([S.sample_negative_centre(case, rng, 150.0) for _ in range(300)])
  d = np.linalg.norm(pts[:, None] - mit[None], axis=-1).min(1)
  assert d.min() >= 150.0
  assert np.all(pts == np.round(pts))  # pixel centres
  # The default is the matching radius in this case's pixels (7.5 um / 0.25).
  assert S.default_min_dist_px(case) == pytest.approx(30.0)
  # A disc covering the whole image leaves no negative.
  tiny = _case([[10, 10]], width=20, height=20)
  with pytest.raises(DataError, match="001.tiff.*no point at >= 50.0 px"):
    S.sample_negative_centre(tiny, rng, 50.0, batch=32, max_rounds=4)


def test_points_in_window_pixel_convention():
  # Window pixels 10..41 (x) and 20..51 (y) hold x in [9.5, 41.5) and y in
  # [19.5, 51.5): both borders exactly, which [0, size) in patch coordinates
  # (the TFDS builder's old rule) gets wrong on each side.
  pts = np.array([[10, 20], [10.4, 19.6], [9.5, 20], [41.5, 20], [9.4, 20],
                  [41.4, 20], [10, 19.5], [10, 51.5], [41.49, 51.49]], np.float32)
  inside, keep = S.points_in_window(pts, 10, 20, 32)
  np.testing.assert_array_equal(
      keep, [True, True, True, False, False, True, True, False, True])
  np.testing.assert_allclose(inside, [[0, 0], [0.4, -0.4], [-0.5, 0], [31.4, 0],
                                      [0, -0.5], [31.49, 31.49]], atol=1e-5)
  assert inside.dtype == np.float32 and keep.dtype == bool
  # Adjacent windows share no point: the border belongs to the later one.
  _, left = S.points_in_window(pts, -22, 20, 32)
  assert not np.any(left & keep)
  # Non-square windows take (width, height).
  _, k = S.points_in_window([[40, 5], [5, 40]], 0, 0, (48, 16))
  np.testing.assert_array_equal(k, [True, False])
  # No points, and the shape of one point.
  assert S.points_in_window(np.zeros((0, 2)), 0, 0, 8)[0].shape == (0, 2)


def test_jittered_request_stays_near_and_on_the_image():
  case = _case(width=300, height=200)
  rng = np.random.default_rng(14)
  offsets = set()
  for _ in range(200):
    r = S.jittered_request(case, 4, (100, 50), 64, "negative", rng, 3.0)
    assert r.case_index == 4 and r.kind == "negative" and r.size == 64
    d = np.array([r.x0 + 32, r.y0 + 32]) - [100, 50]
    assert np.all(np.abs(d) <= 3)
    offsets.add(tuple(d))
  assert len(offsets) > 20
  # A centre on the border is not pushed off the image by the jitter.
  for _ in range(50):
    r = S.jittered_request(case, 0, (0, 199), 64, "mitosis", rng, 3.0)
    assert 0 <= r.x0 + 32 <= 3 and 196 <= r.y0 + 32 <= 199


def test_balanced_on_real_midog21_cases(real_midog_dir):
  ds = midog.load_midog(real_midog_dir / "MIDOG.json")
  rng = np.random.default_rng(0)
  cases = [c for c in ds.labeled if len(c.mitoses)][:12]
  for i, case in enumerate(cases):
    r = S.sample_balanced(case, i, 512, rng, positive=True)
    c = np.array([r.x0 + 256, r.y0 + 256])
    assert r.kind == "mitosis"
    assert np.linalg.norm(case.mitoses - c, axis=1).min() <= 3 * np.sqrt(2) + 1
    r = S.sample_balanced(case, i, 512, rng, positive=False)
    c = np.array([r.x0 + 256, r.y0 + 256])
    d = np.linalg.norm(case.mitoses - c, axis=1).min()
    assert d >= S.default_min_dist_px(case) - 1, (r, d)


def test_sample_balanced_per_record():
  case = _case([[300, 300], [600, 500]], [[305, 300], [800, 200]])
  empty = _case([], [[100, 100]])
  rng = np.random.default_rng(13)
  kinds = []
  for _ in range(200):
    r = S.sample_balanced(case, 2, 64, rng, positive=True, min_dist_px=40.0)
    c = np.array([r.x0 + 32, r.y0 + 32])
    assert r.kind == "mitosis" and r.case_index == 2
    assert np.linalg.norm(case.mitoses - c, axis=1).min() <= 3 * np.sqrt(2) + 1
    r = S.sample_balanced(case, 2, 64, rng, positive=False, min_dist_px=40.0)
    c = np.array([r.x0 + 32, r.y0 + 32])
    assert np.linalg.norm(case.mitoses - c, axis=1).min() >= 40.0 - 1
    if r.kind == "imposter":  # only the far imposter qualifies
      assert np.linalg.norm(c - [800, 200]) <= 3 * np.sqrt(2) + 1
    kinds.append(r.kind)
  assert set(kinds) == {"imposter", "negative"}
  assert abs(kinds.count("imposter") / 200 - 0.5) < 0.15
  # A positive asked of a case without figures says it is not one.
  assert S.sample_balanced(empty, 0, 64, rng, positive=True).kind != "mitosis"
  # No imposters asked for: none made.
  assert {S.sample_balanced(case, 0, 64, rng, positive=False,
                            imposter_fraction=0.0).kind
          for _ in range(50)} == {"negative"}
  # Deterministic given the generator.
  a = [S.sample_balanced(case, 0, 64, np.random.default_rng(15), positive=p)
       for p in (True, False)]
  b = [S.sample_balanced(case, 0, 64, np.random.default_rng(15), positive=p)
       for p in (True, False)]
  assert a == b
