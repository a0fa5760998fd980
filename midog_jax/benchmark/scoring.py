"""Scores of the benchmark's runs: per run, then over seeds, with bootstrap intervals.

Per detection run (one method, one seed), on every scored test case:

* F1, precision, recall: the organisers' matching (``metrics.match``, 7.5 um,
  pooled over cases) of the "mitotic figure" points at the run's operating
  threshold, chosen on its validation images (never on the test set);
* AP and FROC: ``midog_jax.curves`` (the MIDOG 2025 definitions: COCO AP of
  11.25 um boxes at IoU 0.5; ``froc_auc`` over 0..8 false positives per image,
  and the mean sensitivity at 1/8..8 FP per image) on every point written at
  the low prediction threshold;
* the same per group (held-out images of the training domains / unseen
  domains), per domain and per ROI type (``curves.grouped``).

Over seeds: mean, standard deviation (over the seeds' values, ddof 1) and
min-max of each number, and a 95 % bootstrap interval over TEST CASES of the
seed-mean F1 and AP (the same case resamples for every seed, so seed
variation is not counted twice; ``curves.bootstrap_ci``).

The human-agreement ceiling scores rater 2's mitoses against rater 1's with
the same matching; image-level runs are scored per field
(``image_level.metrics.binary_metrics``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from midog_jax import curves, metrics
from midog_jax.benchmark.suite import GROUPS, ScoredCase

GROUPINGS = ("group", "domain", "roi_type")


def spread(values: Sequence[float | None]) -> dict:
  """Mean, std over the values (ddof 1; 0 for one), min, max and n; NaN/None left out."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if len(v) == 0:
    return dict(mean=None, std=None, min=None, max=None, n=0)
  return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
              min=float(v.min()), max=float(v.max()), n=int(len(v)))


def _finite(x) -> float | None:
  return float(x) if x is not None and math.isfinite(float(x)) else None


def _keys(case: ScoredCase, grouping: str) -> str:
  return getattr(case, grouping)


def _split(cases: Sequence[ScoredCase], items: Sequence, grouping: str) -> dict[str, list]:
  out: dict[str, list] = {}
  for c, it in zip(cases, items):
    out.setdefault(_keys(c, grouping), []).append(it)
  return dict(sorted(out.items(), key=lambda kv: (GROUPS.index(kv[0])
                                                  if kv[0] in GROUPS else 9, kv[0])))


def _table(op_items, curve_items, threshold: float) -> dict:
  """One row: F1 parts from the operating points, AP/FROC from the ranking."""
  row = curves.grouped({"x": op_items}, threshold)["x"]
  if curve_items is not op_items:
    ranked = curves.grouped({"x": curve_items}, threshold)["x"]
    row.update(ap=ranked["ap"], froc_auc=ranked["froc_auc"])
  row["ap"], row["froc_auc"] = _finite(row["ap"]), _finite(row["froc_auc"])
  return row


def score_detections(cases: Sequence[ScoredCase], curve: Sequence[tuple],
                     operating: Sequence[tuple], threshold: float) -> dict:
  """Metrics of one detection run.

  Args:
    cases: the scored test cases.
    curve: per case ``(pred_mm (M, 2), scores (M,))``: every point written at
      the low threshold (AP, FROC, curves).
    operating: per case ``(pred_mm, scores)`` of the mitotic points that F1
      counts (after ``threshold``).
    threshold: the run's operating threshold.

  Returns:
    ``{threshold, all: row, group|domain|roi_type: {key: row}, counts:
    [[tp, fp, fn] per case], pr: {recall, precision}, froc: {fp, sensitivity},
    froc_score}`` with rows as ``curves.grouped`` plus ``froc_auc``.
  """
  op = [(c.truth_mm, p, s) for c, (p, s) in zip(cases, operating)]
  cv = [(c.truth_mm, p, s) for c, (p, s) in zip(cases, curve)]
  out = dict(threshold=float(threshold), all=_table(op, cv, threshold))
  for g in GROUPINGS:
    ops, cvs = _split(cases, op, g), _split(cases, cv, g)
    out[g] = {k: _table(ops[k], cvs[k], threshold) for k in ops}
  out["counts"] = [[cnt.tp, cnt.fp, cnt.fn] for cnt in
                   (metrics.match(t, p[s >= threshold])[0] for t, p, s in op)]
  pr = curves.pr_curve(cv)
  fr = curves.froc(cv)
  out["pr"] = dict(recall=pr["recall"].tolist(), precision=pr["precision"].tolist())
  out["froc"] = dict(fp=fr["curve_fp"].tolist(), sensitivity=fr["curve_sens"].tolist())
  out["all"]["froc_score"] = _finite(fr["score"])
  return out


def _score_votes(cases: Sequence[ScoredCase], rater_points: Sequence[np.ndarray]) -> dict:
  """One rater's mitoses scored as detections against the cases' truth.

  Votes carry no ranking: AP, FROC and the curves are left empty.
  """
  ones = [(r, np.ones(len(r))) for r in rater_points]
  out = score_detections(cases, ones, ones, 0.5)
  for row in [out["all"]] + [r for g in GROUPINGS for r in out[g].values()]:
    row["ap"] = row["froc_auc"] = None
  out["all"]["froc_score"] = None
  out["pr"] = out["froc"] = None
  return out


def score_human(cases: Sequence[ScoredCase]) -> dict | None:
  """Rater 2 against rater 1 (the human-agreement ceiling); None without votes."""
  if any(c.votes_mm is None for c in cases):
    return None
  voted = [dataclasses.replace(c, truth_mm=c.votes_mm[0]) for c in cases]
  return _score_votes(voted, [c.votes_mm[1] for c in cases])


def score_raters_vs_consensus(cases: Sequence[ScoredCase]) -> list[dict] | None:
  """Each of the two raters against the consensus (the labels a model is scored on).

  Rater-vs-rater agreement compares two noisy readings; a model is scored
  against the majority of two or three, which is less noisy than one rater,
  so a single expert's F1 against that consensus is the fairer human row.
  """
  if any(c.votes_mm is None for c in cases):
    return None
  return [_score_votes(cases, [c.votes_mm[k] for c in cases]) for k in (0, 1)]


# ----------------------------------------------------------------------------
# Image-level runs (fields).


def label_fields(cases: Sequence[ScoredCase], fields: dict) -> list[dict]:
  """Field labels from the test annotations, by the image-level labelling rule.

  ``fields``: ``python -m midog_jax.benchmark.fields``'s output. Fields the
  rule excludes (a figure cut by the border) are left out, as in training.
  """
  from midog_jax.image_level import fields as fields_lib  # pylint: disable=g-import-not-at-top
  out = []
  margin_um = float(fields["margin_um"])
  for c in cases:
    entry = fields["images"].get(c.stem)
    if entry is None:
      continue
    spacing = float(entry["spacing_um"])
    truth_px = c.truth_mm * 1000.0 / spacing
    for x, y, side, p in entry["fields"]:
      label = fields_lib.field_label(truth_px, x, y, side, margin_um / spacing)
      if label != fields_lib.EXCLUDED:
        out.append(dict(label=int(label), probability=float(p), domain=c.domain,
                        group=c.group, roi_type=c.roi_type))
  return out


def score_fields(cases: Sequence[ScoredCase], fields: dict) -> dict:
  """Field-level F1 / precision / recall / accuracy / ROC AUC at the validation threshold."""
  from midog_jax.image_level import metrics as il_metrics  # pylint: disable=g-import-not-at-top
  items = label_fields(cases, fields)
  t = float(fields["threshold"])

  def row(sel):
    y = np.asarray([i["label"] for i in sel], np.int64)
    p = np.asarray([i["probability"] for i in sel], np.float64)
    return il_metrics.binary_metrics(y, p, t)

  out = dict(threshold=t, all=row(items))
  for g in GROUPINGS:
    keys = sorted({i[g] for i in items}, key=lambda k: (GROUPS.index(k) if k in GROUPS
                                                       else 9, k))
    out[g] = {k: row([i for i in items if i[g] == k]) for k in keys}
  return out


# ----------------------------------------------------------------------------
# Over seeds.


def f1_interval(runs: Sequence[dict], n_boot: int, seed: int = 0) -> list | None:
  """95 % bootstrap interval over test cases of the seed-mean pooled F1."""
  counts = np.asarray([r["counts"] for r in runs], np.float64)  # (seeds, cases, 3)
  if counts.size == 0:
    return None

  def stat(idx: np.ndarray) -> float:
    tp, fp, fn = counts[:, idx].sum(1).T
    return float(np.mean((2 * tp + metrics.EPS) / (2 * tp + fp + fn + metrics.EPS)))

  return list(curves.bootstrap_ci(counts.shape[1], stat, n_boot=n_boot, seed=seed))


def ap_interval(per_seed_cases: Sequence[Sequence[tuple]], n_boot: int,
                seed: int = 0) -> list | None:
  """95 % bootstrap interval over test cases of the seed-mean AP.

  One seed: ``curves.ap_ci`` (vectorised); several: ``curves.bootstrap_ci``
  with the seed-mean of ``curves.pr_curve`` on each resample.
  """
  if not per_seed_cases:
    return None
  if len(per_seed_cases) == 1:
    lo, hi, point = curves.ap_ci(per_seed_cases[0], n_boot=n_boot, seed=seed)
  else:
    def stat(idx: np.ndarray) -> float:
      aps = [curves.pr_curve([cs[i] for i in idx])["ap"] for cs in per_seed_cases]
      aps = [a for a in aps if math.isfinite(a)]
      return float(np.mean(aps)) if aps else float("nan")

    lo, hi, point = curves.bootstrap_ci(len(per_seed_cases[0]), stat, n_boot=n_boot, seed=seed)
  return [_finite(lo), _finite(hi), _finite(point)]


def aggregate(runs: Sequence[dict], keys: Sequence[str]) -> dict:
  """Per number: spread over the runs (seeds), overall and in every grouping."""
  out = dict(all={k: spread([r["all"].get(k) for r in runs]) for k in keys})
  for g in GROUPINGS:
    names = sorted({n for r in runs for n in r.get(g, {})},
                   key=lambda k: (GROUPS.index(k) if k in GROUPS else 9, k))
    out[g] = {n: {k: spread([r[g][n].get(k) for r in runs if n in r[g]]) for k in keys}
              for n in names}
  return out
