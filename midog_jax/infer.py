"""Whole-image inference: overlapping tiles through a jitted, sharded step.

Any image size (7215x5412 and larger) is cut into ``tile_size`` tiles whose
origins step by ``tile_size - overlap``, the last row/column flush with the
far border. Tiles are read lazily (``slides.py``) one batch ahead of the
device, batched to a FIXED ``tile_batch`` (the last batch padded, so one
compiled program serves every image) and sharded over all devices on the
``data`` axis. Each tile's detector returns points in tile coordinates.

Merging across tile borders, in two steps that do not depend on the batch
size or the device count:
1. ownership: the overlap between neighbouring tiles is split at its middle,
   and a detection is kept only by the tile that owns its position (so each
   location is judged by the tile where it lies farthest from the border);
2. distance suppression: detections closer than ``merge_radius`` to a
   higher-scoring one are dropped (one figure seen by two tiles just either
   side of an ownership line).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Iterator

import jax
import numpy as np

from midog_jax import parallel
from midog_jax.data import slides as slides_lib
# The one distance suppression (also used by methods that do not tile).
from midog_jax.detections import Detections, suppress_by_distance  # noqa: F401
from midog_jax.detectors.interface import TileFn

# XLA options for the tile function on CPU. XLA:CPU hands convolutions to
# YNNPACK by default; on a 2-core AVX-512 Xeon the ResNet-50 RetinaNet took
# 188 s per 7215x5412 image that way (51% of a float32 matmul's FLOP/s) and
# 138 s with XLA's own (Eigen) convolutions (75-83%); compute alone, tile
# batches ran 1.4-1.6x faster (benchmarks/inference.py). Set to {} to keep
# XLA's defaults. Ignored on other platforms.
CPU_COMPILER_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def for_platform(tile_fn: TileFn) -> TileFn:
  """``tile_fn`` compiled with :data:`CPU_COMPILER_OPTIONS` when running on CPU.

  Re-wrapping the same function hits jit's cache, so calling this per image
  does not recompile.
  """
  # Only jitted JAX functions (they have ``lower``) are recompiled: a plain
  # callable, such as an eager reference detector in a benchmark, runs as given.
  if jax.default_backend() != "cpu" or not CPU_COMPILER_OPTIONS or not hasattr(tile_fn, "lower"):
    return tile_fn
  return jax.jit(tile_fn, compiler_options=dict(CPU_COMPILER_OPTIONS))


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """How whole images are tiled."""

  tile_size: int = 512
  overlap: int = 64
  tile_batch: int = 8
  merge_radius: float = 25.0
  score_thresh: float = 0.05
  # Extra pixels read on every side of each tile, for dense VALID networks
  # whose output shrinks by their receptive field (the P4 ResNet): the
  # tile_fn gets (tile_size + 2 * context)-px tiles, returns points in those
  # tiles' coordinates, and ``detect`` subtracts ``context``. Ownership and
  # the tile grid are those of the unpadded tiles. Set from the detector's
  # ``tile_context``.
  context: int = 0

  @classmethod
  def from_config(cls, cfg, context: int = 0) -> "TileConfig":
    """From ``config.eval``; ``context`` is the detector's ``tile_context``."""
    return cls(tile_size=cfg.tile_size, overlap=cfg.tile_overlap,
               tile_batch=cfg.tile_batch, merge_radius=cfg.merge_radius_px,
               score_thresh=cfg.score_thresh, context=int(context))


def tile_origins(length: int, tile: int, overlap: int) -> np.ndarray:
  """Tile starts along one axis; the last one flush with the far border.

  An image shorter than a tile gets one tile at 0 (padded by the reader).
  """
  if overlap >= tile:
    raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
  return slides_lib.grid_origins(length, tile, tile - overlap)


def _ownership_bounds(origins: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
  """[lo, hi) owned by each tile: overlaps split at their middle."""
  mids = (origins[1:] + origins[:-1] + tile) / 2.0
  lo = np.concatenate([[-np.inf], mids])
  hi = np.concatenate([mids, [np.inf]])
  return lo, hi


class _Tiles:
  """Tile grid of one image and a batched, read-ahead iterator over it."""

  def __init__(self, read: Callable[[int, int, int, int], np.ndarray],
               width: int, height: int, cfg: TileConfig):
    self.read, self.cfg = read, cfg
    self.xs = tile_origins(width, cfg.tile_size, cfg.overlap)
    self.ys = tile_origins(height, cfg.tile_size, cfg.overlap)
    self.grid = [(iy, ix) for iy in range(len(self.ys)) for ix in range(len(self.xs))]

  def _load(self, start: int) -> np.ndarray:
    c, b = self.cfg.context, self.cfg.tile_batch
    t = self.cfg.tile_size + 2 * c
    batch = np.full((b, t, t, 3), 255, np.uint8)  # padding tiles are blank
    for k, (iy, ix) in enumerate(self.grid[start:start + b]):
      batch[k] = self.read(int(self.xs[ix]) - c, int(self.ys[iy]) - c, t, t)
    return batch

  def batches(self) -> Iterator[tuple[int, np.ndarray]]:
    starts = range(0, len(self.grid), self.cfg.tile_batch)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = None
      for s in starts:
        nxt = pool.submit(self._load, s)
        if pending is not None:
          yield pending[0], pending[1].result()
        pending = (s, nxt)
      if pending is not None:
        yield pending[0], pending[1].result()


def image_reader(source) -> tuple[int, int, Callable[[int, int, int, int], np.ndarray]]:
  """(width, height, read(x, y, w, h)) of a whole image, white beyond its border.

  ``source``: an (H, W, 3) uint8 array, a ``slides.Slide`` (or anything with
  its ``width``, ``height`` and ``read``, such as ``tta.View``), or a path.
  """
  if isinstance(source, np.ndarray):
    h, w = source.shape[:2]

    def read(x, y, tw, th):
      out = np.full((th, tw, 3), 255, np.uint8)
      xs, ys, xe, ye = max(x, 0), max(y, 0), min(x + tw, w), min(y + th, h)
      if xe > xs and ye > ys:
        out[ys - y:ye - y, xs - x:xe - x] = source[ys:ye, xs:xe]
      return out

    return w, h, read
  slide = source if hasattr(source, "read") else slides_lib.Slide(source)
  return slide.width, slide.height, slide.read


def detect(source, tile_fn: TileFn, variables, cfg: TileConfig, mesh=None) -> Detections:
  """Detections on one whole image.

  Args:
    source: a ``slides.Slide`` (or an object with its ``width``, ``height``
      and ``read``), a path, or an (H, W, 3) uint8 array.
    tile_fn: jitted per-tile detector (see ``TileFn``); it receives the
      variables and uint8 tiles and does its own normalisation.
    variables: the model's weights, passed to every ``tile_fn`` call
      (replicated on ``mesh``; see ``evaluation.make_tiler``).
    cfg: tiling settings.
    mesh: device mesh (default: this process's devices, ``local_mesh``).
  """
  w, h, read = image_reader(source)
  mesh = mesh if mesh is not None else parallel.local_mesh()
  n_dev = mesh.devices.size
  if cfg.tile_batch % n_dev:
    raise ValueError(f"tile_batch {cfg.tile_batch} must be a multiple of the "
                     f"{n_dev} devices")
  tiles = _Tiles(read, w, h, cfg)
  lo_x, hi_x = _ownership_bounds(tiles.xs, cfg.tile_size)
  lo_y, hi_y = _ownership_bounds(tiles.ys, cfg.tile_size)
  sharding = parallel.data_sharding(mesh)
  run = for_platform(tile_fn)
  all_xy, all_s, all_c = [], [], []

  def merge(start, out):
    pts, sc, cl, valid = jax.device_get(out)
    for k, (iy, ix) in enumerate(tiles.grid[start:start + cfg.tile_batch]):
      v = valid[k] & (sc[k] >= cfg.score_thresh)
      p = pts[k][v] + np.asarray([tiles.xs[ix] - cfg.context,
                                  tiles.ys[iy] - cfg.context], np.float32)
      # Inside the image: between the first and the last pixel's centres,
      # [0, W - 1], a set that every flip and rotation of the image maps
      # onto itself (so the P4 method's rotation-exact maps stay exact) and
      # that never gives a negative coordinate.
      own = ((p[:, 0] >= lo_x[ix]) & (p[:, 0] < hi_x[ix]) &
             (p[:, 1] >= lo_y[iy]) & (p[:, 1] < hi_y[iy]) &
             (p[:, 0] >= 0) & (p[:, 0] <= w - 1) & (p[:, 1] >= 0) & (p[:, 1] <= h - 1))
      all_xy.append(p[own])
      all_s.append(sc[k][v][own])
      all_c.append(cl[k][v][own])

  # Batch k+1 is dispatched (asynchronously) before batch k is fetched and
  # merged, so the device never waits for the host's merge; the reader thread
  # meanwhile decodes batch k+2.
  pending = None
  for start, batch in tiles.batches():
    out = run(variables, jax.device_put(batch, sharding))
    if pending is not None:
      merge(*pending)
    pending = (start, out)
  if pending is not None:
    merge(*pending)
  xy = np.concatenate(all_xy) if all_xy else np.zeros((0, 2), np.float32)
  s = np.concatenate(all_s) if all_s else np.zeros((0,), np.float32)
  c = np.concatenate(all_c) if all_c else np.zeros((0,), np.int32)
  keep = suppress_by_distance(xy, s, cfg.merge_radius)
  return Detections(xy[keep], s[keep], c[keep])
