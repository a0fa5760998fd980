"""Synthetic MIDOG 2021-format data: H&E tissue rendered through Beer-Lambert.

No pixels of the real release can be downloaded here, so this module writes a
data set in EXACTLY the real layout (``MIDOG.json`` + ``NNN.tiff``) that every
code path can run on::

  python -m midog_jax.data.synthetic --out DIR --preset small --seed 0

Layout of ``DIR``:
  * ``MIDOG.json``: the real file's keys (info, licenses, images, categories,
    annotations); ``bbox`` is ``[x1, y1, x2, y2]``, 50x50 px around the cell;
    category 1 = "mitotic figure", 2 = "not mitotic figure" (imposter).
  * ``NNN.tiff``: RGB uint8, tiled 256x256, JPEG (quality, chroma subsampling
    and JPEG colour space differ per scanner), X/YResolution in pixels per
    centimetre (``1e4 / spacing_um``) with ResolutionUnit CENTIMETER.
  * ``MIDOG_unlabeled_truth.json``: the same format, listing only the images of
    the unlabeled domain (Leica GT450, ids 151..) with their true labels; in
    ``MIDOG.json`` those images have no annotations, as in the real release.
  * ``synthetic.json``: manifest {preset, seed, n_images, ids, scale,
    generator_version}, written LAST: its presence marks a complete data set.

Domains follow the MIDOG 2021 id ranges (``midog.MIDOG21_SCANNERS``): ids 1..
Hamamatsu XR (0.23 um/px), 51.. Hamamatsu S360 (0.23), 101.. Aperio CS2
(0.25), 151.. Leica GT450 (0.25, unlabeled). They differ in stain vectors,
stain density, white point, blur, noise and JPEG settings.

Presets:
  * ``tiny``: 4 domains x 2 images (ids 1,2,51,52,101,102,151,152) of about
    512x512 px, 3-5 mitoses each (tests; a few seconds).
  * ``small``: 4 domains x 10 images (ids 1-10, 51-60, 101-110, 151-160) of
    about 1200x1200 px, 8-15 mitoses each (the demo).
  * ``midog21``: the 200 images of the shipped real ``MIDOG.json`` at their
    real sizes, with figures at the REAL annotation positions (ids and boxes
    copied); the GT450 images get random figures written to the truth file.
    Found via ``$MIDOG_SHARED_DATA`` (folder or file) or
    ``<repo>/../shared/data/midog/MIDOG.json``.
Every preset has about 1.6 imposters per mitotic figure.

Content: stroma (wavy eosin fibres), tumour epithelium (pink cytoplasm, dense
nuclei), lumina (white), normal nuclei (6-10 um, pale to medium chromatin with
texture and nucleoli; ~10% darker), spindle fibroblasts, MITOTIC FIGURES
(prophase: granular clumped chromatin; metaphase: dark "hairy" plate;
anaphase: two parallel hairy bars; telophase: two separated irregular masses;
all with a clear cytoplasm halo) and IMPOSTERS that are as dark
(apoptotic/pyknotic: smooth round, often fragmented, hypereosinophilic
cytoplasm; lymphocytes: small dark round; hyperchromatic large nuclei: dark
but smooth). Sizes are in microns, converted with each scanner's spacing.
What separates the classes is morphology (spiky granular chromatin and a
clear halo versus smooth round dark blobs), so blue-ratio thresholding fails
but a small CNN can learn it.

Determinism: every random stream is seeded from ``(seed, image_id, purpose)``
and every pre-blur pixel is a pure function of its coordinates, so output does
not depend on ``workers`` or on the band size; the same preset and seed give
byte-identical JSON and identical pixels.

Memory: images are rendered in 256-row bands (plus a blur margin) and streamed
to tifffile's tile iterator, so a 7215x5412 image needs a few hundred MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tifffile
from scipy import ndimage
from scipy.spatial import cKDTree

from midog_jax.data import midog
from midog_jax.errors import DataError

GENERATOR_VERSION = "2"
PRESETS = ("tiny", "small", "midog21")
MANIFEST = "synthetic.json"
TRUTH = "MIDOG_unlabeled_truth.json"
TILE = 256
BOX = 50  # bbox side in px, as in the real release
MIN_SEP_PX = 60  # minimum distance between random figure centres
IMPOSTERS_PER_MITOSIS = 1.6

MITOSIS_KINDS = ("prophase", "metaphase", "anaphase", "telophase")
MITOSIS_P = (0.25, 0.35, 0.2, 0.2)
IMPOSTER_KINDS = ("apoptotic", "lymphocyte", "hyperchromatic")
IMPOSTER_P = (0.4, 0.3, 0.3)


@dataclasses.dataclass(frozen=True)
class Domain:
  """Rendering parameters of one synthetic scanner."""

  name: str
  first_id: int
  spacing_um: float
  labeled: bool
  h_vec: tuple[float, float, float]  # OD direction of hematoxylin
  e_vec: tuple[float, float, float]  # OD direction of eosin
  h_scale: float  # stain density multipliers
  e_scale: float
  white: tuple[float, float, float]  # RGB of empty glass
  blur_px: float  # Gaussian PSF sigma
  noise: float  # sensor noise std (intensity units)
  jpeg_quality: int
  jpeg_mode: str  # "ycbcr420", "ycbcr444" or "rgb" (JPEG colour space)


DOMAINS = (
    Domain("Hamamatsu XR", 1, 0.23, True, (0.60, 0.73, 0.33), (0.14, 0.88, 0.45),
           1.00, 1.00, (242, 240, 246), 0.8, 2.0, 90, "ycbcr444"),
    Domain("Hamamatsu S360", 51, 0.23, True, (0.54, 0.76, 0.37),
           (0.10, 0.92, 0.38), 0.90, 1.10, (248, 246, 247), 0.6, 1.5, 85, "ycbcr420"),
    Domain("Aperio CS2", 101, 0.25, True, (0.66, 0.70, 0.27), (0.20, 0.84, 0.50),
           1.15, 0.90, (236, 233, 228), 1.0, 2.5, 70, "rgb"),
    Domain("Leica GT450", 151, 0.25, False, (0.57, 0.76, 0.31),
           (0.07, 0.95, 0.31), 0.85, 1.20, (251, 250, 252), 0.55, 1.2, 80, "ycbcr420"),
)


def domain_of(image_id: int) -> Domain:
  """The synthetic scanner of an image id (MIDOG 2021 id ranges)."""
  for d in reversed(DOMAINS):
    if image_id >= d.first_id:
      return d
  raise ValueError(f"image id {image_id} is below 1")


# ----------------------------------------------------------------------------
# Planning: image sizes and figure positions (cheap; done in the parent).


@dataclasses.dataclass(frozen=True)
class Figure:
  """One annotated cell: centre in px, category (1/2) and morphology kind."""

  x: int
  y: int
  category: int
  kind: str
  bbox: tuple | None = None  # real box (midog21); None -> 50x50 around (x, y)
  ann_id: int | None = None  # real annotation id (midog21)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything needed to render one image, fixed before rendering."""

  seed: int
  image_id: int
  width: int
  height: int
  figures: tuple[Figure, ...]


def _rng(seed: int, image_id: int, *purpose: int) -> np.random.Generator:
  return np.random.default_rng([seed, image_id, *purpose])


def _random_figures(rng: np.random.Generator, seed: int, image_id: int,
                    width: int, height: int, n_mit: int, n_imp: int
                    ) -> list[tuple[int, int, int]]:
  """Centres at least MIN_SEP_PX apart and 40 px from the border.

  Figures go where the image's own fields put tumour epithelium (as in real
  tissue); a figure that finds no room there after many tries goes anywhere.
  """
  fields, lumen_thr, epi_thr = _raw_fields(seed, image_id, width, height,
                                           domain_of(image_id).spacing_um)
  pts: list[tuple[int, int, int]] = []
  cats = [midog.MITOSIS] * n_mit + [midog.IMPOSTER] * n_imp
  cats = [cats[i] for i in rng.permutation(len(cats))]
  for cat in cats:
    xy = np.stack([rng.integers(40, width - 40, 400),
                   rng.integers(40, height - 40, 400)], 1)
    f = _interp_points(fields, xy[:, 0], xy[:, 1])
    good = (_tissue(f[_F_TISSUE], lumen_thr) > 0.99) & (
        _epi(f[_F_EPI], epi_thr) > 0.8)
    xy = np.concatenate([xy[good], xy[~good]])  # preferred ones first
    if pts:
      d2 = ((xy[:, None, :] - np.asarray(pts)[None, :, :2]) ** 2).sum(-1).min(1)
      xy = xy[d2 >= MIN_SEP_PX ** 2]
    if len(xy):
      pts.append((int(xy[0, 0]), int(xy[0, 1]), cat))
  return pts


def _kind(rng: np.random.Generator, category: int) -> str:
  if category == midog.MITOSIS:
    return MITOSIS_KINDS[int(rng.choice(len(MITOSIS_KINDS), p=MITOSIS_P))]
  return IMPOSTER_KINDS[int(rng.choice(len(IMPOSTER_KINDS), p=IMPOSTER_P))]


def _n_imposters(rng: np.random.Generator, n_mit: int) -> int:
  return max(1, int(round(IMPOSTERS_PER_MITOSIS * n_mit + rng.normal(0, 1))))


def preset_ids(preset: str, real: dict | None = None) -> list[int]:
  """All image ids of a preset, ascending."""
  if preset == "tiny":
    return [d.first_id + i for d in DOMAINS for i in range(2)]
  if preset == "small":
    return [d.first_id + i for d in DOMAINS for i in range(10)]
  if preset == "midog21":
    return sorted(im["id"] for im in real["images"])
  raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")


def plan_image(preset: str, seed: int, image_id: int, real: dict | None = None,
               scale: float = 1.0) -> Plan:
  """Size and figures of one image (deterministic in preset, seed, id)."""
  rng = _rng(seed, image_id, 0)
  figures: list[Figure] = []
  if preset in ("tiny", "small"):
    base, n_lo, n_hi = (512, 3, 5) if preset == "tiny" else (1200, 8, 15)
    width = base + int(rng.integers(-32, 33))
    height = base + int(rng.integers(-32, 33))
    n_mit = int(rng.integers(n_lo, n_hi + 1))
    for x, y, cat in _random_figures(rng, seed, image_id, width, height, n_mit,
                                     _n_imposters(rng, n_mit)):
      figures.append(Figure(x, y, cat, _kind(rng, cat)))
    return Plan(seed, image_id, width, height, tuple(figures))
  if preset != "midog21":
    raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
  im = next(i for i in real["images"] if i["id"] == image_id)
  width = max(64, int(round(im["width"] * scale)))
  height = max(64, int(round(im["height"] * scale)))
  anns = [a for a in real["annotations"] if a["image_id"] == image_id]
  if anns:
    for a in anns:
      x1, y1, x2, y2 = (float(v) * scale for v in a["bbox"])
      cx = min(max(int(round((x1 + x2) / 2)), 0), width - 1)
      cy = min(max(int(round((y1 + y2) / 2)), 0), height - 1)
      box = tuple(a["bbox"]) if scale == 1.0 else None
      figures.append(Figure(cx, cy, a["category_id"],
                            _kind(rng, a["category_id"]), box, a["id"]))
  elif not domain_of(image_id).labeled:
    # The real GT450 cases have no labels: random figures at the real
    # labelled images' average density (11.5 mitoses, 18 imposters).
    n_mit = max(1, int(rng.poisson(11.5 * scale ** 2)))
    for x, y, cat in _random_figures(rng, seed, image_id, width, height, n_mit,
                                     _n_imposters(rng, n_mit)):
      figures.append(Figure(x, y, cat, _kind(rng, cat)))
  return Plan(seed, image_id, width, height, tuple(figures))


# ----------------------------------------------------------------------------
# Smooth random fields, sampled on an 8 px grid and interpolated per band.

_CELL = 8
_PAD = 8  # grid nodes before pixel 0 (room for margins and edge cells)
# Field index -> correlation length in microns.
_F_TISSUE, _F_EPI, _F_EDENS, _F_WARP1, _F_WARP2, _F_MIX, _F_HBG, _F_PATCH = range(8)
_FIELD_UM = (40.0, 60.0, 15.0, 12.0, 12.0, 25.0, 20.0, 3.0)
# Derived maps, computed on the grid and interpolated per band (cheaper than
# interpolating the raw fields and combining them at full resolution).
_G_EPI, _G_STROMA, _G_HBG, _G_PHASE1, _G_PHASE2, _G_MIX, _G_PATCH = range(7)


@dataclasses.dataclass
class Layout:
  """Per-image rendering state (fields, stains, stamps)."""

  plan: Plan
  domain: Domain
  fields: np.ndarray  # (F, gh, gw) float32, standardised
  maps: np.ndarray  # (7, gh, gw) float32 derived maps (_G_*)
  lumen_thr: float
  epi_thr: float
  h_vec: np.ndarray
  e_vec: np.ndarray
  h_scale: float
  e_scale: float
  fibre_angles: tuple[float, float]
  fibre_period_px: float
  stamps: list  # (cx, cy, template (3, P, P))
  stamp_y0: np.ndarray  # first row of each stamp, sorted ascending
  stamp_y1: np.ndarray


def _raw_fields(seed: int, image_id: int, width: int, height: int,
                sp: float) -> tuple[np.ndarray, float, float]:
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
  lumen_thr = float(np.quantile(fields[_F_TISSUE], 0.12))
  epi_thr = float(np.quantile(fields[_F_EPI], 0.40))
  return fields, lumen_thr, epi_thr


def _make_fields(plan: Plan, dom: Domain, ctr: np.ndarray) -> tuple[np.ndarray,
                                                                    float, float]:
  fields, lumen_thr, epi_thr = _raw_fields(plan.seed, plan.image_id, plan.width,
                                           plan.height, dom.spacing_um)
  _, gh, gw = fields.shape
  if len(ctr):
    # Figures sit in tissue, in epithelium (real positions may fall anywhere
    # in our random fields): lift both fields under a broad smooth bump around
    # each figure, so it ends up inside a tumour nest with its own nuclei.
    gy, gx = np.mgrid[0:gh, 0:gw]
    pos = np.stack([(gx.ravel() - _PAD) * _CELL, (gy.ravel() - _PAD) * _CELL], 1)
    sig = 25.0 / dom.spacing_um
    d, _ = cKDTree(ctr).query(pos, distance_upper_bound=4 * sig)
    bump = np.exp(-0.5 * (np.minimum(d, 4 * sig) / sig) ** 2).reshape(gh, gw)
    bump = bump.astype(np.float32)
    np.maximum(fields[_F_TISSUE], lumen_thr - 0.6 + 1.6 * bump,
               out=fields[_F_TISSUE])
    np.maximum(fields[_F_EPI], epi_thr - 0.6 + 1.5 * bump, out=fields[_F_EPI])
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


# ----------------------------------------------------------------------------
# Cell templates: (3, P, P) float32 = (hematoxylin add, eosin multiplier,
# eosin add), drawn in micron coordinates.


def _grid(radius_um: float, sp: float) -> tuple[np.ndarray, np.ndarray]:
  c = int(math.ceil(radius_um / sp))
  yy, xx = np.mgrid[-c:c + 1, -c:c + 1].astype(np.float32)
  return xx * sp, yy * sp


def _sigmoid(z):
  return 0.5 * (1.0 + np.tanh(0.5 * np.clip(z, -30, 30)))


def _ellipse(X, Y, cx, cy, a, b, theta, rng=None, wobble=0.0, edge=0.25):
  """Soft mask of a (wobbly) ellipse; ``edge`` is the edge width in um."""
  c, s = math.cos(theta), math.sin(theta)
  u = (X - cx) * c + (Y - cy) * s
  v = -(X - cx) * s + (Y - cy) * c
  r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
  if wobble and rng is not None:
    phi = np.arctan2(v / b, u / a)
    pert = np.ones_like(r)
    for k in (2, 3, 4, 5):
      pert += wobble * rng.normal() / k ** 0.5 * np.cos(k * phi + rng.uniform(0, 6.3))
    r = r / pert
  return _sigmoid((1.0 - r) * math.sqrt(a * b) / edge)


def _strokes(X, Y, p0: np.ndarray, p1: np.ndarray, width: float) -> np.ndarray:
  """Max over K line segments p0->p1 (K, 2) of a Gaussian cross-section."""
  if len(p0) == 0:
    return np.zeros_like(X)
  d = (p1 - p0).astype(np.float32)
  l2 = np.maximum((d ** 2).sum(1), 1e-6)
  out = np.zeros_like(X)
  for k in range(0, len(p0), 16):  # chunks bound the (K, P, P) temporaries
    sl = slice(k, k + 16)
    px = X[None] - p0[sl, 0, None, None]
    py = Y[None] - p0[sl, 1, None, None]
    t = np.clip((px * d[sl, 0, None, None] + py * d[sl, 1, None, None])
                / l2[sl, None, None], 0, 1)
    dist2 = (px - t * d[sl, 0, None, None]) ** 2 + (py - t * d[sl, 1, None, None]) ** 2
    np.maximum(out, np.exp(-dist2 / (2 * width ** 2)).max(0), out=out)
  return out


def _texture(rng, shape, sigma_px):
  n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px)
  return n / (n.std() + 1e-6)


def _chromosomes(rng, centres: np.ndarray, angles: np.ndarray, lo: float,
                 hi: float, spread: float) -> tuple[np.ndarray, np.ndarray]:
  """V-shaped chromosomes: two arms from each centromere (segments p0 -> p1)."""
  k = len(centres)
  a1 = angles + rng.normal(0, spread, k)
  a2 = angles + np.pi + rng.normal(0, spread, k)
  l1, l2 = rng.uniform(lo, hi, k), rng.uniform(lo, hi, k)
  p0 = np.concatenate([centres, centres])
  ang = np.concatenate([a1, a2])
  ln = np.concatenate([l1, l2])
  p1 = p0 + np.stack([np.cos(ang) * ln, np.sin(ang) * ln], 1)
  return p0.astype(np.float32), p1.astype(np.float32)


def _pack(dh, emul, eadd=None) -> np.ndarray:
  if eadd is None:
    eadd = np.zeros_like(dh)
  return np.stack([dh, emul, eadd]).astype(np.float32)


def normal_nucleus(rng, sp: float, dark: bool = False,
                   fibroblast: bool = False) -> np.ndarray:
  """Interphase nucleus: pale-to-medium chromatin, texture, rim, nucleoli."""
  X, Y = _grid(7.5, sp)
  theta = rng.uniform(0, np.pi)
  if fibroblast:
    a, b = rng.uniform(4.5, 7.0), rng.uniform(0.9, 1.4)
    base = rng.uniform(0.7, 1.0)
  else:
    a = rng.uniform(3.0, 5.0)
    b = a * rng.uniform(0.65, 0.95)
    base = rng.uniform(1.0, 1.4) if dark else rng.uniform(0.42, 0.8)
  m = _ellipse(X, Y, 0, 0, a, b, theta, rng, wobble=0.04, edge=0.3)
  tex = _texture(rng, X.shape, 0.35 / sp)
  inner = _ellipse(X, Y, 0, 0, max(a - 0.6, 0.3), max(b - 0.6, 0.3), theta)
  dens = base * (1 + 0.22 * tex) + 0.25 * base * (m - inner)  # darker membrane
  if not fibroblast:
    for _ in range(int(rng.integers(1, 3))):
      r = math.sqrt(rng.uniform(0, 1)) * 0.5 * b
      ang = rng.uniform(0, 2 * np.pi)
      nx, ny = r * math.cos(ang), r * math.sin(ang)
      dens += 0.45 * np.exp(-((X - nx) ** 2 + (Y - ny) ** 2) / (2 * 0.35 ** 2))
  return _pack(m * np.maximum(dens, 0), 1 - 0.55 * m)


def mitotic_figure(rng, sp: float, kind: str) -> np.ndarray:
  """A mitosis of the given phase, with a clear cytoplasm halo."""
  X, Y = _grid(11.0, sp)
  theta = rng.uniform(0, np.pi)
  perp = theta + np.pi / 2  # plate axis = theta; spindle axis = perp
  peak = rng.uniform(1.6, 2.6)
  w = rng.uniform(0.22, 0.3)  # chromosome arm half-width (sigma, um)
  ct, st, cp, spp = math.cos(theta), math.sin(theta), math.cos(perp), math.sin(perp)
  if kind == "prophase":
    r = rng.uniform(3.8, 5.0)
    body = _ellipse(X, Y, 0, 0, r, r * rng.uniform(0.8, 1.0), theta, rng, 0.08)
    k = int(rng.integers(35, 55))
    rad, ang = r * 0.9 * np.sqrt(rng.uniform(0, 1, k)), rng.uniform(0, 2 * np.pi, k)
    cen = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    p0, p1 = _chromosomes(rng, cen, rng.uniform(0, 2 * np.pi, k), 0.5, 1.2, 0.9)
    chrom = np.maximum(_strokes(X, Y, p0, p1, w), 0.35 * body)
    halo = _ellipse(X, Y, 0, 0, r + rng.uniform(2.0, 3.5), r + rng.uniform(2.0, 3.5),
                    theta, rng, 0.05, edge=0.5)
  elif kind == "metaphase":
    lp, th = rng.uniform(7.0, 10.0), rng.uniform(1.2, 2.0)
    k = int(rng.integers(25, 40))
    u, v = rng.uniform(-lp / 2, lp / 2, k), rng.normal(0, th / 4, k)
    cen = np.stack([u * ct - v * st, u * st + v * ct], 1)
    p0, p1 = _chromosomes(rng, cen, np.full(k, perp), 0.8, 2.0, 0.4)
    core = _ellipse(X, Y, 0, 0, lp / 2, th / 2, theta, rng, 0.05)
    chrom = np.maximum(_strokes(X, Y, p0, p1, w), 0.85 * core)
    halo = _ellipse(X, Y, 0, 0, lp / 2 + rng.uniform(2.0, 3.0),
                    th / 2 + rng.uniform(3.0, 4.5), theta, rng, 0.05, edge=0.5)
  elif kind == "anaphase":
    sep, lp = rng.uniform(3.5, 6.0), rng.uniform(6.0, 9.0)
    chrom = np.zeros_like(X)
    for side in (-1, 1):
      ox, oy = side * sep / 2 * cp, side * sep / 2 * spp
      k = int(rng.integers(15, 25))
      u, v = rng.uniform(-lp / 2, lp / 2, k), rng.normal(0, 0.25, k)
      cen = np.stack([ox + u * ct - v * st, oy + u * st + v * ct], 1)
      p0, p1 = _chromosomes(rng, cen, np.full(k, perp), 0.6, 1.6, 0.45)
      core = _ellipse(X, Y, ox, oy, lp / 2, rng.uniform(0.5, 0.8), theta, rng, 0.05)
      chrom = np.maximum(chrom, np.maximum(_strokes(X, Y, p0, p1, w), 0.85 * core))
    halo = _ellipse(X, Y, 0, 0, sep / 2 + rng.uniform(3.5, 4.5),
                    lp / 2 + rng.uniform(2.0, 3.0), perp, rng, 0.05, edge=0.5)
  elif kind == "telophase":
    sep = rng.uniform(7.0, 9.5)
    chrom, halo = np.zeros_like(X), np.zeros_like(X)
    for side in (-1, 1):
      ox, oy = side * sep / 2 * cp, side * sep / 2 * spp
      a, b = rng.uniform(2.2, 3.2), rng.uniform(1.2, 2.0)
      core = _ellipse(X, Y, ox, oy, a, b, theta, rng, 0.12)
      k = int(rng.integers(15, 22))
      u, v = rng.uniform(-a, a, k) * 0.9, rng.uniform(-b, b, k) * 0.8
      cen = np.stack([ox + u * ct - v * st, oy + u * st + v * ct], 1)
      p0, p1 = _chromosomes(rng, cen, rng.uniform(0, 2 * np.pi, k), 0.5, 1.2, 0.8)
      chrom = np.maximum(chrom, np.maximum(_strokes(X, Y, p0, p1, w), 0.75 * core))
      rh = rng.uniform(3.6, 4.6)
      halo = np.maximum(halo, _ellipse(X, Y, ox * 1.1, oy * 1.1, rh, rh, 0.0,
                                       rng, 0.05, edge=0.5))
  else:
    raise ValueError(f"unknown mitosis kind {kind!r}")
  # Granular chromatin: dark clumps and threads over a darker body.
  tex = _texture(rng, X.shape, 0.3 / sp)
  dh = peak * chrom * (1 + 0.12 * tex)
  emul = 1 - rng.uniform(0.45, 0.9) * halo
  return _pack(np.maximum(dh, 0), emul)


def imposter(rng, sp: float, kind: str) -> np.ndarray:
  """A mitosis look-alike: as dark, but smooth and round."""
  X, Y = _grid(9.0, sp)
  if kind == "apoptotic":
    peak = rng.uniform(2.0, 2.6)
    if rng.uniform() < 0.5:
      r = rng.uniform(2.0, 3.2)
      ball = _ellipse(X, Y, 0, 0, r, r * rng.uniform(0.9, 1.0), rng.uniform(0, np.pi),
                      rng, 0.015, edge=0.18)
      dh = peak * ball * (1 - 0.12 * (X ** 2 + Y ** 2) / r ** 2)
    else:
      dh = np.zeros_like(X)
      for _ in range(int(rng.integers(2, 5))):
        r = rng.uniform(0.9, 1.8)
        rad, ang = rng.uniform(0.5, 2.6), rng.uniform(0, 2 * np.pi)
        ball = _ellipse(X, Y, rad * math.cos(ang), rad * math.sin(ang), r, r, 0.0,
                        edge=0.18)
        dh = np.maximum(dh, peak * ball)
    rc = rng.uniform(4.0, 5.5)
    cyto = _ellipse(X, Y, 0, 0, rc, rc * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi),
                    rng, 0.03, edge=0.3)
    ring = _ellipse(X, Y, 0, 0, rc + 1.1, rc + 1.1, 0.0, edge=0.3) - cyto
    return _pack(np.maximum(dh, 0), 1 - 0.7 * np.clip(ring, 0, 1),
                 rng.uniform(0.5, 0.9) * cyto)
  if kind == "lymphocyte":
    r = rng.uniform(2.2, 3.2)
    m = _ellipse(X, Y, 0, 0, r, r * rng.uniform(0.88, 1.0), rng.uniform(0, np.pi),
                 rng, 0.02, edge=0.22)
    tex = _texture(rng, X.shape, 0.6 / sp)
    dh = rng.uniform(1.8, 2.4) * m * (1 + 0.07 * tex)
    rim = _ellipse(X, Y, 0, 0, r + 0.7, r + 0.7, 0.0, edge=0.3)
    return _pack(np.maximum(dh, 0), 1 - 0.5 * rim)
  if kind == "hyperchromatic":
    a = rng.uniform(4.5, 6.5)
    b = a * rng.uniform(0.7, 0.95)
    theta = rng.uniform(0, np.pi)
    m = _ellipse(X, Y, 0, 0, a, b, theta, rng, 0.025, edge=0.25)
    tex = _texture(rng, X.shape, 0.5 / sp)
    dh = rng.uniform(1.6, 2.2) * m * (1 + 0.07 * tex)
    nx, ny = rng.uniform(-1, 1, 2) * 0.3 * b
    dh += 0.4 * m * np.exp(-((X - nx) ** 2 + (Y - ny) ** 2) / (2 * 0.45 ** 2))
    return _pack(np.maximum(dh, 0), 1 - 0.6 * m)
  raise ValueError(f"unknown imposter kind {kind!r}")


def figure_template(rng, sp: float, fig: Figure) -> np.ndarray:
  """Template of an annotated figure (mitosis or imposter)."""
  if fig.category == midog.MITOSIS:
    return mitotic_figure(rng, sp, fig.kind)
  return imposter(rng, sp, fig.kind)


# ----------------------------------------------------------------------------
# Layout: fields, stains, nuclei placement.


def build_layout(plan: Plan) -> Layout:
  """Fields, stain parameters and all cell stamps of one image."""
  dom = domain_of(plan.image_id)
  sp = dom.spacing_um
  ctr = np.array([(f.x, f.y) for f in plan.figures], np.float64).reshape(-1, 2)
  fields, lumen_thr, epi_thr = _make_fields(plan, dom, ctr)

  srng = _rng(plan.seed, plan.image_id, 5)
  h_vec = np.asarray(dom.h_vec) + srng.normal(0, 0.02, 3)
  e_vec = np.asarray(dom.e_vec) + srng.normal(0, 0.02, 3)
  h_vec = np.abs(h_vec) / np.linalg.norm(h_vec)
  e_vec = np.abs(e_vec) / np.linalg.norm(e_vec)
  h_scale = dom.h_scale * srng.uniform(0.92, 1.08)
  e_scale = dom.e_scale * srng.uniform(0.92, 1.08)
  a1 = srng.uniform(0, np.pi)
  angles = (a1, a1 + srng.uniform(0.6, 1.2))
  period = srng.uniform(2.2, 3.0) / sp

  # Normal nuclei on a jittered grid, thinned by tissue type, kept clear of
  # the figures so that each annotated cell stands on its own.
  nrng = _rng(plan.seed, plan.image_id, 3)
  g = 10.5 / sp
  gy, gx = np.mgrid[-0.5:plan.height / g + 0.5, -0.5:plan.width / g + 0.5]
  px = (gx.ravel() + nrng.uniform(-0.3, 0.3, gx.size)) * g
  py = (gy.ravel() + nrng.uniform(-0.3, 0.3, gy.size)) * g
  f = _interp_points(fields, px, py)
  t = _tissue(f[_F_TISSUE], lumen_thr)
  e = _epi(f[_F_EPI], epi_thr)
  keep_p = t * (0.92 * e + 0.22 * (1 - e))
  keep = nrng.uniform(0, 1, px.size) < keep_p
  if len(ctr):
    d, _ = cKDTree(ctr).query(np.stack([px, py], 1))
    keep &= d > 8.5 / sp
  px, py, e = px[keep], py[keep], e[keep]
  is_fib = nrng.uniform(0, 1, px.size) > e
  is_dark = (~is_fib) & (nrng.uniform(0, 1, px.size) < 0.12)

  trng = _rng(plan.seed, plan.image_id, 4)
  n_t = 24
  bank = {
      "epi": [normal_nucleus(trng, sp) for _ in range(2 * n_t)],
      "dark": [normal_nucleus(trng, sp, dark=True) for _ in range(n_t // 2)],
      "fib": [normal_nucleus(trng, sp, fibroblast=True) for _ in range(n_t)],
  }
  stamps = []
  choice = nrng.integers(0, 1 << 30, px.size)
  orient = nrng.integers(0, 8, px.size)
  for i in range(px.size):
    key = "fib" if is_fib[i] else "dark" if is_dark[i] else "epi"
    tpl = bank[key][choice[i] % len(bank[key])]
    tpl = np.rot90(tpl, orient[i] % 4, axes=(1, 2))
    if orient[i] >= 4:
      tpl = tpl[:, :, ::-1]
    stamps.append((int(round(px[i])), int(round(py[i])), tpl))
  for j, fig in enumerate(plan.figures):
    frng = _rng(plan.seed, plan.image_id, 6, j)
    stamps.append((fig.x, fig.y, figure_template(frng, sp, fig)))
  # Sorted by first row, so a band finds its stamps with one binary search.
  stamps.sort(key=lambda s: s[1] - s[2].shape[1] // 2)
  y0 = np.array([cy - s.shape[1] // 2 for _, cy, s in stamps], np.int64)
  y1 = np.array([cy + s.shape[1] // 2 + 1 for _, cy, s in stamps], np.int64)
  t = _tissue(fields[_F_TISSUE], lumen_thr)
  e = _epi(fields[_F_EPI], epi_thr)
  dens = 1 + 0.12 * fields[_F_EDENS]
  maps = np.stack([
      t * e * dens,  # weight of epithelial cytoplasm eosin
      t * (1 - e) * dens,  # weight of stroma eosin
      t * (0.06 + 0.02 * fields[_F_HBG] + 0.04 * e),  # background hematoxylin
      10.0 * fields[_F_WARP1],  # fibre phase warps (radians)
      10.0 * fields[_F_WARP2],
      _sigmoid(2.0 * fields[_F_MIX]),  # blend of the two fibre families
      np.clip(0.65 + 0.5 * fields[_F_PATCH], 0.1, 1.2),  # bundles fade in/out
  ]).astype(np.float32)
  return Layout(plan, dom, fields, maps, lumen_thr, epi_thr, h_vec.astype(np.float32),
                e_vec.astype(np.float32), h_scale, e_scale, angles, period, stamps,
                y0, y1)


def _stamp(h, emul, eadd, ya: int, cx: int, cy: int, tpl: np.ndarray) -> None:
  p = tpl.shape[1]
  c = p // 2
  ty, tx = cy - c - ya, cx - c
  sy0, sy1 = max(0, -ty), min(p, h.shape[0] - ty)
  sx0, sx1 = max(0, -tx), min(p, h.shape[1] - tx)
  if sy0 >= sy1 or sx0 >= sx1:
    return
  dst = (slice(ty + sy0, ty + sy1), slice(tx + sx0, tx + sx1))
  src = (slice(sy0, sy1), slice(sx0, sx1))
  h[dst] += tpl[0][src]
  np.minimum(emul[dst], tpl[1][src], out=emul[dst])
  eadd[dst] += tpl[2][src]


def render_band(lay: Layout, y0: int, y1: int) -> np.ndarray:
  """Rows [y0, y1) of the image as uint8 (y1 - y0, W, 3).

  Everything before the blur is a pure function of pixel coordinates, so
  bands rendered with a margin join without seams.
  """
  dom, plan = lay.domain, lay.plan
  width = plan.width
  m = int(math.ceil(4 * dom.blur_px)) + 1  # blur margin
  gm = 4  # margin of the grain filter
  ya, yb = y0 - m, y1 + m
  ys = np.arange(ya, yb)
  g = _interp(lay.maps, ys, width)
  key = (plan.seed * 1000003 + plan.image_id * 7919) & 0xFFFFFFFF
  grain = _hash_uniform(np.arange(ya - gm, yb + gm), np.arange(width), key)
  grain -= 0.5
  grain = ndimage.gaussian_filter(grain, 1.0, mode="nearest")[gm:-gm]
  grain *= np.float32(12.0)  # ~unit std after smoothing
  # Collagen: two families of wavy fibres (phase-warped cosines), blended.
  k = 2 * np.pi / lay.fibre_period_px
  xs = np.arange(width, dtype=np.float32)
  yf = ys.astype(np.float32)
  fibres = None
  for ang, gi in zip(lay.fibre_angles, (_G_PHASE1, _G_PHASE2)):
    ph = g[gi] + (xs * np.float32(k * math.cos(ang)))[None, :]
    ph += (yf * np.float32(k * math.sin(ang)))[:, None]
    np.cos(ph, out=ph)
    ph += 1.0
    ph *= ph  # (1 + cos)^2 / 4 up to scale: thin bright-dark fibres
    if fibres is None:
      fibres = ph * g[_G_MIX]
    else:
      fibres += ph * (1 - g[_G_MIX])
  fibres *= np.float32(0.25) * g[_G_PATCH]
  eo = fibres
  eo *= 0.45
  eo += 0.45
  eo *= 1 + 0.12 * grain
  eo *= g[_G_STROMA]
  eo += g[_G_EPI] * (0.5 + 0.03 * grain)
  he = g[_G_HBG] * (1 + 0.2 * grain)
  del g, grain
  emul = np.ones_like(he)
  eadd = np.zeros_like(he)
  tallest = int((lay.stamp_y1 - lay.stamp_y0).max(initial=0))
  lo = int(np.searchsorted(lay.stamp_y0, ya - tallest))
  for i in range(lo, len(lay.stamps)):
    if lay.stamp_y0[i] >= yb:
      break
    if lay.stamp_y1[i] <= ya:
      continue
    cx, cy, tpl = lay.stamps[i]
    _stamp(he, emul, eadd, ya, cx, cy, tpl)
  eo *= emul
  eo += eadd
  np.maximum(he, 0, out=he)
  np.maximum(eo, 0, out=eo)
  he *= np.float32(lay.h_scale)
  eo *= np.float32(lay.e_scale)
  od = he[..., None] * lay.h_vec
  od += eo[..., None] * lay.e_vec
  od += np.float32(0.01)
  np.negative(od, out=od)
  rgb = np.exp(od, out=od)
  rgb *= np.asarray(dom.white, np.float32)
  rgb = ndimage.gaussian_filter(rgb, (dom.blur_px, dom.blur_px, 0), mode="nearest")
  rgb = rgb[m:m + (y1 - y0)]
  nrng = _rng(plan.seed, plan.image_id, 7, y0)
  rgb += nrng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(dom.noise)
  np.rint(rgb, out=rgb)
  np.clip(rgb, 0, 255, out=rgb)
  return rgb.astype(np.uint8)


def render_image(plan: Plan) -> Iterator[np.ndarray]:
  """Yields 256-row bands of the whole image, top to bottom."""
  lay = build_layout(plan)
  for y0 in range(0, plan.height, TILE):
    yield render_band(lay, y0, min(plan.height, y0 + TILE))


def write_tiff(path: Path, plan: Plan) -> None:
  """Renders ``plan`` band by band into a tiled JPEG TIFF (atomic)."""
  dom = domain_of(plan.image_id)

  def tiles():
    for band in render_image(plan):
      for x0 in range(0, plan.width, TILE):
        yield band[:, x0:x0 + TILE]

  ppcm = 1e4 / dom.spacing_um
  # tifffile converts RGB input to the JPEG colour space itself; the three
  # modes vary chroma subsampling and colour space between scanners.
  cargs = {"level": dom.jpeg_quality}
  if dom.jpeg_mode == "rgb":
    cargs["outcolorspace"] = "RGB"
  sub = (1, 1) if dom.jpeg_mode == "ycbcr444" else (2, 2)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tifffile.imwrite(tmp, tiles(), shape=(plan.height, plan.width, 3),
                     dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
                     compressionargs=cargs, subsampling=sub,
                     photometric="rgb", resolution=(ppcm, ppcm),
                     resolutionunit="CENTIMETER", metadata=None)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


# ----------------------------------------------------------------------------
# Annotation files and the driver.


def shared_midog_json() -> Path:
  """The shipped real ``MIDOG.json`` (needed by the ``midog21`` preset)."""
  env = os.environ.get("MIDOG_SHARED_DATA")
  cands = []
  if env:
    p = Path(env)
    cands.append(p if p.suffix == ".json" else p / "MIDOG.json")
  repo = Path(__file__).resolve().parents[2]
  cands.append(repo.parent / "shared" / "data" / "midog" / "MIDOG.json")
  for p in cands:
    if p.is_file():
      return p
  raise DataError(cands[0], "the real MIDOG.json needed by preset 'midog21' was "
                  "not found (looked in " + ", ".join(map(str, cands))
                  + "); set MIDOG_SHARED_DATA to the folder holding it")


def _box(fig: Figure) -> list:
  if fig.bbox is not None:
    return list(fig.bbox)
  h = BOX // 2
  return [fig.x - h, fig.y - h, fig.x + h, fig.y + h]


def _annotation_files(plans: Sequence[Plan], preset: str, seed: int
                      ) -> tuple[dict, dict]:
  info = {"description": f"Synthetic MIDOG 2021-format data (midog_jax.data."
                         f"synthetic, preset {preset}, seed {seed})",
          "version": GENERATOR_VERSION, "year": 2021,
          "contributor": "midog_jax synthetic generator",
          "date_created": "synthetic"}
  licenses = [{"url": "", "id": 1, "name": "Synthetic data, no restrictions"}]
  cats = [{"id": midog.MITOSIS, "name": midog.CATEGORY_NAMES[midog.MITOSIS]},
          {"id": midog.IMPOSTER, "name": midog.CATEGORY_NAMES[midog.IMPOSTER]}]

  def image(p):
    return {"license": 1, "file_name": f"{p.image_id:03d}.tiff", "id": p.image_id,
            "width": p.width, "height": p.height}

  main = {"info": info, "licenses": licenses, "images": [], "categories": cats,
          "annotations": []}
  truth = {"info": dict(info, description=info["description"]
                        + " - labels of the unlabeled domain"),
           "licenses": licenses, "images": [], "categories": cats,
           "annotations": []}
  used = {f.ann_id for p in plans for f in p.figures if f.ann_id is not None}
  next_id = max(used, default=0) + 1
  held = []
  for p in plans:
    main["images"].append(image(p))
    if domain_of(p.image_id).labeled:
      for f in p.figures:
        if f.ann_id is None:
          ann_id, next_id = next_id, next_id + 1
        else:
          ann_id = f.ann_id
        main["annotations"].append({"bbox": _box(f), "category_id": f.category,
                                    "image_id": p.image_id, "id": ann_id})
    else:
      held.append(p)
  for p in held:  # ids continue after the main file's
    truth["images"].append(image(p))
    for f in p.figures:
      truth["annotations"].append({"bbox": _box(f), "category_id": f.category,
                                   "image_id": p.image_id, "id": next_id})
      next_id += 1
  return main, truth


def _write_json(path: Path, obj: dict) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _select(all_ids: list[int], ids: Sequence[int] | None, limit: int | None,
            preset: str) -> list[int]:
  if ids is not None:
    bad = sorted(set(ids) - set(all_ids))
    if bad:
      raise ValueError(f"image ids {bad} are not in preset {preset!r} (its ids: "
                       f"{all_ids[0]}..{all_ids[-1]}, {len(all_ids)} images)")
    return sorted(set(ids))
  if limit is not None:
    if limit < 1:
      raise ValueError(f"limit must be >= 1, got {limit}")
    # Round-robin over the domains so that a subset still has all of them.
    by_dom: dict[str, list[int]] = {}
    for i in all_ids:
      by_dom.setdefault(domain_of(i).name, []).append(i)
    queues = [list(v) for v in by_dom.values()]
    out = []
    while len(out) < min(limit, len(all_ids)):
      for q in queues:
        if q and len(out) < limit:
          out.append(q.pop(0))
    return sorted(out)
  return list(all_ids)


def _render_one(args: tuple[str, Plan]) -> tuple[int, float]:
  out_dir, plan = args
  t0 = time.perf_counter()
  write_tiff(Path(out_dir) / f"{plan.image_id:03d}.tiff", plan)
  return plan.image_id, time.perf_counter() - t0


def generate(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0,
             workers: int | None = None, ids: Sequence[int] | None = None,
             limit: int | None = None, scale: float = 1.0) -> Path:
  """Writes a synthetic MIDOG 2021-format data set; returns its MIDOG.json.

  Args:
    out_dir: folder to write (created if needed).
    preset: "tiny", "small" or "midog21" (see the module docstring).
    seed: random seed; same preset + seed -> identical output.
    workers: processes rendering images (spawn); default min(2, cpu_count).
    ids: generate only these image ids (must belong to the preset).
    limit: generate only the first N ids of a domain-balanced round-robin
      order (so a subset still spans all scanners).
    scale: shrinks the midog21 image sizes and annotation positions (a
      testing knob; physical cell sizes are unchanged). 1.0 for real use.
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
  if scale != 1.0 and preset != "midog21":
    raise ValueError("scale is only meaningful for preset 'midog21'")
  real, source = None, preset
  if preset == "midog21":
    source = shared_midog_json()
    try:
      real = json.loads(source.read_text())
      real["images"], real["annotations"]  # noqa: B018 (presence check)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
      raise DataError(source, f"not a MIDOG annotation file ({e!r})") from None
  chosen = _select(preset_ids(preset, real), ids, limit, preset)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # An old manifest would vouch for a half-rewritten folder: drop it first.
  (out / MANIFEST).unlink(missing_ok=True)
  plans = [plan_image(preset, seed, i, real, scale) for i in chosen]
  if workers is None:
    workers = min(2, os.cpu_count() or 1)
  jobs = [(str(out), p) for p in plans]
  # Largest images first keeps the pool busy until the end.
  jobs.sort(key=lambda j: -j[1].width * j[1].height)
  if workers <= 1 or len(jobs) <= 1:
    for j in jobs:
      _render_one(j)
  else:
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
      for _ in pool.imap_unordered(_render_one, jobs):
        pass
  main, truth = _annotation_files(plans, preset, seed)
  _write_json(out / "MIDOG.json", main)
  if truth["images"]:
    _write_json(out / TRUTH, truth)
  else:
    (out / TRUTH).unlink(missing_ok=True)
  _write_json(out / MANIFEST, {"preset": preset, "seed": seed,
                               "n_images": len(plans), "ids": chosen,
                               "scale": scale,
                               "generator_version": GENERATOR_VERSION})
  return out / "MIDOG.json"


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
  """The manifest of a COMPLETE data set in ``out_dir``, or None."""
  p = Path(out_dir) / MANIFEST
  try:
    return json.loads(p.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m midog_jax.data.synthetic",
      description="Write a synthetic data set in the MIDOG 2021 layout.")
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--preset", choices=PRESETS, default="tiny")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workers", type=int, default=None)
  g = ap.add_mutually_exclusive_group()
  g.add_argument("--ids", default=None, help="comma-separated image ids")
  g.add_argument("--limit", type=int, default=None,
                 help="first N images, round-robin over the domains")
  ap.add_argument("--scale", type=float, default=1.0,
                  help="midog21 only: shrink sizes/positions (testing)")
  a = ap.parse_args(argv)
  ids = None
  if a.ids:
    try:
      ids = [int(s) for s in a.ids.split(",") if s.strip()]
    except ValueError:
      ap.error(f"--ids must be comma-separated integers, got {a.ids!r}")
  t0 = time.perf_counter()
  try:
    path = generate(a.out, a.preset, a.seed, a.workers, ids, a.limit, a.scale)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  man = read_manifest(path.parent)
  print(json.dumps(dict(man, out=str(path.parent),
                        seconds=round(time.perf_counter() - t0, 2))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
