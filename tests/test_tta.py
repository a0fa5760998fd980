"""D4 test-time augmentation: lazy views, the merge rule, equivariance for any detector."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tifffile

from midog_jax import infer, tta
from configs import retina as retina_config
from midog_jax import detectors
from midog_jax.data import slides, synthetic
from midog_jax.detections import Detections


def _reference_view(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
  return np.rot90(image[:, ::-1] if flip else image, k)


@pytest.mark.parametrize("k,flip", tta.D4)
def test_a_view_reads_the_turned_image_region_by_region(k, flip):
  rng = np.random.default_rng(k + 4 * flip)
  image = rng.integers(0, 255, (13, 17, 3), np.uint8)
  view = tta.View(17, 13, infer.image_reader(image)[2], k, flip)
  want = _reference_view(image, k, flip)
  assert (view.height, view.width) == want.shape[:2]
  # Inside, across the border and wholly outside (white, as slides pad).
  for x, y, w, h in ((0, 0, view.width, view.height), (3, 2, 5, 7), (-4, -3, 9, 6),
                     (view.width - 2, view.height - 3, 6, 5), (40, 40, 3, 3)):
    padded = np.full((view.height + 100, view.width + 100, 3), 255, np.uint8)
    padded[50:50 + view.height, 50:50 + view.width] = want
    np.testing.assert_array_equal(view.read(x, y, w, h),
                                  padded[50 + y:50 + y + h, 50 + x:50 + x + w])


@pytest.mark.parametrize("k,flip", tta.D4)
def test_points_follow_the_pixels_into_a_view_and_back(k, flip):
  image = np.zeros((13, 17, 3), np.uint8)
  image[4, 11] = 200  # pixel (x, y) = (11, 4)
  view = tta.View(17, 13, infer.image_reader(image)[2], k, flip)
  turned = _reference_view(image, k, flip)
  (yv, xv), = np.argwhere(turned[..., 0] == 200)
  np.testing.assert_array_equal(view.to_view([[11, 4]]), [[xv, yv]])
  pts = np.random.default_rng(0).uniform(-1, 20, (50, 2))
  np.testing.assert_allclose(view.from_view(view.to_view(pts)), pts, atol=1e-12)


def test_merge_views_averages_over_all_eight_views():
  rng = np.random.default_rng(0)
  views = []
  for v in range(8):
    xy = [[100 + rng.uniform(-2, 2), 50 + rng.uniform(-2, 2)]]  # seen by every view
    s = [0.8]
    if v == 3:  # seen once: scores an eighth
      xy.append([300, 300])
      s.append(0.8)
    if v == 5:  # a second detection of view 5 next to the first: not joined
      xy.append([101, 51])
      s.append(0.1)
    views.append(Detections(np.asarray(xy), np.asarray(s)))
  out = tta.merge_views(views, radius=10.0)
  order = np.argsort(-out.scores)
  np.testing.assert_allclose(out.scores[order], [0.8, 0.8 / 8, 0.1 / 8], rtol=1e-6)
  all_first = np.asarray([v.xy[0] for v in views])
  np.testing.assert_allclose(out.xy[order[0]], all_first.mean(0), atol=1e-5)
  np.testing.assert_allclose(out.xy[order[1]], [300, 300])
  # Beyond the radius: two figures, not one.
  far = [Detections([[0, 0]], [0.5]), Detections([[0, 11]], [0.5])]
  assert len(tta.merge_views(far, radius=10.0)) == 2


@pytest.fixture(scope="module")
def odd_image(tmp_path_factory):
  root = tmp_path_factory.mktemp("tta")
  synthetic.generate(root / "src", preset="tiny", seed=0, ids=[1], workers=1)
  with slides.Slide(root / "src" / "001.tiff") as s:
    return np.ascontiguousarray(s.read_all()[:157, :201])


def test_tta_is_rotation_equivariant_for_a_detector_that_is_not(odd_image):
  cfg = retina_config.get_config("tiny")
  cfg.model.topk = 64
  detector = detectors.build(cfg)
  variables = detector.init_variables(jax.random.key(0, impl="rbg"))
  tile_fn = detector.make_tile_fn(0.0)
  tcfg = infer.TileConfig(tile_size=cfg.eval.tile_size, overlap=cfg.eval.tile_overlap,
                          tile_batch=2, merge_radius=12.0, score_thresh=0.0)
  h, w = odd_image.shape[:2]
  turned = np.rot90(odd_image)

  def back(d):  # rot90 coordinates -> the original's: (x', y') -> (W - 1 - y', x')
    return np.stack([(w - 1) - d.xy[:, 1], d.xy[:, 0]], axis=1)

  def same(a_xy, a_s, b_xy, b_s):
    if len(a_xy) != len(b_xy):
      return False
    oa, ob = np.lexsort(np.round(a_xy, 2).T[::-1]), np.lexsort(np.round(b_xy, 2).T[::-1])
    return (np.allclose(a_xy[oa], b_xy[ob], atol=1e-3)
            and np.allclose(a_s[oa], b_s[ob], atol=1e-5))

  plain, plain_r = (infer.detect(x, tile_fn, variables, tcfg) for x in (odd_image, turned))
  assert len(plain) > 10
  # A RetinaNet is not rotation-equivariant: the control fails.
  assert not same(plain.xy, plain.scores, back(plain_r), plain_r.scores)
  d, d_r = (tta.detect(x, tile_fn, variables, tcfg) for x in (odd_image, turned))
  assert len(d) > 10
  assert same(d.xy, d.scores, back(d_r), d_r.scores)
  assert d.xy.min() >= 0 and d.xy[:, 0].max() <= w - 1 and d.xy[:, 1].max() <= h - 1


def test_tta_through_a_tiff_equals_tta_on_the_array(odd_image, tmp_path):
  cfg = retina_config.get_config("tiny")
  detector = detectors.build(cfg)
  variables = detector.init_variables(jax.random.key(1, impl="rbg"))
  tile_fn = detector.make_tile_fn(0.0)
  tcfg = infer.TileConfig(tile_size=cfg.eval.tile_size, overlap=cfg.eval.tile_overlap,
                          tile_batch=2, merge_radius=12.0, score_thresh=0.0)
  path = tmp_path / "a.tiff"
  tifffile.imwrite(path, odd_image, photometric="rgb", tile=(64, 64))
  a = tta.detect(odd_image, tile_fn, variables, tcfg)
  b = tta.detect(path, tile_fn, variables, tcfg)
  np.testing.assert_allclose(a.xy, b.xy, atol=1e-5)
  np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
