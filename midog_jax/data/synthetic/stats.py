"""Tissue statistics that say whether an image looks like a MIDOG region.

  * :func:`tissue_coverage`: fraction of pixels with optical density above
    ``od_min`` (0.15, Macenko's transparency cut) in R, G and B; a dense real
    H&E tumour ROI is about 0.75, mostly pale stroma and glass far lower.
  * :func:`high_frequency_energy`: std of the grey image minus its 3x3 box
    mean, in 0..255 units: texture at the 1-2 px scale (real tissue about 5).

``python -m midog_jax.data.synthetic.stats DIR_OR_FILES...``: a JSON line per image, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from midog_jax.data import slides, stain
from midog_jax.errors import DataError

WINDOW = 1024  # side of the sampled windows of a large image
GRID = 3  # a GRID x GRID grid of them; smaller images are measured whole

# Decadic OD per uint8 value from the package's one OD convention, stain's
# natural-log -ln((I + 1) / 256), divided by ln 10. It differs from the
# textbook -log10(max(I, 1) / 255) by less than one grey level's OD step, and
# gives the same cut (I <= 180 in every channel) at od_min = 0.15.
_OD10_LUT = stain.rgb_to_od(np.arange(256, dtype=np.uint8)) / np.float32(np.log(10.0))


def _uint8_rgb(rgb: np.ndarray) -> np.ndarray:
  rgb = np.asarray(rgb)
  if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
  return rgb


def _stained(rgb: np.ndarray, od_min: float) -> np.ndarray:
  """(H, W) bool: decadic OD > od_min in every channel (a table lookup)."""
  return (_OD10_LUT > od_min)[_uint8_rgb(rgb)].all(axis=-1)


def _residual(rgb: np.ndarray) -> np.ndarray:
  """Grey minus its 3x3 box mean, on interior pixels (no padding rule leaks in)."""
  grey = _uint8_rgb(rgb).astype(np.float64).mean(axis=-1)
  h, w = grey.shape
  box = sum(grey[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3))
  return grey[1:-1, 1:-1] - box / 9.0 if h >= 3 and w >= 3 else np.zeros(0)


def tissue_coverage(rgb: np.ndarray, od_min: float = stain.MACENKO_BETA_LOG10) -> float:
  """Fraction of (H, W, 3) uint8 pixels with decadic OD > od_min in all channels."""
  return float(_stained(rgb, od_min).mean())


def high_frequency_energy(rgb: np.ndarray) -> float:
  """Std of (grey - its 3x3 box mean), grey = channel mean in 0..255.

  0 on a flat image, 4 * 255 / 9 on a 0/255 checkerboard; NaN below 3x3.
  """
  r = _residual(rgb)
  return float(r.std()) if r.size else float("nan")


def _windows(height: int, width: int) -> list[tuple[int, int, int, int]]:
  """(x, y, w, h) windows: the whole image, or a fixed grid on a large one.

  An image with more pixels than GRID**2 windows gets WINDOW x WINDOW windows
  on a GRID x GRID grid of evenly spaced corners, the outer ones flush with
  the borders: a function of the size only, so deterministic.
  """
  if height * width <= GRID * GRID * WINDOW * WINDOW:
    return [(0, 0, width, height)]
  w, h = min(width, WINDOW), min(height, WINDOW)
  xs = np.unique(np.linspace(0, width - w, GRID).round().astype(int))
  ys = np.unique(np.linspace(0, height - h, GRID).round().astype(int))
  return [(int(x), int(y), w, h) for y in ys for x in xs]


def image_stats(source: str | os.PathLike | np.ndarray,
                od_min: float = stain.MACENKO_BETA_LOG10) -> dict:
  """Both statistics of an (H, W, 3) uint8 array or a TIFF file.

  A file is read at full resolution (page 0, via tifffile) by ``slides.Slide``,
  which decodes only the tiles a window touches: a 7215x5412 image costs nine
  windows, not a whole-image read. Windows (``_windows``) are pooled: coverage
  over all their pixels, the energy from their summed moments.

  Keys: tissue_coverage, high_frequency_energy, height, width, windows.
  """
  if isinstance(source, np.ndarray):
    arr = _uint8_rgb(source)
    height, width = arr.shape[:2]
    read = lambda x, y, w, h: arr[y:y + h, x:x + w]  # noqa: E731
  else:
    slide = slides.Slide(source)
    height, width, read = slide.height, slide.width, slide.read
  wins = _windows(height, width)
  sums = np.zeros(5)  # stained, pixels, residual count, sum, sum of squares
  for x, y, w, h in wins:
    rgb = read(x, y, w, h)
    st, r = _stained(rgb, od_min), _residual(rgb)
    sums += (st.sum(), st.size, r.size, r.sum(), np.square(r).sum())
  k, n, rn, r1, r2 = sums
  hfe = np.sqrt(max(r2 / rn - (r1 / rn) ** 2, 0.0)) if rn else np.nan
  return {"tissue_coverage": float(k / n) if n else float("nan"),
          "high_frequency_energy": float(hfe),
          "height": height, "width": width, "windows": len(wins)}


def _image_files(args: Sequence[str]) -> list[Path]:
  """The files named, and the .tif/.tiff files of the folders named, sorted."""
  return [f for a in map(Path, args) for f in (sorted(
      p for p in a.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
      if a.is_dir() else [a])]


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m midog_jax.data.synthetic.stats", description=(
      "Tissue coverage and high-frequency energy of TIFF images."))
  ap.add_argument("paths", nargs="+", help="TIFF files or folders of them")
  ap.add_argument("--od-min", type=float, default=stain.MACENKO_BETA_LOG10,
                  help="decadic OD every channel must exceed (default %(default)s)")
  a = ap.parse_args(argv)
  files = _image_files(a.paths)
  if not files:
    print("error: no .tif/.tiff images found", file=sys.stderr)
    return 2
  rows = []
  try:
    for f in files:  # a line as each image is done, not all at the end
      rows.append(image_stats(f, a.od_min))
      print(json.dumps({"image": str(f), **rows[-1]}), flush=True)
  except DataError as e:  # missing or unreadable image, named in the message
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
             for k in ("tissue_coverage", "high_frequency_energy")
             for v in [[r[k] for r in rows]]}
  print(json.dumps({"summary": {"images": len(rows), **summary}}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
