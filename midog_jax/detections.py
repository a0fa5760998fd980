"""The ``Detections`` type and the one set of class ids (bottom of the import graph).

Class ids are those of the MIDOG annotation files: 1 = mitotic figure,
2 = imposter ("not mitotic figure" in the annotation files, "non-mitotic
figure" in the challenge's prediction format). Every module that needs a class
id imports it from here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.spatial import cKDTree

MITOSIS = 1
IMPOSTER = 2
# Names used by the challenge's prediction format (and its evaluation code).
CHALLENGE_NAMES = {MITOSIS: "mitotic figure", IMPOSTER: "non-mitotic figure"}
CLASS_OF_NAME = {v: k for k, v in CHALLENGE_NAMES.items()}


@dataclasses.dataclass
class Detections:
  """Detected points of one image, in pixel coordinates.

  Attributes:
    xy: float32 (N, 2) (x, y) pixel centres.
    scores: float32 (N,) probabilities.
    classes: int32 (N,), ``MITOSIS`` or ``IMPOSTER`` (all ``MITOSIS`` when
      omitted).
  """

  xy: np.ndarray
  scores: np.ndarray
  classes: np.ndarray | None = None

  def __post_init__(self):
    self.xy = np.asarray(self.xy, np.float32).reshape(-1, 2)
    self.scores = np.asarray(self.scores, np.float32).reshape(-1)
    if self.classes is None:
      self.classes = np.full(len(self.xy), MITOSIS, np.int32)
    self.classes = np.asarray(self.classes, np.int32).reshape(-1)
    if not len(self.xy) == len(self.scores) == len(self.classes):
      raise ValueError(f"Detections: {len(self.xy)} points, {len(self.scores)} "
                       f"scores and {len(self.classes)} classes")
    bad = ~np.isin(self.classes, list(CHALLENGE_NAMES))
    if bad.any():
      raise ValueError(f"Detections: unknown classes {sorted(set(self.classes[bad]))}")

  def __len__(self) -> int:
    return len(self.xy)

  @property
  def names(self) -> list[str]:
    """Challenge names of the points ("mitotic figure" / "non-mitotic figure")."""
    return [CHALLENGE_NAMES[int(c)] for c in self.classes]

  @classmethod
  def from_mm(cls, xy_mm: np.ndarray, probs: np.ndarray, names: list[str],
              spacing_um: float) -> "Detections":
    """Builds detections from challenge-format millimetres and names."""
    xy = np.asarray(xy_mm, np.float64).reshape(-1, 2) * 1000.0 / spacing_um
    classes = [CLASS_OF_NAME[n] for n in names]
    return cls(xy, probs, np.asarray(classes, np.int32))

  def select(self, keep: np.ndarray) -> "Detections":
    """The detections where the boolean (or index) array ``keep`` selects."""
    return Detections(self.xy[keep], self.scores[keep], self.classes[keep])

  def mitotic(self) -> "Detections":
    """Only the points classed as mitotic figures."""
    return self.select(self.classes == MITOSIS)

  def above(self, threshold: float) -> "Detections":
    """Only the points scoring at least ``threshold``."""
    return self.select(self.scores >= threshold)


def suppress_by_distance(xy: np.ndarray, scores: np.ndarray, radius: float
                         ) -> np.ndarray:
  """Indices kept by greedy distance suppression (highest score first)."""
  if len(xy) == 0 or radius <= 0:
    return np.arange(len(xy))
  order = np.lexsort((xy[:, 1], xy[:, 0], -scores))  # ties broken by position
  tree = cKDTree(xy)
  removed = np.zeros(len(xy), bool)
  keep = []
  for i in order:
    if removed[i]:
      continue
    keep.append(i)
    removed[tree.query_ball_point(xy[i], radius)] = True
  return np.sort(np.asarray(keep, np.int64))
