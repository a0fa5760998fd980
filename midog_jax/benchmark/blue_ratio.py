"""The blue-ratio baseline's detections as challenge JSON (the benchmark's baseline row).

  python -m midog_jax.benchmark.blue_ratio --images DIR/test --out PREDS [--workers N]

Kondo's candidate step (MIDOG 2021) used as a detector, exactly as
``midog_jax.baselines.blue_ratio`` scores it (``candidates.find_candidates``:
blue ratio, mean + 3 std, components of 2..50 px, centroids), but written per
image in the challenge format, as ``predict`` writes a model's output, so the
benchmark scores it with the same code as every other method. The baseline has
no scores: every candidate gets probability 1 (its precision-recall curve is
one point). Exit codes: 0 all written, 1 a bad image (the others are written),
2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from midog_jax import candidates, export
from midog_jax import predict as predict_lib
from midog_jax.data import slides as slides_lib
from midog_jax.data import tiff_meta
from midog_jax.detections import Detections
from midog_jax.errors import DataError
from midog_jax.fileio import write_json_atomic


def write_predictions(images: Sequence[str], out: str | Path, workers: int = 1) -> int:
  """Writes ``OUT/<stem>.json`` per image; returns the number of failed images."""
  out = Path(out)
  todo, failed = [], 0
  for path, problem in predict_lib.expand_images(images):
    if problem:
      print(f"error: {path}: {problem}", file=sys.stderr)
      failed += 1
    else:
      todo.append(path)
  spacing = {}
  for path in list(todo):
    try:
      with slides_lib.Slide(path) as slide:
        s = tiff_meta.check_plausible(slide.spacing_um, path)
      if s is None:
        raise DataError(path, "no pixel spacing in the resolution tags")
      spacing[path] = float(s)
    except DataError as e:
      print(f"error: {e}", file=sys.stderr)
      todo.remove(path)
      failed += 1
  found = candidates.find_candidates_many(todo, workers=workers)
  for path, xy in zip(todo, found):
    dets = Detections(xy, np.ones(len(xy), np.float32))
    write_json_atomic(export.to_challenge_json(dets, spacing[path]), out / f"{path.stem}.json")
  print(f"done: {len(todo)} images written to {out} ({failed} failed)", flush=True)
  return failed


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m midog_jax.benchmark.blue_ratio",
                              description=__doc__.splitlines()[0])
  p.add_argument("--images", required=True, nargs="+", help="TIFF files and/or folders")
  p.add_argument("--out", required=True, help="output folder (<stem>.json per image)")
  p.add_argument("--workers", type=int, default=1, help="images in parallel")
  try:
    args = p.parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  try:
    failed = write_predictions(args.images, args.out, max(1, args.workers))
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
