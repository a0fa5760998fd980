"""The scorer against an independent re-implementation of the organisers' protocol.

The reference below is written from the protocol, not from ``metrics.py``:
points in millimetres (pixels times spacing / 1000), for each ground-truth
figure in order the NEAREST not-yet-claimed prediction at distance
``<= 0.0075`` mm (plain floating point, no slack) is claimed; counts pooled
over cases; F1 = (2 TP + eps) / (2 TP + FP + FN + eps). 2,400 random cases
on integer grids make exact-radius offsets, ties, duplicates and empty cases
common. A "first within the radius" matcher, a slack on the radius or F1 without
eps in the numerator each fail here (the last three tests show it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from midog_jax import evaluate, metrics
from midog_jax.data.midog import Case

RADIUS_MM, EPS = 0.0075, 1e-6


def _reference_counts(truth_px, pred_px, spacing_um):
  """(tp, fp, fn) of one case by the protocol, with plain Python loops."""
  scale = spacing_um / 1000.0
  truth = [(x * scale, y * scale) for x, y in truth_px]
  pred = [(x * scale, y * scale) for x, y in pred_px]
  claimed = [False] * len(pred)
  tp = 0
  for tx, ty in truth:
    best, best_d = None, None
    for j, (px, py) in enumerate(pred):
      if claimed[j]:
        continue
      d = math.sqrt((tx - px) ** 2 + (ty - py) ** 2)
      if d <= RADIUS_MM and (best_d is None or d < best_d):
        best, best_d = j, d
    if best is not None:
      claimed[best] = True
      tp += 1
  return tp, len(pred) - tp, len(truth) - tp


def _reference_f1(tp, fp, fn):
  return (2 * tp + EPS) / (2 * tp + fp + fn + EPS)


def _case(i, truth, spacing):
  return Case(image_id=i, file_name=f"{i:04d}.tiff", path=Path(f"/none/{i:04d}.tiff"),
              width=4000, height=4000, scanner="A", tumor_type="", lab="", species="",
              domain="A", spacing_um=spacing, labeled=True,
              mitoses=np.asarray(truth, np.float32).reshape(-1, 2),
              imposters=np.zeros((0, 2), np.float32))


def _random_cases(rng, n):
  cases, preds = [], {}
  # Offsets of exactly 7.5 um in x, in y and on 3-4-5 diagonals at the two
  # usual spacings, their neighbours, and small integer offsets (ties).
  exact = [(30, 0), (0, 30), (18, 24), (24, 18), (29, 0), (31, 0), (0, 0), (15, 0),
           (-15, 0), (10, 10), (-30, 0), (0, -30)]
  for i in range(n):
    spacing = float(rng.choice([0.25, 0.23, 0.5]))
    n_truth = int(rng.integers(0, 6))
    truth = rng.integers(100, 400, (n_truth, 2)) * 2  # a coarse grid: near neighbours
    pred = []
    for t in truth:
      for _ in range(int(rng.integers(0, 3))):  # 0, 1 or 2 (a duplicate) per figure
        off = exact[int(rng.integers(len(exact)))] if rng.random() < 0.7 else \
            tuple(rng.integers(-40, 41, 2))
        pred.append(t + np.asarray(off))
    for _ in range(int(rng.integers(0, 3))):  # false positives anywhere
      pred.append(rng.integers(200, 800, 2))
    pred = np.asarray(pred, np.float64).reshape(-1, 2)
    cases.append(_case(i, truth, spacing))
    preds[i] = (pred.astype(np.float32), np.ones(len(pred)))
  return cases, preds


def test_pooled_counts_and_f1_match_the_reference_on_2400_cases():
  rng = np.random.default_rng(2021)
  cases, preds = _random_cases(rng, 2400)
  ref = np.zeros(3, np.int64)
  per_case_disagree = 0
  for c in cases:
    want = np.asarray(_reference_counts(c.mitoses.astype(np.float64),
                                        preds[c.image_id][0].astype(np.float64),
                                        c.spacing_um))
    got = evaluate.evaluate_points([c], {c.image_id: preds[c.image_id]})
    per_case_disagree += tuple(want) != (got["tp"], got["fp"], got["fn"])
    ref += want
  assert per_case_disagree == 0
  r = evaluate.evaluate_points(cases, preds)
  assert (r["tp"], r["fp"], r["fn"]) == tuple(int(v) for v in ref)
  assert r["f1"] == _reference_f1(*ref)
  # The data really exercises the edges: exact-radius misses and empty cases.
  assert any(len(c.mitoses) == 0 and len(preds[c.image_id][0]) == 0 for c in cases)
  assert ref[0] > 500 and ref[1] > 500 and ref[2] > 100


def test_nearest_not_first_within_the_radius_is_claimed():
  # Figure A at 100; predictions at 125 (first in the list, within 30 px) and
  # 101 (nearest). A claims 101; figure B at 150 then still finds 125 (25 px).
  # A "first within radius" matcher gives A 125 and leaves B unmatched.
  truth = np.array([[100, 100], [150, 100]], np.float64) * 0.25e-3
  pred = np.array([[125, 100], [101, 100]], np.float64) * 0.25e-3
  counts, assigned = metrics.match(truth, pred)
  assert (counts.tp, counts.fp, counts.fn) == (2, 0, 0)
  assert assigned.tolist() == [1, 0]
  assert _reference_counts([[100, 100], [150, 100]], [[125, 100], [101, 100]], 0.25) == (2, 0, 0)


def test_no_slack_on_the_radius():
  # 30 px at 0.25 um/px: 0.0075000000000000015 mm in floating point.
  d = abs(1030 * 0.25 / 1000 - 1000 * 0.25 / 1000)
  assert d > RADIUS_MM
  assert _reference_counts([[1000, 0]], [[1030, 0]], 0.25) == (0, 1, 1)
  counts, _ = metrics.match(np.array([[1000 * 0.25e-3, 0.0]]),
                            np.array([[1030 * 0.25e-3, 0.0]]))
  assert (counts.tp, counts.fp, counts.fn) == (0, 1, 1)


def test_f1_of_an_empty_pool_is_one():
  assert metrics.Counts(0, 0, 0).f1 == _reference_f1(0, 0, 0) == 1.0
  assert metrics.Counts(0, 1, 0).f1 == _reference_f1(0, 1, 0) < 1e-5
