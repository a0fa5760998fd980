"""Hard-negative mining: score every pool centre with a model, drop the easy ones.

A trained detector's patch scorer (``Detector.make_patch_score_fn``) gives
the probability that a patch centred on each pool negative shows a mitotic
figure (``score_negatives``); the negatives it already rejects confidently
(low probability) teach little, so ``hard_mask`` / ``drop_easy`` keep the
hardest share (or those above a threshold) for the next round.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from midog_jax.data import sampling
from midog_jax.data import slides as slides_lib
from midog_jax.data.midog import Case
from midog_jax.data.pipeline import check_negatives


def read_centred(case: Case, x: float, y: float, size: int) -> np.ndarray:
  """The ``size`` x ``size`` uint8 patch centred on (x, y), as the pipeline cuts it."""
  req = sampling.centred_request(0, x, y, size, "negative")
  return slides_lib.open_slide(case.path).read(req.x0, req.y0, size, size)


def score_negatives(score_fn: Callable[[np.ndarray], np.ndarray],
                    cases: Sequence[Case], pool: np.ndarray, patch_size: int,
                    batch_size: int = 32) -> np.ndarray:
  """Mitosis probability of every pool centre, float32 (N,).

  ``score_fn`` maps a uint8 (B, P, P, 3) batch of patches centred on the
  pool centres to (B,) probabilities; ``cases`` are the cases the pool's
  case indices refer to (``ExperimentData.pool_cases``). Patches are read in
  case order (slide locality) and every call gets exactly ``batch_size``
  patches (the last batch is padded by repetition), so a jitted ``score_fn``
  compiles once.
  """
  if len(pool) == 0:
    return np.zeros(0, np.float32)
  pool = check_negatives(pool, len(cases))
  order = np.lexsort((pool[:, 2], pool[:, 1], pool[:, 0]))
  scores = np.empty(len(pool), np.float32)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    patches = [read_centred(cases[int(pool[j, 0])], pool[j, 1], pool[j, 2], patch_size)
               for j in idx]
    patches += [patches[-1]] * (batch_size - len(patches))
    out = np.asarray(score_fn(np.stack(patches)), np.float32).reshape(-1)
    if len(out) != batch_size:
      raise ValueError(f"score_fn returned {len(out)} scores for {batch_size} patches")
    scores[idx] = out[:len(idx)]
  return scores


def hard_mask(scores: np.ndarray, keep_fraction: float | None = None,
              threshold: float | None = None, min_keep: int = 1) -> np.ndarray:
  """Which negatives to keep: the hard ones (highest mitosis probability).

  Exactly one of ``keep_fraction`` (keep the ``ceil(fraction * N)`` highest
  scores; ties broken by position) and ``threshold`` (keep scores >=
  threshold) must be given. At least ``min_keep`` (the hardest) are always
  kept, so the pool never empties.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  if (keep_fraction is None) == (threshold is None):
    raise ValueError("give exactly one of keep_fraction and threshold")
  n = len(scores)
  order = np.argsort(-scores, kind="stable")
  if keep_fraction is not None:
    if not 0.0 <= keep_fraction <= 1.0:
      raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    n_keep = int(np.ceil(keep_fraction * n - 1e-9))
  else:
    n_keep = int((scores >= threshold).sum())
  keep = np.zeros(n, bool)
  keep[order[:min(n, max(n_keep, min_keep))]] = True
  return keep


def drop_easy(pool: np.ndarray, scores: np.ndarray, keep_fraction: float | None = None,
              threshold: float | None = None, min_keep: int = 1
              ) -> tuple[np.ndarray, int]:
  """The pool without its easy negatives, and how many were removed.

  See ``hard_mask`` for the rule; the kept rows keep their order.
  """
  pool = np.asarray(pool)
  if len(pool) != len(np.asarray(scores).reshape(-1)):
    raise ValueError(f"{len(pool)} pool rows but {np.size(scores)} scores")
  keep = hard_mask(scores, keep_fraction, threshold, min_keep)
  return pool[keep], int((~keep).sum())
