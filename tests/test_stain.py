"""Stain tools: Beer-Lambert OD, Macenko, unmixing, HED jitter, blue ratio."""

from __future__ import annotations

import numpy as np
import pytest

from midog_jax.data import stain

# Stain vectors of a made-up scanner (rows: H, E), not the Ruifrok defaults,
# so that a method that just returns its defaults fails.
H_TRUE = np.array([0.55, 0.77, 0.32])
E_TRUE = np.array([0.18, 0.86, 0.48])


def _render(conc: np.ndarray, h=H_TRUE, e=E_TRUE) -> np.ndarray:
  """uint8 RGB from (..., 2) H/E concentrations through Beer-Lambert."""
  m = stain.complete_stain_matrix(h, e)
  od = conc[..., 0:1] * m[0] + conc[..., 1:2] * m[1]
  return stain.od_to_rgb(od)


def _tissue_conc(rng, n=20000) -> np.ndarray:
  """Mixtures with pure-H and pure-E pixels and some blank glass."""
  c = rng.uniform(0, 1, (n, 2)) * np.array([1.2, 0.9])
  c[: n // 6, 1] = 0.0  # pure hematoxylin
  c[n // 6: n // 3, 0] = 0.0  # pure eosin
  c[-n // 10:] = 0.0  # glass
  return c.reshape(100, -1, 2)


def test_od_round_trip():
  v = np.arange(256, dtype=np.uint8).reshape(16, 16)
  rgb = np.stack([v, v[::-1], v.T], -1)
  od = stain.rgb_to_od(rgb)
  assert od.dtype == np.float32 and od.min() >= 0
  back = stain.od_to_rgb(od)
  expect = np.maximum(rgb, 1)  # 0 is clipped to 1 before the log
  np.testing.assert_array_equal(back, expect)
  # Natural-log convention: I = 255 / e has OD 1.
  assert stain.rgb_to_od(np.array([255 / np.e]))[0] == pytest.approx(1.0, abs=1e-5)
  # Brighter than the background is OD 0, never negative.
  assert stain.rgb_to_od(np.array([250.0]), background=240.0)[0] == 0.0


def test_macenko_recovers_known_stains():
  rng = np.random.default_rng(0)
  rgb = _render(_tissue_conc(rng))
  m, max_conc = stain.macenko(rgb)
  assert m.shape == (3, 3) and max_conc.shape == (2,)
  assert float(m[0] @ H_TRUE / np.linalg.norm(H_TRUE)) > 0.99
  assert float(m[1] @ E_TRUE / np.linalg.norm(E_TRUE)) > 0.99
  np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
  # The residual row is orthogonal to both stains.
  assert abs(float(m[2] @ m[0])) < 1e-5 and abs(float(m[2] @ m[1])) < 1e-5
  assert 0.8 < max_conc[0] < 1.5


def test_macenko_orders_h_first_whatever_the_input_order():
  # Swapping which stain is "more present" must not swap the output rows.
  rng = np.random.default_rng(1)
  c = _tissue_conc(rng)[..., ::-1].copy()
  m, _ = stain.macenko(_render(c))
  assert float(m[0] @ H_TRUE / np.linalg.norm(H_TRUE)) > 0.99
  assert m[0, 0] > m[1, 0]  # H absorbs more red than E


def test_macenko_rejects_blank_image():
  with pytest.raises(ValueError, match="blank"):
    stain.macenko(np.full((32, 32, 3), 250, np.uint8))


def test_unmix_recovers_concentrations():
  rng = np.random.default_rng(2)
  conc = rng.uniform(0.05, 1.0, (64, 64, 2))
  rgb = _render(conc)
  m = stain.complete_stain_matrix(H_TRUE, E_TRUE)
  got = stain.unmix(rgb, m)
  assert got.shape == (64, 64, 3) and got.dtype == np.float32
  # uint8 quantisation is the only error source: ~0.5/I in OD.
  np.testing.assert_allclose(got[..., :2], conc, atol=0.03)
  assert np.abs(got[..., 2]).max() < 0.03  # nothing outside the H/E plane


def test_hed_jitter_zero_is_identity_and_nonzero_changes():
  rng = np.random.default_rng(3)
  img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  same = stain.hed_jitter(img, np.random.default_rng(0), sigma=0.0, bias=0.0)
  np.testing.assert_array_equal(same, img)
  a = stain.hed_jitter(img, np.random.default_rng(5), sigma=0.2, bias=0.1)
  b = stain.hed_jitter(img, np.random.default_rng(5), sigma=0.2, bias=0.1)
  assert a.dtype == np.uint8 and a.shape == img.shape
  np.testing.assert_array_equal(a, b)  # deterministic given the generator
  assert np.abs(a.astype(int) - img).mean() > 1.0


def test_hed_jitter_scales_the_hematoxylin_channel():
  # With bias 0 and a known matrix, H concentration scales by the draw.
  m = stain.complete_stain_matrix(H_TRUE, E_TRUE)
  conc = np.zeros((8, 8, 2))
  conc[..., 0] = 0.8
  img = _render(conc)
  rng = np.random.default_rng(7)
  a = np.random.default_rng(7).uniform(0.7, 1.3, 3)  # same draw as inside
  out = stain.hed_jitter(img, rng, sigma=0.3, bias=0.0, stain_matrix=m)
  h_out = stain.unmix(out, m)[..., 0].mean()
  assert h_out == pytest.approx(0.8 * a[0], abs=0.02)


def test_blue_ratio_prefers_hematoxylin():
  blue = np.array([[70, 60, 150]], np.uint8)  # dark purple-blue nucleus
  pink = np.array([[230, 140, 200]], np.uint8)  # eosin cytoplasm
  white = np.array([[245, 245, 245]], np.uint8)
  br = [float(stain.blue_ratio(x)[0]) for x in (blue, pink, white)]
  assert br[0] > 2 * br[1] and br[0] > 2 * br[2]
  # The formula by hand for the blue pixel.
  r, g, b = 70.0, 60.0, 150.0
  assert br[0] == pytest.approx(100 * b / (1 + r + g) * 256 / (1 + r + g + b),
                                rel=1e-5)
