"""Image-level probabilities of the fields of test images (the benchmark's image-level rows).

  python -m midog_jax.benchmark.fields --workdir W --images DIR/test --out fields.json

The image-level classifier (Irfan, SOFTEC AIC'24) answers "does this field
hold a mitotic figure?", not "where". To score it on whole test images, each
image is cut into the grid of fields its workdir was trained on (the
``image_level.field_area_mm2`` square at the image's own pixel spacing from
the TIFF tags, on the grid ``image_level.fields.case_fields`` cuts labelled
images with) and every field is scored by the trained classifier
(``classify.Classifier``: round 1's head ensemble, or round 2's network).
Labels are never read here: the benchmark labels the fields afterwards from
the test annotations with the same rule (``fields.field_label``).

Writes ``{round, head, threshold, margin_um, images: {stem: {spacing_um,
fields: [[x, y, side, probability], ...]}}}``; ``threshold`` is the one chosen
on validation during training. Exit codes: 0 written, 1 a bad workdir or
image, 2 usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from midog_jax import predict as predict_lib
from midog_jax.data import slides as slides_lib
from midog_jax.data import tiff_meta
from midog_jax.errors import DataError
from midog_jax.fileio import write_json_atomic

CHUNK = 32  # fields read and scored at once (bounded memory)


def score_fields(workdir: str | Path, images: Sequence[str], out: str | Path) -> dict:
  """Scores every field of every image and writes ``out`` (see the module docstring)."""
  from midog_jax.classify import Classifier  # pylint: disable=g-import-not-at-top
  from midog_jax.image_level import fields as fields_lib  # pylint: disable=g-import-not-at-top
  clf = Classifier(workdir)
  il = clf.config.image_level
  result = dict(round=clf.round, head=clf.head, threshold=float(clf.threshold),
                margin_um=float(il.margin_um), images={})
  items, owners = [], []
  for path, problem in predict_lib.expand_images(images):
    if problem:
      raise DataError(path, problem)
    slide = slides_lib.open_slide(path)
    spacing = tiff_meta.check_plausible(slide.spacing_um, path)
    if spacing is None:
      raise DataError(path, "no pixel spacing in the resolution tags")
    side = max(1, int(round(fields_lib.field_side_um(float(il.field_area_mm2)) / spacing)))
    result["images"][path.stem] = dict(spacing_um=float(spacing), fields=[])
    for y in slides_lib.grid_origins(slide.height, side, side):
      for x in slides_lib.grid_origins(slide.width, side, side):
        items.append(fields_lib.Item(str(path), int(x), int(y), side, side, clf.out_px, -1,
                                     "", f"{path.stem}@{int(x)},{int(y)}"))
        owners.append(path.stem)
  cache = slides_lib.SlideCache()
  for start in range(0, len(items), CHUNK):
    chunk = items[start:start + CHUNK]
    probs = clf.scores(np.stack([fields_lib.read_item(it, cache) for it in chunk]))
    for it, stem, p in zip(chunk, owners[start:start + CHUNK], probs):
      result["images"][stem]["fields"].append([it.x, it.y, it.w, float(p)])
  write_json_atomic(result, out)
  return result


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m midog_jax.benchmark.fields",
                              description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="an image-level training workdir")
  p.add_argument("--images", required=True, nargs="+", help="TIFF files and/or folders")
  p.add_argument("--out", required=True, help="output JSON")
  try:
    args = p.parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's restore warnings
  try:
    r = score_fields(args.workdir, args.images, args.out)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  n = sum(len(v["fields"]) for v in r["images"].values())
  print(f"done: {n} fields of {len(r['images'])} images scored into {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
