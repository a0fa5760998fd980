"""Detection outputs: challenge JSON (mm), GeoJSON (QuPath), CSV and overlay PNGs.

Every writer goes through :func:`atomic_output` (temp file in the target's
folder, then ``os.replace``), so a crash or a full disk never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from midog_jax.errors import DataError

MITOTIC = 1
NON_MITOTIC = 2
# Names used by the challenge's prediction format (and its evaluation code).
CHALLENGE_NAMES = {MITOTIC: "mitotic figure", NON_MITOTIC: "non-mitotic figure"}
_CLASS_OF_NAME = {v: k for k, v in CHALLENGE_NAMES.items()}
# QuPath class names and colours (QuPath >= 0.4 reads colour as [r, g, b]).
QUPATH_CLASSES = {MITOTIC: ("Mitotic figure", [220, 30, 30]),
                  NON_MITOTIC: ("Non-mitotic figure", [40, 90, 230])}
CSV_COLUMNS = ("x_px", "y_px", "x_mm", "y_mm", "probability", "name")


@dataclasses.dataclass
class Detections:
  """Detected points of one image, in pixel coordinates.

  Attributes:
    xy: float32 (N, 2) (x, y) pixel centres.
    scores: float32 (N,) probabilities.
    classes: int32 (N,), 1 = "mitotic figure", 2 = "non-mitotic figure"
      (all 1 when omitted).
  """

  xy: np.ndarray
  scores: np.ndarray
  classes: np.ndarray | None = None

  def __post_init__(self):
    self.xy = np.asarray(self.xy, np.float32).reshape(-1, 2)
    self.scores = np.asarray(self.scores, np.float32).reshape(-1)
    if self.classes is None:
      self.classes = np.full(len(self.xy), MITOTIC, np.int32)
    self.classes = np.asarray(self.classes, np.int32).reshape(-1)
    if not len(self.xy) == len(self.scores) == len(self.classes):
      raise ValueError(f"Detections: {len(self.xy)} points, {len(self.scores)} "
                       f"scores and {len(self.classes)} classes")
    bad = ~np.isin(self.classes, list(CHALLENGE_NAMES))
    if bad.any():
      raise ValueError(f"Detections: unknown classes {sorted(set(self.classes[bad]))}")

  def __len__(self) -> int:
    return len(self.xy)

  @property
  def names(self) -> list[str]:
    """Challenge names of the points ("mitotic figure" / "non-mitotic figure")."""
    return [CHALLENGE_NAMES[int(c)] for c in self.classes]

  @classmethod
  def from_mm(cls, xy_mm: np.ndarray, probs: np.ndarray, names: list[str],
              spacing_um: float) -> "Detections":
    """Builds detections from challenge-format millimetres and names."""
    xy = np.asarray(xy_mm, np.float64).reshape(-1, 2) * 1000.0 / spacing_um
    classes = [_CLASS_OF_NAME[n] for n in names]
    return cls(xy, probs, np.asarray(classes, np.int32))

  def mitotic(self) -> "Detections":
    """Only the points classed as mitotic figures."""
    keep = self.classes == MITOTIC
    return Detections(self.xy[keep], self.scores[keep], self.classes[keep])


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w",
                  **open_kwargs) -> Iterator:
  """Opens a temp file beside ``path``; on success it replaces ``path``.

  On any exception the temp file is removed and ``path`` is left untouched.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Same folder as the target so os.replace is an atomic rename (same disk).
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
  """Writes ``obj`` as JSON to ``path`` atomically; NaN/inf are refused."""
  # Serialise first: an unserialisable object then never touches the disk.
  text = json.dumps(obj, indent=1, allow_nan=False)
  with atomic_output(path, "w", encoding="utf-8") as f:
    f.write(text + "\n")
  return Path(path)


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


def _is_number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v))


def from_challenge_json(path: str | os.PathLike
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Reads a challenge-format prediction file.

  Returns:
    ``(xy_mm (N, 2) float64, probabilities (N,) float64, names)``.
    As in the organisers' reader, a point without ``name`` counts as a
    "mitotic figure" and one without ``probability`` gets 0.5 (the 2021 format
    had neither field).

  Raises:
    DataError naming the file: unreadable JSON, no ``points`` list, a point
    without a 2- or 3-number ``point``, non-finite numbers, unknown names, or
    a ``type`` other than "Multiple points".
  """
  path = Path(path)
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise DataError(path, "prediction file not found") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(path, f"malformed JSON ({e})") from None
  if not isinstance(data, dict):
    raise DataError(path, "expected a JSON object with a 'points' list")
  if "type" in data and data["type"] != "Multiple points":
    raise DataError(path, f"type must be 'Multiple points', got {data['type']!r}")
  if "points" not in data:
    raise DataError(path, "missing key 'points'")
  if not isinstance(data["points"], list):
    raise DataError(path, "'points' must be a list")
  xy, probs, names = [], [], []
  for i, p in enumerate(data["points"]):
    if not isinstance(p, dict):
      raise DataError(path, f"points[{i}] is not an object")
    if "point" not in p:
      raise DataError(path, f"points[{i}] is missing key 'point'")
    pt = p["point"]
    if (not isinstance(pt, list) or len(pt) not in (2, 3)
        or not all(_is_number(v) for v in pt)):
      raise DataError(path, f"points[{i}].point must be 2 or 3 finite numbers, "
                      f"got {pt!r}")
    prob = p.get("probability", 0.5)
    if not _is_number(prob):
      raise DataError(path, f"points[{i}].probability must be a finite number, "
                      f"got {prob!r}")
    name = p.get("name", CHALLENGE_NAMES[MITOTIC])
    if name not in _CLASS_OF_NAME:
      raise DataError(path, f"points[{i}].name {name!r} is not one of "
                      f"{sorted(_CLASS_OF_NAME)}")
    xy.append(pt[:2])
    probs.append(prob)
    names.append(name)
  return (np.asarray(xy, np.float64).reshape(-1, 2),
          np.asarray(probs, np.float64).reshape(-1), names)


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
