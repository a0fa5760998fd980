"""Smooth random fields and random streams of the synthetic generator.

Fields are standardised Gaussian noise sampled on an 8 px grid and bilinearly
interpolated, so every pre-blur pixel is a pure function of its coordinates
(bands join without seams). The figure planner reads the tissue and
epithelium fields too, to put figures in tumour epithelium.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _rng(seed: int, image_id: int, *purpose: int) -> np.random.Generator:
  """The random stream of one purpose in one image.

  Seeding from ``(seed, image_id, *purpose)`` keeps the streams independent of
  each other, of the image order and of the worker that draws them.
  """
  return np.random.default_rng([seed, image_id, *purpose])


_CELL = 8
_PAD = 8  # grid nodes before pixel 0 (room for margins and edge cells)
# Field index -> correlation length in microns.
_F_TISSUE, _F_EPI, _F_EDENS, _F_WARP1, _F_WARP2, _F_MIX, _F_HBG, _F_PATCH = range(8)
_FIELD_UM = (40.0, 60.0, 15.0, 12.0, 12.0, 25.0, 20.0, 3.0)
# Derived maps, computed on the grid and interpolated per band (cheaper than
# interpolating the raw fields and combining them at full resolution).
_G_EPI, _G_STROMA, _G_HBG, _G_PHASE1, _G_PHASE2, _G_MIX, _G_PATCH = range(7)


def _raw_fields(seed: int, image_id: int, width: int, height: int,
                sp: float, lumen_q: float = 0.12, epi_q: float = 0.40
                ) -> tuple[np.ndarray, float, float]:
  """Standardised smooth noise fields on the 8 px grid, and the thresholds.

  Each field is drawn on a grid coarse enough for its correlation length
  (about 4 coarse cells per sigma), smoothed there and spline-upsampled:
  the same statistics as smoothing at full grid resolution, at a fraction of
  the cost for the long-range fields.
  """
  gh = (height + 2 * _PAD * _CELL) // _CELL + 3
  gw = (width + 2 * _PAD * _CELL) // _CELL + 3
  rng = _rng(seed, image_id, 1)
  fields = np.empty((len(_FIELD_UM), gh, gw), np.float32)
  for i, um in enumerate(_FIELD_UM):
    sigma = um / sp / _CELL
    r = max(1, int(sigma // 4))
    coarse = rng.standard_normal((gh // r + 4, gw // r + 4)).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma / r, mode="reflect")
    f = ndimage.zoom(coarse, r, order=3, mode="reflect")[:gh, :gw] if r > 1 \
        else coarse[:gh, :gw]
    f -= f.mean()
    f /= f.std() + 1e-6
    fields[i] = f
  # The quantiles set how much of the image is glass and how much stroma.
  lumen_thr = float(np.quantile(fields[_F_TISSUE], lumen_q))
  epi_thr = float(np.quantile(fields[_F_EPI], epi_q))
  return fields, lumen_thr, epi_thr


def _interp(fields: np.ndarray, ys: np.ndarray, width: int) -> np.ndarray:
  """Bilinear samples (F, len(ys), width) of the grid at rows ``ys``.

  Columns 0..width-1 sit at fixed fractions of the grid cells, so the x
  direction is a broadcast ``a + (b - a) * w`` with no gathers.
  """
  gy = ys.astype(np.float32) / _CELL + _PAD
  iy = np.floor(gy).astype(np.int64)
  fy = (gy - iy)[None, :, None]
  rows = fields[:, iy] * (1 - fy) + fields[:, iy + 1] * fy
  n = -(-width // _CELL)
  a = rows[:, :, _PAD:_PAD + n, None]
  d = rows[:, :, _PAD + 1:_PAD + n + 1, None] - a
  w = np.arange(_CELL, dtype=np.float32) / _CELL
  out = (a + d * w).reshape(len(fields), len(ys), n * _CELL)
  return out[:, :, :width]


def _interp_points(fields: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Bilinear samples (F, N) at scattered points."""
  gy = y.astype(np.float32) / _CELL + _PAD
  gx = x.astype(np.float32) / _CELL + _PAD
  iy, ix = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
  fy, fx = gy - iy, gx - ix
  return (fields[:, iy, ix] * (1 - fy) * (1 - fx)
          + fields[:, iy + 1, ix] * fy * (1 - fx)
          + fields[:, iy, ix + 1] * (1 - fy) * fx
          + fields[:, iy + 1, ix + 1] * fy * fx)


def _tissue(f_tissue, lumen_thr):
  return np.clip((f_tissue - lumen_thr) / 0.12, 0.0, 1.0)


def _epi(f_epi, epi_thr):
  return np.clip((f_epi - epi_thr) / 0.3, 0.0, 1.0)


def _hash_uniform(ys: np.ndarray, xs: np.ndarray, key: int) -> np.ndarray:
  """Uniform [0, 1) float32 noise that is a pure function of (y, x, key)."""
  with np.errstate(over="ignore"):
    y = (ys.astype(np.int64) + 65536).astype(np.uint32)[:, None]
    x = (xs.astype(np.int64) + 65536).astype(np.uint32)[None, :]
    h = (y * np.uint32(0x9E3779B1)) ^ (x * np.uint32(0x85EBCA77)) ^ np.uint32(
        key & 0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
  return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))
