"""MIDOG evaluation: pooled and per-domain F1, threshold sweeps, and the CLI.

Usage::

  python -m midog_jax.evaluate --annotations MIDOG.json --predictions OUTDIR \\
      [--images DIR] [--truth EXTRA_TRUTH.json] [--split all] [--threshold T]

``OUTDIR/<stem>.json`` holds one challenge-format prediction file per image
(written by :mod:`midog_jax.export`, read here). The protocol (the organisers'
evaluation code): points in millimetres, greedy matching in ground-truth order within
7.5 um (:func:`midog_jax.metrics.match`), counts summed over cases and F1
computed once from the sums. Imposters are not truth; points named
"non-mitotic figure" are ignored. Prints one JSON object with ``tp, fp, fn,
precision, recall, f1, n_cases, threshold`` and ``per_domain``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from midog_jax import metrics
from midog_jax.data import midog
from midog_jax.detections import CHALLENGE_NAMES, CLASS_OF_NAME, MITOSIS, Detections
from midog_jax.errors import DataError
from midog_jax.fileio import read_json, write_json_atomic

MAX_SWEEP_THRESHOLDS = 512
SPLITS = ("all", "train", "val", "test", "heldout")


# ----------------------------------------------------------------------------
# Library API (called by training and inference code; keep it stable).


def _as_xy_scores(value, image_id) -> tuple[np.ndarray, np.ndarray]:
  """(xy (N, 2), scores (N,)) from a tuple or :class:`detections.Detections`."""
  if isinstance(value, Detections):
    value = value.mitotic()
    return value.xy.astype(np.float64), value.scores.astype(np.float64)
  xy, scores = value
  xy = np.asarray(xy, np.float64).reshape(-1, 2)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if len(xy) != len(scores):
    raise ValueError(f"image {image_id}: {len(xy)} points but {len(scores)} scores")
  if not (np.isfinite(xy).all() and np.isfinite(scores).all()):
    raise ValueError(f"image {image_id}: non-finite predicted points or scores")
  return xy, scores


def _truth_mm(case: midog.Case) -> np.ndarray:
  return case.mitoses.astype(np.float64) * (case.spacing_um / 1000.0)


def _summary(per_case: Sequence[tuple[midog.Case, metrics.Counts]],
             threshold: float) -> dict:
  """Pooled counts overall and per domain, in the CLI's output structure."""
  total = metrics.pooled(c for _, c in per_case)
  out = dict(total.as_dict(), n_cases=len(per_case), threshold=float(threshold))
  domains: dict[str, list[metrics.Counts]] = {}
  for case, c in per_case:
    domains.setdefault(case.domain, []).append(c)
  out["per_domain"] = {d: dict(metrics.pooled(cs).as_dict(), n_cases=len(cs))
                       for d, cs in sorted(domains.items())}
  return out


def _collect(cases: Sequence[midog.Case], preds: Mapping, allow_missing: bool,
             to_mm: bool) -> list[tuple[midog.Case, np.ndarray, np.ndarray]]:
  """Labelled cases with their predictions in mm (empty where missing)."""
  labeled = [c for c in cases if c.labeled]
  missing = [c.image_id for c in labeled if c.image_id not in preds]
  if missing and not allow_missing:
    raise KeyError(f"no predictions for {len(missing)} labelled case(s): "
                   f"image ids {missing[:20]}{' ...' if len(missing) > 20 else ''}")
  out = []
  for c in labeled:
    if c.image_id in preds:
      if not to_mm and isinstance(preds[c.image_id], Detections):
        raise TypeError("Detections are in pixels; use evaluate_points")
      xy, scores = _as_xy_scores(preds[c.image_id], c.image_id)
      if to_mm:
        xy = xy * (c.spacing_um / 1000.0)
    else:
      xy, scores = np.zeros((0, 2)), np.zeros((0,))
    out.append((c, xy, scores))
  return out


def _evaluate(items, threshold: float, per_case: bool) -> dict:
  results = []
  for case, xy_mm, scores in items:
    keep = scores >= threshold
    counts, _ = metrics.match(_truth_mm(case), xy_mm[keep], metrics.RADIUS_MM)
    results.append((case, counts))
  out = _summary(results, threshold)
  if per_case:
    out["per_case"] = {c.stem: dict(cnt.as_dict(), domain=c.domain)
                       for c, cnt in results}
  return out


def evaluate_points(cases: Sequence[midog.Case], preds: Mapping[int, object],
                    threshold: float = 0.0, *, allow_missing: bool = False,
                    per_case: bool = False) -> dict:
  """MIDOG metrics of pixel-coordinate predictions.

  Args:
    cases: cases to evaluate; unlabelled ones are skipped.
    preds: image_id -> ``(xy_px (N, 2), scores (N,))`` (or a
      :class:`detections.Detections`, whose non-mitotic points are dropped).
      Each case's ``spacing_um`` converts pixels to millimetres.
    threshold: predictions with score below it are dropped.
    allow_missing: count a labelled case without predictions as having none
      (all its figures FN) instead of raising KeyError.
    per_case: also return ``per_case: {stem: counts}``.

  Returns:
    ``{tp, fp, fn, precision, recall, f1, n_cases, threshold, per_domain:
    {domain: {tp, fp, fn, precision, recall, f1, n_cases}}}``, pooled.
  """
  return _evaluate(_collect(cases, preds, allow_missing, to_mm=True),
                   threshold, per_case)


def evaluate_mm(cases: Sequence[midog.Case], preds_mm: Mapping[int, object],
                threshold: float = 0.0, *, allow_missing: bool = False,
                per_case: bool = False) -> dict:
  """As :func:`evaluate_points`, for ``(xy_mm (N, 2), scores (N,))`` tuples
  already in millimetres (what the challenge JSON files hold)."""
  return _evaluate(_collect(cases, preds_mm, allow_missing, to_mm=False),
                   threshold, per_case)


def _sweep_thresholds(all_scores: np.ndarray) -> np.ndarray:
  """Unique scores, or <= 512 score quantiles when there are more."""
  uniq = np.unique(all_scores)
  if len(uniq) <= MAX_SWEEP_THRESHOLDS:
    return uniq
  # Quantiles of the score distribution (with multiplicity), taken as actual
  # scores so every threshold is one a prediction sits on.
  s = np.sort(all_scores)
  idx = np.round(np.linspace(0, len(s) - 1, MAX_SWEEP_THRESHOLDS)).astype(int)
  return np.unique(s[idx])


def _components(adjacent: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """Connected groups of (truth, prediction) points linked by ``adjacent``.

  Greedy matching never links points of different groups (they are farther
  apart than the radius), so each group can be matched on its own; indices
  stay in increasing order, which keeps truth order and tie-breaking intact.
  """
  from scipy.sparse import coo_matrix  # pylint: disable=g-import-not-at-top
  from scipy.sparse.csgraph import connected_components  # pylint: disable=g-import-not-at-top
  n_t, n_p = adjacent.shape
  ti, pj = np.nonzero(adjacent)
  if len(ti) == 0:
    return []
  graph = coo_matrix((np.ones(len(ti), bool), (ti, n_t + pj)),
                     shape=(n_t + n_p, n_t + n_p))
  _, label = connected_components(graph, directed=False)
  t_lab, p_lab = label[:n_t], label[n_t:]
  linked = np.unique(t_lab[ti])
  return [(np.flatnonzero(t_lab == g), np.flatnonzero(p_lab == g)) for g in linked]


def _component_tp(truth: np.ndarray, xy: np.ndarray, scores: np.ndarray,
                  ts: np.ndarray) -> np.ndarray:
  """True positives of one group at each threshold in ``ts``."""
  # Kept sets are nested in the threshold, so the number kept identifies the
  # set: match once per distinct number, not once per threshold.
  n_kept = len(scores) - np.searchsorted(np.sort(scores), ts, side="left")
  tp = np.zeros(len(ts), np.int64)
  for k in np.unique(n_kept):
    if k == 0:
      continue
    at = np.flatnonzero(n_kept == k)
    keep = scores >= ts[at[0]]
    counts, _ = metrics.match(truth, xy[keep], metrics.RADIUS_MM)
    tp[at] = counts.tp
  return tp


def threshold_sweep(cases: Sequence[midog.Case], preds: Mapping[int, object],
                    thresholds: Sequence[float] | None = None, *,
                    allow_missing: bool = False
                    ) -> tuple[float, float, list[tuple[float, float, float, float]]]:
  """Pooled precision/recall/F1 for many thresholds; picks the best F1.

  Exactly the numbers :func:`evaluate_points` gives at each threshold (scores
  >= t are kept), but fast: only predictions within 7.5 um of some figure
  can change the greedy matching (the others are FP whenever kept), and the
  matching splits into independent groups of nearby points. Each group is
  re-matched only for the distinct sets of its predictions the thresholds
  produce; everything else is counted with ``searchsorted``.

  Args:
    cases, preds, allow_missing: as for :func:`evaluate_points`.
    thresholds: candidate thresholds (default: the unique scores, capped to
      512 score quantiles).

  Returns:
    ``(best_threshold, best_f1, curve)`` with ``curve`` a list of
    ``(threshold, precision, recall, f1)`` in increasing threshold; ties in F1
    go to the lowest threshold.
  """
  items = _collect(cases, preds, allow_missing, to_mm=True)
  if thresholds is None:
    all_scores = np.concatenate([s for _, _, s in items] + [np.zeros((0,))])
    ts = _sweep_thresholds(all_scores)
    if len(ts) == 0:
      ts = np.zeros((1,))
  else:
    ts = np.unique(np.asarray(thresholds, np.float64).reshape(-1))
    if len(ts) == 0:
      raise ValueError("thresholds is empty")

  tp = np.zeros(len(ts), np.int64)
  kept = np.zeros(len(ts), np.int64)
  n_truth = 0
  # Slightly looser than the match radius: including a prediction that cannot
  # match does not change the greedy result, excluding one that can would.
  near = metrics.RADIUS_MM * (1 + 1e-6)
  for case, xy, scores in items:
    truth = _truth_mm(case)
    n_truth += len(truth)
    kept += len(scores) - np.searchsorted(np.sort(scores), ts, side="left")
    if len(truth) == 0 or len(xy) == 0:
      continue
    dist = np.sqrt(((truth[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
    for t_idx, p_idx in _components(dist <= near):
      tp += _component_tp(truth[t_idx], xy[p_idx], scores[p_idx], ts)

  curve = []
  for t, tp_t, kept_t in zip(ts, tp, kept):
    c = metrics.Counts(int(tp_t), int(kept_t - tp_t), int(n_truth - tp_t))
    curve.append((float(t), c.precision, c.recall, c.f1))
  f1s = np.array([f for *_, f in curve])
  best = int(np.argmax(f1s))
  return curve[best][0], curve[best][3], curve


# ----------------------------------------------------------------------------
# Files: spacing from TIFF tags, prediction folders.


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
  data = read_json(path, "prediction file")
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
    name = p.get("name", CHALLENGE_NAMES[MITOSIS])
    if name not in CLASS_OF_NAME:
      raise DataError(path, f"points[{i}].name {name!r} is not one of "
                      f"{sorted(CLASS_OF_NAME)}")
    xy.append(pt[:2])
    probs.append(prob)
    names.append(name)
  return (np.asarray(xy, np.float64).reshape(-1, 2),
          np.asarray(probs, np.float64).reshape(-1), names)


def _tiff_spacing_um(path: Path) -> float | None:
  """Microns per pixel from a TIFF's resolution tags (None when absent)."""
  import tifffile  # pylint: disable=g-import-not-at-top

  from midog_jax.data import tiff_meta  # pylint: disable=g-import-not-at-top
  try:
    with tifffile.TiffFile(path) as tif:
      spacing = tiff_meta.spacing_from_tags(tif)
  except (OSError, ValueError, tifffile.TiffFileError) as e:
    raise DataError(path, f"cannot read TIFF resolution tags ({e})") from None
  return tiff_meta.check_plausible(spacing, path)


def with_image_spacing(cases: Sequence[midog.Case]) -> list[midog.Case]:
  """Cases whose ``spacing_um`` comes from their TIFF tags where readable."""
  out = []
  for c in cases:
    if c.path.exists():
      s = _tiff_spacing_um(c.path)
      if s is not None:
        c = dataclasses.replace(c, spacing_um=s)
    out.append(c)
  return out


def load_prediction_dir(outdir: str | os.PathLike, cases: Sequence[midog.Case],
                        *, allow_missing: bool = False
                        ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[str]]:
  """Reads ``OUTDIR/<stem>.json`` for each labelled case.

  Points named "non-mitotic figure" are dropped here (they do not count).

  Returns:
    ``({image_id: (xy_mm, probabilities)}, missing_file_names)``.

  Raises:
    DataError: the folder is missing, a file is malformed, or (unless
      ``allow_missing``) a labelled case has no prediction file.
  """
  outdir = Path(outdir)
  if not outdir.is_dir():
    raise DataError(outdir, "prediction folder not found")
  labeled = [c for c in cases if c.labeled]
  by_stem: dict[str, list[midog.Case]] = {}
  for c in labeled:
    by_stem.setdefault(c.stem, []).append(c)
  for stem, same in by_stem.items():
    if len(same) > 1:  # one OUTDIR/<stem>.json cannot hold the predictions of both
      raise DataError(outdir, f"{same[0].path} and {same[1].path} share the name {stem!r}, "
                      f"so one prediction file {stem}.json would be scored for both; "
                      "evaluate them from separate folders")
  preds, missing = {}, []
  for c in labeled:
    f = outdir / f"{c.stem}.json"
    if not f.exists():
      missing.append(f.name)
      continue
    xy, probs, names = from_challenge_json(f)
    extent_mm = np.array([c.width, c.height]) * c.spacing_um / 1000.0
    if len(xy) and (xy.max(axis=0) > 1.05 * extent_mm).any():
      print(f"warning: {f}: points beyond the image's {extent_mm[0]:.2f} x "
            f"{extent_mm[1]:.2f} mm; are they in pixels? The format wants millimetres",
            file=sys.stderr, flush=True)
    mitotic = np.array([n == CHALLENGE_NAMES[MITOSIS] for n in names],
                       bool).reshape(-1)
    preds[c.image_id] = (xy[mitotic], probs[mitotic])
  if missing and not allow_missing:
    shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)"
                                       if len(missing) > 10 else "")
    raise DataError(outdir, f"no prediction file for {len(missing)} labelled "
                    f"case(s): {shown}; pass --allow-missing to count their "
                    "figures as missed")
  return preds, missing


def select_cases(dataset: midog.MidogDataset, split: str, *,
                 heldout_ids: set[int] = frozenset(), val_fraction: float = 0.2,
                 seed: int = 0) -> list[midog.Case]:
  """Labelled cases of one split.

  ``all``: every labelled case; ``train``/``val``:
  :func:`midog.split_train_val` over the cases labelled in the annotation file
  itself; ``test``: MIDOG++'s official test split; ``heldout``: the cases
  labelled by a ``--truth`` file.
  """
  if split == "all":
    return [c for c in dataset.cases if c.labeled]
  if split in ("train", "val"):
    base = [c for c in dataset.cases if c.labeled and c.image_id not in heldout_ids]
    train, val = midog.split_train_val(base, val_fraction, seed)
    return train if split == "train" else val
  if split == "test":
    return midog.official_split(dataset.cases)[1]
  if split == "heldout":
    if not heldout_ids:
      raise ValueError("--split heldout needs --truth")
    return [c for c in dataset.cases if c.image_id in heldout_ids and c.labeled]
  raise ValueError(f"unknown split {split!r}; one of {SPLITS}")


# ----------------------------------------------------------------------------
# CLI.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m midog_jax.evaluate",
      description="MIDOG F1 (pooled over cases and per domain) of a folder of "
      "challenge-format predictions.")
  p.add_argument("--annotations", required=True, help="MIDOG.json or MIDOG++.json")
  p.add_argument("--predictions", required=True, help="folder with <stem>.json files")
  p.add_argument("--images", default=None,
                 help="image folder (default: the annotation file's folder); "
                 "TIFF resolution tags there override nominal spacings")
  p.add_argument("--truth", default=None,
                 help="extra truth file, e.g. MIDOG_unlabeled_truth.json")
  p.add_argument("--split", default="all", choices=SPLITS)
  p.add_argument("--val_fraction", "--val-fraction", type=float, default=0.2)
  p.add_argument("--split_seed", "--split-seed", type=int, default=0)
  p.add_argument("--threshold", type=float, default=0.0,
                 help="drop points with probability below this")
  p.add_argument("--allow_missing", "--allow-missing", action="store_true",
                 help="count cases without a prediction file as all-missed")
  p.add_argument("--per_case", "--per-case", action="store_true",
                 help="add per-case counts to the output")
  p.add_argument("--output", default=None, help="also write the JSON here")
  return p


def run(args: argparse.Namespace) -> dict:
  """Runs the CLI's evaluation and returns the result object."""
  if args.images and not Path(args.images).is_dir():
    raise DataError(args.images, "image folder not found")
  ds = midog.load_midog(args.annotations, args.images)
  heldout: set[int] = set()
  if args.truth:
    before = {c.image_id for c in ds.cases if c.labeled}
    ds = midog.attach_truth(ds, args.truth)
    heldout = {c.image_id for c in ds.cases if c.labeled} - before
  cases = select_cases(ds, args.split, heldout_ids=heldout,
                       val_fraction=args.val_fraction, seed=args.split_seed)
  preds, missing = load_prediction_dir(args.predictions, cases,
                                       allow_missing=args.allow_missing)
  if missing:
    print(f"warning: {len(missing)} case(s) without a prediction file count as "
          f"all-missed: {', '.join(missing[:10])}", file=sys.stderr)
  # Only cases that are evaluated need their TIFF tags read.
  cases = with_image_spacing(cases)
  result = evaluate_mm(cases, preds, args.threshold, allow_missing=True,
                       per_case=args.per_case)
  result["split"] = args.split
  result["missing_predictions"] = missing
  return result


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    result = run(args)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except ValueError as e:  # bad split choice for this dataset
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.output:
    write_json_atomic(result, args.output)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
