"""Figure-level label noise: simulated raters that vote like MIDOG++'s experts.

In MIDOG++ every annotated cell carries ``labels``, the per-rater votes
(1 = mitotic figure, 2 = not): two raters vote, a third breaks the tie only
when they disagree, and ``category_id`` is the majority. Their disagreement
is not uniform noise: it concentrates on cells that are genuinely hard to
call. This module models that with one latent number per cell,

  m in [0, 1], the cell's "mitosis-likeness": 1 = unmistakable mitosis,
  0 = unmistakable non-mitosis, 0.5 = maximally ambiguous,

from which the generator renders the cell (the renderer's job) and the raters
vote (this module's job). Pipeline::

  m = draw_likeness(rng, n, kind_is_mitosis, ambiguous_fraction)
  s = calibrate(m, target_agreement=0.76)       # the real rater-vs-rater F1
  votes = simulate(rng, m, s)                   # MIDOG++ ``labels`` lists
  category_id = consensus(votes); ceiling = agreement(votes)

Vote model (:func:`vote_probability`), a clipped line through (0.5, 0.5)::

  p(m) = clip(0.5 + sharpness * (m - 0.5), 0, 1)

chosen over a logistic because it has exact certainty: once
``sharpness >= 1 / (2 |m - 0.5|)`` a cell gets p = 0 or 1 and every rater
calls it the same way, as experts do for unmistakable figures. ``sharpness
= 0`` is a coin flip for every cell, ``1`` makes p = m, ``2`` makes every
clear cell (within 0.25 of 0 or 1) unanimous, so that all disagreement comes
from the ambiguous ones, and large values a hard threshold. Which of these a
target agreement lands on depends on the ambiguous fraction: for 0.76,
sharpness ~1.0 at a fraction of 0.3 (clear cells disputed too), ~2.0 at 0.7.

Agreement is the F1 between rater 1's set of mitoses A and rater 2's set B,
``2 |A & B| / (|A| + |B|)``, the figure the MIDOG papers quote (about 0.76);
not Cohen's kappa or percent agreement, which also reward agreeing on
non-mitoses. Numpy only (no JAX): it runs inside the data generator.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MITOSIS, NOT_MITOSIS = 1, 2  # MIDOG category ids, also the vote values

# Clear cells sit within CLEAR_SPAN of their kind's end (m in [0.75, 1] for a
# mitosis), so a sharpness >= 2 makes every one of them unanimous.
CLEAR_SPAN = 0.25
# Ambiguous cells are uniform over AMBIGUOUS_WIDTH around 0.5, shifted by
# AMBIGUOUS_LEAN towards their kind: a hard mitosis still leans mitotic
# (m in [0.3, 0.8]), so the consensus stays correlated with the generator's
# kind instead of being a coin flip on every hard cell.
AMBIGUOUS_WIDTH = 0.5
AMBIGUOUS_LEAN = 0.05

_BISECT_STEPS = 100  # halves the bracket far below float resolution
_GRID = 400  # scan points for the achievable range and the first bracket


def draw_likeness(rng: np.random.Generator, n: int, kind_is_mitosis: np.ndarray,
                  ambiguous_fraction: float) -> np.ndarray:
  """Draws the latent mitosis-likeness of ``n`` cells.

  Each cell independently is ambiguous with probability
  ``ambiguous_fraction``, otherwise clear:

    * clear: its distance from its kind's end (1 for a mitosis, 0 otherwise)
      is ``CLEAR_SPAN * Beta(1, 3)``, mean 1/16, density falling to 0 at
      0.25, so most clear cells are near-prototypical;
    * ambiguous: uniform on ``0.5 + lean +- AMBIGUOUS_WIDTH / 2`` with
      ``lean = +AMBIGUOUS_LEAN`` for a mitosis and ``-AMBIGUOUS_LEAN``
      otherwise ([0.3, 0.8] and [0.2, 0.7]).

  Args:
    rng: the only source of randomness; the same state gives the same m.
    n: number of cells.
    kind_is_mitosis: (n,) bool, the generator's kind of each cell.
    ambiguous_fraction: in [0, 1].

  Returns:
    (n,) float64 in [0, 1].
  """
  kind = np.asarray(kind_is_mitosis, bool)
  if kind.shape != (n,):
    raise ValueError(f"kind_is_mitosis has shape {kind.shape}, expected ({n},)")
  if not 0.0 <= ambiguous_fraction <= 1.0:
    raise ValueError(f"ambiguous_fraction {ambiguous_fraction} is not in [0, 1]")
  # Every stream is drawn for every cell, so the rng advances by the same
  # amount whatever the fraction: m depends on (state, n, kind, fraction) only.
  is_ambiguous = rng.random(n) < ambiguous_fraction
  dist = CLEAR_SPAN * rng.beta(1.0, 3.0, n)
  u = rng.random(n)
  clear = np.where(kind, 1.0 - dist, dist)
  lean = np.where(kind, AMBIGUOUS_LEAN, -AMBIGUOUS_LEAN)
  ambiguous = 0.5 + lean + AMBIGUOUS_WIDTH * (u - 0.5)
  return np.clip(np.where(is_ambiguous, ambiguous, clear), 0.0, 1.0)


def vote_probability(m: np.ndarray, sharpness: float) -> np.ndarray:
  """Probability that one rater calls a cell a mitosis (see module docstring).

  ``clip(0.5 + sharpness * (m - 0.5), 0, 1)``: non-decreasing in m, 0.5 at
  m = 0.5, steeper with larger ``sharpness`` (>= 0).
  """
  if sharpness < 0:
    raise ValueError(f"sharpness must be >= 0, got {sharpness}")
  m = np.asarray(m, np.float64)
  return np.clip(0.5 + sharpness * (m - 0.5), 0.0, 1.0)


def expected_agreement(m: np.ndarray, sharpness: float) -> float:
  """Expected rater-vs-rater F1 of two independent raters over cells ``m``.

  With p the vote probabilities, ``E|A & B| = sum p^2`` and
  ``E|A| = E|B| = sum p``, so the ratio of expectations is

    E[F1] ~= 2 sum p^2 / (2 sum p) = sum p^2 / sum p.

  The ratio's bias is O(1 / number of mitoses): negligible for the hundreds
  of cells of a data set. NaN when no cell can be called a mitosis.
  """
  p = vote_probability(m, sharpness)
  total = p.sum()
  return float(np.square(p).sum() / total) if total > 0 else float("nan")


def _saturating_sharpness(m: np.ndarray) -> float:
  """The sharpness from which every cell with m != 0.5 has p = 0 or 1.

  Past it the expected agreement no longer changes, so it closes the search
  bracket exactly instead of with an arbitrary "large" value.
  """
  off = np.abs(m - 0.5)
  off = off[off > 0]
  return 1.0 if off.size == 0 else float(min(1.0 / (2.0 * off.min()), 1e12))


def calibrate(m: np.ndarray, target_agreement: float) -> float:
  """The sharpness at which :func:`expected_agreement` equals the target.

  The expected agreement is scanned over sharpness 0 and a geometric grid
  up to the saturating sharpness; the first grid interval that brackets the
  target is then bisected. For a usual mix of likenesses the agreement rises
  monotonically from 0.5 (every vote a coin flip) to its maximum (1 unless
  some m is exactly 0.5), and the bracket is unique.

  Raises:
    ValueError: the target lies outside the range the scan reaches (the
      message names that range), or there are no cells.
  """
  m = np.asarray(m, np.float64)
  hi = _saturating_sharpness(m)
  grid = np.concatenate([[0.0], np.geomspace(hi * 1e-4, hi, _GRID)])
  err = np.array([expected_agreement(m, s) for s in grid]) - target_agreement
  ok = ~np.isnan(err)
  if not ok.any():
    raise ValueError("calibrate: no cells")
  lo_a, hi_a = err[ok].min() + target_agreement, err[ok].max() + target_agreement
  if not lo_a <= target_agreement <= hi_a:
    raise ValueError(f"target agreement {target_agreement} cannot be reached with "
                     f"these likenesses: achievable range [{lo_a:.4f}, {hi_a:.4f}]")
  exact = np.flatnonzero(err == 0)
  if exact.size:
    return float(grid[exact[0]])
  # First sign change between two valid neighbouring grid points.
  i = np.flatnonzero(ok[:-1] & ok[1:] & (np.sign(err[:-1]) != np.sign(err[1:])))[0]
  a, b, fa = grid[i], grid[i + 1], err[i]
  for _ in range(_BISECT_STEPS):
    mid = 0.5 * (a + b)
    fm = expected_agreement(m, mid) - target_agreement
    if np.sign(fm) == np.sign(fa):
      a, fa = mid, fm
    else:
      b = mid
  return float(0.5 * (a + b))


def simulate(rng: np.random.Generator, m: np.ndarray, sharpness: float
             ) -> list[list[int]]:
  """Votes of two raters and, on disagreement, a tie-breaker, per cell.

  Every rater votes independently with :func:`vote_probability`. Three
  uniforms are drawn per cell whether or not the third vote is needed, so
  the rng advances by ``3 * len(m)`` draws and the votes of one cell do not
  depend on the others.

  Returns:
    MIDOG++ ``labels`` lists of Python ints: ``[a, a]`` when the first two
    agree, ``[a, b, c]`` (a != b) when they do not.
  """
  p = vote_probability(m, sharpness)
  u = rng.random((p.size, 3))
  v = np.where(u < p.reshape(-1, 1), MITOSIS, NOT_MITOSIS).tolist()
  return [row[:2] if row[0] == row[1] else row for row in v]


def consensus(votes: Sequence[Sequence[int]]) -> np.ndarray:
  """Majority category id (1 or 2) of each cell's votes, as int64.

  Raises:
    ValueError: a tie (an even number of votes split evenly) or a vote that
      is not 1 or 2.
  """
  out = np.empty(len(votes), np.int64)
  for i, v in enumerate(votes):
    v = np.asarray(v)
    if v.size == 0 or not np.isin(v, (MITOSIS, NOT_MITOSIS)).all():
      raise ValueError(f"cell {i}: votes {v.tolist()} are not a list of 1s and 2s")
    yes = int((v == MITOSIS).sum())
    if 2 * yes == v.size:
      raise ValueError(f"cell {i}: votes {v.tolist()} are tied")
    out[i] = MITOSIS if 2 * yes > v.size else NOT_MITOSIS
  return out


def agreement(votes: Sequence[Sequence[int]]) -> float:
  """Realised F1 between rater 1's and rater 2's mitosis sets.

  ``2 |A & B| / (|A| + |B|)`` with A (B) the cells whose first (second) vote
  is 1; cells both call non-mitotic do not count, unlike percent agreement
  or kappa. NaN when neither rater calls any cell a mitosis.
  """
  first = np.array([v[0] == MITOSIS for v in votes], bool)
  second = np.array([v[1] == MITOSIS for v in votes], bool)
  total = int(first.sum() + second.sum())
  return 2.0 * int((first & second).sum()) / total if total else float("nan")
