"""Detection outputs: challenge JSON (mm), GeoJSON (QuPath), CSV and overlay PNGs.

The last stage of the data flow: nothing below it imports it. Every writer
goes through ``fileio`` (temp file in the target's folder, then
``os.replace``), so a crash or a full disk never leaves a half-written file
under the final name.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from midog_jax.detections import IMPOSTER, MITOSIS, Detections
from midog_jax.fileio import atomic_output

# QuPath class names and colours (QuPath >= 0.4 reads colour as [r, g, b]).
QUPATH_CLASSES = {MITOSIS: ("Mitotic figure", [220, 30, 30]),
                  IMPOSTER: ("Non-mitotic figure", [40, 90, 230])}
CSV_COLUMNS = ("x_px", "y_px", "x_mm", "y_mm", "probability", "name")


def to_challenge_json(dets: Detections, spacing_um: float) -> dict:
  """The MIDOG challenge's "Multiple points" prediction object (millimetres).

  ``point`` is ``[x_mm, y_mm, 0]`` with ``x_mm = x_px * spacing_um / 1000``.
  """
  if not (spacing_um > 0 and math.isfinite(spacing_um)):
    raise ValueError(f"spacing_um must be positive, got {spacing_um}")
  mm = dets.xy.astype(np.float64) * (spacing_um / 1000.0)
  points = [{"point": [float(x), float(y), 0], "probability": float(p), "name": n}
            for (x, y), p, n in zip(mm, dets.scores.astype(np.float64), dets.names)]
  return {"type": "Multiple points", "points": points,
          "version": {"major": 1, "minor": 0}}


def to_geojson(dets: Detections) -> dict:
  """A GeoJSON FeatureCollection of Point annotations that QuPath imports.

  Coordinates are full-resolution pixels with the origin at the top-left
  corner (QuPath's convention); the score is a measurement.
  """
  features = []
  for i, ((x, y), s, c) in enumerate(zip(dets.xy.astype(np.float64),
                                         dets.scores.astype(np.float64),
                                         dets.classes)):
    name, color = QUPATH_CLASSES[int(c)]
    features.append({
        "type": "Feature",
        "id": f"detection-{i}",
        "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": list(color)},
            "measurements": {"score": float(s)},
        },
    })
  return {"type": "FeatureCollection", "features": features}


def to_csv(dets: Detections, path: str | os.PathLike, spacing_um: float) -> Path:
  """Writes one row per detection: x_px, y_px, x_mm, y_mm, probability, name."""
  mm = dets.xy.astype(np.float64) * (spacing_um / 1000.0)
  with atomic_output(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(CSV_COLUMNS)
    for (x, y), (xm, ym), p, n in zip(dets.xy.astype(np.float64), mm,
                                      dets.scores.astype(np.float64), dets.names):
      w.writerow([repr(float(x)), repr(float(y)), repr(float(xm)), repr(float(ym)),
                  repr(float(p)), n])
  return Path(path)


# Overlay colours: true positive, false positive, false negative, imposter.
OVERLAY_COLORS = {"tp": (0, 200, 0), "fp": (230, 0, 0), "fn": (255, 220, 0),
                  "imposter": (40, 110, 255)}


def overlay_png(image_uint8: np.ndarray, dets: Detections,
                truth_mitoses: np.ndarray, truth_imposters: np.ndarray,
                path: str | os.PathLike, match_radius_px: float,
                max_side: int | None = 2048) -> float:
  """Draws detections against the ground truth and writes a PNG.

  Mitotic-class detections are matched to the truth mitoses with the MIDOG
  rule (:func:`midog_jax.metrics.match`, radius in pixels): true positives are
  green circles, false positives red, missed figures (FN) yellow, imposters
  blue. Images whose longer side exceeds ``max_side`` are downscaled first.

  Args:
    image_uint8: (H, W, 3) or (H, W) uint8 image.
    dets: detections in pixels of ``image_uint8``.
    truth_mitoses, truth_imposters: (N, 2) pixel centres.
    path: output PNG.
    match_radius_px: matching radius (also the drawn circle radius).
    max_side: longest side of the written PNG (None: full size).

  Returns:
    The scale factor applied to the image (1.0 when not downscaled).
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  from midog_jax import metrics  # pylint: disable=g-import-not-at-top

  img = np.asarray(image_uint8)
  if img.dtype != np.uint8 or img.ndim not in (2, 3) or (
      img.ndim == 3 and img.shape[2] not in (3, 4)):
    raise ValueError(f"overlay_png needs an (H, W[, 3]) uint8 image, got "
                     f"{img.dtype} {img.shape}")
  pil = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
  h, w = img.shape[:2]
  scale = 1.0
  if max_side is not None and max(h, w) > max_side:
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reduce() by an integer factor first keeps big images fast, then resize.
    factor = int(1 / scale)
    if factor >= 2:
      pil = pil.reduce(factor)
    pil = pil.resize(size, Image.Resampling.BILINEAR)

  mit = dets.mitotic()
  truth = np.asarray(truth_mitoses, np.float64).reshape(-1, 2)
  _, assigned = metrics.match(truth, mit.xy, radius=match_radius_px)
  claimed = np.zeros(len(truth), bool)
  claimed[assigned[assigned >= 0]] = True

  draw = ImageDraw.Draw(pil)
  r = max(3.0, match_radius_px * scale)
  width = max(1, round(r / 8))

  def circles(points, color, radius):
    for x, y in np.asarray(points, np.float64).reshape(-1, 2) * scale:
      draw.ellipse([x - radius, y - radius, x + radius, y + radius],
                   outline=color, width=width)

  # Truth first (slightly larger) so detections stay visible on top.
  circles(truth_imposters, OVERLAY_COLORS["imposter"], r * 1.15)
  circles(truth[~claimed], OVERLAY_COLORS["fn"], r * 1.15)
  circles(mit.xy[assigned >= 0], OVERLAY_COLORS["tp"], r)
  circles(mit.xy[assigned < 0], OVERLAY_COLORS["fp"], r)

  with atomic_output(path, "wb") as f:
    pil.save(f, format="PNG")
  return scale
