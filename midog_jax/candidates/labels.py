"""Candidate labels and candidate recall, in the MIDOG matching's units.

The rule: a candidate is MITOTIC (label 1) when at least one ground-truth
mitotic figure lies within the organisers' radius of its centre, i.e.
``distance <= metrics.RADIUS_MM`` (7.5 um, inclusive, no slack) with both
points converted to millimetres as the matching does (``px * spacing_um /
1000`` in float64, Euclidean distance). Otherwise it is label 0; imposters
count as non-mitotic. Unlike the matching, this is not one-to-one: every
candidate near a figure is mitotic (two candidates on one figure are both
positives for the classifier).

Candidate recall of an image set = fraction of mitotic figures with at least
one candidate within the same radius: the ceiling of any method that only
classifies these candidates.
"""

from __future__ import annotations

import numpy as np

from midog_jax import metrics


def _to_mm(xy_px: np.ndarray, spacing_um: float) -> np.ndarray:
  # The matching's conversion (evaluate: points in px * spacing_um / 1000).
  return np.asarray(xy_px, np.float64).reshape(-1, 2) * (spacing_um / 1000.0)


def within_radius(cand_px: np.ndarray, figures_px: np.ndarray,
                  spacing_um: float) -> np.ndarray:
  """Boolean (N candidates, M figures): figure within the radius of candidate."""
  c, f = _to_mm(cand_px, spacing_um), _to_mm(figures_px, spacing_um)
  if len(c) == 0 or len(f) == 0:
    return np.zeros((len(c), len(f)), bool)
  dist = np.sqrt(((c[:, None, :] - f[None, :, :]) ** 2).sum(-1))
  return dist <= metrics.RADIUS_MM


def label_candidates(cand_px: np.ndarray, figures_px: np.ndarray,
                     spacing_um: float) -> tuple[np.ndarray, int]:
  """(labels int32 (N,) in {0, 1}, number of figures with a candidate)."""
  near = within_radius(cand_px, figures_px, spacing_um)
  return near.any(axis=1).astype(np.int32), int(near.any(axis=0).sum())
