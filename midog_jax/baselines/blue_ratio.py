"""Blue-ratio candidate detector (Kondo's MIDOG 2021 candidate step) as a baseline.

Per image: blue-ratio image (Chang et al. 2012), threshold at mean + 3 std,
connected components (8-connected), drop components smaller than 2 px or wider
or taller than 50 px; the centroids of the rest are the detections. Scored with
the MIDOG matching (7.5 um radius, in millimetres) pooled over the labelled
cases, and per domain; the unlabeled domain is scored against
``MIDOG_unlabeled_truth.json`` when that file is present::

  python -m midog_jax.baselines.blue_ratio --data DIR [--truth auto|PATH|none] [--workers N]

Prints one JSON object {tp, fp, fn, precision, recall, f1, per_domain}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from midog_jax import candidates
from midog_jax import evaluate as eval_lib
from midog_jax.data import midog
from midog_jax.data.synthetic import TRUTH
from midog_jax.errors import DataError


def detect(rgb: np.ndarray, k_std: float = 3.0) -> np.ndarray:
  """Blue-ratio candidates of one RGB image as (N, 2) float32 (x, y) centres
  (the one implementation: ``candidates.find_candidates``)."""
  return candidates.find_candidates(rgb, candidates.Settings(k_std=k_std))


def evaluate(data: str | Path, truth: str | Path | None = "auto",
             workers: int = 1) -> dict:
  """Runs the detector on every case it can score; returns the JSON dict.

  Pooled counts cover the labelled cases; the unlabeled domain (scored
  against its truth file when present) appears in ``per_domain`` only.
  """
  data = Path(data)
  if data.is_dir():
    from midog_jax.data.experiment import find_annotations
    ann = find_annotations(data)  # MIDOG.json or MIDOG++.json
  else:
    ann = data
  ds = midog.load_midog(ann)
  if truth == "auto":
    truth = ann.parent / TRUTH if (ann.parent / TRUTH).exists() else None
  heldout = []
  if truth not in (None, "none"):
    unl = {c.image_id for c in ds.unlabeled}
    heldout = [c for c in midog.attach_truth(ds, truth).cases
               if c.image_id in unl and c.labeled]
  cases = eval_lib.with_image_spacing(ds.labeled + heldout)
  # Streamed tile by tile, ``workers`` images at a time.
  found = candidates.find_candidates_many([c.path for c in cases], workers=workers)
  preds = {c.image_id: (xy, np.ones(len(xy), np.float32)) for c, xy in zip(cases, found)}
  out = eval_lib.evaluate_points([c for c in cases if c.image_id not in
                                  {h.image_id for h in heldout}], preds)
  if heldout:
    out["per_domain"].update(eval_lib.evaluate_points(
        [c for c in cases if c.image_id in {h.image_id for h in heldout}],
        preds)["per_domain"])
  return out


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m midog_jax.baselines.blue_ratio",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--data", required=True,
                  help="folder with MIDOG.json and the images (or the JSON)")
  ap.add_argument("--truth", default="auto",
                  help="truth file of the unlabeled domain: auto (beside "
                  "MIDOG.json if present), a path, or none")
  ap.add_argument("--workers", type=int, default=1, help="images in parallel")
  a = ap.parse_args(argv)
  try:
    res = evaluate(a.data, a.truth, max(1, a.workers))
  except DataError as e:  # a data error: exit 1, as every program
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
