"""Augmentation: every geometric transform moves the points with the pixels;
colour transforms keep points, range and identity at strength 0."""

from __future__ import annotations

import numpy as np
import pytest

from midog_jax.data import augment as A
from support import blob_image, local_max, marked_image

H, W = 13, 17  # non-square, so width/height mix-ups fail


def _marked(h=H, w=W, seed=0):
  return marked_image(h, w, seed)


def _assert_on_marks(img0, pts0, img1, pts1, keep):
  """Each moved point sits on its own pixel value, on a pixel centre."""
  assert img1.dtype == np.uint8 and keep.all() and len(pts1) == len(pts0)
  np.testing.assert_allclose(pts1, np.round(pts1), atol=1e-5)
  assert A.in_bounds(pts1, img1.shape).all()
  for (x0, y0), (x1, y1) in zip(pts0.astype(int), np.round(pts1).astype(int)):
    np.testing.assert_array_equal(img1[y1, x1], img0[y0, x0])
  # And nothing else is lit: the marks were moved, not copied.
  assert (img1[..., 1] == 255).sum() == len(pts0)


@pytest.mark.parametrize("fn", [A.flip_lr]
                         + [lambda im, p, k=k: A.rot90(im, p, k) for k in range(4)]
                         + [lambda im, p, k=k: A.d4(im, p, k) for k in range(8)])
def test_geometric_transform_moves_points_with_pixels(fn):
  img, pts = _marked()
  _assert_on_marks(img, pts, *fn(img, pts))


def test_rot90_shape_and_direction():
  img, pts = _marked()
  out, p, _ = A.rot90(img, np.array([[W - 1, 0]], np.float32), 1)
  # Counter-clockwise as displayed: the top-right corner goes to top-left.
  assert out.shape == (W, H, 3)
  np.testing.assert_array_equal(p, [[0, 0]])


def test_d4_group_laws():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  pts = rng.uniform(-0.5, min(H, W) - 0.5, (9, 2)).astype(np.float32)
  im, p = img, pts
  for _ in range(4):
    im, p, keep = A.rot90(im, p, 1)
    assert keep.all()
  np.testing.assert_array_equal(im, img)
  np.testing.assert_allclose(p, pts, atol=1e-5)
  im, p, _ = A.flip_lr(*A.flip_lr(img, pts)[:2])
  np.testing.assert_array_equal(im, img)
  np.testing.assert_allclose(p, pts, atol=1e-5)
  # Element 6 (left-right flip, then half a turn) is the up-down flip.
  im6, p6, _ = A.d4(img, pts, 6)
  np.testing.assert_array_equal(im6, img[::-1])
  np.testing.assert_allclose(p6, np.stack([pts[:, 0], H - 1 - pts[:, 1]], 1),
                             atol=1e-5)
  # The 8 elements are distinct.
  sq = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  assert len({A.d4(sq, pts, k)[0].tobytes() for k in range(8)}) == 8
  # random_d4 reaches all 8 elements.
  seen = {A.random_d4(sq, pts, rng)[0].tobytes() for _ in range(200)}
  assert len(seen) == 8


def test_shift_moves_points():
  img, pts = _marked(40, 50)
  rng = np.random.default_rng(2)
  offsets = set()
  for _ in range(60):
    out, p, keep = A.random_shift(img, pts, rng, 4)
    assert out.shape == (32, 42, 3)
    assert A.in_bounds(p, out.shape).all()
    for (x0, y0), (x1, y1) in zip(pts[keep].astype(int), p.astype(int)):
      np.testing.assert_array_equal(out[y1, x1], img[y0, x0])
    offsets.add(tuple((pts[keep] - p)[0]))
  assert all(0 <= ox <= 8 and 0 <= oy <= 8 for ox, oy in offsets)
  assert len(offsets) > 20
  with pytest.raises(ValueError, match="too large"):
    A.random_shift(img, pts, rng, 20)


def test_elastic_points_follow_blobs():
  h, w = 96, 112
  g = np.arange(12, 96, 17)
  pts = np.array([(x, y) for x in g for y in g if y < h - 8], np.float32)
  pts += np.random.default_rng(3).uniform(-0.4, 0.4, pts.shape).astype(np.float32)
  img = blob_image(h, w, pts)
  rng = np.random.default_rng(4)
  field = A.elastic_field((h, w), rng, 3.0, 12.0)
  out, moved, keep = A.warp(img, pts, field)
  assert keep.all()
  assert out.dtype == np.uint8 and out.shape == img.shape
  err = [np.linalg.norm(local_max(out, *q) - q) for q in moved]
  assert max(err) <= 1.5, err
  # The deformation is real, and the naive (not inverted) map would miss.
  assert np.linalg.norm(moved - pts, axis=1).max() > 3
  q = pts[:, ::-1].T
  from scipy import ndimage as ndi
  d = np.stack([ndi.map_coordinates(field[i], q, order=1) for i in range(2)])
  wrong = (q + d)[::-1].T
  assert max(np.linalg.norm(local_max(out, *p) - p) for p in wrong) > 1.5
  # Same through `elastic` with a seeded rng: deterministic.
  a = A.elastic(img, pts, np.random.default_rng(5), 3.0, 12.0)
  b = A.elastic(img, pts, np.random.default_rng(5), 3.0, 12.0)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_elastic_field_amplitude():
  rng = np.random.default_rng(6)
  stds = [A.elastic_field((128, 128), rng, 4.0, 8.0).std() for _ in range(20)]
  # alpha is the RMS displacement (per component), whatever sigma is.
  assert 3.0 < np.mean(stds) < 5.0
  f = A.elastic_field((128, 160), rng, 2.0, 16.0)
  assert f.shape == (2, 128, 160) and f.dtype == np.float32


@pytest.mark.parametrize("fn", [A.rgb_colour, A.od_colour])
def test_colour_transforms(fn):
  rng = np.random.default_rng(7)
  img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  np.testing.assert_array_equal(fn(img, rng, 0.0), img)
  outs = [fn(img, rng, 1.0) for _ in range(5)]
  for out in outs:
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.abs(out.astype(int) - img).mean() > 1.0
  assert not np.array_equal(outs[0], outs[1])
  # Strong settings saturate at the ends of the range instead of wrapping.
  ext = np.zeros((4, 4, 3), np.uint8)
  ext[:2] = 255
  hot = fn(ext, np.random.default_rng(8), 5.0)
  assert hot.dtype == np.uint8
  # Deterministic for a fixed seed.
  np.testing.assert_array_equal(fn(img, np.random.default_rng(9), 1.0),
                                fn(img, np.random.default_rng(9), 1.0))


def test_augmenter_chain_keeps_points_on_marks():
  img, pts = _marked(40, 40, seed=11)
  aug = A.Augmenter(d4=True, max_shift=6)
  rng = np.random.default_rng(12)
  dropped = 0
  for _ in range(30):
    out, p, keep = aug(img, pts, rng)
    assert out.shape == (28, 28, 3) and out.flags.c_contiguous
    assert len(p) == keep.sum() and A.in_bounds(p, out.shape).all()
    dropped += len(pts) - len(p)
    for (x0, y0), (x1, y1) in zip(pts[keep].astype(int), np.round(p).astype(int)):
      np.testing.assert_array_equal(out[y1, x1], img[y0, x0])
  assert dropped > 0  # the shift crop does drop border points
  # Colour alone leaves the points where they are.
  col = A.Augmenter(d4=False, colour="od")
  out, p, keep = col(img, pts, rng)
  np.testing.assert_array_equal(p, pts)
  assert keep.all() and not np.array_equal(out, img)


def test_augmenter_full_chain_and_bad_config():
  rng = np.random.default_rng(13)
  img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  pts = rng.uniform(0, 63, (5, 2)).astype(np.float32)
  aug = A.Augmenter(d4=True, max_shift=4, elastic=(2.0, 10.0), colour="rgb")
  a = aug(img, pts, np.random.default_rng(14))
  b = aug(img, pts, np.random.default_rng(14))
  assert a[0].shape == (56, 56, 3) and a[0].dtype == np.uint8
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="colour must be one of"):
    A.Augmenter(colour="hsv")
  with pytest.raises(ValueError, match="uint8"):
    aug(img.astype(np.float32), pts, rng)


def test_in_bounds_uses_the_pixel_rule_on_both_borders():
  # A 4 (wide) x 3 (high) image holds x in [-0.5, 3.5) and y in [-0.5, 2.5).
  pts = np.array([[-0.5, 0], [3.49, 0], [3.5, 0], [-0.51, 0],
                  [0, -0.5], [0, 2.49], [0, 2.5], [0, -0.51]], np.float32)
  np.testing.assert_array_equal(A.in_bounds(pts, (3, 4, 3)),
                                [True, True, False, False] * 2)


def test_points_leaving_the_image_are_dropped_with_their_mask():
  img = np.zeros((32, 32, 3), np.uint8)
  pts = np.array([[1, 1], [16, 16], [31, 2], [-3, 5]], np.float32)
  # Input points off the image stay off (D4 maps the image onto itself).
  out, p, keep = A.d4(img, pts, 5)
  np.testing.assert_array_equal(keep, [True, True, True, False])
  assert len(p) == 3
  # The shift crop drops what it cuts off.
  oy, ox = np.random.default_rng(0).integers(0, 17, 2)  # its draw: (14, 10)
  out, p, keep = A.random_shift(img, pts, np.random.default_rng(0), 8)
  assert out.shape == (16, 16, 3)
  np.testing.assert_array_equal(keep, [False, True, False, False])
  np.testing.assert_array_equal(p, [[16 - ox, 16 - oy]])
  np.testing.assert_array_equal(A.compose_keep(np.array([True, False, True]),
                                               np.array([False, True])),
                                [False, False, True])
