"""Lazy slide reads against real tifffile-written TIFFs.

Every layout is checked against numpy slicing of the full array (np.pad for the
outside), so padding, strip/tile/planar handling and pixel conversions are all
compared with an independent reference.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import threading

import numpy as np
import pytest
import tifffile

from midog_jax.data import slides
from midog_jax.data.slides import Slide, SlideCache, check_size, open_slide, spacing_from_tags
from midog_jax.errors import DataError

H, W = 500, 600
# Windows (x, y, w, h): inside, across each border and corner, wholly outside
# on each side, larger than the image, degenerate.
WINDOWS = [
    (100, 70, 64, 50), (0, 0, W, H), (-20, 100, 64, 64), (W - 30, 100, 64, 64),
    (200, -25, 64, 64), (200, H - 10, 64, 64), (-9, -11, 40, 40), (W - 5, H - 7, 40, 40),
    (-100, 50, 60, 60), (W + 3, 50, 60, 60), (50, -200, 60, 60), (50, H + 40, 60, 60),
    (-50, -60, W + 120, H + 100), (130, 130, 1, 1), (10, 10, 0, 5),
]
MARGIN = 700  # np.pad margin that covers every window above


@pytest.fixture(scope="module")
def image() -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _write(path, data, **kw) -> str:
  tifffile.imwrite(path, data, **kw)
  return os.fspath(path)


def _expected(full: np.ndarray, window, pad: str, value: int = 255) -> np.ndarray:
  x, y, w, h = window
  widths = ((MARGIN, MARGIN), (MARGIN, MARGIN), (0, 0))
  if pad == "constant":
    padded = np.pad(full, widths, mode="constant", constant_values=value)
  else:
    padded = np.pad(full, widths, mode="reflect")
  return padded[MARGIN + y:MARGIN + y + h, MARGIN + x:MARGIN + x + w]


LOSSLESS_LAYOUTS = {
    "tiled_deflate": dict(tile=(128, 128), compression="deflate"),
    "tiled_raw": dict(tile=(128, 128)),
    "strips_deflate": dict(compression="deflate", rowsperstrip=64),
    "single_strip_raw": dict(),  # tifffile's default: one uncompressed strip
    "strips_raw_many": dict(rowsperstrip=32),
}


@pytest.mark.parametrize("layout", sorted(LOSSLESS_LAYOUTS))
def test_windows_match_numpy_slicing(tmp_path, image, layout):
  path = _write(tmp_path / f"{layout}.tif", image, photometric="rgb", **LOSSLESS_LAYOUTS[layout])
  with Slide(path) as slide:
    assert (slide.width, slide.height) == (W, H) and slide.shape == (H, W, 3)
    assert np.array_equal(slide.read_all(), image)
    for window in WINDOWS:
      for pad in ("constant", "reflect"):
        got = slide.read(*window, pad=pad)
        assert got.dtype == np.uint8 and got.shape == (window[3], window[2], 3)
        np.testing.assert_array_equal(got, _expected(image, window, pad), err_msg=f"{window} {pad}")
    got = slide.read(-30, -30, 60, 60, pad_value=7)
    np.testing.assert_array_equal(got, _expected(image, (-30, -30, 60, 60), "constant", 7))


def test_planar_separate_tiled(tmp_path, image):
  path = _write(tmp_path / "planar.tif", np.moveaxis(image, -1, 0), photometric="rgb",
                planarconfig="separate", tile=(64, 64), compression="deflate")
  slide = Slide(path)
  for window in WINDOWS[:8]:
    np.testing.assert_array_equal(slide.read(*window, pad="reflect"),
                                  _expected(image, window, "reflect"))


def test_jpeg_tiles_match_tifffile_decode(tmp_path, image):
  # JPEG is lossy, so the reference is tifffile's own full decode of the file.
  smooth = np.repeat(np.repeat(image[::8, ::8], 8, 0), 8, 1)[:H, :W]
  path = _write(tmp_path / "jpeg.tif", smooth, photometric="rgb", tile=(128, 128),
                compression="jpeg")
  full = tifffile.imread(path)
  slide = Slide(path)
  for window in WINDOWS:
    np.testing.assert_array_equal(slide.read(*window), _expected(full, window, "constant"))
  assert np.abs(slide.read_all().astype(int) - smooth).mean() < 10  # really is the image


def test_rgba_composited_onto_white(tmp_path, image):
  alpha = np.random.default_rng(1).integers(0, 256, (H, W, 1), dtype=np.uint8)
  alpha[:10] = 0  # fully transparent rows -> white
  alpha[-10:] = 255  # opaque rows -> the colour itself
  rgba = np.concatenate([image, alpha], axis=-1)
  a = alpha.astype(float) / 255
  want = np.round(image * a + 255 * (1 - a))
  for extra, want in (("unassalpha", want), ("assocalpha", np.minimum(image + 255.0 - alpha, 255))):
    path = _write(tmp_path / f"{extra}.tif", rgba, photometric="rgb", extrasamples=[extra],
                  tile=(128, 128), compression="deflate")
    got = Slide(path).read_all()
    assert np.abs(got.astype(float) - want).max() <= 1, extra
    assert (got[:10] == 255).all()
    if extra == "unassalpha":
      assert np.array_equal(got[-10:], image[-10:])


def test_grey_palette_uint16_conversions(tmp_path, image):
  grey = image[..., 1]
  rgb_grey = np.repeat(grey[..., None], 3, axis=-1)
  for name, data, kw in (("grey2d", grey, {}), ("grey3d", grey[..., None], {}),
                         ("grey_tiled", grey, dict(tile=(128, 128), compression="deflate"))):
    slide = Slide(_write(tmp_path / f"{name}.tif", data, photometric="minisblack", **kw))
    assert np.array_equal(slide.read_all(), rgb_grey), name
    np.testing.assert_array_equal(slide.read(-5, -5, 30, 30, pad="reflect"),
                                  _expected(rgb_grey, (-5, -5, 30, 30), "reflect"))
  white = Slide(_write(tmp_path / "miniswhite.tif", grey, photometric="miniswhite"))
  assert np.array_equal(white.read_all(), 255 - rgb_grey)

  u16 = image.astype(np.uint16) * 257  # exact 8-bit values in 16 bits
  slide = Slide(_write(tmp_path / "u16.tif", u16, photometric="rgb", tile=(128, 128)))
  assert np.array_equal(slide.read(10, 20, 100, 80), image[20:100, 10:110])
  ramp = np.random.default_rng(2).integers(0, 65536, (64, 64), dtype=np.uint16)
  got = Slide(_write(tmp_path / "ramp16.tif", ramp)).read_all()[..., 0]
  assert np.abs(got - np.round(ramp / 257.0)).max() <= 0.5

  cmap = np.random.default_rng(3).integers(0, 65536, (3, 256), dtype=np.uint16)
  slide = Slide(_write(tmp_path / "palette.tif", grey, photometric="palette", colormap=cmap))
  assert np.array_equal(slide.read_all(), (cmap >> 8).T.astype(np.uint8)[grey])


def test_spacing_from_resolution_tags(tmp_path, image):
  small = image[:32, :32]
  cm = _write(tmp_path / "cm.tif", small, resolution=(40000, 40000), resolutionunit="CENTIMETER")
  inch = _write(tmp_path / "inch.tif", small, resolution=(25400 / 0.23, 25400 / 0.23),
                resolutionunit="INCH")
  unitless = _write(tmp_path / "none.tif", small, resolution=(40000, 40000), resolutionunit="NONE")
  bare = _write(tmp_path / "bare.tif", small)
  assert Slide(cm).spacing_um == pytest.approx(0.25)
  assert Slide(inch).spacing_um == pytest.approx(0.23, rel=1e-6)
  assert Slide(unitless).spacing_um is None
  assert Slide(bare).spacing_um is None
  with tifffile.TiffFile(cm) as tif:
    assert spacing_from_tags(tif) == pytest.approx(0.25)
    assert spacing_from_tags(tif.pages.first) == pytest.approx(0.25)
  aperio = _write(tmp_path / "aperio.tif", small,
                  description="Aperio Image Library v12\n32x32 |AppMag = 40|MPP = 0.2499|x")
  assert Slide(aperio).spacing_um == pytest.approx(0.2499)


def test_pickle_drops_handles_and_reopens(tmp_path, image):
  path = _write(tmp_path / "p.tif", image, photometric="rgb", tile=(128, 128),
                compression="deflate", resolution=(40000, 40000), resolutionunit="CENTIMETER")
  slide = Slide(path)
  first = slide.read(37, 41, 300, 200, pad="reflect")
  blob = pickle.dumps(slide)
  assert len(blob) < 4096  # metadata only, no pixels or parsed file
  copy = pickle.loads(blob)
  assert not copy.is_open and slide.is_open
  assert (copy.width, copy.height, copy.spacing_um) == (W, H, pytest.approx(0.25))
  assert np.array_equal(copy.read(37, 41, 300, 200, pad="reflect"), first)
  assert copy.is_open
  slide.close()
  assert not slide.is_open
  assert np.array_equal(slide.read(37, 41, 300, 200, pad="reflect"), first)  # reopens


def test_spawned_worker_reads_the_same_pixels(tmp_path, image):
  path = _write(tmp_path / "spawn.tif", image, photometric="rgb", tile=(128, 128),
                compression="deflate")
  slide = Slide(path)
  want = slide.read(500, 400, 200, 150)
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
    got = pool.submit(slide.read, 500, 400, 200, 150).result(timeout=120)
  assert np.array_equal(got, want)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_reopens_its_own_handle(tmp_path, image):
  path = _write(tmp_path / "fork.tif", image, photometric="rgb", tile=(128, 128),
                compression="deflate")
  slide = Slide(path)
  want = slide.read(100, 100, 300, 300)
  parent_handles = slide._handles
  pid = os.fork()
  if pid == 0:  # child: exit code 0 iff it read the same pixels on a new handle
    ok = False
    try:
      ok = (np.array_equal(slide.read(100, 100, 300, 300), want)
            and slide._handles is not parent_handles and slide.is_open)
    finally:
      os._exit(0 if ok else 1)
  _, status = os.waitpid(pid, 0)
  assert os.waitstatus_to_exitcode(status) == 0
  assert slide._handles is parent_handles
  assert np.array_equal(slide.read(100, 100, 300, 300), want)  # parent handle intact


def test_threads_share_a_slide(tmp_path, image):
  path = _write(tmp_path / "threads.tif", image, photometric="rgb", tile=(64, 64),
                compression="deflate")
  slide = Slide(path)
  rng = np.random.default_rng(4)
  windows = [tuple(int(v) for v in rng.integers(-50, 550, 2)) + (96, 96) for _ in range(24)]
  results = [None] * len(windows)

  def work(i):
    results[i] = slide.read(*windows[i])

  threads = [threading.Thread(target=work, args=(i,)) for i in range(len(windows))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for window, got in zip(windows, results):
    np.testing.assert_array_equal(got, _expected(image, window, "constant"))


def _open_fds_under(folder) -> int:
  folder = os.fspath(folder)
  count = 0
  for fd in os.listdir("/proc/self/fd"):
    try:
      count += os.readlink(f"/proc/self/fd/{fd}").startswith(folder)
    except OSError:
      pass
  return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_lru_cache_bounds_open_files(tmp_path, image):
  paths = [_write(tmp_path / f"s{i}.tif", image[:64, :64] + i, tile=(32, 32)) for i in range(10)]
  cache = SlideCache(maxsize=8)
  opened = []
  for i, path in enumerate(paths):
    slide = cache.get(path)
    opened.append(slide)
    assert np.array_equal(slide.read(0, 0, 8, 8), image[:8, :8] + i)
  assert len(cache) == 8
  assert [s.is_open for s in opened] == [False] * 2 + [True] * 8
  assert _open_fds_under(tmp_path) == 8
  assert paths[0] not in cache and paths[9] in cache
  assert cache.get(paths[5]) is opened[5]  # a hit, which makes s5 most recent
  cache.get(paths[0])  # reopens s0 and evicts the least recent: s2
  assert not opened[2].is_open and opened[5].is_open and len(cache) == 8
  assert _open_fds_under(tmp_path) == 8
  copy = pickle.loads(pickle.dumps(cache))
  assert len(copy) == 0 and copy.maxsize == 8
  cache.clear()
  assert len(cache) == 0 and _open_fds_under(tmp_path) == 0
  assert open_slide(paths[3]) is open_slide(paths[3])
  slides._DEFAULT_CACHE.clear()


def test_check_size(tmp_path, image):
  slide = Slide(_write(tmp_path / "size.tif", image))
  check_size(slide, W, H, "MIDOG.json")
  with pytest.raises(DataError, match=r"size\.tif.*600x500.*MIDOG\.json says 7215x5412"):
    check_size(slide, 7215, 5412, "MIDOG.json")


def test_bad_files_raise_data_error_naming_the_file(tmp_path, image):
  with pytest.raises(DataError, match=r"missing\.tif: image file not found"):
    Slide(tmp_path / "missing.tif")

  garbage = tmp_path / "garbage.tif"
  garbage.write_bytes(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(DataError, match=r"garbage\.tif: not a readable TIFF"):
    Slide(garbage)

  cases = {
      "float32.tif": (image.astype(np.float32), dict(photometric="rgb"), "float32"),
      "two.tif": (image[..., :2], dict(photometric="minisblack", planarconfig="contig"),
                  r"channels \(2\)"),
      "five.tif": (np.concatenate([image, image[..., :2]], -1), dict(photometric="rgb"),
                   r"channels \(5\)"),
      "int16.tif": (image.astype(np.int16), dict(photometric="rgb"), "int16"),
      "bilevel.tif": (image[..., 0] > 127, {}, "bool"),
  }
  for name, (data, kw, problem) in cases.items():
    path = _write(tmp_path / name, data, **kw)
    with pytest.raises(DataError, match=name.replace(".", r"\.") + ".*" + problem):
      Slide(path)


def test_truncated_file_fails_only_where_data_is_missing(tmp_path, image):
  path = _write(tmp_path / "cut.tif", image, photometric="rgb", tile=(128, 128),
                compression="deflate")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * 0.6))
  slide = Slide(path)  # the header is intact
  assert slide.truncated
  assert np.array_equal(slide.read(0, 0, 100, 100), image[:100, :100])  # early tiles fine
  with pytest.raises(DataError, match=r"cut\.tif: file is truncated.*x=450\.\.550, y=400\.\.500"):
    slide.read(450, 400, 100, 100)

  raw = _write(tmp_path / "cut_raw.tif", image, photometric="rgb")  # one uncompressed strip
  with open(raw, "r+b") as f:
    f.truncate(int(os.path.getsize(raw) * 0.6))
  slide = Slide(raw)
  assert np.array_equal(slide.read(0, 0, 50, 50), image[:50, :50])
  with pytest.raises(DataError, match=r"cut_raw\.tif: file is truncated"):
    slide.read(0, 450, 50, 50)


def test_corrupt_tile_bytes_raise_with_window(tmp_path, image):
  path = _write(tmp_path / "bad_tile.tif", image, photometric="rgb", tile=(128, 128),
                compression="deflate")
  with tifffile.TiffFile(path) as tif:
    offset, count = tif.pages.first.dataoffsets[6], tif.pages.first.databytecounts[6]
  with open(path, "r+b") as f:  # tile 6 = row 1, column 1 of a 5-wide grid
    f.seek(offset)
    f.write(b"\xff" * count)
  slide = Slide(path)
  assert np.array_equal(slide.read(0, 0, 128, 128), image[:128, :128])
  with pytest.raises(DataError,
                     match=r"bad_tile\.tif: cannot decode window x=130\.\.140, y=130\.\.140"):
    slide.read(130, 130, 10, 10)


def test_argument_checks(tmp_path, image):
  slide = Slide(_write(tmp_path / "args.tif", image[:32, :32]))
  with pytest.raises(ValueError, match="pad"):
    slide.read(0, 0, 4, 4, pad="edge")
  with pytest.raises(ValueError, match="non-negative"):
    slide.read(0, 0, -1, 4)
  assert slide.read(3, 3, 0, 0).shape == (0, 0, 3)
  assert slide.read(3, 3, 5, 0, pad="reflect").shape == (0, 5, 3)


def test_implausible_spacing_is_refused_by_name():
  from midog_jax.data import tiff_meta
  assert tiff_meta.check_plausible(None, "a.tif") is None
  assert tiff_meta.check_plausible(0.25, "a.tif") == 0.25
  for bad in (25400 / 72, 0.05, 3.0):
    with pytest.raises(DataError, match=r"^a\.tif: the resolution tags give .* --spacing_um"):
      tiff_meta.check_plausible(bad, "a.tif")


def test_full_resolution_page_not_the_thumbnail(tmp_path, image):
  # A thumbnail first (as some whole-slide formats store it), then the image.
  path = tmp_path / "thumb_first.tif"
  with tifffile.TiffWriter(path) as w:
    w.write(image[::8, ::8].copy(), photometric="rgb")
    w.write(image, photometric="rgb", tile=(128, 128), resolution=(40000, 40000),
            resolutionunit="CENTIMETER")
  slide = Slide(path)
  assert (slide.width, slide.height) == (image.shape[1], image.shape[0])
  assert slide.page_index == 1 and "page=1" in repr(slide)
  assert slide.spacing_um == pytest.approx(0.25)
  np.testing.assert_array_equal(slide.read(0, 0, 64, 48), image[:48, :64])
  # A pyramid written the other way round (full level first) reads page 0.
  pyr = tmp_path / "pyramid.tif"
  with tifffile.TiffWriter(pyr) as w:
    w.write(image, photometric="rgb", tile=(128, 128))
    w.write(image[::2, ::2].copy(), photometric="rgb", tile=(128, 128))
  assert Slide(pyr).page_index == 0
