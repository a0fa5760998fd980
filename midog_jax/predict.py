"""Detections on new images with a trained workdir: challenge JSON (and more) per image.

Usage::

  python -m midog_jax.predict --workdir=runs/retina --images slides/ extra.tiff \\
      --out predictions/ [--threshold T] [--spacing_um S] \\
      [--formats json,geojson,csv] [--overlays] [--checkpoint best|latest] \\
      [--inference tiles|regions] [--skip_blank]

Several workdirs (``--workdir A --workdir B`` or ``--workdir A,B``) make an
ensemble by agreement (Lafarge & Koelzer's final submission): a detection of the first
model is kept when every other model has a detection of the same class within
the MIDOG matching radius (7.5 um in the image's pixels), each model having
applied its own threshold first; see :func:`midog_jax.ensemble.combine`.

Writes ``OUT/<stem>.json`` (the MIDOG "Multiple points" format, millimetres)
for every image, plus ``<stem>.geojson`` (QuPath, pixels), ``<stem>.csv`` and
``<stem>.png`` (detections drawn on the image) when asked. Points are the
detections scoring at least the threshold: the F1-best one found on the
validation images during training (stored with the checkpoint) unless
``--threshold`` is given. Millimetres use the pixel spacing from the TIFF
resolution tags, or ``--spacing_um`` (which overrides the tags).

Bad images (missing, corrupt, truncated, unsupported pixels, no known pixel
spacing) are reported on stderr and skipped; the others are still written, and
nothing is written for a failed image. SIGTERM or Ctrl-C: the current image
is finished, then the run stops (one line saying how far it got, exit 1).
Exit code 0: all images written; 1: some failed or the run was stopped;
2: usage or workdir errors.

The model half (:class:`Predictor`, one per workdir, and :func:`detect_image`,
one ``Detections`` per image per workdir) is kept apart from the output half
so that an ensemble of workdirs can combine its members' detections before
anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from midog_jax import ensemble, export, signals
from midog_jax.data import slides as slides_lib
from midog_jax.data import tiff_meta
from midog_jax.detections import Detections
from midog_jax.errors import DataError, Stopped
from midog_jax.fileio import atomic_path, read_json, write_json_atomic

FORMATS = ("json", "geojson", "csv")
TIFF_SUFFIXES = (".tif", ".tiff")
CHECKPOINTS = ("best", "latest")


# ----------------------------------------------------------------------------
# The model half: one Predictor per workdir.


@dataclasses.dataclass
class Predictor:
  """A trained workdir ready for inference.

  Attributes:
    workdir: the training workdir.
    config: its config (``config.json``).
    threshold: score a detection needs to be written (the checkpoint's
      F1-best threshold unless overridden).
    tiler: the detector's tile function with its tiling
      (``evaluation.Tiler``).
  """

  workdir: Path
  config: object
  threshold: float
  tiler: object

  def detect(self, slide: slides_lib.Slide) -> Detections:
    """Detections on one image scoring at least ``self.threshold`` (pixels)."""
    return self.tiler.detect(slide).above(self.threshold)  # ">=" as in the sweep


def _check_threshold(threshold: float) -> None:
  if not 0.0 <= threshold <= 1.0:  # NaN fails this too
    raise ValueError(f"--threshold must be a probability in [0, 1], got {threshold}")


def load_config(workdir: str | os.PathLike, meta: dict | None = None):
  """The workdir's ``config.json`` as a ConfigDict (else the checkpoint's copy).

  JSON has no tuples; the method code converts every sequence it uses with
  ``tuple(...)``, so lists from JSON build the same model.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = Path(workdir) / "config.json"
  if path.exists():
    data = read_json(path, "config file")
    if not isinstance(data, dict):
      raise DataError(path, "expected a JSON object (the training config)")
    return ml_collections.ConfigDict(data)
  if meta and isinstance(meta.get("config"), dict):
    return ml_collections.ConfigDict(meta["config"])
  raise DataError(path, "no config.json in the workdir (train first with "
                  "midog_jax.main)")


def load_predictor(workdir: str | os.PathLike, threshold: float | None = None,
                   checkpoint: str = "best", exact_rotation: bool = False,
                   tta: bool = False, inference: str | None = None,
                   skip_blank: bool = False) -> Predictor:
  """Builds the method of ``workdir`` and loads its weights and threshold.

  Args:
    workdir: a training workdir (``config.json`` + ``checkpoints/``).
    threshold: output threshold; None takes the F1-best threshold stored in
      the checkpoint meta.
    checkpoint: "best" (falls back to "latest" when no best exists) or
      "latest".
    exact_rotation: the P4 method's stride-1 map (``eval.exact_rotation``):
      rotation-exact on images of any size, at 4x the compute.
    tta: D4 test-time augmentation (``eval.tta``, ``midog_jax.tta``), 8x.
    inference: "tiles" or "regions" (``eval.inference``, see ``infer``);
      None keeps the workdir's setting.
    skip_blank: skip tiles/regions without tissue (``eval.skip_blank``).

  Raises:
    DataError: no workdir, no checkpoint, or no config.
  """
  from midog_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from midog_jax import detectors, evaluation, infer  # pylint: disable=g-import-not-at-top

  if not os.fspath(workdir):  # Path("") would silently mean the current folder
    raise DataError(None, "empty --workdir")
  workdir = Path(workdir)
  if checkpoint not in CHECKPOINTS:
    raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
  if not workdir.is_dir():
    raise DataError(workdir, "workdir not found")
  # Fail on a missing checkpoint before any model is built (that takes a while).
  ckdir = workdir / "checkpoints"
  if not any(ckpt_lib.saved_steps(ckdir / n) for n in CHECKPOINTS):
    raise DataError(ckdir, "no checkpoint found (train first with midog_jax.main)")
  variables, meta = ckpt_lib.load_for_inference(workdir, checkpoint)
  config = load_config(workdir, meta)
  if threshold is None:
    if "threshold" not in meta:
      raise DataError(ckdir, "checkpoint meta has no threshold; pass --threshold")
    threshold = float(meta["threshold"])
  _check_threshold(threshold)  # also a stored one
  if exact_rotation:
    if config.get("method") != "p4":
      raise ValueError(f"--exact_rotation is for the P4 method; {workdir} holds "
                       f"{config.get('method')!r}")
    config.eval.exact_rotation = True
  if tta:
    config.eval.tta = True
  if inference is not None:
    if inference not in infer.MODES:
      raise ValueError(f"--inference must be one of {infer.MODES}, got {inference!r}")
    config.eval.inference = inference
  if skip_blank:
    config.eval.skip_blank = True
  detector = detectors.build(config)
  # Candidates below the output threshold would be dropped anyway; a threshold
  # under the training-time candidate cut-off lowers it, or "--threshold 0"
  # would silently still mean eval.score_thresh.
  tiler = evaluation.make_tiler(detector, variables, config, score_thresh=threshold)
  return Predictor(workdir=workdir, config=config, threshold=threshold, tiler=tiler)


def detect_image(predictors: Sequence[Predictor], slide: slides_lib.Slide
                 ) -> list[Detections]:
  """One ``Detections`` per predictor (workdir) for one image.

  The hook for ensembles: combine the list (e.g. by agreement) before output.
  """
  return [p.detect(slide) for p in predictors]


# ----------------------------------------------------------------------------
# Inputs and outputs.


def expand_images(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, str | None]]:
  """Files as given, folders as their ``*.tif``/``*.tiff`` files (sorted).

  Returns ``(path, problem)`` pairs; ``problem`` is None for paths to try and a
  message for inputs already known to be bad (a folder without TIFFs). Files
  are kept even when missing, so they are reported as images.
  """
  out = []
  for p in map(Path, paths):
    if p.is_dir():
      found = sorted(f for f in p.iterdir()
                     if f.suffix.lower() in TIFF_SUFFIXES and f.is_file())
      if not found:
        out.append((p, "folder holds no .tif/.tiff files"))
      out.extend((f, None) for f in found)
    else:
      out.append((p, None))
  return out


def output_paths(out: Path, stem: str, formats: Sequence[str], overlays: bool
                 ) -> dict[str, Path]:
  """Output files of one image by kind."""
  suffix = dict(json=".json", geojson=".geojson", csv=".csv", png=".png")
  kinds = list(formats) + (["png"] if overlays else [])
  return {k: out / f"{stem}{suffix[k]}" for k in kinds}


def write_outputs(dets: Detections, spacing_um: float, paths: dict[str, Path],
                  slide: slides_lib.Slide | None = None) -> None:
  """Writes every requested output of one image; all or none of them.

  Every file is first written under a temporary name beside its target; only
  when all of them are complete are they renamed into place. A failure (or a
  signal) before that leaves no new file and every earlier output of this
  image, say from a previous run, untouched.
  """
  with contextlib.ExitStack() as staged:
    for kind, path in paths.items():
      tmp = staged.enter_context(atomic_path(path))  # renamed when the stack closes
      if kind == "json":
        write_json_atomic(export.to_challenge_json(dets, spacing_um), tmp)
      elif kind == "geojson":
        write_json_atomic(export.to_geojson(dets), tmp)
      elif kind == "csv":
        export.to_csv(dets, tmp, spacing_um)
      elif kind == "png":
        # No truth on new images: every mitotic detection is drawn (in the
        # "unmatched" colour); the circle is the 7.5 um matching radius.
        none = np.zeros((0, 2), np.float32)
        export.overlay_png(slide.read_all(), dets, none, none, tmp,
                           match_radius_px=7.5 / spacing_um)
      else:
        raise ValueError(f"unknown output kind {kind!r}")


def _spacing(slide: slides_lib.Slide, override: float | None) -> float:
  if override is not None:
    return float(override)
  if slide.spacing_um is None:
    raise DataError(slide.path, "no pixel spacing: the TIFF has no usable "
                    "resolution tags; pass --spacing_um (microns per pixel)")
  return float(tiff_meta.check_plausible(slide.spacing_um, slide.path))


# ----------------------------------------------------------------------------
# Library entry point.


def _workdirs(workdir) -> list[str]:
  """One or several workdirs: a path, a comma-separated string, or a list."""
  items = [workdir] if isinstance(workdir, (str, os.PathLike)) else list(workdir)
  out = []
  for w in items:
    w = os.fspath(w)
    out += [p.strip() for p in w.split(",")] if "," in w else [w]
  if not out:
    raise DataError(None, "empty --workdir")
  return out


def predict_images(workdir: str | os.PathLike | Sequence[str | os.PathLike],
                   images: Sequence[str | os.PathLike],
                   out: str | os.PathLike, threshold: float | None = None,
                   spacing_um: float | None = None,
                   formats: Sequence[str] = ("json",), overlays: bool = False, *,
                   checkpoint: str = "best", exact_rotation: bool = False,
                   tta: bool = False, inference: str | None = None,
                   skip_blank: bool = False, verbose: bool = True) -> dict[str, dict]:
  """Detects mitotic figures on ``images`` and writes one output set per image.

  Args:
    workdir: trained workdir, or several (a list or a comma-separated
      string) for an ensemble by agreement (see :func:`ensemble.combine`).
    images: TIFF files and/or folders (every ``*.tif``/``*.tiff`` inside).
    out: output folder (created).
    threshold: output threshold (default: the checkpoint's F1-best one); in
      an ensemble it replaces every member's own threshold.
    spacing_um: microns per pixel for all images (overrides the TIFF tags).
    formats: subset of ("json", "geojson", "csv").
    overlays: also write ``<stem>.png`` with the detections drawn.
    checkpoint: "best" (else latest) or "latest".
    exact_rotation, tta, inference, skip_blank: see :func:`load_predictor`.
    verbose: print one line per image (stdout) and each error (stderr).

  Returns:
    Per stem: ``{"n": detections, "path": json-or-first-output path,
    "seconds": s}`` for written images, ``{"error": message}`` for failed ones.

  Raises:
    DataError: the workdir cannot be used (nothing is written then).
    ValueError: bad arguments (unknown format, non-positive spacing).
    errors.Stopped: SIGTERM/SIGINT; the images before it are complete.
  """
  formats = tuple(formats)
  bad = [f for f in formats if f not in FORMATS]
  if bad or not (formats or overlays):
    raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
  if spacing_um is not None and not (spacing_um > 0 and math.isfinite(spacing_um)):
    raise ValueError(f"spacing_um must be a positive number, got {spacing_um}")
  if threshold is not None:
    _check_threshold(threshold)  # before any model loads
  predictors = [load_predictor(w, threshold, checkpoint, exact_rotation, tta,
                               inference, skip_blank)
                for w in _workdirs(workdir)]
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  if verbose:
    thresholds = ", ".join(f"{p.workdir}: threshold {p.threshold:.4f}" for p in predictors)
    print(f"predicting with {thresholds}", flush=True)

  results: dict[str, dict] = {}
  sources: dict[str, Path] = {}
  todo = expand_images(images)
  # SIGTERM/Ctrl-C: the current image is finished (its files are written
  # whole or not at all), then the run stops.
  with signals.StopRequest("the current image") as stop:
    for path, problem in todo:
      if stop.requested:
        done = sum("error" not in r for r in results.values())
        raise Stopped(stop.signal_name, (
            f"stopped on {stop.signal_name} after {len(results)} of {len(todo)} images "
            f"({done} written to {out}, each complete); run again for the rest"))
      stem = path.stem if path.suffix.lower() in TIFF_SUFFIXES else path.name
      t0 = time.perf_counter()
      try:
        if problem is not None:
          raise DataError(path, problem)
        if stem in sources:
          raise DataError(path, f"output name {stem!r} is already used by "
                          f"{sources[stem]}; rename one of them")
        with slides_lib.Slide(path) as slide:
          spacing = _spacing(slide, spacing_um)
          # The matching radius (7.5 um) in this image's pixels.
          dets = ensemble.combine(detect_image(predictors, slide), radius_px=7.5 / spacing)
          paths = output_paths(out, stem, formats, overlays)
          write_outputs(dets, spacing, paths, slide)
        sources[stem] = path
      except (DataError, OSError) as e:
        msg = str(e) if isinstance(e, DataError) else f"{path}: {e}"
        key = stem if stem not in results else str(path)
        results[key] = {"error": msg}
        if verbose:
          print(f"error: {msg} (skipped)", file=sys.stderr, flush=True)
        continue
      secs = time.perf_counter() - t0
      results[stem] = {"n": len(dets), "path": str(next(iter(paths.values()))),
                       "seconds": secs}
      if verbose:
        print(f"{stem}: {len(dets)} detections ({secs:.2f} s)", flush=True)
  return results


# ----------------------------------------------------------------------------
# Command line.


def add_output_arguments(p: argparse.ArgumentParser) -> None:
  """--threshold, --spacing_um and --formats: how detections become output files
  (shared by every program that writes predict's outputs: predict, adapt)."""
  p.add_argument("--threshold", type=float, default=None,
                 help="score threshold (default: the checkpoint's F1-best one)")
  p.add_argument("--spacing_um", "--spacing-um", type=float, default=None,
                 help="microns per pixel (overrides the TIFF resolution tags)")
  p.add_argument("--formats", default="json",
                 help=f"comma-separated subset of {','.join(FORMATS)} (default json)")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m midog_jax.predict",
      description="Mitotic-figure detections on TIFF images with a trained workdir.")
  p.add_argument("--workdir", required=True, action="append",
                 help="training workdir; repeat it (or separate by commas) for "
                 "an ensemble by agreement")
  p.add_argument("--images", required=True, nargs="+",
                 help="TIFF files and/or folders of *.tif/*.tiff")
  p.add_argument("--out", required=True, help="output folder")
  add_output_arguments(p)
  p.add_argument("--overlays", action="store_true",
                 help="also write <stem>.png with the detections drawn")
  p.add_argument("--exact_rotation", "--exact-rotation", action="store_true",
                 help="P4 method: a stride-1 map, so predictions on a rotated image are the "
                 "rotated predictions for every image size (4x the compute)")
  p.add_argument("--tta", action="store_true",
                 help="D4 test-time augmentation: the 8 flips/rotations of each image, "
                 "detections merged back, scores averaged (8x the compute)")
  p.add_argument("--inference", default=None, choices=("tiles", "regions"),
                 help="tiles (512 px squares; one compiled program for every image size) or "
                 "regions (a few large regions per image, ~3%% extra pixels instead of ~29%%; "
                 "one compilation per image size); default: the workdir's eval.inference")
  p.add_argument("--skip_blank", "--skip-blank", action="store_true",
                 help="skip tiles/regions without tissue (no pixel darker than OD 0.15 "
                 "on an every-8th-pixel grid)")
  p.add_argument("--checkpoint", default="best", choices=CHECKPOINTS,
                 help="best (falls back to latest) or latest")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """CLI; returns 0 (all written), 1 (a bad workdir, or some images failed), 2 (usage)."""
  parser = _parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
    return int(e.code or 0)
  formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
  # Orbax warns on every read-only restore; those lines would bury ours.
  logging.getLogger("absl").setLevel(logging.ERROR)
  t0 = time.perf_counter()
  try:
    results = predict_images(args.workdir, args.images, args.out,
                             threshold=args.threshold, spacing_um=args.spacing_um,
                             formats=formats, overlays=args.overlays,
                             checkpoint=args.checkpoint,
                             exact_rotation=args.exact_rotation, tta=args.tta,
                             inference=args.inference, skip_blank=args.skip_blank)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except ValueError as e:  # bad arguments (formats, threshold)
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Stopped as e:  # not every image was done: not a success
    print(e.message, file=sys.stderr)
    return 1
  failed = sum("error" in r for r in results.values())
  n_dets = sum(r.get("n", 0) for r in results.values())
  print(f"done: {len(results) - failed} of {len(results)} images written to "
        f"{args.out} ({n_dets} detections, {failed} failed, "
        f"{time.perf_counter() - t0:.1f} s)", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
