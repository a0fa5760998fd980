"""Image-level labels from a trained detector: is the image-level classifier worth training?

A field is positive when the detector (a RetinaNet or P4 workdir) finds at
least one mitotic figure in it at the detector's own F1-best validation
threshold; its probability is the highest mitotic detection score inside the
field (0 when there is none), so ROC AUC and the curves rank fields by it.
Detections are those of whole-image inference (``evaluation.make_tiler``:
the detector's tiling, candidates down to its ``eval.score_thresh``), each
image run once however many fields it holds; a detection belongs to a field
when its point lies in the field's pixels (``sampling.points_in_window``).

  python -m midog_jax.image_level.baseline --detector runs/retina \\
      --image_level runs/il1 --out runs/il1/eval_detector

scores the fields of the image-level workdir's sets (its config: the same
fields, splits and labels) and writes ``OUT/<set>/metrics.json``,
``probabilities.csv``, ``roc.png`` and ``pr.png`` like the image-level heads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from midog_jax import checkpoint as ckpt_lib
from midog_jax import detectors, evaluation
from midog_jax import predict as predict_lib
from midog_jax.data import sampling
from midog_jax.data import slides as slides_lib
from midog_jax.errors import DataError
from midog_jax.fileio import write_json_atomic
from midog_jax.image_level import datasets
from midog_jax.image_level import metrics as metrics_lib
from midog_jax.image_level.fields import Item


def field_scores(items: Sequence[Item], detect) -> np.ndarray:
  """Highest mitotic detection score inside each item's region (0 if none).

  ``detect(path)`` returns the ``Detections`` of a whole image; it is called
  once per image.
  """
  by_path: dict[str, object] = {}
  out = np.zeros(len(items), np.float64)
  for k, it in enumerate(items):
    if it.path not in by_path:
      by_path[it.path] = detect(it.path).mitotic()
    dets = by_path[it.path]
    _, keep = sampling.points_in_window(dets.xy, it.x, it.y, (it.w, it.h))
    if keep.any():
      out[k] = float(dets.scores[keep].max())
  return out


def detector_baseline(detector_workdir: str | Path, image_level_workdir: str | Path,
                      out: str | Path, checkpoint: str = "best") -> dict:
  """Scores the image-level workdir's evaluation sets with the detector; writes ``out``."""
  variables, meta = ckpt_lib.load_for_inference(detector_workdir, checkpoint)
  det_config = predict_lib.load_config(detector_workdir, meta)
  if "threshold" not in meta:
    raise DataError(detector_workdir, "checkpoint meta has no threshold")
  threshold = float(meta["threshold"])
  tiler = evaluation.make_tiler(detectors.build(det_config), variables, det_config)
  il_config = predict_lib.load_config(image_level_workdir)
  if il_config.get("method") != "image_level":
    raise DataError(image_level_workdir, "not an image-level workdir")
  sets = datasets.load_sets(il_config)
  results = {}
  for name, items in sets.sets().items():
    if name == "train":
      continue
    scores = field_scores(items, lambda p: tiler.detect(slides_lib.open_slide(p)))
    results[name] = {"detector": metrics_lib.write_set(
        Path(out) / name, [it.name for it in items], [it.domain for it in items],
        np.asarray([it.label for it in items]), scores, threshold, f"{name} detector")}
  write_json_atomic(dict(results=results, detector=str(detector_workdir),
                         method=det_config.get("method"), threshold=threshold),
                    Path(out) / "summary.json")
  return results


def main(argv: Sequence[str] | None = None) -> int:
  """CLI; 0 done, 1 bad input, 2 usage."""
  p = argparse.ArgumentParser(prog="python -m midog_jax.image_level.baseline",
                              description=__doc__.split("\n")[0])
  p.add_argument("--detector", required=True, help="a RetinaNet or P4 training workdir")
  p.add_argument("--image_level", required=True, help="an image-level workdir (its fields)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--checkpoint", default="best", choices=predict_lib.CHECKPOINTS)
  try:
    args = p.parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    results = detector_baseline(args.detector, args.image_level, args.out, args.checkpoint)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(metrics_lib.format_table(results), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
