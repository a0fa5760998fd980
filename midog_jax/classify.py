"""Image-level classification of new images with a trained image-level workdir.

Usage::

  python -m midog_jax.classify --workdir runs/il1 --images fields/ extra.tiff \\
      --out preds.csv [--head ensemble|dense|forest] [--scale physical|rescale] \\
      [--threshold T] [--checkpoint best|latest]

Writes one CSV row per image: ``path,probability,label``, the label at the
threshold chosen on the validation set during training (round 1: each head's
F1-best validation threshold, the ensemble's rule; round 2: the F1-best
threshold stored with the best checkpoint) unless ``--threshold`` is given.
Each image is one field: ``--scale physical`` (default: the workdir's
``image_level.scale``) resamples it to the training pixel spacing using its
resolution tags and takes the centred field-sized square; ``rescale``
resamples the whole image to the field size.

Bad images (missing, corrupt, no pixel spacing under ``physical``) are
reported on stderr and left out; the others are still written. Exit code 0:
every image written; 1: a bad workdir, or some images failed; 2: usage.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from midog_jax import checkpoint as ckpt_lib
from midog_jax import predict as predict_lib
from midog_jax.errors import DataError
from midog_jax.fileio import atomic_output
from midog_jax.image_level import fields as fields_lib
from midog_jax.image_level import round1
from midog_jax.image_level.finetune import Finetune

CHUNK = 32  # images read and scored at once (bounded memory)


class Classifier:
  """A trained image-level workdir (round 1 or 2) ready to score images."""

  def __init__(self, workdir: str | Path, head: str = "ensemble", checkpoint: str = "best"):
    if not str(workdir):
      raise DataError(None, "empty --workdir")
    self.workdir = Path(workdir)
    if not self.workdir.is_dir():
      raise DataError(self.workdir, "workdir not found")
    self.config = predict_lib.load_config(self.workdir)
    if self.config.get("method") != "image_level":
      raise DataError(self.workdir / "config.json", f"method {self.config.get('method')!r} "
                      "is not image_level (detectors: python -m midog_jax.predict)")
    self.round = int(self.config.image_level.round)
    if self.round == 1:
      if head not in round1.HEADS:
        raise ValueError(f"--head must be one of {round1.HEADS}, got {head!r}")
      self.head = head
      self.trained = round1.load(self.workdir, self.config)
      self.out_px = self.trained.out_px
      self.threshold = self.trained.heads.thresholds()[head]
    else:
      self.head = "finetune"
      self.variables, meta = ckpt_lib.load_for_inference(self.workdir, checkpoint)
      self.method = Finetune(self.config)
      self.out_px = self.method.patch_size
      self.threshold = float(meta.get("threshold", 0.5))

  def scores(self, images: np.ndarray) -> np.ndarray:
    """P(positive) of uint8 (N, out_px, out_px, 3) fields."""
    if self.round == 1:
      return self.trained.heads.predict(self.trained.extractor(images))[self.head]
    return self.method.predict_images(self.variables, images)


def classify(workdir, images: Sequence[str], out: str | Path, *, head: str = "ensemble",
             scale: str | None = None, threshold: float | None = None,
             checkpoint: str = "best") -> dict[str, dict]:
  """Scores every image and writes the CSV; returns per-path results (or errors)."""
  clf = Classifier(workdir, head, checkpoint)
  il = clf.config.image_level
  scale = scale or str(il.scale)
  t = clf.threshold if threshold is None else float(threshold)
  if not 0.0 <= t <= 1.0:
    raise ValueError(f"--threshold must be a probability in [0, 1], got {t}")
  results: dict[str, dict] = {}
  todo = []
  for path, problem in predict_lib.expand_images(images):
    if problem:
      results[str(path)] = dict(error=problem)
      continue
    todo.append(path)
  for start in range(0, len(todo), CHUNK):
    good, pixels = [], []
    for path in todo[start:start + CHUNK]:
      try:
        item = fields_lib.image_item(path, clf.out_px, scale, float(il.work_spacing_um))
        pixels.append(fields_lib.read_item(item))
        good.append(path)
      except DataError as e:
        results[str(path)] = dict(error=e.problem)
    if good:
      for path, p in zip(good, clf.scores(np.stack(pixels))):
        results[str(path)] = dict(probability=float(p), label=int(float(p) >= t))
  with atomic_output(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "probability", "label"])
    for path, r in results.items():
      if "error" not in r:
        w.writerow([path, f"{r['probability']:.6f}", r["label"]])
  for path, r in results.items():
    if "error" in r:
      print(f"error: {path}: {r['error']}", file=sys.stderr)
  return results


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m midog_jax.classify",
      description="Does each image hold a mitotic figure? (an image-level workdir)")
  p.add_argument("--workdir", required=True, help="an image-level training workdir")
  p.add_argument("--images", required=True, nargs="+", help="TIFF files or folders")
  p.add_argument("--out", required=True, help="output CSV (path,probability,label)")
  p.add_argument("--head", default="ensemble", choices=round1.HEADS,
                 help="round-1 head (round 2 has one model)")
  p.add_argument("--scale", default=None, choices=fields_lib.SCALES,
                 help="physical (resolution tags) or rescale (default: the workdir's)")
  p.add_argument("--threshold", type=float, default=None,
                 help="label threshold (default: chosen on validation in training)")
  p.add_argument("--checkpoint", default="best", choices=predict_lib.CHECKPOINTS)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """CLI; returns 0 (all written), 1 (a bad workdir, or some images failed), 2 (usage)."""
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
    return int(e.code or 0)
  logging.getLogger("absl").setLevel(logging.ERROR)
  t0 = time.perf_counter()
  try:
    results = classify(args.workdir, args.images, args.out, head=args.head,
                       scale=args.scale, threshold=args.threshold,
                       checkpoint=args.checkpoint)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  failed = sum("error" in r for r in results.values())
  print(f"done: {len(results) - failed} of {len(results)} images classified into "
        f"{args.out} ({failed} failed, {time.perf_counter() - t0:.1f} s)", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
