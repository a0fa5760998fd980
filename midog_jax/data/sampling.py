"""Patch sampling: which window of which case each training example shows.

Everything here is a pure function of (case, ``np.random.Generator``), so a
grain worker seeded per record gets the same patches on every run. The
pipeline (``pipeline.PatchMaker``) picks the case of each record (and the
domain stratification); these functions pick the window inside it.

Conventions:
  * Points are (x, y) in pixel-index coordinates: pixel column k spans
    [k - 0.5, k + 0.5], so its centre is the integer k.
  * A ``PatchRequest`` names the top-left pixel (x0, y0) of a ``size`` x
    ``size`` window; the window may reach past the image border (the slide
    reader pads), so a point p lies at ``p - (x0, y0)`` inside the patch.
  * A window of pixels x0 .. x0 + size - 1 holds the points with
    ``x0 - 0.5 <= x < x0 + size - 0.5`` (the same in y): exactly those whose
    pixel is inside. ``points_in_window`` is the one implementation of this
    rule (the pipeline, the TFDS builder and the augmentation use it).

Samplers (one window per call):
  * ``sample_mitosis_centred`` (Sheta's MIDOG 2021 RetinaNet report): with
    probability ``p`` (0.5) and if the case has mitotic figures, a patch
    holding a random figure at a random position at least ``margin`` px (25)
    from the patch border; else a random patch.
  * ``sample_imposter_centred``: the same with imposters (hard negatives).
  * ``sample_random``: a uniformly random patch inside the image.
  * ``sample_balanced`` (Lafarge & Koelzer, MIDOG 2022): a patch centred
    (+ small jitter) on a mitotic figure, or a negative: an imposter or a
    random point far (``min_dist_px``) from every mitotic figure.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from midog_jax.data.midog import Case
from midog_jax.errors import DataError
from midog_jax.metrics import RADIUS_MM

KINDS = ("mitosis", "imposter", "random", "negative")
DEFAULT_MARGIN = 25
# Centring jitter of balanced patches (positives and negatives alike, so the
# precision of the centring does not tell the classes apart).
DEFAULT_JITTER_PX = 3.0


@dataclasses.dataclass(frozen=True)
class PatchRequest:
  """One patch to read: case, top-left pixel of the window, size and why.

  ``kind`` says how the window was chosen: "mitosis"/"imposter" (holds that
  point on purpose), "random" (uniform) or "negative" (centred far from all
  mitotic figures).
  """

  case_index: int
  x0: int
  y0: int
  size: int
  kind: str

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


def centred_request(case_index: int, x: float, y: float, size: int,
                    kind: str) -> PatchRequest:
  """The window whose centre pixel (``size // 2``) holds the point (x, y)."""
  return PatchRequest(case_index, int(np.floor(x + 0.5)) - size // 2,
                      int(np.floor(y + 0.5)) - size // 2, size, kind)


def jittered_request(case: Case, case_index: int, xy: np.ndarray, size: int,
                     kind: str, rng: np.random.Generator,
                     jitter_px: float = DEFAULT_JITTER_PX) -> PatchRequest:
  """The window centred on ``xy`` moved by a uniform jitter in each axis.

  The jitter is uniform in [-``jitter_px``, ``jitter_px``] in x and y; the
  jittered centre is then clipped onto the image, so the window's centre
  pixel is always a pixel of the image.
  """
  jit = rng.uniform(-jitter_px, jitter_px, 2)
  x = float(np.clip(float(xy[0]) + jit[0], 0, case.width - 1))
  y = float(np.clip(float(xy[1]) + jit[1], 0, case.height - 1))
  return centred_request(case_index, x, y, size, kind)


def _check_size(size: int) -> None:
  if int(size) != size or size < 1:
    raise ValueError(f"patch size must be a positive integer, got {size!r}")


def _uniform_origin(extent: int, size: int, rng: np.random.Generator) -> int:
  # An image smaller than the patch is placed anywhere inside the window, so
  # the patch still holds the whole image (the reader pads the rest).
  lo, hi = min(0, extent - size), max(0, extent - size)
  return int(rng.integers(lo, hi + 1))


def sample_random(case: Case, case_index: int, size: int,
                  rng: np.random.Generator) -> PatchRequest:
  """A uniformly random ``size`` x ``size`` window inside the image."""
  _check_size(size)
  return PatchRequest(case_index, _uniform_origin(case.width, size, rng),
                      _uniform_origin(case.height, size, rng), size, "random")


def _point_origin(v: float, size: int, margin: int,
                  rng: np.random.Generator) -> int:
  """Window origin on one axis putting coordinate ``v`` at a random offset.

  The point's pixel ends up at patch pixel u, uniform in ``margin <= u <=
  size - 1 - margin``.
  """
  m = min(int(margin), max(0, (size - 1) // 2))
  u = int(rng.integers(m, size - m))
  return int(np.floor(v + 0.5)) - u


def _sample_point_centred(points: np.ndarray, kind: str, case: Case,
                          case_index: int, size: int, rng: np.random.Generator,
                          p: float, margin: int) -> PatchRequest:
  _check_size(size)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p must be in [0, 1], got {p}")
  # Draw the coin even for cases without points so the random stream (and so
  # the rest of the record) does not depend on whether the case has labels.
  coin = rng.random() < p
  if coin and len(points):
    x, y = points[int(rng.integers(len(points)))]
    return PatchRequest(case_index, _point_origin(x, size, margin, rng),
                        _point_origin(y, size, margin, rng), size, kind)
  return sample_random(case, case_index, size, rng)


def sample_mitosis_centred(case: Case, case_index: int, size: int,
                           rng: np.random.Generator, p: float = 0.5,
                           margin: int = DEFAULT_MARGIN) -> PatchRequest:
  """Sheta's (MIDOG 2021 RetinaNet) sampler: a figure with probability p.

  With probability ``p``, and if the case has any mitotic figure, the window
  holds a random figure at a random position at least ``margin`` px from the
  patch border, so the figure is not always dead centre. Otherwise (and for cases without
  figures) a uniformly random window inside the image, kind "random".
  """
  return _sample_point_centred(case.mitoses, "mitosis", case, case_index, size,
                               rng, p, margin)


def sample_imposter_centred(case: Case, case_index: int, size: int,
                            rng: np.random.Generator, p: float = 0.5,
                            margin: int = DEFAULT_MARGIN) -> PatchRequest:
  """As ``sample_mitosis_centred``, with imposters (hard negatives)."""
  return _sample_point_centred(case.imposters, "imposter", case, case_index,
                               size, rng, p, margin)


def default_min_dist_px(case: Case) -> float:
  """The MIDOG matching radius (7.5 um) in this case's pixels."""
  return RADIUS_MM * 1000.0 / case.spacing_um


def far_from_mitoses(case: Case, xy: np.ndarray, min_dist_px: float
                     ) -> np.ndarray:
  """bool (N,): which points lie at >= ``min_dist_px`` from every mitosis."""
  mit = np.asarray(case.mitoses, np.float32).reshape(-1, 2)
  if not len(mit):
    return np.ones(len(xy), bool)
  d2 = ((xy[:, None, :] - mit[None, :, :]) ** 2).sum(-1).min(1)
  return d2 >= np.float32(min_dist_px) ** 2


def sample_negative_centre(case: Case, rng: np.random.Generator,
                           min_dist_px: float | None = None,
                           batch: int = 256, max_rounds: int = 16
                           ) -> np.ndarray:
  """A random pixel centre at distance >= ``min_dist_px`` from every mitosis.

  Lafarge & Koelzer's negatives are patches "whose centre is sufficiently
  distant from the positive examples". Rejection sampling, ``batch``
  candidates at a time, at most ``max_rounds`` rounds. ``min_dist_px``
  defaults to the matching radius (7.5 um) in the case's pixels.

  Returns:
    float32 (2,) point (x, y) on a pixel centre.

  Raises:
    DataError naming the case's image if no such point was found (the image
    is covered by the discs around its mitotic figures).
  """
  if min_dist_px is None:
    min_dist_px = default_min_dist_px(case)
  for _ in range(max_rounds):
    cand = np.stack([rng.integers(0, case.width, batch),
                     rng.integers(0, case.height, batch)], 1).astype(np.float32)
    ok = np.flatnonzero(far_from_mitoses(case, cand, min_dist_px))
    if len(ok):
      return cand[ok[0]]
  raise DataError(case.path, f"no point at >= {min_dist_px:.1f} px from all "
                  f"{len(case.mitoses)} mitotic figures found in "
                  f"{max_rounds * batch} random draws on the "
                  f"{case.width}x{case.height} image")


def sample_balanced(case: Case, case_index: int, size: int,
                    rng: np.random.Generator, positive: bool,
                    min_dist_px: float | None = None,
                    imposter_fraction: float = 0.5,
                    jitter_px: float = DEFAULT_JITTER_PX) -> PatchRequest:
  """One example of Lafarge & Koelzer's (MIDOG 2022) balanced stream.

  ``positive``: a window centred (+ uniform jitter up to ``jitter_px``,
  ``jittered_request``) on a random mitotic figure of the case, kind
  "mitosis". Otherwise a negative: with probability ``imposter_fraction``
  centred (+ jitter) on an imposter at least ``min_dist_px`` + jitter from
  every mitosis (kind "imposter"), else (or without such imposters) on a
  random point at least ``min_dist_px`` from every mitosis (kind
  "negative", ``sample_negative_centre``). A positive asked of a case
  without mitotic figures falls back to a negative, so the pipeline picks
  positive examples' cases among those with figures; ``kind`` always tells
  what was made.
  """
  _check_size(size)
  min_dist = (default_min_dist_px(case) if min_dist_px is None
              else float(min_dist_px))
  use_imposter = rng.random() < imposter_fraction
  mit = np.asarray(case.mitoses, np.float32).reshape(-1, 2)
  if positive and len(mit):
    return jittered_request(case, case_index, mit[int(rng.integers(len(mit)))],
                            size, "mitosis", rng, jitter_px)
  if use_imposter:
    imp = np.asarray(case.imposters, np.float32).reshape(-1, 2)
    # An imposter right beside a mitotic figure would make a "negative" patch
    # whose centre shows a mitosis; the jitter can bring it sqrt(2) j closer.
    imp = imp[far_from_mitoses(case, imp, min_dist + jitter_px * np.sqrt(2))]
    if len(imp):
      pick = imp[int(rng.integers(len(imp)))]
      return jittered_request(case, case_index, pick, size, "imposter", rng,
                              jitter_px)
  x, y = sample_negative_centre(case, rng, min_dist)
  return centred_request(case_index, float(x), float(y), size, "negative")


def points_in_window(points: np.ndarray, x0: int, y0: int,
                     size: int | tuple[int, int]
                     ) -> tuple[np.ndarray, np.ndarray]:
  """The points inside a window of pixels, in window coordinates.

  The window holds pixel columns x0 .. x0 + width - 1 and rows y0 .. y0 +
  height - 1; pixel k spans [k - 0.5, k + 0.5], so a point belongs to it iff
  ``x0 - 0.5 <= x < x0 + width - 0.5`` and ``y0 - 0.5 <= y < y0 + height -
  0.5``. Half-open, so a point on the border between two adjacent windows
  belongs to exactly one of them (the later one).

  Args:
    points: (N, 2) (x, y) in the coordinates x0 and y0 refer to.
    x0, y0: the window's top-left pixel.
    size: side of a square window, or (width, height).

  Returns:
    ``(inside, keep)``: float32 (K, 2) ``p - (x0, y0)`` of the points inside,
    and the bool (N,) mask of which input points those are.
  """
  w, h = (size, size) if np.ndim(size) == 0 else size
  q = np.asarray(points, np.float32).reshape(-1, 2) - np.float32([x0, y0])
  keep = ((q[:, 0] >= -0.5) & (q[:, 0] < np.float32(w) - 0.5)
          & (q[:, 1] >= -0.5) & (q[:, 1] < np.float32(h) - 0.5))
  return q[keep], keep
