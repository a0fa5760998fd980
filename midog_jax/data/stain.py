"""Stain space: optical density, Macenko stain matrices, unmixing, blue ratio.

Optical density (the one convention of the package; ``augment.py`` imports it
from here)::

  OD = -ln((I + 1) / 256)        I = 256 * exp(-OD) - 1

for uint8 intensities ``I``, per channel. This is Beer-Lambert with the
intensity counted from 1 (``I + 1`` in 1..256) against the white background
256, the form of the widely used Macenko implementation
(``-log((I + 1) / Io)``). It is chosen because it is:

  * exactly 0 on white (I = 255): glass has no absorbance, so a stain change
    in OD space leaves the background white;
  * finite and largest on black (``ln 256 ~= 5.55``), with no clipping, and
    never negative on uint8 input;
  * one-to-one on the 256 uint8 values, so ``od_to_rgb(rgb_to_od(x)) == x``
    for every pixel: an OD-space transform that changes nothing changes no
    pixel (``-ln(max(I, 1) / 255)`` would send 0 and 1 to the same OD).

The logarithm is natural: Macenko et al. (2009) use log10, which scales
every OD (and concentration) by 1 / ln 10 but gives the same stain
*directions*. Their transparency threshold, an OD of 0.15 in log10 units
(``MACENKO_BETA_LOG10``), is therefore ``MACENKO_BETA = 0.15 * ln 10 ~= 0.345``
here: a pixel counts as stained when every channel has I <= 180, as in the
paper. (Popular re-implementations apply 0.15 to natural-log OD, a cut of
0.065 in the paper's units, I <= 219, which lets pale background in.)

uint8 images take the hot path, a 256-entry lookup table indexed by the image
(the augmentation converts every training patch; a gather is several times
faster than a logarithm per pixel).

Stain matrices are (3, 3) float32 with one unit OD vector per ROW, in the order
hematoxylin, eosin, residual; an image's OD is ``C @ M`` for concentrations
``C`` of shape (..., 3).
"""

from __future__ import annotations

import numpy as np

# Macenko's OD threshold below which a pixel counts as transparent (glass):
# 0.15 in the paper's log10 units, converted to this module's natural log.
MACENKO_BETA_LOG10 = 0.15
MACENKO_BETA = MACENKO_BETA_LOG10 * float(np.log(10.0))


def _od(intensity: np.ndarray) -> np.ndarray:
  """The OD formula itself, for intensities already in [0, 255]."""
  return -np.log((np.asarray(intensity, np.float32) + 1) / np.float32(256))


# OD of each uint8 value: exactly 0 at 255, ln(256) at 0.
_OD_LUT = _od(np.arange(256)).astype(np.float32)
_OD_LUT[255] = 0.0  # -log(1.0) is -0.0; a plain 0 compares and prints cleanly


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
  """Optical density ``-ln((I + 1) / 256)`` as float32 of the same shape.

  uint8 input (any shape or strides, e.g. a channel-first view) goes through
  the lookup table. Other dtypes are clipped to [0, 255] first, since
  intensities outside the uint8 range do not exist in the images.
  """
  rgb = np.asarray(rgb)
  if rgb.dtype == np.uint8:
    return _OD_LUT[rgb]
  return np.maximum(_od(np.clip(rgb, 0, 255)), np.float32(0))


def od_to_rgb(od: np.ndarray) -> np.ndarray:
  """Inverse of :func:`rgb_to_od`: ``256 * exp(-od) - 1`` rounded to uint8.

  Values past the uint8 range (negative OD, or OD past black) saturate at 255
  and 0.
  """
  i = np.negative(od, dtype=np.float32)  # a new temporary, then in place
  np.exp(i, out=i)
  i *= 256
  i -= 1
  np.clip(i, 0, 255, out=i)
  i += 0.5  # truncating a value in [0.5, 255.5] rounds it
  return i.astype(np.uint8)


def rgb_to_od_jnp(rgb):
  """:func:`rgb_to_od` of a uint8 ``jax.Array`` (the same lookup table).

  For the augmentation on the accelerator (``augment_device.py``); jax is
  imported here, not at the top, so grain workers that only need the numpy
  functions do not load it.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.take(jnp.asarray(_OD_LUT), rgb.astype(jnp.int32), axis=0)


def od_to_rgb_jnp(od):
  """:func:`od_to_rgb` in jax.numpy: ``256 * exp(-od) - 1``, clipped, rounded."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  i = jnp.clip(256 * jnp.exp(-od.astype(jnp.float32)) - 1, 0, 255)
  return jnp.floor(i + 0.5).astype(jnp.uint8)  # as the numpy truncation of i + 0.5


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


def macenko(rgb: np.ndarray, beta: float = MACENKO_BETA, alpha: float = 1.0
            ) -> tuple[np.ndarray, np.ndarray]:
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

  Returns:
    ``(stain_matrix, max_conc)``: the (3, 3) float32 matrix with unit rows H
    (the vector with the larger red OD), E, residual; and (2,) float32 99th
    percentiles of the H and E concentrations over the tissue pixels (used to
    normalise concentrations between images).

  Raises:
    ValueError: fewer than 10 stained pixels (nothing to estimate from).
  """
  od = rgb_to_od(np.asarray(rgb).reshape(-1, 3)).astype(np.float64)
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


def unmix(rgb: np.ndarray, stain_matrix: np.ndarray = DEFAULT_STAIN_MATRIX
          ) -> np.ndarray:
  """Per-pixel concentrations (..., 3) of H, E and residual (float32).

  Solves ``OD = C @ M`` exactly with the inverse of the (3, 3) matrix.
  """
  m = np.asarray(stain_matrix, np.float64)
  inv = np.linalg.inv(m).astype(np.float32)
  return rgb_to_od(rgb) @ inv


def blue_ratio(rgb: np.ndarray) -> np.ndarray:
  """Blue-ratio image (Chang et al. 2012), float32 (...,).

  ``BR = 100 * B / (1 + R + G) * 256 / (1 + R + G + B)``: high where the
  pixel is blue relative to red and green AND dark, i.e. on hematoxylin.
  """
  x = np.asarray(rgb, np.float32)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  return (100 * b / (1 + r + g)) * (256 / (1 + r + g + b))
