"""Lazy, memory-bounded reads of windows from (tiled) TIFF images.

A :class:`Slide` wraps one TIFF file. Reading a window decodes only the tiles
(or strips) it touches, through a zarr view of the first page that tifffile
builds (``page.aszarr()``); neither zarr nor tifffile caches decoded chunks, so
memory is bounded by the window, not the image. Uncompressed single-strip files
(what ``tifffile.imwrite`` writes by default) are read as a row band straight
from the file instead, so a window never costs a whole-image read.

Every supported pixel layout comes out as RGB ``uint8`` ``(h, w, 3)``: RGB,
YCbCr-JPEG (tifffile converts), greyscale (``(H, W)`` or ``(H, W, 1)``, min-is-
black or min-is-white), palette, 8/16-bit (or fewer bits, scaled by the
``BitsPerSample`` range) and one alpha channel (composited onto white).
Anything else raises :class:`DataError` naming the file and what was found.

Process safety: open handles are never pickled (``__getstate__`` keeps only the
path and metadata) and are reopened lazily in the worker after pickling (grain
worker processes pickle the data source) or after ``os.fork`` (the opening pid
is remembered; a forked child must not share the parent's file offset).
:class:`SlideCache` / :func:`open_slide` keep at most a few slides open (LRU),
so open files and parsed headers do not grow with the number of images.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any

import numpy as np
import tifffile
import zarr

from midog_jax.data import tiff_meta
from midog_jax.data.tiff_meta import spacing_from_tags  # noqa: F401 (part of this API)
from midog_jax.errors import DataError

PAD_MODES = ("constant", "reflect")
DEFAULT_CACHE_SIZE = 8

_PH = tifffile.PHOTOMETRIC
_COLOUR_CHANNELS = {
    _PH.MINISBLACK: 1, _PH.MINISWHITE: 1, _PH.PALETTE: 1,
    _PH.RGB: 3, _PH.YCBCR: 3,
}
_ALPHA = {tifffile.EXTRASAMPLE.ASSOCALPHA: "assoc",
          tifffile.EXTRASAMPLE.UNASSALPHA: "unassoc"}
def grid_origins(length: int, patch_size: int, stride: int) -> np.ndarray:
  """Window origins along one axis of ``length`` pixels (the one tile grid).

  Origins ``0, stride, 2*stride, ...`` while the window fits, plus one window
  flush with the far border when the stride leaves pixels uncovered, so no
  window reaches past the image unless the image is smaller than one window
  (then one origin 0, and the reader pads). Used for whole-image inference
  tiles (``infer.tile_origins``) and the TFDS patch grids.
  """
  if stride < 1:
    raise ValueError(f"the stride must be positive, got {stride}")
  last = max(length - patch_size, 0)
  origins = np.arange(0, last + 1, stride, dtype=np.int64)
  if origins[-1] != last:
    origins = np.append(origins, last)
  return origins


def check_size(slide: Slide, width: int, height: int, source: str | os.PathLike) -> None:
  """Raises DataError if the image is not ``width`` x ``height`` as ``source`` says.

  ``source`` is the annotation file that gave the size; both files are named so
  a user can tell which one is stale.
  """
  if (slide.width, slide.height) != (int(width), int(height)):
    raise DataError(slide.path, f"image is {slide.width}x{slide.height} px but "
                    f"{os.fspath(source)} says {int(width)}x{int(height)}")


def _reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
  """Maps any integer positions into [0, n) like ``np.pad(mode='reflect')``.

  Reflection without repeating the edge pixel has period 2 (n - 1); folding by
  the period handles windows that reach past the image by more than its size.
  """
  if n == 1:
    return np.zeros_like(idx)
  period = 2 * (n - 1)
  idx = np.mod(idx, period)
  return np.where(idx >= n, period - idx, idx)


class _Layout:
  """How stored samples become RGB; plain data so it pickles with the Slide."""

  def __init__(self, path: str, page: tifffile.TiffPage):
    self.axes = page.axes
    self.dtype = page.dtype
    photometric = page.photometric
    found = (f"dtype {page.dtype}, shape {page.shape} ({page.axes}), photometric "
             f"{_name(photometric)}, {page.samplesperpixel} samples per pixel")
    if self.axes not in ("YX", "YXS", "SYX"):
      raise DataError(path, f"unsupported image layout: {found}")
    if page.dtype is None or page.dtype.kind != "u" or page.dtype.itemsize > 2:
      # bool = bilevel; floats and signed or 32-bit integers have no agreed
      # mapping to display RGB.
      raise DataError(path, f"unsupported pixel type (want 8/16-bit unsigned): {found}")
    if photometric not in _COLOUR_CHANNELS:
      raise DataError(path, f"unsupported photometric interpretation: {found}")
    if photometric == _PH.YCBCR and page.compression not in (
        tifffile.COMPRESSION.JPEG, tifffile.COMPRESSION.OJPEG):
      # tifffile converts YCbCr to RGB only inside the JPEG decoder.
      raise DataError(path, f"YCbCr is only supported with JPEG compression: {found}")
    samples = 1 if self.axes == "YX" else int(page.shape[self.axes.index("S")])
    self.samples = samples
    colour = _COLOUR_CHANNELS[photometric]
    extras = tuple(page.extrasamples)
    self.alpha = None
    if samples == colour + 1 and extras and extras[0] in _ALPHA:
      self.alpha = _ALPHA[extras[0]]
    elif not (samples == colour or (samples == 4 and colour == 3)):
      # Four RGB samples with an unspecified fourth are kept as RGB (the
      # fourth dropped): often "RGBX" padding, and not known to be opacity.
      raise DataError(path, f"unsupported number of channels ({samples}): {found}")
    self.photometric = int(photometric)
    self.colour = colour
    bits = int(page.bitspersample)
    self.maxval = (1 << bits) - 1
    self.lut = None
    if photometric == _PH.PALETTE:
      cmap = np.asarray(page.colormap)
      if cmap.ndim != 2 or cmap.shape[0] != 3:
        raise DataError(path, f"palette image without a usable colour map: {found}")
      # Colour maps are 16-bit per the spec, but some writers store 8-bit values.
      cmap = cmap >> 8 if cmap.max() > 255 else cmap
      self.lut = np.ascontiguousarray(cmap.T.astype(np.uint8))

  def white(self) -> int:
    """Stored value that renders white; fills tiles a sparse TIFF omits."""
    if self.photometric in (_PH.MINISWHITE, _PH.PALETTE):
      return 0
    return self.maxval

  def to_rgb(self, raw: np.ndarray) -> np.ndarray:
    """(h, w) or (h, w, S) stored samples -> (h, w, 3) uint8 RGB."""
    if raw.ndim == 2:
      raw = raw[..., None]
    if self.lut is not None:
      return self.lut[np.minimum(raw[..., 0], len(self.lut) - 1)]
    if raw.dtype != np.uint8 or self.maxval != 255:
      # Rounded linear rescale of the BitsPerSample range onto 0..255.
      wide = raw.astype(np.uint32)
      raw = ((wide * 255 + self.maxval // 2) // self.maxval).astype(np.uint8)
    rgb = raw[..., :self.colour]
    if self.photometric == _PH.MINISWHITE:
      rgb = 255 - rgb
    if self.alpha is not None:
      a = raw[..., self.colour:self.colour + 1].astype(np.uint16)
      c = rgb.astype(np.uint16)
      if self.alpha == "unassoc":
        rgb = ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
      else:  # premultiplied: colour already carries a, add white * (1 - a)
        rgb = np.minimum(c + (255 - a), 255).astype(np.uint8)
    if rgb.shape[-1] == 1:
      rgb = np.repeat(rgb, 3, axis=-1)
    return np.ascontiguousarray(rgb)


def _name(photometric: Any) -> str:
  try:
    return tifffile.PHOTOMETRIC(photometric).name
  except ValueError:
    return str(photometric)


class Slide:
  """One TIFF image read window by window; picklable, fork- and thread-safe.

  The constructor opens the file and validates its layout (raising DataError
  early); handles are dropped by :meth:`close` or pickling and reopened on the
  next read. Attributes ``path``, ``width``, ``height``, ``spacing_um``
  (microns per pixel from the resolution tags, or None) and ``page_index``
  (the page read: the largest, i.e. the full-resolution level of a pyramid or
  of a file with a thumbnail first) need no open handle.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._lock = threading.RLock()
    self._handles = None
    self._pid = None
    tif, page = self._open_tiff()
    try:
      self.width, self.height = int(page.imagewidth), int(page.imagelength)
      self.spacing_um = spacing_from_tags(page)
      self._layout = _Layout(self.path, page)
    except BaseException:
      tif.close()
      raise
    self._attach(tif, page)

  # --- handles ---------------------------------------------------------------

  def _open_tiff(self) -> tuple[tifffile.TiffFile, tifffile.TiffPage]:
    if not os.path.isfile(self.path):
      raise DataError(self.path, "image file not found")
    try:
      tif = tifffile.TiffFile(self.path)
    except Exception as e:  # tifffile raises many types for garbage headers
      raise DataError(self.path, f"not a readable TIFF file ({type(e).__name__}: {e})") from e
    try:
      page = tiff_meta.full_resolution_page(tif)
      if page is None or not page.shape or page.imagewidth < 1 or page.imagelength < 1:
        raise DataError(self.path, "TIFF file holds no image")
      self.page_index = int(page.index)
      return tif, page
    except DataError:
      tif.close()
      raise
    except Exception as e:
      tif.close()
      raise DataError(self.path, f"corrupt TIFF header ({type(e).__name__}: {e})") from e

  def _attach(self, tif: tifffile.TiffFile, page: tifffile.TiffPage) -> None:
    """Builds the read path for an open file and records the opening pid."""
    try:
      size = os.fstat(tif.filehandle.fileno()).st_size
      offsets = np.asarray(page.dataoffsets, np.int64)
      counts = np.asarray(page.databytecounts, np.int64)
      # Segments that end past the end of the file: a cut download or copy.
      # Found here (cheap) rather than trusting every decoder to notice.
      cut = (offsets > 0) & (counts > 0) & (offsets + counts > size)
      band = None
      if (page.compression == tifffile.COMPRESSION.NONE and page.is_contiguous
          and page.axes in ("YX", "YXS") and page.fillorder == 1 and page.predictor == 1
          and page.bitspersample == 8 * page.dtype.itemsize):
        # Uncompressed contiguous data: read a row band at a computed offset.
        band = (int(page.dataoffsets[0]), np.dtype(page.dtype).newbyteorder(tif.byteorder))
        arr, cut_tiles, chunk_yx = None, None, None
      else:
        store = page.aszarr(fillvalue=self._layout.white())
        arr = zarr.open_array(store, mode="r", zarr_format=2)
        chunked, chunks, axes = page.chunked, page.chunks, page.axes
        cut_grid = cut.reshape(chunked)
        if axes == "SYX":
          cut_grid = cut_grid.any(axis=0)
        elif axes == "YXS":
          cut_grid = cut_grid.any(axis=2)
        cut_tiles = cut_grid if cut.any() else None
        # page.chunks has no sample axis for planar (SYX) data.
        cy, cx = chunks[-2:] if axes == "SYX" else chunks[:2]
        chunk_yx = (int(cy), int(cx))
    except DataError:
      tif.close()
      raise
    except Exception as e:
      tif.close()
      raise DataError(self.path, f"corrupt TIFF image data layout ({type(e).__name__}: {e})") from e
    self._handles = dict(tif=tif, arr=arr, band=band, size=size, cut_tiles=cut_tiles,
                         chunk_yx=chunk_yx, truncated=bool(cut.any()))
    self._pid = os.getpid()

  def _ensure_open(self) -> dict:
    """Open handles for this process, reopening after pickle/fork/close."""
    if self._pid != os.getpid():
      # Forked child (or fresh unpickled copy): the inherited lock may be held
      # by a thread that does not exist here, and the inherited file
      # description shares its offset with the parent, so start afresh.
      self._lock = threading.RLock()
      self._drop()
    if self._handles is None:
      tif, page = self._open_tiff()
      if (int(page.imagewidth), int(page.imagelength)) != (self.width, self.height):
        tif.close()
        raise DataError(self.path, "file changed since it was opened: now "
                        f"{page.imagewidth}x{page.imagelength}, was {self.width}x{self.height}")
      self._attach(tif, page)
    return self._handles

  def _drop(self) -> None:
    handles, self._handles, self._pid = self._handles, None, None
    if handles is not None:
      try:
        handles["tif"].close()
      except Exception:  # closing a handle we are abandoning must not raise
        pass

  @property
  def is_open(self) -> bool:
    """Whether this process holds an open file handle for the slide."""
    return self._handles is not None and self._pid == os.getpid()

  @property
  def truncated(self) -> bool:
    """Whether some tile or strip ends past the end of the file (opens it)."""
    with self._lock:
      return self._ensure_open()["truncated"]

  def close(self) -> None:
    """Releases the file handle; a later read reopens it."""
    if self._pid != os.getpid():
      self._lock = threading.RLock()
    with self._lock:
      self._drop()

  def __enter__(self) -> Slide:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    if getattr(self, "_handles", None) is not None and self._pid == os.getpid():
      self._drop()

  def __getstate__(self) -> dict:
    # Only the path and metadata travel; handles are reopened in the worker.
    state = self.__dict__.copy()
    state.update(_handles=None, _pid=None, _lock=None)
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.RLock()

  def __repr__(self) -> str:
    return (f"Slide({self.path!r}, {self.width}x{self.height}, "
            f"spacing_um={self.spacing_um}, page={self.page_index})")

  @property
  def shape(self) -> tuple[int, int, int]:
    """(height, width, 3) of the RGB image."""
    return (self.height, self.width, 3)

  # --- reads -----------------------------------------------------------------

  def read(self, x: int, y: int, w: int, h: int, pad: str = "constant",
           pad_value: int = 255) -> np.ndarray:
    """The window with top-left (x, y) and size w x h as uint8 (h, w, 3) RGB.

    The window may reach past any border, or lie wholly outside the image; the
    outside is ``pad_value`` (white by default) for ``pad="constant"``, or the
    image mirrored without repeating the edge (``np.pad`` "reflect") for
    ``pad="reflect"``. Only the tiles the window touches are decoded.
    """
    x, y, w, h = int(x), int(y), int(w), int(h)
    if w < 0 or h < 0:
      raise ValueError(f"window size must be non-negative, got {w}x{h}")
    if pad not in PAD_MODES:
      raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")
    if pad == "constant":
      out = np.full((h, w, 3), pad_value, np.uint8)
      x0, x1 = max(x, 0), min(x + w, self.width)
      y0, y1 = max(y, 0), min(y + h, self.height)
      if x1 > x0 and y1 > y0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read_inside(x0, y0, x1, y1)
      return out
    if w == 0 or h == 0:
      return np.zeros((h, w, 3), np.uint8)
    xs = _reflect_index(np.arange(x, x + w), self.width)
    ys = _reflect_index(np.arange(y, y + h), self.height)
    x0, y0 = int(xs.min()), int(ys.min())
    block = self._read_inside(x0, y0, int(xs.max()) + 1, int(ys.max()) + 1)
    return np.ascontiguousarray(block[(ys - y0)[:, None], (xs - x0)[None, :]])

  def read_all(self) -> np.ndarray:
    """The whole image as uint8 (height, width, 3); meant for small images."""
    return self.read(0, 0, self.width, self.height)

  def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """RGB of [y0:y1, x0:x1], which must lie inside the image."""
    where = f"window x={x0}..{x1}, y={y0}..{y1}"
    with self._lock:
      handles = self._ensure_open()
      if handles["band"] is not None:
        raw = self._read_band(handles, x0, y0, x1, y1, where)
      else:
        cut = handles["cut_tiles"]
        if cut is not None:
          cy, cx = handles["chunk_yx"]
          if cut[y0 // cy:(y1 - 1) // cy + 1, x0 // cx:(x1 - 1) // cx + 1].any():
            raise DataError(self.path, f"file is truncated: image data for {where} "
                            f"lies past the end of the file ({handles['size']} bytes)")
        axes = self._layout.axes
        try:
          if axes == "SYX":
            raw = np.moveaxis(np.asarray(handles["arr"][:, y0:y1, x0:x1]), 0, -1)
          else:
            raw = np.asarray(handles["arr"][y0:y1, x0:x1])
        except DataError:
          raise
        except Exception as e:  # decoder / IO errors of tifffile, imagecodecs, zarr
          raise DataError(self.path, f"cannot decode {where} "
                          f"({type(e).__name__}: {e})") from e
    return self._layout.to_rgb(raw)

  def _read_band(self, handles: dict, x0: int, y0: int, x1: int, y1: int,
                 where: str) -> np.ndarray:
    """Rows y0..y1 of contiguous uncompressed data, read at their file offset."""
    offset, dtype = handles["band"]
    samples = self._layout.samples
    row = self.width * samples * dtype.itemsize
    start, nbytes = offset + y0 * row, (y1 - y0) * row
    fh = handles["tif"].filehandle
    try:
      with fh.lock:
        fh.seek(start)
        data = fh.read(nbytes)
    except Exception as e:
      raise DataError(self.path, f"cannot read {where} ({type(e).__name__}: {e})") from e
    if len(data) != nbytes:
      raise DataError(self.path, f"file is truncated: image data for {where} "
                      f"lies past the end of the file ({handles['size']} bytes)")
    band = np.frombuffer(data, dtype).reshape(y1 - y0, self.width, samples)
    return band[:, x0:x1].astype(dtype.newbyteorder("="), copy=False)


class SlideCache:
  """A small LRU of open slides so open files stay bounded.

  ``get(path)`` returns the cached Slide (opening it if needed); opening one
  more than ``maxsize`` closes the least recently used. An evicted Slide still
  works (it reopens on read) but is no longer counted, so hold slides through
  the cache. Pickles as an empty cache of the same size (handles stay home).
  """

  def __init__(self, maxsize: int = DEFAULT_CACHE_SIZE):
    if maxsize < 1:
      raise ValueError(f"maxsize must be >= 1, got {maxsize}")
    self.maxsize = int(maxsize)
    self._slides: collections.OrderedDict[str, Slide] = collections.OrderedDict()
    self._lock = threading.Lock()
    self._pid = os.getpid()

  def _check_pid(self) -> None:
    if self._pid != os.getpid():  # forked: the parent's lock may be held
      self._lock = threading.Lock()
      self._pid = os.getpid()

  def get(self, path: str | os.PathLike) -> Slide:
    """The open Slide for ``path``; may close the least recently used one."""
    self._check_pid()
    key = os.path.abspath(os.fspath(path))
    with self._lock:
      slide = self._slides.get(key)
      if slide is not None:
        self._slides.move_to_end(key)
        return slide
    slide = Slide(path)  # opened outside the lock: parsing a header takes a while
    with self._lock:
      if key in self._slides:  # another thread won the race; keep its copy
        slide.close()
        self._slides.move_to_end(key)
        return self._slides[key]
      self._slides[key] = slide
      evicted = []
      while len(self._slides) > self.maxsize:
        evicted.append(self._slides.popitem(last=False)[1])
    for old in evicted:
      old.close()
    return slide

  def read(self, path: str | os.PathLike, x: int, y: int, w: int, h: int,
           pad: str = "constant", pad_value: int = 255) -> np.ndarray:
    """``get(path).read(...)``."""
    return self.get(path).read(x, y, w, h, pad=pad, pad_value=pad_value)

  def clear(self) -> None:
    """Closes and forgets every cached slide."""
    self._check_pid()
    with self._lock:
      slides, self._slides = list(self._slides.values()), collections.OrderedDict()
    for slide in slides:
      slide.close()

  close = clear

  def __len__(self) -> int:
    return len(self._slides)

  def __contains__(self, path: str | os.PathLike) -> bool:
    return os.path.abspath(os.fspath(path)) in self._slides

  def __getstate__(self) -> dict:
    return {"maxsize": self.maxsize}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["maxsize"])


_DEFAULT_CACHE = SlideCache()


def open_slide(path: str | os.PathLike) -> Slide:
  """The process-wide cached Slide for ``path`` (at most 8 kept open)."""
  return _DEFAULT_CACHE.get(path)
