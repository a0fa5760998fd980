"""Patch sampling: seed 000's mitosis-centred sampler, seed 001's balanced
batches, negatives far from mitoses, domain stratification, determinism."""

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


def _cases():
  """Three domains, one case without figures, several with."""
  rng = np.random.default_rng(7)
  out = []
  for i, d in enumerate(["A", "A", "B", "C", "C", "C"]):
    n_m = 0 if i == 1 else 5 + i
    mit = rng.uniform([0, 0], [999, 799], (n_m, 2))
    imp = rng.uniform([0, 0], [999, 799], (8, 2))
    out.append(_case(mit, imp, domain=d, image_id=i + 1))
  return out


def _window_pts(case, r, attr="mitoses"):
  m, i = S.points_in_window(case, r.x0, r.y0, r.size)
  return m if attr == "mitoses" else i


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


def test_mitosis_centred_jitter_bounds_the_offset_from_centre():
  case = _case([[500, 400]])
  rng = np.random.default_rng(1)
  for _ in range(100):
    r = S.sample_mitosis_centred(case, 0, 64, rng, p=1.0, jitter=3)
    u = np.array([500, 400]) - [r.x0, r.y0]
    assert np.all(np.abs(u - 32) <= 3)


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


def test_balanced_exact_half_and_negatives_far():
  cases = _cases()
  rng = np.random.default_rng(8)
  c = S.balanced_centres(cases, 64, rng, min_dist_px=40.0, jitter_px=3.0)
  kinds = np.array(c.kind)
  assert len(c) == 64 and (kinds == "mitosis").sum() == 32
  assert 0 < (kinds == "imposter").sum() < 32 and (kinds == "negative").sum() > 0
  for i, xy, k in zip(c.case_index, c.xy, c.kind):
    mit = cases[i].mitoses
    d = np.linalg.norm(mit - xy, axis=1).min() if len(mit) else np.inf
    if k == "mitosis":
      assert d <= 3.0 * np.sqrt(2) + 1e-4
    else:
      assert d >= 40.0, (k, d)
    if k == "imposter":
      assert np.linalg.norm(cases[i].imposters - xy, axis=1).min() <= 3 * np.sqrt(2) + 1e-4
  # Requests put the point on the patch's centre pixel.
  reqs = c.requests(65)
  for r, xy in zip(reqs, c.xy):
    assert np.all(np.abs(xy - [r.x0, r.y0] - 32) <= 0.5)
  # Odd counts round at random: the positive share averages pos_fraction.
  n_pos = [sum(k == "mitosis" for k in S.balanced_centres(cases, 3, rng).kind)
           for _ in range(400)]
  assert set(n_pos) == {1, 2} and abs(np.mean(n_pos) - 1.5) < 0.12


def test_balanced_imposter_fraction_and_close_imposters_skipped():
  # One imposter sits on a mitosis: it must never be a negative centre.
  case = _case([[300, 300]], [[305, 300], [700, 500]])
  rng = np.random.default_rng(9)
  c = S.balanced_centres([case], 200, rng, min_dist_px=30.0,
                         imposter_fraction=1.0, jitter_px=2.0)
  kinds = np.array(c.kind)
  assert (kinds == "imposter").sum() == 100
  imp_xy = c.xy[kinds == "imposter"]
  assert np.all(np.linalg.norm(imp_xy - [700, 500], axis=1) <= 2 * np.sqrt(2) + 1e-4)
  c0 = S.balanced_centres([case], 200, rng, min_dist_px=30.0, imposter_fraction=0.0)
  assert "imposter" not in c0.kind


def test_domain_stratification_equal_counts():
  cases = _cases()
  rng = np.random.default_rng(10)
  domains = np.array([c.domain for c in cases])
  for _ in range(5):
    idx = S.domain_stratified_cases(cases, 30, rng)
    counts = {d: int((domains[idx] == d).sum()) for d in "ABC"}
    assert counts == {"A": 10, "B": 10, "C": 10}
  # Not a multiple: counts differ by at most one.
  idx = S.domain_stratified_cases(cases, 31, rng)
  counts = [int((domains[idx] == d).sum()) for d in "ABC"]
  assert sorted(counts) == [10, 10, 11]
  # Through make_requests, per-case strategies and balanced.
  reqs = S.make_requests(cases, 60, rng, "mitosis_centred", 64,
                         stratify_domains=True)
  assert [sum(domains[r.case_index] == d for r in reqs) for d in "ABC"] == [20] * 3
  reqs = S.make_requests(cases, 60, rng, "balanced", 64, stratify_domains=True,
                         min_dist_px=30.0)
  pos = [domains[r.case_index] for r in reqs if r.kind == "mitosis"]
  neg = [domains[r.case_index] for r in reqs if r.kind != "mitosis"]
  assert [pos.count(d) for d in "ABC"] == [10] * 3
  assert [neg.count(d) for d in "ABC"] == [10] * 3


def test_make_requests_deterministic_and_strategies():
  cases = _cases()
  for strategy in S.STRATEGIES:
    a = S.make_requests(cases, 16, np.random.default_rng(11), strategy, 96,
                        min_dist_px=30.0)
    b = S.make_requests(cases, 16, np.random.default_rng(11), strategy, 96,
                        min_dist_px=30.0)
    c = S.make_requests(cases, 16, np.random.default_rng(12), strategy, 96,
                        min_dist_px=30.0)
    assert a == b and a != c, strategy
    assert all(isinstance(r, S.PatchRequest) and r.size == 96 for r in a)
  assert {r.kind for r in S.make_requests(cases, 50, np.random.default_rng(0),
                                          "random", 96)} == {"random"}
  with pytest.raises(ValueError, match="strategy must be one of"):
    S.make_requests(cases, 4, np.random.default_rng(0), "nope", 96)
  with pytest.raises(ValueError, match="no cases"):
    S.make_requests([], 4, np.random.default_rng(0), "random", 96)


def test_points_in_window_pixel_convention():
  case = _case([[10, 20], [10.4, 19.6], [9.4, 20], [41.4, 20], [41.6, 20]],
               [[25, 30]])
  m, i = S.points_in_window(case, 10, 20, 32)
  # Window pixels 10..41 own x in [9.5, 41.5): 9.4 and 41.6 are out.
  np.testing.assert_allclose(m, [[0, 0], [0.4, -0.4], [31.4, 0]], atol=1e-5)
  np.testing.assert_allclose(i, [[15, 10]])
  assert m.dtype == np.float32 and i.dtype == np.float32


def test_balanced_on_real_midog21_cases(real_midog_dir):
  ds = midog.load_midog(real_midog_dir / "MIDOG.json")
  train = ds.labeled
  rng = np.random.default_rng(0)
  c = S.balanced_centres(train, 96, rng, stratify_domains=True)
  kinds = np.array(c.kind)
  assert (kinds == "mitosis").sum() == 48
  doms = np.array([train[i].domain for i in c.case_index])
  assert [int((doms[kinds == "mitosis"] == d).sum()) for d in sorted(set(doms))] == [16] * 3
  for i, xy, k in zip(c.case_index, c.xy, c.kind):
    if k != "mitosis" and len(train[i].mitoses):
      d = np.linalg.norm(train[i].mitoses - xy, axis=1).min()
      assert d >= S.default_min_dist_px(train[i]) - 1e-3


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
