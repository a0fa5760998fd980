"""Blue-ratio candidate detector (seed 002's candidate step) as a baseline.

Per image: blue-ratio image (Chang et al. 2012), threshold at mean + 3 std,
connected components (8-connected), drop components smaller than 2 px or wider
or taller than 50 px; the centroids of the rest are the detections. Scored with
the MIDOG matching (7.5 um radius, in millimetres) pooled over the labelled
cases, and per domain; the unlabeled domain is scored against
``MIDOG_unlabeled_truth.json`` when that file is present::

  python -m midog_jax.baselines.blue_ratio --data DIR [--truth auto|PATH|none]

Prints one JSON object {tp, fp, fn, precision, recall, f1, per_domain}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile
from scipy import ndimage

from midog_jax import metrics
from midog_jax.data import midog, stain
from midog_jax.data.synthetic import TRUTH, load_truth
from midog_jax.errors import DataError

MIN_AREA_PX = 2
MAX_SIDE_PX = 50


def detect(rgb: np.ndarray, k_std: float = 3.0) -> np.ndarray:
  """Blue-ratio candidates of one RGB image as (N, 2) float32 (x, y) centres."""
  br = stain.blue_ratio(rgb)
  mask = br > br.mean() + k_std * br.std()
  lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
  if n == 0:
    return np.zeros((0, 2), np.float32)
  idx = np.arange(1, n + 1)
  area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
  keep = area >= MIN_AREA_PX
  for i, sl in enumerate(ndimage.find_objects(lab)):
    h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
    if h > MAX_SIDE_PX or w > MAX_SIDE_PX:
      keep[i] = False
  cy_cx = np.asarray(ndimage.center_of_mass(mask, lab, idx[keep]), np.float32)
  return cy_cx.reshape(-1, 2)[:, ::-1].copy()


def read_rgb(path: Path) -> np.ndarray:
  """Whole image as uint8 (H, W, 3); DataError for unreadable files."""
  try:
    img = tifffile.imread(path)
  except FileNotFoundError:
    raise DataError(path, "image file not found") from None
  except Exception as e:  # tifffile raises several types for corrupt files
    raise DataError(path, f"cannot read image ({e})") from None
  if img.ndim != 3 or img.shape[-1] < 3:
    raise DataError(path, f"expected an RGB image, got shape {img.shape}")
  return np.ascontiguousarray(img[..., :3]).astype(np.uint8, copy=False)


def spacing_um(path: Path, default: float) -> float:
  """Microns per pixel from the TIFF resolution tags, else ``default``."""
  try:
    with tifffile.TiffFile(path) as t:
      tags = t.pages[0].tags
      unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
      num, den = tags["XResolution"].value
  except (KeyError, TypeError, ValueError):
    return default
  if not num or not den:
    return default
  per_unit = num / den
  um_per_unit = {3: 1e4, 2: 25400.0}.get(int(unit))
  return um_per_unit / per_unit if um_per_unit else default


def evaluate(data: str | Path, truth: str | Path | None = "auto") -> dict:
  """Runs the detector on every case it can score; returns the JSON dict."""
  data = Path(data)
  ann = data / "MIDOG.json" if data.is_dir() else data
  ds = midog.load_midog(ann)
  truth_pts: dict[int, np.ndarray] = {}
  if truth == "auto":
    p = ann.parent / TRUTH
    truth_pts = load_truth(p) if p.exists() else {}
  elif truth not in (None, "none"):
    truth_pts = load_truth(truth)
  per_domain: dict[str, metrics.Counts] = {}
  total = metrics.Counts()
  for case in ds.cases:
    if case.labeled:
      gt, pooled_in = case.mitoses, True
    elif case.image_id in truth_pts:
      # The unlabeled domain is reported per domain only, never pooled:
      # a method may not tune on it.
      gt, pooled_in = truth_pts[case.image_id], False
    else:
      continue
    sp = spacing_um(case.path, case.spacing_um)
    pred = detect(read_rgb(case.path))
    c, _ = metrics.match(gt * sp * 1e-3, pred * sp * 1e-3, metrics.RADIUS_MM)
    per_domain[case.domain] = per_domain.get(case.domain, metrics.Counts()) + c
    if pooled_in:
      total = total + c
  out = total.as_dict()
  out["per_domain"] = {k: v.as_dict() for k, v in sorted(per_domain.items())}
  return out


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m midog_jax.baselines.blue_ratio",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--data", required=True,
                  help="folder with MIDOG.json and the images (or the JSON)")
  ap.add_argument("--truth", default="auto",
                  help="truth file of the unlabeled domain: auto (beside "
                  "MIDOG.json if present), a path, or none")
  a = ap.parse_args(argv)
  try:
    res = evaluate(a.data, a.truth)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
