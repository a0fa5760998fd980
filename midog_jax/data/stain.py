"""Stain tools: Beer-Lambert optical density, Macenko unmixing, HED jitter, blue ratio.

Convention: optical density uses the NATURAL logarithm,
``OD = -ln(I / I0)`` with ``I0`` the background (white) intensity, so
``I = I0 * exp(-OD)``. (Macenko et al. 2009 use log10; the stain *directions*
are the same either way, only concentrations scale by ln(10).) Intensities are
clipped to at least 1 before the log, so a black pixel has a finite OD
(``ln(255) ~= 5.5``) instead of infinity.

Stain matrices are (3, 3) float32 with one unit OD vector per ROW, in the order
hematoxylin, eosin, residual; an image's OD is ``C @ M`` for concentrations
``C`` of shape (..., 3).
"""

from __future__ import annotations

import numpy as np

# Ruifrok & Johnston (2001) H and E OD vectors (normalised), the usual default
# when no image-specific matrix is estimated.
_H_REF = np.array([0.650, 0.704, 0.286])
_E_REF = np.array([0.072, 0.990, 0.105])


def _normed(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def complete_stain_matrix(h: np.ndarray, e: np.ndarray) -> np.ndarray:
  """(3, 3) float32 matrix with rows H, E and the residual ``H x E`` direction.

  The residual row is orthogonal to both stains, so its concentration after
  unmixing measures how much of a pixel's OD the two stains cannot explain.
  """
  h = _normed(np.asarray(h, np.float64))
  e = _normed(np.asarray(e, np.float64))
  r = np.cross(h, e)
  n = np.linalg.norm(r)
  if n < 1e-6:
    raise ValueError("hematoxylin and eosin vectors are parallel")
  return np.stack([h, e, r / n]).astype(np.float32)


DEFAULT_STAIN_MATRIX = complete_stain_matrix(_H_REF, _E_REF)


def rgb_to_od(rgb: np.ndarray, background: float = 255.) -> np.ndarray:
  """Optical density ``-ln(max(I, 1) / background)`` as float32, same shape.

  Values brighter than the background give OD 0 (not negative), since
  Beer-Lambert has no negative absorbance.
  """
  i = np.maximum(np.asarray(rgb, np.float32), 1.0)
  return np.maximum(-np.log(i / np.float32(background)), 0.0).astype(np.float32)


def od_to_rgb(od: np.ndarray, background: float = 255.) -> np.ndarray:
  """Inverse of :func:`rgb_to_od`: ``background * exp(-od)``, rounded to uint8."""
  i = np.float32(background) * np.exp(-np.asarray(od, np.float32))
  return np.clip(np.rint(i), 0, 255).astype(np.uint8)


def macenko(rgb: np.ndarray, beta: float = 0.15, alpha: float = 1.0,
            background: float = 255.) -> tuple[np.ndarray, np.ndarray]:
  """Estimates an image's stain matrix with Macenko et al. (2009).

  Pixels whose OD is below ``beta`` in any channel (glass, lumen) are dropped;
  the remaining OD vectors are projected onto the plane of the two largest
  eigenvectors of their covariance; the ``alpha`` and ``100 - alpha``
  percentiles of the angle in that plane give the two extreme directions,
  which are the stain vectors (robust versions of the extremes).

  Args:
    rgb: (..., 3) uint8 image.
    beta: OD threshold for transparent pixels.
    alpha: percentile (in %) of the angular extremes.
    background: white intensity.

  Returns:
    ``(stain_matrix, max_conc)``: the (3, 3) float32 matrix with unit rows H
    (the vector with the larger red OD), E, residual; and (2,) float32 99th
    percentiles of the H and E concentrations over the tissue pixels (used to
    normalise concentrations between images).

  Raises:
    ValueError: fewer than 10 stained pixels (nothing to estimate from).
  """
  od = rgb_to_od(np.asarray(rgb).reshape(-1, 3), background).astype(np.float64)
  od = od[np.all(od >= beta, axis=1)]
  if len(od) < 10:
    raise ValueError(f"macenko: only {len(od)} pixels have OD >= {beta} in all "
                     "channels; the image looks blank")
  # Eigenvectors of the covariance (eigh: ascending eigenvalues); the top two
  # span the plane the two stains lie in.
  _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
  plane = vecs[:, [2, 1]]
  # Eigenvector signs are arbitrary; point both into the positive octant so the
  # angles of physical (non-negative) OD vectors are comparable.
  plane = plane * np.where(plane.sum(0) < 0, -1.0, 1.0)
  proj = od @ plane
  phi = np.arctan2(proj[:, 1], proj[:, 0])
  lo, hi = np.percentile(phi, [alpha, 100 - alpha])
  v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
  v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
  v1 = v1 * (-1.0 if v1.sum() < 0 else 1.0)
  v2 = v2 * (-1.0 if v2.sum() < 0 else 1.0)
  h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)
  m = complete_stain_matrix(h, e)
  conc = od @ np.linalg.inv(m.astype(np.float64))
  max_conc = np.percentile(conc[:, :2], 99, axis=0).astype(np.float32)
  return m, max_conc


def unmix(rgb: np.ndarray, stain_matrix: np.ndarray = DEFAULT_STAIN_MATRIX,
          background: float = 255.) -> np.ndarray:
  """Per-pixel concentrations (..., 3) of H, E and residual (float32).

  Solves ``OD = C @ M`` exactly with the inverse of the (3, 3) matrix.
  """
  m = np.asarray(stain_matrix, np.float64)
  inv = np.linalg.inv(m).astype(np.float32)
  return rgb_to_od(rgb, background) @ inv


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 0.05,
               bias: float = 0.05, stain_matrix: np.ndarray | None = None,
               background: float = 255.) -> np.ndarray:
  """Random per-stain scale and shift in OD space (seed 001's CA-OD).

  Each concentration ``c_k`` (H, E, residual) becomes
  ``c_k * a_k + b_k`` with ``a_k ~ U(1 - sigma, 1 + sigma)`` and
  ``b_k ~ U(-bias, bias)`` (Tellez et al. 2018). The change is applied as an
  OD *difference*, ``I' = I * exp(-dOD)``, which equals re-rendering through
  Beer-Lambert but leaves the image bit-identical when the change is zero
  (and keeps saturated black pixels black instead of clipping them).

  Args:
    rgb: (..., 3) uint8 image (one image; one draw of a and b).
    rng: numpy Generator.
    sigma, bias: jitter strengths.
    stain_matrix: (3, 3) rows H, E, residual; default Ruifrok's H&E.

  Returns:
    uint8 image of the same shape.
  """
  m = DEFAULT_STAIN_MATRIX if stain_matrix is None else np.asarray(stain_matrix,
                                                                   np.float32)
  a = rng.uniform(1 - sigma, 1 + sigma, 3).astype(np.float32)
  b = rng.uniform(-bias, bias, 3).astype(np.float32)
  rgb = np.asarray(rgb)
  conc = unmix(rgb, m, background)
  d_od = (conc * (a - 1) + b) @ m
  out = rgb.astype(np.float32) * np.exp(-d_od)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blue_ratio(rgb: np.ndarray) -> np.ndarray:
  """Blue-ratio image (Chang et al. 2012), float32 (...,).

  ``BR = 100 * B / (1 + R + G) * 256 / (1 + R + G + B)``: high where the
  pixel is blue relative to red and green AND dark, i.e. on hematoxylin.
  """
  x = np.asarray(rgb, np.float32)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  return (100 * b / (1 + r + g)) * (256 / (1 + r + g + b))
