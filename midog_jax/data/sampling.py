"""Patch sampling: where to cut training patches from the cases.

Everything here is a pure function of (cases, ``np.random.Generator``), so a
grain worker seeded per record gets the same patches on every run.

Conventions:
  * Points are (x, y) pixel centres: pixel column i spans [i - 0.5, i + 0.5].
  * A ``PatchRequest`` names the top-left pixel (x0, y0) of a ``size`` x
    ``size`` window; the window may reach past the image border (the slide
    reader pads), so a point p lies at ``p - (x0, y0)`` inside the patch.
  * A window owns the points whose patch coordinates fall in
    [-0.5, size - 0.5), i.e. exactly those whose pixel (``round``) is inside.

Strategies (``make_requests``):
  * "mitosis_centred" (seed 000): with probability ``p`` (0.5) and if the case
    has mitotic figures, a patch holding a random figure at a random position
    at least ``margin`` px (25) from the patch border; else a random patch.
  * "imposter_centred": the same with imposters (hard negatives).
  * "random": uniformly random patches inside the image.
  * "balanced" (seed 001): exactly ``pos_fraction`` of the patches centred
    (+ small jitter) on mitotic figures, the rest negatives: imposters and
    random points far (``min_dist_px``) from every mitotic figure.
  Any of them can be domain-stratified (equal counts per domain).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from midog_jax.data.midog import Case
from midog_jax.errors import DataError
from midog_jax.metrics import RADIUS_MM

KINDS = ("mitosis", "imposter", "random", "negative")
STRATEGIES = ("mitosis_centred", "imposter_centred", "random", "balanced")
DEFAULT_MARGIN = 25


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


@dataclasses.dataclass(frozen=True)
class Centres:
  """Patch centres from ``balanced_centres``: one row per patch."""

  case_index: np.ndarray  # int64 (n,)
  xy: np.ndarray  # float32 (n, 2), (x, y) in image pixels
  kind: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.kind)

  def requests(self, size: int) -> list[PatchRequest]:
    """``size`` x ``size`` windows centred on the points."""
    return [centred_request(int(i), float(x), float(y), size, k)
            for i, (x, y), k in zip(self.case_index, self.xy, self.kind)]


def centred_request(case_index: int, x: float, y: float, size: int,
                    kind: str) -> PatchRequest:
  """The window whose centre pixel (``size // 2``) holds the point (x, y)."""
  return PatchRequest(case_index, int(np.floor(x + 0.5)) - size // 2,
                      int(np.floor(y + 0.5)) - size // 2, size, kind)


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


def _point_origin(v: float, size: int, margin: int, jitter: int | None,
                  rng: np.random.Generator) -> int:
  """Window origin on one axis putting coordinate ``v`` at a random offset.

  The point's pixel ends up at patch pixel u, with ``margin <= u <= size - 1
  - margin`` and, if ``jitter`` is given, ``|u - size // 2| <= jitter``.
  """
  m = min(int(margin), max(0, (size - 1) // 2))
  lo, hi = m, size - 1 - m
  if jitter is not None:
    lo, hi = max(lo, size // 2 - int(jitter)), min(hi, size // 2 + int(jitter))
  u = int(rng.integers(lo, hi + 1))
  return int(np.floor(v + 0.5)) - u


def _sample_point_centred(points: np.ndarray, kind: str, case: Case,
                          case_index: int, size: int, rng: np.random.Generator,
                          p: float, margin: int, jitter: int | None
                          ) -> PatchRequest:
  _check_size(size)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p must be in [0, 1], got {p}")
  # Draw the coin even for cases without points so the random stream (and so
  # the rest of the record) does not depend on whether the case has labels.
  coin = rng.random() < p
  if coin and len(points):
    x, y = points[int(rng.integers(len(points)))]
    return PatchRequest(case_index, _point_origin(x, size, margin, jitter, rng),
                        _point_origin(y, size, margin, jitter, rng), size, kind)
  return sample_random(case, case_index, size, rng)


def sample_mitosis_centred(case: Case, case_index: int, size: int,
                           rng: np.random.Generator, p: float = 0.5,
                           margin: int = DEFAULT_MARGIN,
                           jitter: int | None = None) -> PatchRequest:
  """Seed 000's sampler: a patch holding a mitotic figure with probability p.

  With probability ``p``, and if the case has any mitotic figure, the window
  holds a random figure at a random position at least ``margin`` px from the
  patch border (and at most ``jitter`` px from the patch centre when given),
  so the figure is not always dead centre. Otherwise (and for cases without
  figures) a uniformly random window inside the image, kind "random".
  """
  return _sample_point_centred(case.mitoses, "mitosis", case, case_index, size,
                               rng, p, margin, jitter)


def sample_imposter_centred(case: Case, case_index: int, size: int,
                            rng: np.random.Generator, p: float = 0.5,
                            margin: int = DEFAULT_MARGIN,
                            jitter: int | None = None) -> PatchRequest:
  """As ``sample_mitosis_centred``, with imposters (hard negatives)."""
  return _sample_point_centred(case.imposters, "imposter", case, case_index,
                               size, rng, p, margin, jitter)


def default_min_dist_px(case: Case) -> float:
  """The MIDOG matching radius (7.5 um) in this case's pixels."""
  return RADIUS_MM * 1000.0 / case.spacing_um


def sample_negative_centre(case: Case, rng: np.random.Generator,
                           min_dist_px: float | None = None,
                           batch: int = 256, max_rounds: int = 16
                           ) -> np.ndarray:
  """A random pixel centre at distance >= ``min_dist_px`` from every mitosis.

  Seed 001's negatives are patches "whose centre is sufficiently distant from
  the positive examples". Rejection sampling, ``batch`` candidates at a time,
  at most ``max_rounds`` rounds. ``min_dist_px`` defaults to the matching
  radius (7.5 um) in the case's pixels.

  Returns:
    float32 (2,) point (x, y) on a pixel centre.

  Raises:
    DataError naming the case's image if no such point was found (the image
    is covered by the discs around its mitotic figures).
  """
  if min_dist_px is None:
    min_dist_px = default_min_dist_px(case)
  mit = np.asarray(case.mitoses, np.float32).reshape(-1, 2)
  for _ in range(max_rounds):
    cand = np.stack([rng.integers(0, case.width, batch),
                     rng.integers(0, case.height, batch)], 1).astype(np.float32)
    if not len(mit):
      return cand[0]
    d2 = ((cand[:, None, :] - mit[None, :, :]) ** 2).sum(-1).min(1)
    ok = np.flatnonzero(d2 >= np.float32(min_dist_px) ** 2)
    if len(ok):
      return cand[ok[0]]
  raise DataError(case.path, f"no point at >= {min_dist_px:.1f} px from all "
                  f"{len(mit)} mitotic figures found in {max_rounds * batch} "
                  f"random draws on the {case.width}x{case.height} image")


def sample_balanced(case: Case, case_index: int, size: int,
                    rng: np.random.Generator, positive: bool,
                    min_dist_px: float | None = None,
                    imposter_fraction: float = 0.5, jitter_px: float = 3.0
                    ) -> PatchRequest:
  """One example of a balanced stream (seed 001), for per-record pipelines.

  ``positive``: a window centred (+ uniform jitter up to ``jitter_px``) on a
  random mitotic figure of the case, kind "mitosis". Otherwise a negative:
  with probability ``imposter_fraction`` centred (+ jitter) on an imposter at
  least ``min_dist_px`` + jitter from every mitosis (kind "imposter"), else
  (or without such imposters) on a random point at least ``min_dist_px``
  from every mitosis (kind "negative"). A positive asked of a case without
  mitotic figures falls back to a negative, so a pipeline wanting exact
  halves picks positive examples' cases among those with figures (or uses
  ``balanced_centres``, which pools figures over cases); ``kind`` always
  tells what was made.
  """
  _check_size(size)
  min_dist = default_min_dist_px(case) if min_dist_px is None else float(min_dist_px)
  use_imposter = rng.random() < imposter_fraction
  jit = rng.uniform(-jitter_px, jitter_px, 2).astype(np.float32)
  mit = np.asarray(case.mitoses, np.float32).reshape(-1, 2)
  if positive and len(mit):
    xy, kind = mit[int(rng.integers(len(mit)))] + jit, "mitosis"
  else:
    imp = np.asarray(case.imposters, np.float32).reshape(-1, 2)
    if use_imposter and len(imp):
      far = _far_imposters([case], np.zeros(len(imp), np.int64), imp,
                           [min_dist + jitter_px * np.sqrt(2)])
      imp = imp[far]
    if use_imposter and len(imp):
      xy, kind = imp[int(rng.integers(len(imp)))] + jit, "imposter"
    else:
      xy, kind = sample_negative_centre(case, rng, min_dist), "negative"
  x = float(np.clip(xy[0], 0, case.width - 1))
  y = float(np.clip(xy[1], 0, case.height - 1))
  return centred_request(case_index, x, y, size, kind)


def domain_stratified_cases(cases: Sequence[Case], n: int,
                            rng: np.random.Generator) -> np.ndarray:
  """Case indices with (as near as possible) equal numbers per domain.

  Domains are taken round robin in a random order (so with ``n`` a multiple
  of the number of domains, every domain gets exactly ``n / D``; otherwise
  counts differ by at most one and the favoured domains are random); within
  a domain the case is uniform.
  """
  if not len(cases):
    raise ValueError("no cases to sample from")
  by_domain: dict[str, list[int]] = {}
  for i, c in enumerate(cases):
    by_domain.setdefault(c.domain, []).append(i)
  domains = sorted(by_domain)
  order = rng.permutation(len(domains))
  out = np.empty(n, np.int64)
  for slot, d in enumerate(order):
    members = np.asarray(by_domain[domains[d]])
    idx = np.arange(slot, n, len(domains))
    out[idx] = members[rng.integers(len(members), size=len(idx))]
  return out


def _count(n: int, fraction: float, rng: np.random.Generator) -> int:
  """``n * fraction`` rounded at random: exact when it is an integer."""
  v = n * fraction
  k = int(np.floor(v))
  return k + int(rng.random() < v - k)


def _pool(cases: Sequence[Case], members: Sequence[int], attr: str
          ) -> tuple[np.ndarray, np.ndarray]:
  """All points of ``attr`` of the member cases: (case index, xy)."""
  idx = [np.full(len(getattr(cases[i], attr)), i, np.int64) for i in members]
  xy = [np.asarray(getattr(cases[i], attr), np.float32).reshape(-1, 2)
        for i in members]
  if not idx:
    return np.zeros(0, np.int64), np.zeros((0, 2), np.float32)
  return np.concatenate(idx), np.concatenate(xy)


def _far_imposters(cases: Sequence[Case], idx: np.ndarray, xy: np.ndarray,
                   min_dist: Sequence[float]) -> np.ndarray:
  """Mask of imposters at >= min_dist from every mitosis of their case.

  An imposter right beside a mitotic figure would make a "negative" patch
  whose centre shows a mitosis.
  """
  keep = np.ones(len(idx), bool)
  for i in np.unique(idx):
    mit = cases[i].mitoses
    if not len(mit):
      continue
    sel = idx == i
    d2 = ((xy[sel][:, None] - mit[None]) ** 2).sum(-1).min(1)
    keep[sel] = d2 >= np.float32(min_dist[i]) ** 2
  return keep


def balanced_centres(cases: Sequence[Case], n: int, rng: np.random.Generator,
                     pos_fraction: float = 0.5, min_dist_px: float | None = None,
                     imposter_fraction: float = 0.5, jitter_px: float = 3.0,
                     stratify_domains: bool = False) -> Centres:
  """Seed 001's balanced mini-batch: positives and negatives in fixed shares.

  ``n * pos_fraction`` patches (exactly, when that is an integer; otherwise
  rounded at random) are centred on a mitotic figure drawn uniformly from all
  figures (of the sample's domain when stratified), moved by a uniform jitter
  of up to ``jitter_px`` in x and y. The rest are negatives: an
  ``imposter_fraction`` share centred (+ jitter) on imposters that lie at
  least ``min_dist_px`` + jitter from every mitosis, the others random points
  at least ``min_dist_px`` from every mitosis (``sample_negative_centre``;
  default: the 7.5 um matching radius). Without usable imposters all
  negatives are random. The order is shuffled.

  With ``stratify_domains``, positives are spread equally over the domains
  that have mitotic figures and negatives over all domains.
  """
  if not len(cases):
    raise ValueError("no cases to sample from")
  if not 0.0 <= pos_fraction <= 1.0 or not 0.0 <= imposter_fraction <= 1.0:
    raise ValueError("pos_fraction and imposter_fraction must be in [0, 1]")
  min_dist = [default_min_dist_px(c) if min_dist_px is None else float(min_dist_px)
              for c in cases]
  n_pos = _count(n, pos_fraction, rng)
  n_neg = n - n_pos

  by_domain: dict[str, list[int]] = {}
  for i, c in enumerate(cases):
    by_domain.setdefault(c.domain if stratify_domains else "", []).append(i)
  groups = [by_domain[d] for d in sorted(by_domain)]

  case_idx, xy, kinds = [], [], []

  # Positives.
  pos_pools = [p for p in (_pool(cases, g, "mitoses") for g in groups) if len(p[0])]
  if n_pos and not pos_pools:
    raise ValueError("balanced sampling needs mitotic figures, but none of the "
                     f"{len(cases)} cases has any")
  pos_group = _round_robin(n_pos, len(pos_pools), rng)
  for g, pool in enumerate(pos_pools):
    k = int((pos_group == g).sum())
    pick = rng.integers(len(pool[0]), size=k)
    case_idx.append(pool[0][pick])
    xy.append(pool[1][pick] + rng.uniform(-jitter_px, jitter_px, (k, 2)))
    kinds += ["mitosis"] * k

  # Negatives: imposters (far from mitoses) and random far points.
  neg_group = _round_robin(n_neg, len(groups), rng)
  for g, members in enumerate(groups):
    k = int((neg_group == g).sum())
    if not k:
      continue
    idx, pts = _pool(cases, members, "imposters")
    far = _far_imposters(cases, idx, pts,
                         [d + jitter_px * np.sqrt(2) for d in min_dist])
    idx, pts = idx[far], pts[far]
    k_imp = _count(k, imposter_fraction, rng) if len(idx) else 0
    pick = rng.integers(len(idx), size=k_imp) if k_imp else np.zeros(0, np.int64)
    case_idx.append(idx[pick])
    xy.append(pts[pick] + rng.uniform(-jitter_px, jitter_px, (k_imp, 2)))
    kinds += ["imposter"] * k_imp
    rand_cases = np.asarray(members)[rng.integers(len(members), size=k - k_imp)]
    rand_xy = [sample_negative_centre(cases[i], rng, min_dist[i]) for i in rand_cases]
    case_idx.append(rand_cases.astype(np.int64))
    xy.append(np.asarray(rand_xy, np.float32).reshape(-1, 2))
    kinds += ["negative"] * (k - k_imp)

  case_idx = np.concatenate(case_idx) if case_idx else np.zeros(0, np.int64)
  xy = np.concatenate(xy).astype(np.float32) if xy else np.zeros((0, 2), np.float32)
  # Jitter may push a centre off the image; keep centres on pixels of the image.
  w = np.asarray([cases[i].width for i in case_idx], np.float32)
  h = np.asarray([cases[i].height for i in case_idx], np.float32)
  xy = np.stack([np.clip(xy[:, 0], 0, w - 1), np.clip(xy[:, 1], 0, h - 1)], 1)
  perm = rng.permutation(len(kinds))
  return Centres(case_idx[perm], xy[perm], tuple(kinds[j] for j in perm))


def _round_robin(n: int, groups: int, rng: np.random.Generator) -> np.ndarray:
  """Group of each of ``n`` slots: round robin over a random group order."""
  if groups == 0:
    return np.zeros(0, np.int64)
  return rng.permutation(groups)[np.arange(n) % groups]


def make_requests(cases: Sequence[Case], num: int, rng: np.random.Generator,
                  strategy: str = "mitosis_centred", size: int = 512, *,
                  stratify_domains: bool = False, p: float = 0.5,
                  margin: int = DEFAULT_MARGIN, jitter: int | None = None,
                  pos_fraction: float = 0.5, min_dist_px: float | None = None,
                  imposter_fraction: float = 0.5, jitter_px: float = 3.0
                  ) -> list[PatchRequest]:
  """``num`` patch requests by a named strategy (see the module docstring).

  Args:
    cases: the cases to draw from (``case_index`` refers to this sequence).
    num: how many patches (e.g. one mini-batch).
    rng: the random stream (the result is a pure function of it).
    strategy: one of ``STRATEGIES``.
    size: patch side in pixels.
    stratify_domains: equal numbers of patches per domain; otherwise cases
      are drawn uniformly (per-case strategies) or figures pooled (balanced).
    p, margin, jitter: see ``sample_mitosis_centred``.
    pos_fraction, min_dist_px, imposter_fraction, jitter_px: see
      ``balanced_centres``.
  """
  _check_size(size)
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if not len(cases):
    raise ValueError("no cases to sample from")
  if strategy == "balanced":
    return balanced_centres(
        cases, num, rng, pos_fraction=pos_fraction, min_dist_px=min_dist_px,
        imposter_fraction=imposter_fraction, jitter_px=jitter_px,
        stratify_domains=stratify_domains).requests(size)
  if stratify_domains:
    idx = domain_stratified_cases(cases, num, rng)
  else:
    idx = rng.integers(len(cases), size=num)
  out = []
  for i in idx:
    i = int(i)
    if strategy == "mitosis_centred":
      out.append(sample_mitosis_centred(cases[i], i, size, rng, p, margin, jitter))
    elif strategy == "imposter_centred":
      out.append(sample_imposter_centred(cases[i], i, size, rng, p, margin, jitter))
    else:
      out.append(sample_random(cases[i], i, size, rng))
  return out


def points_in_window(case: Case, x0: int, y0: int, size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Mitoses and imposters inside a window, in patch coordinates.

  Returns float32 (N, 2) and (M, 2) arrays ``p - (x0, y0)``, keeping the
  points whose pixel lies in the window: patch coordinates in
  [-0.5, size - 0.5) (pixel i spans [i - 0.5, i + 0.5]).
  """
  def inside(pts):
    q = np.asarray(pts, np.float32).reshape(-1, 2) - np.asarray([x0, y0], np.float32)
    keep = np.all((q >= -0.5) & (q < size - 0.5), axis=1)
    return q[keep]
  return inside(case.mitoses), inside(case.imposters)
