"""Ensembles of detectors by agreement (Lafarge & Koelzer, MIDOG 2022).

Their final submission kept a detection of one model when the other model
also detected a figure there. :func:`combine` generalises that to any number
of members; ``predict --workdir A --workdir B`` uses it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from midog_jax import metrics
from midog_jax.detections import Detections


def combine(per_model: Sequence[Detections],
            radius_px: float | None = None) -> Detections:
  """The detections to write from the members' detections of one image.

  One member: its detections, unchanged. Several: agreement (Lafarge & Koelzer's
  final submission). The
  first member's detections are taken in decreasing score order; each
  claims, in every other member, the nearest not-yet-claimed detection of
  the same class within ``radius_px`` (inclusive; the MIDOG greedy matching,
  so one detection never vouches for two). A detection matched in every
  member is kept, at the mean position of the matched points with the mean
  of their probabilities; the rest are dropped. The output is in the first
  member's score order.

  Args:
    per_model: one ``Detections`` per member, each already thresholded.
    radius_px: the matching radius in pixels (``7.5 / spacing_um``);
      required for several members.
  """
  if not per_model:
    raise ValueError("combine needs at least one model's detections")
  if len(per_model) == 1:
    return per_model[0]
  if radius_px is None or not radius_px > 0:
    raise ValueError(f"an ensemble needs a positive matching radius, got {radius_px}")
  first = per_model[0]
  order = np.argsort(-first.scores, kind="stable")
  xy = first.xy[order].astype(np.float64)
  classes = first.classes[order]
  agree = np.ones(len(order), bool)
  sum_xy, sum_p = xy.copy(), first.scores[order].astype(np.float64)
  for other in per_model[1:]:
    for c in np.unique(classes):
      mine = np.flatnonzero(classes == c)
      theirs = np.flatnonzero(other.classes == c)
      # metrics.match: "truth" (ours, in score order) claims "predictions".
      _, assigned = metrics.match(xy[mine], other.xy[theirs], radius_px)
      got = np.full(len(mine), -1, np.int64)
      hit = assigned >= 0
      got[assigned[hit]] = theirs[hit]
      ok = got >= 0
      agree[mine[~ok]] = False
      sum_xy[mine[ok]] += other.xy[got[ok]]
      sum_p[mine[ok]] += other.scores[got[ok]]
  n = len(per_model)
  return Detections(sum_xy[agree] / n, sum_p[agree] / n, classes[agree])
