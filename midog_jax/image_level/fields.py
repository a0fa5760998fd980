"""Image-level examples: fields cut from MIDOG images, or whole images from a CSV.

An :class:`Item` is one square input of the image-level classifier: a region
of an image file (in the file's own pixels) that is read, padded with white
where it reaches past the image, and resampled to ``out_px`` x ``out_px``.

**Fields from MIDOG point labels.** Each labelled image is cut into square
fields of a fixed physical size (default 0.237 mm^2, about one high-power
field: 486.8 um a side, ~1950 px at 0.25 um/px) on a grid
(``slides.grid_origins``: fields side by side, the last one flush with the far
border). With ``m`` the 7.5 um radius of a mitotic figure (the MIDOG matching
radius) in the image's pixels, a field is

  * **positive** when some mitotic figure's centre lies inside it at least
    ``m`` from every border (the whole figure is in the field);
  * **negative** when every mitotic figure's centre lies outside it at least
    ``m`` away (Euclidean distance to the square: no part of a figure reaches
    into the field);
  * **excluded** otherwise: a figure whose centre is within ``m`` of the border,
    inside or outside, may show as a cut cell; such fields are left out of
    training and scoring alike.

Pixel k spans [k - 0.5, k + 0.5] (``sampling.points_in_window``), so a field
with origin x0 and side s covers [x0 - 0.5, x0 + s - 0.5]. A field inherits
the split of its image (the existing domain-stratified splits), so no image
is ever split between training and test.

**Whole images from a CSV** ``path,label[,domain][,split]`` (paths relative
to the CSV's folder; label 0/1; split train/val/test, else a seeded split
stratified by domain and label). ``scale="rescale"`` resamples the whole image
to ``out_px`` x ``out_px`` (the seed's round 2: images from 3x larger to 2x
smaller than the network's window, all rescaled to 512x512);
``scale="physical"`` resamples to the working pixel spacing using the image's
resolution tags and keeps the centred ``out_px`` square (white beyond the image).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from midog_jax.data import slides as slides_lib
from midog_jax.data import tiff_meta
from midog_jax.errors import DataError

POSITIVE, NEGATIVE, EXCLUDED = 1, 0, -1
FIGURE_RADIUS_UM = 7.5
SCALES = ("physical", "rescale")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Item:
  """One image-level example.

  Attributes:
    path: the image file.
    x, y, w, h: the region read, in the file's pixels (may reach past it).
    out_px: side of the square the region is resampled to.
    label: 1 / 0 (-1: unknown, for images to classify).
    domain: for per-domain tables and stratification.
    name: unique, readable id (``<stem>`` or ``<stem>@x,y``) for CSV outputs.
  """

  path: str
  x: int
  y: int
  w: int
  h: int
  out_px: int
  label: int
  domain: str
  name: str

  def identity(self) -> dict:
    """What the pixels depend on (the feature cache key; the label is not)."""
    st = os.stat(self.path)
    return dict(path=os.path.realpath(self.path), size=st.st_size,
                mtime_ns=st.st_mtime_ns, region=[self.x, self.y, self.w, self.h],
                out_px=self.out_px)


def read_item(item: Item, cache: slides_lib.SlideCache | None = None) -> np.ndarray:
  """The item's pixels: uint8 (out_px, out_px, 3), white beyond the image."""
  slide = cache.get(item.path) if cache is not None else slides_lib.open_slide(item.path)
  region = slide.read(item.x, item.y, item.w, item.h)
  return resize(region, item.out_px)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (h, w, 3) -> (size, size, 3), bilinear (antialiased when shrinking)."""
  if image.shape[:2] == (size, size):
    return np.ascontiguousarray(image)
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


# ----------------------------------------------------------------------------
# Fields from point labels.


def field_side_um(area_mm2: float) -> float:
  """Side (um) of a square field of ``area_mm2``."""
  if not area_mm2 > 0:
    raise ValueError(f"field area must be positive, got {area_mm2}")
  return math.sqrt(area_mm2) * 1000.0


def field_label(mitoses: np.ndarray, x0: float, y0: float, side: float,
                margin_px: float) -> int:
  """POSITIVE / NEGATIVE / EXCLUDED for a field (the rule in the module docstring)."""
  pts = np.asarray(mitoses, np.float64).reshape(-1, 2)
  if not len(pts):
    return NEGATIVE
  lo_x, lo_y = x0 - 0.5, y0 - 0.5
  hi_x, hi_y = lo_x + side, lo_y + side
  # Distance inside (>= 0 for points in the square, to the nearest border).
  inside = np.minimum.reduce([pts[:, 0] - lo_x, hi_x - pts[:, 0],
                              pts[:, 1] - lo_y, hi_y - pts[:, 1]])
  if (inside >= margin_px).any():
    return POSITIVE
  # Euclidean distance from outside points to the square (0 inside).
  dx = np.maximum.reduce([lo_x - pts[:, 0], np.zeros(len(pts)), pts[:, 0] - hi_x])
  dy = np.maximum.reduce([lo_y - pts[:, 1], np.zeros(len(pts)), pts[:, 1] - hi_y])
  outside = np.hypot(dx, dy)
  return NEGATIVE if (outside >= margin_px).all() else EXCLUDED


def case_spacing(case) -> float:
  """Microns per pixel of a case: the TIFF's tags, else the scanner's nominal value."""
  tags = slides_lib.open_slide(case.path).spacing_um
  return float(tiff_meta.check_plausible(tags, case.path) or case.spacing_um)


def case_fields(case, area_mm2: float, out_px: int, margin_um: float = FIGURE_RADIUS_UM
                ) -> tuple[list[Item], int]:
  """The labelled fields of one case and the number excluded by the rule."""
  spacing = case_spacing(case)
  side = max(1, int(round(field_side_um(area_mm2) / spacing)))
  margin = margin_um / spacing
  items, excluded = [], 0
  stem = Path(case.file_name).stem
  for y in slides_lib.grid_origins(case.height, side, side):
    for x in slides_lib.grid_origins(case.width, side, side):
      label = field_label(case.mitoses, x, y, side, margin)
      if label == EXCLUDED:
        excluded += 1
        continue
      items.append(Item(str(case.path), int(x), int(y), side, side, out_px, label,
                        case.domain, f"{stem}@{int(x)},{int(y)}"))
  return items, excluded


def midog_items(cases: Sequence, area_mm2: float, out_px: int,
                margin_um: float = FIGURE_RADIUS_UM) -> tuple[list[Item], int]:
  """Fields of every labelled case (in case order) and how many were excluded."""
  items, excluded = [], 0
  for c in cases:
    if not c.labeled:
      continue
    got, n = case_fields(c, area_mm2, out_px, margin_um)
    items += got
    excluded += n
  return items, excluded


# ----------------------------------------------------------------------------
# Whole images (a labelled CSV, or images to classify).


def image_item(path: str | os.PathLike, out_px: int, scale: str, work_spacing_um: float,
               label: int = -1, domain: str = "", name: str | None = None) -> Item:
  """One whole image as an item (``scale``: see the module docstring)."""
  if scale not in SCALES:
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
  slide = slides_lib.open_slide(path)
  name = name or Path(path).stem
  if scale == "rescale":
    return Item(os.fspath(path), 0, 0, slide.width, slide.height, out_px, label,
                domain, name)
  spacing = tiff_meta.check_plausible(slide.spacing_um, path)
  if spacing is None:
    raise DataError(path, "no pixel spacing in the resolution tags; use "
                    "scale 'rescale' (image_level.scale=rescale)")
  side = max(1, int(round(out_px * work_spacing_um / spacing)))
  return Item(os.fspath(path), (slide.width - side) // 2, (slide.height - side) // 2,
              side, side, out_px, label, domain, name)


def read_label_csv(path: str | os.PathLike, out_px: int, scale: str,
                   work_spacing_um: float, val_fraction: float = 0.2, seed: int = 0
                   ) -> dict[str, list[Item]]:
  """Items of a ``path,label[,domain][,split]`` CSV by split (train/val/test)."""
  path = Path(path)
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except FileNotFoundError:
    raise DataError(path, "label CSV not found") from None
  if not rows or not {"path", "label"} <= set(rows[0]):
    raise DataError(path, "expected a header with columns path,label "
                    "(optional: domain, split)")
  items, splits = [], []
  for i, r in enumerate(rows):
    label = (r.get("label") or "").strip()
    if label not in ("0", "1"):
      raise DataError(path, f"row {i + 2}: label must be 0 or 1, got {label!r}")
    split = (r.get("split") or "").strip()
    if split and split not in SPLITS:
      raise DataError(path, f"row {i + 2}: split must be one of {SPLITS}, got {split!r}")
    image = path.parent / r["path"].strip()
    try:
      items.append(image_item(image, out_px, scale, work_spacing_um, int(label),
                              (r.get("domain") or "").strip() or "all",
                              name=f"{i:05d}_{image.stem}"))
    except DataError as e:
      raise DataError(path, f"row {i + 2}: {e}") from None
    splits.append(split)
  out = {s: [] for s in SPLITS}
  if all(splits):
    for it, s in zip(items, splits):
      out[s].append(it)
    return out
  if any(splits):
    raise DataError(path, "the split column is filled in for some rows only")
  out["train"], out["val"] = stratified_split(items, val_fraction, seed)
  return out


def stratified_split(items: Sequence[Item], val_fraction: float, seed: int
                     ) -> tuple[list[Item], list[Item]]:
  """A seeded train/val split with every (domain, label) group split alike."""
  rng = np.random.default_rng(seed)
  train, val = [], []
  groups: dict[tuple[str, int], list[Item]] = {}
  for it in items:
    groups.setdefault((it.domain, it.label), []).append(it)
  for key in sorted(groups):
    g = groups[key]
    order = rng.permutation(len(g))
    n_val = int(round(len(g) * val_fraction))
    val += [g[i] for i in order[:n_val]]
    train += [g[i] for i in order[n_val:]]
  return train, val


def balance(items: Iterable[Item]) -> dict[str, dict[str, int]]:
  """Per-domain (and "all") counts of positive and negative items."""
  table: dict[str, dict[str, int]] = {}
  for it in items:
    for key in ("all", it.domain):
      row = table.setdefault(key, dict(positive=0, negative=0))
      row["positive" if it.label == POSITIVE else "negative"] += 1
  return dict(sorted(table.items(), key=lambda kv: (kv[0] != "all", kv[0])))


def format_balance(sets: dict[str, list[Item]]) -> str:
  """The class balance per split and domain as a small table."""
  lines = [f"{'set':<16}{'domain':<22}{'positive':>9}{'negative':>9}"]
  for name, items in sets.items():
    for dom, row in balance(items).items():
      lines.append(f"{name:<16}{dom:<22}{row['positive']:>9}{row['negative']:>9}")
  return "\n".join(lines)
