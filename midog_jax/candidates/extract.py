"""Blue-ratio candidates, streamed tile by tile (Kondo's MIDOG 2021 candidate step).

The rule (Kondo, MIDOG 2021; blue ratio of Chang et al. 2012): per image, the
blue-ratio image (``data.stain.blue_ratio``) is thresholded at the IMAGE's mean
+ ``k_std`` (3) standard deviations (population std, strict ``>``); the
8-connected components of the mask are kept when their area is at least
``min_area_px`` (2) pixels and their bounding box is at most ``max_side_px``
(50) pixels wide and tall; a candidate is the centroid (mean pixel position,
pixel centres at integer coordinates) of a kept component.

Streaming, in memory bounded by ``tile_px`` (not by the image):

* Pass 1 reads full-width row bands of about ``tile_px**2`` pixels and keeps,
  per image ROW, the float64 sum and sum of squares of the blue ratio (each
  row summed whole, so the numbers do not depend on the band height); the
  mean and std come from the sums of those per-row arrays. The whole-image
  reference (:func:`find_candidates_whole`) computes them the same way, so
  both thresholds are bit-identical.
* Pass 2 labels windows: a core tile of ``tile_px`` plus a margin of 1 px on
  the top/left and ``max_side_px + 1`` px on the bottom/right (more when
  patches are cut). A labelled piece is COMPLETE when it has no pixel on a
  window edge that lies inside the image: then all its neighbours are in the
  window, so it is a whole component of the image. A component belongs to
  the one tile whose core holds its bounding box's top-left pixel. Every
  component that passes the size filter is complete in that tile (it spans
  at most ``max_side_px`` px right and down of a core pixel, inside the
  margin), so keeping complete, owned, small-enough pieces finds each kept
  component exactly once; an oversize component crossing a border is either
  complete somewhere and dropped by the filter, or never complete: it is
  never split into small kept pieces.

Output order: sorted by (y, x), which does not depend on ``tile_px``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

from midog_jax.data import sampling, slides, stain
from midog_jax.errors import DataError

_EIGHT = np.ones((3, 3), bool)  # 8-connectivity
# TIFF tile side of the project's images; pass-1 bands are rounded to it so a
# band decodes each TIFF tile once.
_BAND_ALIGN = 256


@dataclasses.dataclass(frozen=True)
class Settings:
  """Extraction settings (the seed's numbers are the defaults).

  Attributes:
    k_std: threshold = image mean + k_std * image std of the blue ratio.
    min_area_px: components smaller than this (in pixels) are dropped.
    max_side_px: components wider or taller than this are dropped.
    patch_size: side of the RGB patch centred on each candidate.
    tile_px: core tile side of the streamed pass (memory, not results: the
      output does not depend on it).
  """

  k_std: float = 3.0
  min_area_px: int = 2
  max_side_px: int = 50
  patch_size: int = 64
  tile_px: int = 2048

  def __post_init__(self):
    if not math.isfinite(self.k_std):
      raise ValueError(f"k_std must be finite, got {self.k_std}")
    for name in ("min_area_px", "max_side_px", "patch_size", "tile_px"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


class _ArraySource:
  """An in-memory RGB image with the read API of ``slides.Slide``."""

  def __init__(self, rgb: np.ndarray):
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
      raise ValueError(f"want an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    self.rgb = rgb
    self.height, self.width = rgb.shape[:2]

  def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
    out = np.full((h, w, 3), 255, np.uint8)  # white outside, as Slide.read
    x0, x1 = max(x, 0), min(x + w, self.width)
    y0, y1 = max(y, 0), min(y + h, self.height)
    if x1 > x0 and y1 > y0:
      out[y0 - y:y1 - y, x0 - x:x1 - x] = self.rgb[y0:y1, x0:x1]
    return out


class _Opened:
  """Context manager: a readable source for a path, Slide or array."""

  def __init__(self, source):
    self.source, self._own = source, None

  def __enter__(self):
    s = self.source
    if isinstance(s, (str, os.PathLike)):
      self._own = slides.Slide(s)
      return self._own
    if isinstance(s, slides.Slide):
      return s
    return _ArraySource(s)

  def __exit__(self, *exc):
    if self._own is not None:
      self._own.close()


# ----------------------------------------------------------------------------
# Pass 1: the threshold.


def _row_sums(br: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-row float64 sums of the blue ratio and of its square."""
  b = br.astype(np.float64)
  return b.sum(axis=1), np.square(b).sum(axis=1)


def _threshold(row_sum: np.ndarray, row_sq: np.ndarray, n: int, k_std: float) -> np.float64:
  mean = row_sum.sum() / n
  var = max(row_sq.sum() / n - mean * mean, 0.0)  # population variance
  return np.float64(mean + k_std * math.sqrt(var))


def _band_rows(width: int, tile_px: int) -> int:
  rows = max(1, tile_px * tile_px // max(width, 1))
  return rows - rows % _BAND_ALIGN if rows >= _BAND_ALIGN else rows


def image_threshold(src, settings: Settings) -> np.float64:
  """The image's blue-ratio threshold, from full-width bands (pass 1)."""
  h_img, w_img = src.height, src.width
  row_sum, row_sq = np.empty(h_img), np.empty(h_img)
  rows = _band_rows(w_img, settings.tile_px)
  for y0 in range(0, h_img, rows):
    h = min(rows, h_img - y0)
    row_sum[y0:y0 + h], row_sq[y0:y0 + h] = _row_sums(
        stain.blue_ratio(src.read(0, y0, w_img, h)))
  return _threshold(row_sum, row_sq, h_img * w_img, settings.k_std)


# ----------------------------------------------------------------------------
# Pass 2: components of one window.


def _window_components(mask: np.ndarray, wx0: int, wy0: int, open_sides: tuple,
                       core: tuple[int, int, int, int], settings: Settings
                       ) -> np.ndarray:
  """Centroids (n, 2) float64 (x, y), in image pixels, of the kept components
  of ``mask`` (a window with top-left (wx0, wy0)) that are complete and whose
  bounding-box top-left lies in ``core`` = (x0, y0, x1, y1)."""
  lab, n = ndimage.label(mask, structure=_EIGHT)
  if n == 0:
    return np.zeros((0, 2))
  ys, xs = np.nonzero(lab)
  ids = lab[ys, xs]
  area = np.bincount(ids, minlength=n + 1)[1:]
  # Integer coordinate sums are exact in float64, so a centroid is the same
  # number whichever window it is computed in.
  cx = np.bincount(ids, weights=xs + wx0, minlength=n + 1)[1:] / area
  cy = np.bincount(ids, weights=ys + wy0, minlength=n + 1)[1:] / area
  box = np.array([(s[0].start, s[0].stop, s[1].start, s[1].stop)
                  for s in ndimage.find_objects(lab)], np.int64).reshape(n, 4)
  by0, by1, bx0, bx1 = box.T
  wh, ww = mask.shape
  top, bottom, left, right = open_sides
  # With the margins of iter_tiles, ownership and the size filter already
  # reject incomplete pieces (one on the top/left edge starts outside the
  # core; one on the bottom/right edge is wider than max_side_px); checked
  # anyway so the rule does not hang on the margin arithmetic.
  complete = ~((top & (by0 == 0)) | (bottom & (by1 == wh))
               | (left & (bx0 == 0)) | (right & (bx1 == ww)))
  gx0, gy0 = bx0 + wx0, by0 + wy0
  owned = (gx0 >= core[0]) & (gx0 < core[2]) & (gy0 >= core[1]) & (gy0 < core[3])
  keep = (complete & owned & (area >= settings.min_area_px)
          & (by1 - by0 <= settings.max_side_px) & (bx1 - bx0 <= settings.max_side_px))
  return np.stack([cx[keep], cy[keep]], axis=1)


def _patch_origins(xy: np.ndarray, patch_size: int) -> np.ndarray:
  """Top-left (x, y) of the patch centred on each point (the project's rule,
  ``sampling.centred_request``: centre pixel ``patch_size // 2``)."""
  if len(xy) == 0:
    return np.zeros((0, 2), np.int64)
  return np.array([(r.x0, r.y0) for r in (
      sampling.centred_request(0, float(x), float(y), patch_size, "random")
      for x, y in xy)], np.int64)


def _cut(window: np.ndarray, wx0: int, wy0: int, origins: np.ndarray,
         patch_size: int) -> np.ndarray:
  out = np.empty((len(origins), patch_size, patch_size, 3), np.uint8)
  for i, (ox, oy) in enumerate(origins):
    out[i] = window[oy - wy0:oy - wy0 + patch_size, ox - wx0:ox - wx0 + patch_size]
  return out


def iter_tiles(src, settings: Settings, with_patches: bool = False
               ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
  """Pass 1, then pass 2 tile by tile: yields (centroids (n, 2) float64,
  patches (n, P, P, 3) uint8 or None) of each tile's owned candidates, tiles
  in raster order, candidates in label order within a tile."""
  thr = image_threshold(src, settings)
  w_img, h_img, t = src.width, src.height, settings.tile_px
  p = settings.patch_size
  # Left/top: 1 px shows whether a piece continues outside the core; right/
  # bottom: a kept component spans <= max_side_px - 1 px past a core pixel.
  lo, hi = 1, settings.max_side_px + 1
  if with_patches:
    # A centroid lies in its component's box, so its patch fits in these.
    lo, hi = max(lo, p // 2), hi + p - p // 2
  for cy0 in range(0, h_img, t):
    for cx0 in range(0, w_img, t):
      core = (cx0, cy0, min(cx0 + t, w_img), min(cy0 + t, h_img))
      wx0, wy0 = cx0 - lo, cy0 - lo
      ww, wh = core[2] - cx0 + lo + hi, core[3] - cy0 + lo + hi
      rgb = src.read(wx0, wy0, ww, wh)  # white outside the image
      mask = stain.blue_ratio(rgb) > thr
      # Outside the image is never foreground (whatever white scores).
      ix0, iy0 = max(0, -wx0), max(0, -wy0)
      ix1, iy1 = min(ww, w_img - wx0), min(wh, h_img - wy0)
      mask[:iy0], mask[iy1:], mask[:, :ix0], mask[:, ix1:] = False, False, False, False
      open_sides = (wy0 > 0, wy0 + wh < h_img, wx0 > 0, wx0 + ww < w_img)
      xy = _window_components(mask, wx0, wy0, open_sides, core, settings)
      patches = None
      if with_patches:
        patches = _cut(rgb, wx0, wy0, _patch_origins(xy, p), p)
      yield xy, patches


def yx_order(xy: np.ndarray) -> np.ndarray:
  """Indices sorting centres by (y, x) (stable), the candidates' order."""
  return np.lexsort((xy[:, 0], xy[:, 1])) if len(xy) else np.zeros(0, np.int64)


def find_candidates(source, settings: Settings = Settings()) -> np.ndarray:
  """Candidate centres (N, 2) float32 (x, y) in full-resolution pixels.

  ``source``: an image path, a ``data.slides.Slide`` or an (H, W, 3) uint8
  array. Streamed tile by tile (see the module docstring); sorted by (y, x).
  """
  with _Opened(source) as src:
    parts = [xy for xy, _ in iter_tiles(src, settings)]
  xy = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 2), np.float32)
  return xy[yx_order(xy)]


def find_candidates_whole(rgb: np.ndarray, settings: Settings = Settings()) -> np.ndarray:
  """The same candidates computed on the whole image at once (the reference
  definition the streamed :func:`find_candidates` must equal; small images)."""
  src = _ArraySource(rgb)
  br = stain.blue_ratio(src.rgb)
  row_sum, row_sq = _row_sums(br)
  thr = _threshold(row_sum, row_sq, br.size, settings.k_std)
  h, w = br.shape
  xy = _window_components(br > thr, 0, 0, (False,) * 4, (0, 0, w, h), settings)
  xy = xy.astype(np.float32)
  return xy[yx_order(xy)]


def candidates_and_patches(source, settings: Settings = Settings()
                           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Streams (centres (n, 2) float32, patches (n, P, P, 3) uint8) per tile,
  in tile order (NOT sorted: the caller sorts the centres it collects)."""
  with _Opened(source) as src:
    for xy, patches in iter_tiles(src, settings, with_patches=True):
      yield xy.astype(np.float32), patches


def patches_for(source, xy: np.ndarray, patch_size: int = 64,
                tile_px: int = 2048) -> np.ndarray:
  """Patches (N, P, P, 3) uint8 centred on arbitrary points (x, y) in pixels,
  white outside the image, in the order of ``xy``; reads one window per
  ``tile_px`` tile holding patch origins, not one per patch."""
  xy = np.asarray(xy, np.float64).reshape(-1, 2)
  out = np.empty((len(xy), patch_size, patch_size, 3), np.uint8)
  if len(xy) == 0:
    return out
  origins = _patch_origins(xy, patch_size)
  tile = origins // tile_px
  with _Opened(source) as src:
    for tx, ty in np.unique(tile, axis=0):
      sel = np.flatnonzero((tile[:, 0] == tx) & (tile[:, 1] == ty))
      wx0, wy0 = int(tx) * tile_px, int(ty) * tile_px
      window = src.read(wx0, wy0, tile_px + patch_size, tile_px + patch_size)
      out[sel] = _cut(window, wx0, wy0, origins[sel], patch_size)
  return out


def _call(fn_job: tuple) -> tuple[bool, object]:
  fn, job = fn_job
  try:
    return True, fn(job)
  except DataError as e:  # DataError does not survive pickling: send its fields
    return False, (e.path, e.problem)


def map_images(fn, jobs: Sequence, workers: int) -> list:
  """``[fn(job) for job in jobs]`` over ``workers`` spawned processes (safe
  when the caller has threads or JAX), results in the order of ``jobs``; a
  DataError in a worker is raised here, and stops the jobs not yet started."""
  if workers <= 1 or len(jobs) <= 1:
    return [fn(j) for j in jobs]
  ex = concurrent.futures.ProcessPoolExecutor(
      min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"))
  try:
    out = []
    for ok, r in ex.map(_call, [(fn, j) for j in jobs]):
      if not ok:
        raise DataError(*r)
      out.append(r)
    return out
  finally:
    ex.shutdown(wait=True, cancel_futures=True)


def _find_one(args: tuple) -> np.ndarray:
  return find_candidates(*args)


def find_candidates_many(sources: Sequence, settings: Settings = Settings(),
                         workers: int = 2) -> list[np.ndarray]:
  """:func:`find_candidates` of each source, in the order given, over
  ``workers`` processes (:func:`map_images`)."""
  return map_images(_find_one, [(s, settings) for s in sources], workers)
