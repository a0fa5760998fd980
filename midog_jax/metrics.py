"""The MIDOG challenge's detection metric (matching and pooled F1).

Facts from the organisers' evaluation code: points in millimetres;
for each case, ground-truth mitotic figures are taken in order and each claims
the nearest not-yet-claimed prediction within 7.5 um (``<=``, no slack).
Unclaimed truth is FN, unclaimed predictions FP (so duplicates of one figure
are FPs). Counts are summed over cases and F1 is computed once from the
pooled counts as ``(2 TP + eps) / (2 TP + FP + FN + eps)``, eps 1e-6.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

RADIUS_MM = 0.0075  # 7.5 um (30 px at 0.25 um/px)
EPS = 1e-6
# No slack on the radius, as in the organisers' code (a radius query on
# millimetre coordinates, "<= 7.5 um" in floating point): a point 30 px away
# at 0.25 um/px comes out 0.0075000000000000015 mm away and is a miss there,
# so it is a miss here too.


@dataclasses.dataclass
class Counts:
  """True positives, false positives and false negatives."""

  tp: int = 0
  fp: int = 0
  fn: int = 0

  def __add__(self, other: "Counts") -> "Counts":
    return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

  @property
  def precision(self) -> float:
    return self.tp / (self.tp + self.fp + EPS)

  @property
  def recall(self) -> float:
    return self.tp / (self.tp + self.fn + EPS)

  @property
  def f1(self) -> float:
    # The organisers' formula: eps in the numerator too, so an empty pool
    # (no truth, no predictions) scores 1, not 0.
    return (2 * self.tp + EPS) / (2 * self.tp + self.fp + self.fn + EPS)

  def as_dict(self) -> dict:
    return dict(tp=self.tp, fp=self.fp, fn=self.fn, precision=self.precision,
                recall=self.recall, f1=self.f1)


def match(truth: np.ndarray, pred: np.ndarray, radius: float = RADIUS_MM
          ) -> tuple[Counts, np.ndarray]:
  """Greedy matching of one case, in ground-truth order.

  Args:
    truth: (N, 2) ground-truth points (same unit as ``radius``).
    pred: (M, 2) predicted points.
    radius: matching radius (inclusive).

  Returns:
    The counts and an int array (M,) giving, per prediction, the index of the
    truth point it matched or -1.
  """
  truth = np.asarray(truth, np.float64).reshape(-1, 2)
  pred = np.asarray(pred, np.float64).reshape(-1, 2)
  assigned = np.full(len(pred), -1, np.int64)
  if len(truth) == 0 or len(pred) == 0:
    return Counts(0, len(pred), len(truth)), assigned
  dist = np.sqrt(((truth[:, None, :] - pred[None, :, :]) ** 2).sum(-1))
  tp = 0
  for i in range(len(truth)):
    d = np.where(assigned < 0, dist[i], np.inf)
    j = int(np.argmin(d))
    if d[j] <= radius:
      assigned[j] = i
      tp += 1
  return Counts(tp, len(pred) - tp, len(truth) - tp), assigned


def pooled(counts: Iterable[Counts]) -> Counts:
  """Sum of per-case counts (the challenge's pooled F1 is computed on this)."""
  total = Counts()
  for c in counts:
    total = total + c
  return total


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> dict:
  """The F1-best threshold of a binary classification, and its scores.

  Items scoring ``>= threshold`` are positive; every distinct score is a
  candidate cut (equal scores go in together) and ties go to the highest
  threshold (the fewest positive calls). One sort, O(n log n): the one
  implementation for per-item classifiers (Kondo's candidates, image-level
  fields). With no positives: F1 0 at threshold 0.5.
  """
  labels = np.asarray(labels) == 1
  scores = np.asarray(scores, np.float64)
  n_pos = int(labels.sum())
  if len(scores) == 0 or n_pos == 0:
    return dict(f1=0.0, precision=0.0, recall=0.0, threshold=0.5)
  order = np.argsort(-scores, kind="stable")
  s, tp = scores[order], np.cumsum(labels[order])
  # Only the last of equal scores is a valid cut (ties go in together).
  last = np.r_[s[1:] != s[:-1], True]
  k = np.flatnonzero(last)
  tp_k, pred_k = tp[k].astype(np.float64), k + 1.0
  prec, rec = tp_k / pred_k, tp_k / n_pos
  f1 = 2 * tp_k / (pred_k + n_pos)  # = 2 TP / (2 TP + FP + FN), one division: exact ties
  i = int(np.argmax(f1))
  return dict(f1=float(f1[i]), precision=float(prec[i]), recall=float(rec[i]),
              threshold=float(s[k[i]]))
