"""Ranking metrics for the leaderboard: AP, FROC, bootstrap CIs, grouped tables.

The MIDOG 2025 definitions, read from the organisers' Track 1 evaluation
container (github DeepMicroscopy/MIDOG25_T1_evaluation_docker, ``evaluate.py``
at commit 8577851, "Major update to include FROC score", August 2025):

* **AP** is torchmetrics' ``MeanAveragePrecision`` (pycocotools backend),
  reported as ``map_50``: every point becomes a square box of half-side
  11.25 um (``bbox_size = 0.01125`` mm, so that a purely horizontal offset of
  7.5 um gives IoU 0.5), IoU threshold 0.5, recall levels
  ``np.arange(0, 1.01, 0.01)``, no cap on detections. Detections are matched
  once, COCO style (per image, in descending score, each takes the unclaimed
  truth box of highest IoU >= 0.5), ranked across images, precision is made
  monotone from the right and read at the 101 recall levels (COCO's
  interpolation, not VOC's all-point area). Note the geometry: a box IoU, so a
  detection 7 um away on the diagonal is a miss here but a hit for F1. (Their
  torchmetrics is unpinned; 1.x evaluates with pycocotools, against whose
  COCOeval :func:`pr_curve` was checked to the last bit.)
* **FROC** is their ``calc_froc_score``: 40 thresholds evenly spaced from the
  lowest to the highest score; at each, every image is matched again with the
  F1 matching (greedy in ground-truth order, 7.5 um); sensitivity is pooled
  ``TP / (TP + FN + 1e-6)`` and the FP rate the mean number of false
  positives per image; the curve, sorted by FP rate, is linearly interpolated
  at 50 points over [0, 8] FP per image (0 left of it, its last sensitivity
  right of it) and integrated by the trapezoid rule: ``froc_auc``, in [0, 8].
  They define no discrete FP rates; :func:`froc` adds sensitivities at the
  usual 1/8..8 rates (read off the same interpolated curve) and their mean.
* Both use all points of a prediction file, "non-mitotic figure" ones too, with
  their probabilities; F1 uses the "mitotic figure" points only. Here a case
  is ``(truth_mm (N, 2), pred_mm (M, 2), scores (M,))``: pass every candidate
  with its score; F1 at a threshold keeps ``score >= threshold``.
* They report each overall, per tumour domain and per ROI type.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from midog_jax import evaluate
from midog_jax import metrics

CaseTuple = tuple  # (truth_mm (N, 2), pred_mm (M, 2), scores (M,))

BOX_HALF_MM = 0.01125
IOU_THRESHOLD = 0.5
# As the organisers pass it (the same values as COCO's linspace): 0.35 comes
# out as 0.35000000000000003, so a recall of exactly 7/20 reads the next rank.
RECALL_LEVELS = np.arange(0, 1.01, 0.01)
FROC_THRESHOLDS = 40
FROC_MAX_FP = 8.0
FROC_GRID = 50
FP_RATES = (0.125, 0.25, 0.5, 1, 2, 4, 8)


def _arrays(case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  truth, pred, scores = case
  truth = np.asarray(truth, np.float64).reshape(-1, 2)
  pred = np.asarray(pred, np.float64).reshape(-1, 2)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if len(pred) != len(scores):
    raise ValueError(f"{len(pred)} points but {len(scores)} scores")
  if not (np.isfinite(pred).all() and np.isfinite(scores).all()):
    raise ValueError("non-finite predicted points or scores")
  return truth, pred, scores


def _boxes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(corner, size) of each point's box, as the organisers' pipeline holds them."""
  # Corners rounded to float32 (their torch.Tensor), sizes subtracted in
  # float32 (torchvision's box_convert), the IoU then in double (pycocotools):
  # reproduced so that a point on the IoU-0.5 boundary falls the same side.
  lo = (points - BOX_HALF_MM).astype(np.float32)
  hi = (points + BOX_HALF_MM).astype(np.float32)
  return lo.astype(np.float64), (hi - lo).astype(np.float64)


def _iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """(M, N) IoU of prediction and truth boxes, in pycocotools' arithmetic."""
  (d0, dw), (g0, gw) = _boxes(pred), _boxes(truth)
  side = (np.minimum((dw + d0)[:, None], (gw + g0)[None])
          - np.maximum(d0[:, None], g0[None]))
  inter = np.where((side > 0).all(-1), side[..., 0] * side[..., 1], 0.0)
  area_d, area_g = dw[:, 0] * dw[:, 1], gw[:, 0] * gw[:, 1]
  return inter / (area_d[:, None] + area_g[None] - inter)


def _coco_match(truth, pred, scores) -> tuple[np.ndarray, np.ndarray]:
  """One case matched as COCO does: (scores, is-TP) in the case's rank order."""
  s = scores.astype(np.float32)  # their scores are a float32 tensor: ties as there
  order = np.argsort(-s, kind="stable")
  s, pred = s[order], pred[order]
  hit = np.zeros(len(s), bool)
  if len(truth) and len(pred):
    iou = _iou(pred, truth)
    claimed = np.zeros(len(truth), bool)
    # Only detections overlapping some truth enough can match; the rest are FP.
    for d in np.flatnonzero((iou >= IOU_THRESHOLD).any(1)):
      row = np.where(claimed, -1.0, iou[d])
      best = row.max()
      if best >= IOU_THRESHOLD:
        # COCO's scan replaces on equal IoU, so the last of tied truths wins.
        g = len(row) - 1 - int(np.argmax(row[::-1] == best))
        claimed[g] = hit[d] = True
  return s, hit


def _ranked(cases) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """All detections in rank order: (scores, is-TP, case index, truths per case)."""
  arrays = [_arrays(c) for c in cases]
  parts = [_coco_match(*a) for a in arrays]
  n_truth = np.array([len(a[0]) for a in arrays], np.int64)
  s = np.concatenate([p[0] for p in parts] + [np.zeros(0, np.float32)])
  hit = np.concatenate([p[1] for p in parts] + [np.zeros(0, bool)])
  owner = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(parts)]
                         + [np.zeros(0, np.int64)])
  # A stable sort of the per-case lists, as COCO's accumulate: ties go in
  # case order, then in each case's own order.
  order = np.argsort(-s, kind="stable")
  return s[order], hit[order], owner[order], n_truth


def _ap(hit: np.ndarray, weight: np.ndarray, n_truth: float) -> float:
  """COCO's 101-point AP of a ranked list whose items count ``weight`` times.

  Weights stand for bootstrap copies of a case: with distinct scores, k copies
  of a detection give the same AP as k adjacent entries would (inside a run
  of TPs precision rises, so the run's end carries the envelope).
  """
  if n_truth == 0:
    return float("nan")  # the organisers report -1 (no truth, AP undefined)
  if len(hit) == 0:
    return 0.0
  tp = np.cumsum(np.where(hit, weight, 0))
  fp = np.cumsum(np.where(hit, 0, weight))
  recall = tp / n_truth
  precision = tp / (tp + fp + np.spacing(1))
  envelope = np.maximum.accumulate(precision[::-1])[::-1]
  at = np.searchsorted(recall, RECALL_LEVELS, side="left")
  # Recall levels never reached read 0 (COCO's q array starts as zeros).
  q = np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0)
  return float(q.mean())


def pr_curve(cases: Sequence[CaseTuple]) -> dict:
  """Average precision and the precision-recall curve, as MIDOG 2025 ranks.

  Matching is done once on all detections, COCO style with boxes (see the
  module docstring), not by re-running the F1 matching per threshold, and AP
  is COCO's 101-point interpolation (precision made monotone from the right,
  read at recall 0, 0.01, ..., 1; unreached levels count 0). The organisers'
  value is this one rounded to float32.

  Args:
    cases: ``(truth_mm (N, 2), pred_mm (M, 2), scores (M,))`` per case; every
      candidate with its score (below-threshold ones too).

  Returns:
    ``dict(ap, precision, recall, thresholds, n_truth)``: ``ap`` is NaN when
    there is no truth; the curve has one point per distinct score (as float32,
    as scored), in decreasing threshold (increasing recall), with the raw,
    uninterpolated precision of the detections scoring ``>=`` it.
  """
  s, hit, _, n_truth_c = _ranked(cases)
  n_truth = int(n_truth_c.sum())
  ap = _ap(hit, np.ones(len(hit)), n_truth)
  tp = np.cumsum(hit)
  last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)
  kept = np.arange(1, len(s) + 1)[last]
  precision = tp[last] / kept
  recall = tp[last] / n_truth if n_truth else np.zeros(len(kept))
  return dict(ap=ap, precision=precision, recall=recall,
              thresholds=s[last].astype(np.float64), n_truth=n_truth)


def _pooled_sweep(cases, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """Pooled TP and kept counts at each threshold, the F1 matching re-run at
  each (greedy matching in truth order is not monotone in the threshold).

  Fast as :func:`evaluate.threshold_sweep`: only groups of nearby points are
  re-matched, once per distinct kept set; the other predictions are FP.
  """
  tp = np.zeros(len(ts), np.int64)
  kept = np.zeros(len(ts), np.int64)
  n_truth = 0
  # Looser than the radius: an extra far point cannot change the matching.
  near = metrics.RADIUS_MM * (1 + 1e-6)
  for truth, xy, scores in map(_arrays, cases):
    n_truth += len(truth)
    kept += len(scores) - np.searchsorted(np.sort(scores), ts, side="left")
    if len(truth) and len(xy):
      dist = np.sqrt(((truth[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
      for t_idx, p_idx in evaluate._components(dist <= near):  # pylint: disable=protected-access
        tp += evaluate._component_tp(truth[t_idx], xy[p_idx], scores[p_idx], ts)  # pylint: disable=protected-access
  return tp, kept, n_truth


def froc(cases: Sequence[CaseTuple], areas_mm2: Sequence[float] | None = None,
         fp_rates: Sequence[float] = FP_RATES, *,
         n_thresholds: int | None = FROC_THRESHOLDS,
         max_fp: float = FROC_MAX_FP) -> dict:
  """FROC curve, sensitivities at FP rates, and the MIDOG 2025 ``froc_auc``.

  As the organisers (module docstring): thresholds evenly spaced between the
  lowest and highest score (``n_thresholds``, 40; None: every distinct
  score), the F1 matching re-run at each, sensitivity ``TP / (TP + FN +
  1e-6)`` pooled over cases, the curve sorted by FP rate and read by linear
  interpolation, 0 left of the curve and its last sensitivity right of it.
  Thresholds that share an FP rate become one point with the best of their
  sensitivities (the organisers' order there is undefined, see the code).

  Args:
    cases: as for :func:`pr_curve`.
    areas_mm2: one image area per case: FP rates are then false positives per
      mm^2 (pooled FP / total area) instead of per case (the organisers' unit,
      the default).
    fp_rates: the rates ``sensitivity`` is read at; ``score`` is its mean.
    n_thresholds, max_fp: the organisers' 40 thresholds and 8 FP upper end.

  Returns:
    ``dict(sensitivity, fp_rates, curve_fp, curve_sens, score, auc,
    thresholds)``; ``auc`` is the organisers' ``froc_auc`` (trapezoid area
    over 50 points in [0, max_fp], so at most max_fp), NaN without any
    detection, as theirs.
  """
  cases = [_arrays(c) for c in cases]
  rates = np.asarray(fp_rates, np.float64).reshape(-1)
  all_scores = np.concatenate([s for _, _, s in cases] + [np.zeros(0)])
  if len(all_scores) == 0:
    return dict(sensitivity=np.zeros(len(rates)), fp_rates=rates,
                curve_fp=np.zeros(0), curve_sens=np.zeros(0), score=0.0,
                auc=float("nan"), thresholds=np.zeros(0))
  lo, hi = all_scores.min(), all_scores.max()
  if n_thresholds is None:
    ts = np.unique(all_scores)
  else:
    ts = np.array([lo]) if lo == hi else np.linspace(lo, hi, n_thresholds)
  if areas_mm2 is None:
    per = float(len(cases))
  else:
    areas = np.asarray(areas_mm2, np.float64).reshape(-1)
    if len(areas) != len(cases) or not (areas > 0).all():
      raise ValueError("areas_mm2 needs one positive area per case")
    per = float(areas.sum())
  tp, kept, n_truth = _pooled_sweep(cases, ts)
  sens = tp / (n_truth + 1e-6)  # their tp / (tp + fn + 1e-6)
  fp = (kept - tp) / per
  # One point per FP rate, its best sensitivity: where thresholds tie on FP
  # rate the organisers' np.argsort (unstable, SIMD-dependent) leaves the
  # order, hence their number, undefined; without ties this is their curve.
  order = np.lexsort((-sens, fp))
  first = np.r_[True, fp[order][1:] != fp[order][:-1]]
  fp, sens, ts = fp[order][first], sens[order][first], ts[order][first]

  def read(x):
    return np.interp(x, fp, sens, left=0.0, right=sens[-1])

  grid = np.linspace(0.0, max_fp, FROC_GRID)
  y = read(grid)
  auc = float(((y[1:] + y[:-1]) / 2 * np.diff(grid)).sum())  # np.trapz's sum
  sensitivity = read(rates)
  return dict(sensitivity=sensitivity, fp_rates=rates, curve_fp=fp,
              curve_sens=sens, score=float(sensitivity.mean()), auc=auc,
              thresholds=ts)


def _resample(n_cases: int, n_boot: int, seed: int) -> np.ndarray:
  """(n_boot, n_cases) case indices drawn with replacement."""
  if n_cases < 1 or n_boot < 1:
    raise ValueError("bootstrap needs at least one case and one resample")
  return np.random.default_rng(seed).integers(0, n_cases, size=(n_boot, n_cases))


def _multiplicity(idx: np.ndarray, n_cases: int) -> np.ndarray:
  """(n_boot, n_cases) how often each case is drawn in each resample."""
  n_boot = len(idx)
  flat = (idx + n_cases * np.arange(n_boot)[:, None]).ravel()
  return np.bincount(flat, minlength=n_boot * n_cases).reshape(n_boot, n_cases)


def _percentiles(values, alpha: float) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]  # e.g. AP of a resample without truth
  if len(v) == 0:
    return float("nan"), float("nan")
  low, high = np.percentile(v, [50 * alpha, 100 - 50 * alpha])
  return float(low), float(high)


def bootstrap_ci(n_cases: int, statistic: Callable[[np.ndarray], float],
                 n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
                 ) -> tuple[float, float, float]:
  """Percentile bootstrap interval over cases.

  Cases, not detections, are the unit resampled: figures and false positives
  cluster within images, so resampling detections would give too narrow an
  interval.

  Args:
    n_cases: number of cases.
    statistic: metric of a multiset of cases, given as an int array of case
      indices (with repeats).
    n_boot, alpha, seed: resamples, 1 - coverage, random seed.

  Returns:
    ``(low, high, point)``: the ``alpha/2`` and ``1 - alpha/2`` percentiles of
    the resampled statistic (non-finite values left out) and the statistic
    on all cases.
  """
  idx = _resample(n_cases, n_boot, seed)
  low, high = _percentiles([statistic(i) for i in idx], alpha)
  return low, high, float(statistic(np.arange(n_cases)))


def f1_ci(counts: Sequence[metrics.Counts], n_boot: int = 1000,
          alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
  """Bootstrap interval of the pooled F1 over per-case counts.

  Same resamples as :func:`bootstrap_ci` with the same seed, vectorised: one
  (n_boot, n_cases) multiplicity matrix times the (n_cases, 3) counts.

  Returns:
    ``(low, high, point)`` with ``point`` the pooled F1 of all cases.
  """
  c = np.array([[x.tp, x.fp, x.fn] for x in counts], np.int64).reshape(-1, 3)
  tp, fp, fn = (_multiplicity(_resample(len(c), n_boot, seed), len(c)) @ c).T
  f1 = (2 * tp + metrics.EPS) / (2 * tp + fp + fn + metrics.EPS)  # Counts.f1's formula
  low, high = _percentiles(f1, alpha)
  return low, high, metrics.pooled(counts).f1


def ap_ci(cases: Sequence[CaseTuple], n_boot: int = 1000, alpha: float = 0.05,
          seed: int = 0) -> tuple[float, float, float]:
  """Bootstrap interval of :func:`pr_curve`'s AP over cases.

  Each case is matched once (matching never crosses cases); a resample only
  reweights the ranked list, so no re-matching per resample. Same resamples
  as :func:`bootstrap_ci` with the same seed; with distinct scores the values
  equal ``pr_curve`` on the resampled case lists (with tied scores, the order
  of copies within a tie may differ).

  Returns:
    ``(low, high, point)`` with ``point`` the AP of all cases.
  """
  _, hit, owner, n_truth = _ranked(cases)
  w = _multiplicity(_resample(len(cases), n_boot, seed), len(cases))
  values = [_ap(hit, wb[owner], float(wb @ n_truth)) for wb in w]
  low, high = _percentiles(values, alpha)
  return low, high, _ap(hit, np.ones(len(hit)), float(n_truth.sum()))


def grouped(cases_by_key: Mapping[str, Sequence[CaseTuple]], threshold: float
            ) -> dict[str, dict]:
  """Per-group table (per domain, per ROI type), as the organisers report.

  F1, precision and recall from the counts of :func:`metrics.match` on the
  predictions with ``score >= threshold``, pooled over the group's cases;
  ``ap`` from :func:`pr_curve` and ``froc_auc`` from :func:`froc` on all of
  its predictions.

  Returns:
    ``{key: dict(f1, precision, recall, ap, froc_auc, n_cases, tp, fp, fn)}``.
  """
  out = {}
  for key, group in cases_by_key.items():
    group = [_arrays(c) for c in group]
    total = metrics.pooled(metrics.match(t, p[s >= threshold])[0]
                           for t, p, s in group)
    out[key] = dict(f1=total.f1, precision=total.precision, recall=total.recall,
                    ap=pr_curve(group)["ap"], froc_auc=froc(group)["auc"],
                    n_cases=len(group), tp=total.tp, fp=total.fp, fn=total.fn)
  return out
