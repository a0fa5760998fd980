"""Whole-image inference: tiles or regions through a jitted, sharded step.

Two ways to cut an image (``TileConfig.mode``), one mechanism for both:

* ``"tiles"`` (the default): ``tile_size`` squares whose origins step by
  ``tile_size - overlap``, the last row/column flush with the far border,
  batched to a FIXED ``tile_batch`` (the last batch padded): ONE compiled
  program serves every image size. A 7215x5412 MIDOG image costs 50.3 Mpx of
  512 px tiles for its 39.0 Mpx (29% extra).
* ``"regions"``: a few large regions, all of one shape per image (see
  :func:`plan`): per axis the fewest regions whose side, rounded up to the
  detector's ``multiple``, keeps the region area within ``region_max_mpx``
  (the memory bound); neighbours overlap by ``overlap`` (more only where the
  rounding leaves slack), the last flush with the far border, and a region
  longer than the image is padded white by the reader. The 7215x5412 image is
  2 x 2 regions of 3648 x 2752 px (2.8% extra). Regions go one per device per
  step (a batch of the device count, so the result does not depend on it);
  one program is compiled per distinct image size.

Regions are big rectangular tiles: the reader, the ownership split and the
merge below are the same code for both. They equal tiles up to what a tile
border changes: a "same"-padded network sees its borders (the overlap keeps
them away from owned points, but not beyond the receptive field), and the
RetinaNet's GroupNorm heads normalise over the whole tile, so each of its
scores depends somewhat on the tile's size and content. A network without
such layers gives the same detections either way (tests/test_infer.py, with
the RetinaNet's heads cut to their predictors; the P4 ResNet's maps are exact
in both modes); for the RetinaNet, an F1-best threshold found in one mode is
only approximately the other's. Tiles are read lazily (``slides.py``)
one batch ahead of the device and sharded over all devices on the ``data``
axis. Each tile's detector returns points in tile coordinates.

Blank tiles (``skip_blank``): a tile or region is skipped, never sent to the
device, when NO pixel of its every-:data:`BLANK_STEP`-th-pixel grid is
stained, i.e. has an optical density (``data/stain.py``) above Macenko's
transparency threshold (0.15 in log10 units, ``stain.MACENKO_BETA``; a uint8
value <= 180) in any channel. Any stained object that covers a
``BLANK_STEP`` x ``BLANK_STEP`` square is therefore seen, whatever the
region's size (a fraction-of-area rule would drop a region holding one
figure); pale glass (all channels above 180) is blank. The decision is made on
the host from the pixels just read, and batches are formed from the
non-blank tiles only.

Merging across tile borders, in two steps that do not depend on the batch
size or the device count:
1. ownership: the overlap between neighbouring tiles is split at its middle,
   and a detection is kept only by the tile that owns its position (so each
   location is judged by the tile where it lies farthest from the border; a
   skipped tile's share has no detections);
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
from midog_jax.data import stain
# The one distance suppression (also used by methods that do not tile).
from midog_jax.detections import Detections, suppress_by_distance  # noqa: F401
from midog_jax.detectors.interface import TileFn

def for_platform(tile_fn: TileFn) -> TileFn:
  """``tile_fn`` compiled with ``parallel.compiler_options()`` (on CPU: XLA's own
  convolutions, ``parallel.CPU_COMPILER_OPTIONS``).

  Re-wrapping the same function hits jit's cache, so calling this per image
  does not recompile.
  """
  # Only jitted JAX functions (they have ``lower``) are recompiled: a plain
  # callable, such as an eager reference detector in a benchmark, runs as given.
  opts = parallel.compiler_options()
  if opts is None or not hasattr(tile_fn, "lower"):
    return tile_fn
  return jax.jit(tile_fn, compiler_options=opts)


MODES = ("tiles", "regions")
# The blank-tile rule (module docstring): every BLANK_STEP-th pixel of each
# row and column is looked at; a pixel is stained when one of its channels
# has an optical density above Macenko's threshold (uint8 value <= 180).
BLANK_STEP = 8


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """How whole images are cut (module docstring: tiles or regions)."""

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
  # "tiles" (tile_size squares, tile_batch at a time) or "regions" (a few
  # large regions of one shape per image, one per device per step).
  mode: str = "tiles"
  # Regions: the largest region area in Mpx (without context); bounds memory.
  region_max_mpx: float = 12.0
  # Regions: sides are rounded up to a multiple of this (the detector's
  # ``input_multiple``, e.g. the RetinaNet's stride 32).
  multiple: int = 1
  # Skip tiles/regions without tissue (module docstring), in either mode.
  skip_blank: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"inference mode must be one of {MODES}, got {self.mode!r}")
    if self.multiple < 1 or self.region_max_mpx <= 0:
      raise ValueError(f"multiple ({self.multiple}) and region_max_mpx "
                       f"({self.region_max_mpx}) must be positive")

  @classmethod
  def from_config(cls, cfg, context: int = 0, multiple: int = 1) -> "TileConfig":
    """From ``config.eval``; ``context``/``multiple``: the detector's
    ``tile_context`` and ``input_multiple``."""
    # .get: configs of workdirs saved before the region keys existed.
    return cls(tile_size=cfg.tile_size, overlap=cfg.tile_overlap,
               tile_batch=cfg.tile_batch, merge_radius=cfg.merge_radius_px,
               score_thresh=cfg.score_thresh, context=int(context),
               mode=str(cfg.get("inference", "tiles")),
               region_max_mpx=float(cfg.get("region_max_mpx", 12.0)),
               multiple=int(multiple), skip_blank=bool(cfg.get("skip_blank", False)))


def tile_origins(length: int, tile: int, overlap: int) -> np.ndarray:
  """Tile starts along one axis; the last one flush with the far border.

  An image shorter than a tile gets one tile at 0 (padded by the reader).
  """
  if overlap >= tile:
    raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
  return slides_lib.grid_origins(length, tile, tile - overlap)


def region_side(length: int, n: int, overlap: int, multiple: int) -> int:
  """Side of ``n`` regions covering ``length`` px with ``overlap``, rounded up
  to ``multiple``: ``roundup(ceil((length + (n - 1) * overlap) / n), multiple)``."""
  side = -(-(length + (n - 1) * overlap) // n)
  return -(-side // multiple) * multiple


def _region_origins(length: int, side: int, overlap: int) -> np.ndarray:
  """Region starts along one axis: ``tile_origins``, or one region at 0 when
  it covers the axis (whatever the overlap)."""
  return np.zeros(1, np.int64) if side >= length else tile_origins(length, side, overlap)


def _axis_sides(length: int, overlap: int, multiple: int) -> list[tuple[int, int]]:
  """(regions, side) along one axis, fewest regions first: each distinct
  ``region_side`` for n = 1, 2, ... (one region, or sides that still step
  forward: side > overlap), with the number of origins it really gives."""
  out = []
  for n in range(1, max(length, 1) + 1):
    side = region_side(length, n, overlap, multiple)
    if n > 1 and side <= overlap:
      break
    if not out or side < out[-1][1]:
      out.append((len(_region_origins(length, side, overlap)), side))
  return out


def plan(width: int, height: int, cfg: TileConfig) -> tuple[np.ndarray, np.ndarray, int, int]:
  """``(xs, ys, th, tw)``: tile origins along x and y and the tiles' shape.

  Tiles mode: ``tile_size`` squares. Regions mode: the fewest regions (then
  the fewest pixels) whose area ``th * tw`` is at most ``region_max_mpx``,
  per axis ``region_side`` of its count, origins by ``tile_origins``. A pure
  function of the sizes and the config (tested; ``pixels_processed``).
  """
  if cfg.mode == "tiles":
    t = cfg.tile_size
    return tile_origins(width, t, cfg.overlap), tile_origins(height, t, cfg.overlap), t, t
  max_px = cfg.region_max_mpx * 1e6
  along_y = _axis_sides(height, cfg.overlap, cfg.multiple)
  best = None
  for nx, tw in _axis_sides(width, cfg.overlap, cfg.multiple):
    if best is not None and nx > best[0][0]:
      break
    ny, th = next(((n, s) for n, s in along_y if s * tw <= max_px), (0, 0))
    if ny:
      key = (nx * ny, nx * ny * th * tw)
      if best is None or key < best[0]:
        best = (key, tw, th)
  if best is None:
    raise ValueError(f"no region of at most {cfg.region_max_mpx} Mpx covers a "
                     f"{width}x{height} image with overlap {cfg.overlap} and sides "
                     f"a multiple of {cfg.multiple}; raise eval.region_max_mpx")
  _, tw, th = best
  return (_region_origins(width, tw, cfg.overlap), _region_origins(height, th, cfg.overlap),
          th, tw)


def pixels_processed(width: int, height: int, cfg: TileConfig) -> int:
  """Pixels the network sees for one image (context included, nothing skipped).

  ``pixels_processed / (width * height) - 1`` is the extra-pixel fraction.
  """
  xs, ys, th, tw = plan(width, height, cfg)
  c = cfg.context
  return len(xs) * len(ys) * (th + 2 * c) * (tw + 2 * c)


def is_blank(tile: np.ndarray, step: int = BLANK_STEP) -> bool:
  """The blank-tile rule (module docstring) on one uint8 (H, W, 3) tile."""
  sub = tile[::step, ::step]
  return not bool((stain.rgb_to_od(sub) > stain.MACENKO_BETA).any())


def _ownership_bounds(origins: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
  """[lo, hi) owned by each tile: overlaps split at their middle."""
  mids = (origins[1:] + origins[:-1] + tile) / 2.0
  lo = np.concatenate([[-np.inf], mids])
  hi = np.concatenate([mids, [np.inf]])
  return lo, hi


class _Tiles:
  """Tile (or region) grid of one image and a batched, read-ahead iterator
  over its non-blank tiles."""

  def __init__(self, read: Callable[[int, int, int, int], np.ndarray],
               width: int, height: int, cfg: TileConfig, batch: int):
    self.read, self.cfg, self.batch = read, cfg, batch
    self.xs, self.ys, self.th, self.tw = plan(width, height, cfg)
    self.grid = [(iy, ix) for iy in range(len(self.ys)) for ix in range(len(self.xs))]
    self._cursor = 0

  def _next_batch(self) -> tuple[list[int], np.ndarray]:
    """The next ``batch`` non-blank tiles (grid indices, pixels); one caller
    at a time (the reader thread)."""
    c = self.cfg.context
    th, tw = self.th + 2 * c, self.tw + 2 * c
    out = np.full((self.batch, th, tw, 3), 255, np.uint8)  # padding tiles are blank
    idx: list[int] = []
    while len(idx) < self.batch and self._cursor < len(self.grid):
      g = self._cursor
      self._cursor += 1
      iy, ix = self.grid[g]
      tile = self.read(int(self.xs[ix]) - c, int(self.ys[iy]) - c, tw, th)
      if self.cfg.skip_blank and is_blank(tile):
        continue  # never sent to the device
      out[len(idx)] = tile
      idx.append(g)
    return idx, out

  def batches(self) -> Iterator[tuple[list[int], np.ndarray]]:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      nxt = pool.submit(self._next_batch)
      while True:
        idx, batch = nxt.result()
        if not idx:
          return
        nxt = pool.submit(self._next_batch)
        yield idx, batch


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
    cfg: tiling settings (tiles or regions, blank-tile skipping).
    mesh: device mesh (default: this process's devices, ``local_mesh``).
  """
  w, h, read = image_reader(source)
  mesh = mesh if mesh is not None else parallel.local_mesh()
  n_dev = mesh.devices.size
  if cfg.mode == "regions":
    batch = n_dev  # one region per device per step (module docstring)
  elif cfg.tile_batch % n_dev:
    raise ValueError(f"tile_batch {cfg.tile_batch} must be a multiple of the "
                     f"{n_dev} devices")
  else:
    batch = cfg.tile_batch
  tiles = _Tiles(read, w, h, cfg, batch)
  lo_x, hi_x = _ownership_bounds(tiles.xs, tiles.tw)
  lo_y, hi_y = _ownership_bounds(tiles.ys, tiles.th)
  sharding = parallel.data_sharding(mesh)
  run = for_platform(tile_fn)
  all_xy, all_s, all_c = [], [], []

  def merge(idx, out):
    pts, sc, cl, valid = jax.device_get(out)
    for k, g in enumerate(idx):
      iy, ix = tiles.grid[g]
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
  for idx, arr in tiles.batches():
    out = run(variables, jax.device_put(arr, sharding))
    if pending is not None:
      merge(*pending)
    pending = (idx, out)
  if pending is not None:
    merge(*pending)
  xy = np.concatenate(all_xy) if all_xy else np.zeros((0, 2), np.float32)
  s = np.concatenate(all_s) if all_s else np.zeros((0,), np.float32)
  c = np.concatenate(all_c) if all_c else np.zeros((0,), np.int32)
  keep = suppress_by_distance(xy, s, cfg.merge_radius)
  return Detections(xy[keep], s[keep], c[keep])
