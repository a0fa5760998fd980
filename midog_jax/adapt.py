"""Domain adaptation on target images, then their challenge outputs (Kondo, MIDOG 2021).

Usage::

  python -m midog_jax.adapt --workdir=runs/kondo --images target/ more.tiff \\
      --out predictions/ [--per image|domain] [--threshold T] [--spacing_um S] \\
      [--formats json,geojson,csv] [--checkpoint best|latest]

For a workdir trained with ``configs/kondo_da.py``:

1. the source selection (``detectors/kondo_da/adaptation.py``): confident
   source patches, ``kondo.adapt.source_per_domain`` per training scanner of
   which ``kondo.adapt.source_mitotic`` mitotic, computed ONCE per trained
   model and kept in ``WORKDIR/adapt/source-<hash of the weights and
   settings>.npz`` (later runs load it);
2. per target image (``--per image``, the seed) or once for all the given
   images (``--per domain``: pass the images of ONE unseen scanner), the
   model's domain head grows by one class and trains on the source patches
   (mitosis + domain losses) and the target images' candidates (domain loss
   only; their labels are never read): Adam ``kondo.adapt.lr`` (1.7e-6)
   constant, batch ``kondo.adapt.batch_size`` (128), ``kondo.adapt.epochs``
   (5);
3. each image's candidates are classified by the adapted model and written
   as ``predict`` writes them (``OUT/<stem>.json``, the MIDOG "Multiple
   points" format, plus the asked formats): points scoring at least the
   threshold (the checkpoint's F1-best one on the source validation images
   unless ``--threshold``); every image's files are written whole or not at
   all. The trained workdir is not modified (except ``adapt/``).

Bad images are reported on stderr and skipped. SIGTERM or Ctrl-C: the current
image is finished (per domain: the current phase), then the run stops with
one line (exit 1). Exit codes: 0 all written; 1 a bad workdir or image, or
stopped; 2 usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from midog_jax import errors, predict, signals
from midog_jax.data import slides as slides_lib
from midog_jax.errors import DataError, Stopped
from midog_jax.fileio import atomic_path

PER = ("image", "domain")


def _weights_hash(variables) -> str:
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def source_selection(detector, variables, workdir: Path, log=print):
  """The stored source selection of this model (computed and saved if absent)."""
  from midog_jax.detectors.kondo_da import adaptation  # pylint: disable=g-import-not-at-top
  a = detector.config.kondo.adapt
  settings = dict(per_domain=int(a.source_per_domain), mitotic=int(a.source_mitotic),
                  candidates=str(detector.settings))
  key = hashlib.sha256((_weights_hash(variables) + json.dumps(settings, sort_keys=True)
                        ).encode()).hexdigest()[:20]
  path = workdir / "adapt" / f"source-{key}.npz"
  if path.exists():
    return adaptation.SourceSet.load(path), path
  data = detector.load_data()  # builds or finds the candidate store
  t0 = time.perf_counter()
  sel = adaptation.select_source(detector, variables, detector.indices_of(data.train),
                                 settings["per_domain"], settings["mitotic"])
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_path(path) as tmp:
    sel.save(tmp)
  names = detector.store.domain_names
  counts = ", ".join(f"{names[d]} {c['patches']} ({c['mitotic']} mitotic)"
                     for d, c in sel.counts().items())
  log(f"source selection: {counts} ({time.perf_counter() - t0:.1f} s) -> {path}")
  return sel, path


class _Target:
  """One target image: its path, stem, spacing and candidates."""

  def __init__(self, path: Path, stem: str, spacing: float, xy: np.ndarray,
               patches: np.ndarray):
    self.path, self.stem, self.spacing, self.xy, self.patches = path, stem, spacing, xy, patches


def _read_target(detector, path: Path, stem: str, spacing_um) -> _Target:
  with slides_lib.Slide(path) as slide:
    spacing = predict._spacing(slide, spacing_um)  # pylint: disable=protected-access
    xy, patches = detector.candidates(slide)
  return _Target(path, stem, spacing, xy, patches)


def adapt_images(workdir, images: Sequence, out, *, per: str = "image",
                 threshold: float | None = None, spacing_um: float | None = None,
                 formats: Sequence[str] = ("json",), checkpoint: str = "best",
                 verbose: bool = True) -> dict[str, dict]:
  """Adapts the workdir's model to the target images and writes their outputs.

  Returns per stem ``{"n", "path", "adapt_seconds", "seconds", "candidates"}``
  for written images, ``{"error": message}`` for failed ones.

  Raises:
    DataError: the workdir cannot be used (nothing is written then).
    ValueError: bad arguments.
    errors.Stopped: SIGTERM/SIGINT; the images before it are complete.
  """
  from midog_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from midog_jax import detectors  # pylint: disable=g-import-not-at-top
  from midog_jax.detectors.kondo_da import adaptation  # pylint: disable=g-import-not-at-top

  if per not in PER:
    raise ValueError(f"--per must be one of {PER}, got {per!r}")
  formats = tuple(formats)
  if not formats or any(f not in predict.FORMATS for f in formats):
    raise ValueError(f"formats must be a non-empty subset of {predict.FORMATS}, got {formats}")
  if threshold is not None:
    predict._check_threshold(threshold)  # pylint: disable=protected-access
  if spacing_um is not None and not (spacing_um > 0 and math.isfinite(spacing_um)):
    raise ValueError(f"spacing_um must be a positive number, got {spacing_um}")
  log = print if verbose else (lambda *a, **k: None)
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise DataError(workdir, "workdir not found")
  ckdir = workdir / "checkpoints"
  if not any(ckpt_lib.saved_steps(ckdir / n) for n in predict.CHECKPOINTS):
    raise DataError(ckdir, "no checkpoint found (train first with midog_jax.main)")
  variables, meta = ckpt_lib.load_for_inference(workdir, checkpoint)
  config = predict.load_config(workdir, meta)
  if config.get("method") != "kondo_da":
    raise DataError(workdir / "config.json", f"method {config.get('method')!r}: "
                    "adaptation needs a workdir trained with configs/kondo_da.py")
  if threshold is None:
    threshold = float(meta["threshold"])
  detector = detectors.build(config)
  a = config.kondo.adapt
  source, _ = source_selection(detector, variables, workdir, log)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)

  def adapt(patches):
    t0 = time.perf_counter()
    grown, v = adaptation.adapt_variables(
        detector, variables, source, patches, lr=float(a.lr),
        batch_size=int(a.batch_size), epochs=float(a.epochs), seed=int(a.seed))
    return grown, v, time.perf_counter() - t0

  def write(target: _Target, grown, v, adapt_s: float, t0: float) -> dict:
    probs = grown.score_patches(v, target.patches)
    dets = grown.to_detections(target.xy, probs, threshold, float(config.eval.merge_radius_px))
    with slides_lib.Slide(target.path) as slide:
      paths = predict.output_paths(out, target.stem, formats, False)
      predict.write_outputs(dets, target.spacing, paths, slide)
    secs = time.perf_counter() - t0
    log(f"{target.stem}: {len(dets)} detections of {len(target.xy)} candidates "
        f"(adaptation {adapt_s:.1f} s, total {secs:.1f} s)", flush=True)
    return {"n": len(dets), "path": str(next(iter(paths.values()))),
            "adapt_seconds": adapt_s, "seconds": secs, "candidates": len(target.xy)}

  results: dict[str, dict] = {}
  todo = predict.expand_images(images)
  stems: dict[str, Path] = {}

  def fail(stem, path, e):
    msg = str(e) if isinstance(e, DataError) else f"{path}: {e}"
    results[stem if stem not in results else str(path)] = {"error": msg}
    if verbose:
      print(f"error: {msg} (skipped)", file=sys.stderr, flush=True)

  def read(path, problem):
    stem = path.stem if path.suffix.lower() in predict.TIFF_SUFFIXES else path.name
    if problem is not None:
      raise DataError(path, problem)
    if stem in stems:
      raise DataError(path, f"output name {stem!r} is already used by {stems[stem]}; "
                      "rename one of them")
    target = _read_target(detector, path, stem, spacing_um)
    if not len(target.xy):
      raise DataError(path, "no candidates in this image (blue-ratio threshold)")
    stems[stem] = path
    return target

  def stopped(stop):
    done = sum("error" not in r for r in results.values())
    return Stopped(stop.signal_name, (
        f"stopped on {stop.signal_name} after {len(results)} of {len(todo)} images "
        f"({done} written to {out}, each complete); run again for the rest"))

  with signals.StopRequest("the current image") as stop:
    if per == "image":
      for path, problem in todo:
        if stop.requested:
          raise stopped(stop)
        t0 = time.perf_counter()
        try:
          target = read(path, problem)
          grown, v, adapt_s = adapt(target.patches)
          results[target.stem] = write(target, grown, v, adapt_s, t0)
        except (DataError, OSError) as e:
          fail(path.stem, path, e)
    else:
      t0 = time.perf_counter()
      targets = []
      for path, problem in todo:
        if stop.requested:
          raise stopped(stop)
        try:
          targets.append(read(path, problem))
        except (DataError, OSError) as e:
          fail(path.stem, path, e)
      if targets:
        if stop.requested:
          raise stopped(stop)
        grown, v, adapt_s = adapt(np.concatenate([t.patches for t in targets]))
        log(f"adapted to {len(targets)} images at once ({adapt_s:.1f} s)")
        for t in targets:
          if stop.requested:
            raise stopped(stop)
          try:
            results[t.stem] = write(t, grown, v, adapt_s / len(targets), t0)
          except (DataError, OSError) as e:
            fail(t.stem, t.path, e)
  return results


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m midog_jax.adapt",
      description="Adapt a kondo_da workdir to target images, then write their detections.")
  p.add_argument("--workdir", required=True, help="workdir trained with configs/kondo_da.py")
  p.add_argument("--images", required=True, nargs="+",
                 help="target TIFF files and/or folders of *.tif/*.tiff")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--per", default="image", choices=PER,
                 help="adapt per image (the seed) or once per domain (all the given images)")
  predict.add_output_arguments(p)
  p.add_argument("--checkpoint", default="best", choices=predict.CHECKPOINTS)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """CLI; 0 all written, 1 a bad workdir or image or stopped, 2 usage."""
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # argparse: 2 on usage errors, 0 on --help
    return int(e.code or 0)
  formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only warnings
  outcome = {}

  def run():
    t0 = time.perf_counter()
    try:
      results = adapt_images(args.workdir, args.images, args.out, per=args.per,
                             threshold=args.threshold, spacing_um=args.spacing_um,
                             formats=formats, checkpoint=args.checkpoint)
    except DataError:
      raise  # a ValueError too: exit_code's one line and exit 1
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      outcome["code"] = 2
      return
    except Stopped as e:  # not every image was done: not a success
      print(e.message, file=sys.stderr)
      outcome["code"] = 1
      return
    failed = sum("error" in r for r in results.values())
    print(f"done: {len(results) - failed} of {len(results)} images written to {args.out} "
          f"({failed} failed, {time.perf_counter() - t0:.1f} s)", flush=True)
    outcome["code"] = 1 if failed else 0

  code = errors.exit_code(run)  # DataError -> one line, 1; storage errors
  return code or outcome.get("code", 0)


if __name__ == "__main__":
  sys.exit(main())
