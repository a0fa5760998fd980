"""Stain space: the optical-density convention, Macenko, unmixing, blue ratio."""

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


def test_od_convention():
  # The one convention: OD = -ln((I + 1) / 256).
  od = stain.rgb_to_od(np.arange(256, dtype=np.uint8))
  assert od.dtype == np.float32 and od.shape == (256,)
  assert od[255] == 0.0  # white is exactly 0 (no absorbance on glass)
  assert od[127] == pytest.approx(np.log(2), abs=1e-6)  # (127 + 1) / 256 = 1/2
  assert od[0] == pytest.approx(np.log(256), abs=1e-5)  # black is finite
  np.testing.assert_allclose(od, -np.log((np.arange(256) + 1) / 256), atol=1e-6)
  # The other conventions in use give a different number on these pixels:
  # -ln(max(I, 1) / 255) has OD(127) = 0.697 and OD(0) = OD(1).
  assert abs(od[127] + np.log(127 / 255)) > 2e-3 and od[0] > od[1]
  assert np.all(np.diff(od) < 0)  # strictly decreasing: one-to-one
  # Float input follows the same formula (clipped to the uint8 range).
  np.testing.assert_allclose(
      stain.rgb_to_od(np.array([0.0, 127.0, 255.0, 300.0, -4.0])),
      [np.log(256), np.log(2), 0.0, 0.0, np.log(256)], atol=1e-5)


def test_od_round_trip_is_exact_for_every_uint8_value():
  v = np.arange(256, dtype=np.uint8).reshape(16, 16)
  rgb = np.stack([v, v[::-1], v.T], -1)
  back = stain.od_to_rgb(stain.rgb_to_od(rgb))
  assert back.dtype == np.uint8
  np.testing.assert_array_equal(back, rgb)
  # A channel-first view (how the augmentation calls it) gives the same.
  cf = rgb.reshape(-1, 3).T
  np.testing.assert_array_equal(stain.rgb_to_od(cf),
                                stain.rgb_to_od(rgb).reshape(-1, 3).T)
  # OD past either end of the range saturates instead of wrapping.
  np.testing.assert_array_equal(stain.od_to_rgb(np.array([-1.0, 0.0, 9.0])),
                                [255, 255, 0])


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


def test_macenko_transparency_cut_is_the_papers_0_15_in_log10_units():
  # One convention: natural-log OD, so the paper's log10 cut of 0.15 is
  # 0.15 * ln 10 here: a grey pixel counts as stained up to I = 180.
  assert stain.MACENKO_BETA == pytest.approx(0.15 * np.log(10))
  od = stain.rgb_to_od(np.arange(256, dtype=np.uint8))
  assert np.flatnonzero(od >= stain.MACENKO_BETA).max() == 180
  # Pale pixels (I 190-215: stained at the 0.065 cut that 0.15 on natural-log
  # OD would be, glass at the paper's) far off the H&E plane must not enter
  # the fit: with them the estimate tilts.
  rng = np.random.default_rng(3)
  tissue = _render(_tissue_conc(rng)[:, :150] * 1.6).reshape(-1, 3)
  pale = rng.integers(190, 216, (len(tissue) // 3, 3)).astype(np.uint8)
  pale[:, 1] = 215  # greenish-grey: off the plane
  rgb = np.concatenate([tissue, pale])
  for beta, fits in ((stain.MACENKO_BETA, True), (0.15, False)):
    m, _ = stain.macenko(rgb, beta=beta)
    good = (m[0] @ H_TRUE / np.linalg.norm(H_TRUE) > 0.99 and
            m[1] @ E_TRUE / np.linalg.norm(E_TRUE) > 0.99)
    assert good == fits, (beta, m)


def test_macenko_alpha_is_the_1st_and_99th_angle_percentile():
  # Directions in the H&E plane at angles from H towards E: 10 pixels at A
  # (-0.1 rad) and 10 at B (-0.05) beyond H, 480 at H, mirrored beyond E
  # (C, D). Of 1,000 angles the 1st percentile falls on B (after the 10 A's,
  # before any H): alpha = 1 returns B and D's mirror C; alpha 0 would give
  # A and D, alpha 2 gives H and E. (beta 0: every pixel enters; the cut is
  # pinned by the test above.)
  u = H_TRUE / np.linalg.norm(H_TRUE)
  v = E_TRUE - (E_TRUE @ u) * u
  v /= np.linalg.norm(v)
  t_e = np.arctan2(E_TRUE @ v, E_TRUE @ u)
  angles = {"A": -0.1, "B": -0.05, "H": 0.0, "E": t_e, "C": t_e + 0.05, "D": t_e + 0.1}
  unit = {k: np.cos(a) * u + np.sin(a) * v for k, a in angles.items()}
  assert min(x.min() for x in unit.values()) > 0.05  # physical (positive) OD
  counts = {"A": 10, "B": 10, "H": 480, "E": 480, "C": 10, "D": 10}
  od = np.concatenate([np.outer(np.linspace(1.5, 2.5, n), unit[k]) for k, n in counts.items()])
  rgb = stain.od_to_rgb(od)

  def nearest(row):
    return max(unit, key=lambda k: float(row @ unit[k]))

  for alpha, want in ((1.0, "BC"), (0.0, "AD"), (2.0, "HE")):
    m, _ = stain.macenko(rgb, beta=0.0, alpha=alpha)
    assert nearest(m[0]) + nearest(m[1]) == want, alpha
  m, _ = stain.macenko(rgb, beta=0.0)  # the default is the paper's alpha = 1
  assert nearest(m[0]) + nearest(m[1]) == "BC"


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
