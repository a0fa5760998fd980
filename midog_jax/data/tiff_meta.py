"""TIFF metadata: which page holds the image, and its pixel spacing (microns per pixel).

Read from the resolution tags (or an Aperio description), never guessed from
a placeholder: a wrong spacing silently wrecks every distance in microns (the
7.5 um matching radius, millimetre outputs).
"""

from __future__ import annotations

import os
import re

import tifffile

from midog_jax.errors import DataError

# Microns per pixel of a microscope scan: 0.23-0.5 for the MIDOG scanners at
# 40x/20x; a value outside this range is a placeholder (72 dpi is 352.8 um/px),
# and using it would make every millimetre and the matching radius wrong.
PLAUSIBLE_UM = (0.1, 2.0)

# Microns per ResolutionUnit. 4 and 5 are tifffile's (non-baseline) extensions.
_UM_PER_UNIT = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)")


def spacing_from_tags(tif: tifffile.TiffFile | tifffile.TiffPage) -> float | None:
  """Pixel spacing in microns from a TIFF's image page, or None if unknown.

  Uses ``XResolution`` (pixels per unit, a rational) with ``ResolutionUnit``
  INCH (25,400 um) or CENTIMETER (10,000 um); tifffile's MILLIMETER and
  MICROMETER extensions are honoured too. Returns None when XResolution is
  absent or zero, or when the unit is NONE or missing: the TIFF default for a
  missing unit is inch, but writers that omit it nearly always wrote a
  placeholder such as 72 dpi (352 um/px), which would silently wreck every
  distance in microns. Falls back to the ``MPP = x`` field of an Aperio
  ImageDescription. Only the X resolution is used (pixels are assumed square).
  """
  page = full_resolution_page(tif) if isinstance(tif, tifffile.TiffFile) else tif
  tags = page.tags
  xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
  if xres is not None and unit is not None and int(unit.value) in _UM_PER_UNIT:
    value = xres.value
    num, den = (value if isinstance(value, tuple) else (value, 1))
    if num and den:
      return _UM_PER_UNIT[int(unit.value)] * float(den) / float(num)
  desc = getattr(page, "description", "") or ""
  if desc.startswith("Aperio"):
    found = _APERIO_MPP.search(desc)
    if found and float(found.group(1)) > 0:
      return float(found.group(1))
  return None


def check_plausible(spacing_um: float | None, path: str | os.PathLike) -> float | None:
  """``spacing_um`` when None or plausible (``PLAUSIBLE_UM``), else a ``DataError``."""
  if spacing_um is None or PLAUSIBLE_UM[0] <= spacing_um <= PLAUSIBLE_UM[1]:
    return spacing_um
  raise DataError(path, f"the resolution tags give {spacing_um:.4g} um/px, outside the "
                  f"{PLAUSIBLE_UM[0]}-{PLAUSIBLE_UM[1]} um/px of a microscope scan (a "
                  "placeholder such as 72 dpi?); pass --spacing_um (microns per pixel)")


# Pages looked at for the full-resolution image (a pyramid, a thumbnail,
# label and macro images); a TIFF with more pages is a stack, read at page 0.
_MAX_PAGES = 64


def full_resolution_page(tif: tifffile.TiffFile) -> tifffile.TiffPage | None:
  """The largest page: the full-resolution level of a pyramid or a TIFF with
  a thumbnail first (whole-slide formats such as Aperio SVS), never the
  thumbnail. The first of equally large pages wins."""
  pages = tif.pages
  if len(pages) <= 1 or len(pages) > _MAX_PAGES:
    return pages.first
  best, best_area = None, -1
  for page in pages:
    page = page.aspage() if hasattr(page, "aspage") else page
    area = int(page.imagewidth) * int(page.imagelength)
    if area > best_area:
      best, best_area = page, area
  return best
