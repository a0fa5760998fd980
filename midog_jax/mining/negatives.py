"""Where negatives come from: the initial pool and the stain-mined negatives.

  * ``initial_negative_pool``: random centres far from every mitotic figure
    of the labelled training cases, plus every imposter (imposters ARE
    negatives for a mitosis classifier).
  * ``stain_mined_negatives``: part (a) of Lafarge & Koelzer (MIDOG 2022),
    stain unmixing of unlabeled images to find non-H&E impostors. Each
    image's stain matrix is estimated with Macenko (``fit_stains``); the part
    of the optical density outside the H&E plane (``residual_map``) is large
    on ink, pigment and other non-H&E impostors, so the centres of the
    strongest residual blobs (``residual_peaks``) become extra negatives.

Pools are float64 (N, 3) rows (case_index, x, y) in full-resolution pixel
coordinates; ``SOURCES`` names the origin codes the rounds driver records.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from midog_jax.data import sampling
from midog_jax.data import slides as slides_lib
from midog_jax.data import stain as stain_lib
from midog_jax.data.midog import Case
from midog_jax.errors import DataError

# Origin of each pool negative; a pool's int8 ``sources`` index this tuple.
SOURCES = ("random", "imposter", "stain")


# ----------------------------------------------------------------------------
# The initial pool.


def _random_far_centres(case: Case, n: int, rng: np.random.Generator,
                        min_dist: float, max_rounds: int = 32) -> np.ndarray:
  """``n`` random pixel centres at >= ``min_dist`` from the case's mitoses."""
  mit = np.asarray(case.mitoses, np.float32).reshape(-1, 2)
  got, need = [], n
  for _ in range(max_rounds):
    cand = np.stack([rng.integers(0, case.width, 2 * need + 16),
                     rng.integers(0, case.height, 2 * need + 16)], 1).astype(np.float32)
    cand = cand[sampling.far_from_mitoses(case, cand, min_dist)][:need]
    got.append(cand)
    need -= len(cand)
    if need == 0:
      return np.concatenate(got)
  raise DataError(case.path, f"only {n - need} of {n} random points at >= "
                  f"{min_dist:.1f} px from all {len(mit)} mitotic figures found "
                  f"on the {case.width}x{case.height} image")


def initial_negative_pool(cases: Sequence[Case], n_per_case: int,
                          rng: np.random.Generator,
                          min_dist_px: float | None = None
                          ) -> tuple[np.ndarray, dict]:
  """Random far-from-mitosis centres plus all imposters of the labelled cases.

  Args:
    cases: the training cases (pool case indices index this sequence).
      Unlabeled cases are skipped: a random point there may be an unlabelled
      mitotic figure.
    n_per_case: random centres per labelled case, each at least
      ``min_dist_px`` from every mitotic figure of the case.
    rng: the random stream (the result is a pure function of it).
    min_dist_px: the distance; None = the 7.5 um matching radius per case.
      Imposters closer than this (+ the pipeline's 3 px jitter) to a mitosis
      are left out too, so no "negative" patch is centred on a mitosis.

  Returns:
    ``(pool, counts)``: float64 (N, 3) rows (case_index, x, y), random
    centres first, then imposters; and ``{"random": n, "imposter": m,
    "imposter_near_mitosis": dropped}``.
  """
  rows_r, rows_i, near = [], [], 0
  for ci, case in enumerate(cases):
    if not case.labeled:
      continue
    dist = sampling.default_min_dist_px(case) if min_dist_px is None else float(min_dist_px)
    if n_per_case > 0:
      xy = _random_far_centres(case, int(n_per_case), rng, dist)
      rows_r.append(np.column_stack([np.full(len(xy), ci), xy]))
    imp = np.asarray(case.imposters, np.float32).reshape(-1, 2)
    # + the pipeline's centre jitter, so no jittered patch lands on a mitosis.
    far = sampling.far_from_mitoses(case, imp, dist + sampling.DEFAULT_JITTER_PX * np.sqrt(2))
    near += int((~far).sum())
    rows_i.append(np.column_stack([np.full(int(far.sum()), ci), imp[far]]))
  rand = np.concatenate(rows_r) if rows_r else np.zeros((0, 3))
  imps = np.concatenate(rows_i) if rows_i else np.zeros((0, 3))
  pool = np.concatenate([rand, imps]).astype(np.float64).reshape(-1, 3)
  return pool, dict(random=len(rand), imposter=len(imps), imposter_near_mitosis=near)


# ----------------------------------------------------------------------------
# Stain-mined negatives (Lafarge & Koelzer, MIDOG 2022, part a).


def fit_stains(slide: slides_lib.Slide, rng: np.random.Generator, n_tiles: int = 16,
               tile: int = 256, trim: float = 0.05, refits: int = 2,
               max_pixels: int = 100_000) -> np.ndarray:
  """Macenko stain matrix of an image from ``n_tiles`` random tiles.

  Reading tiles bounds memory; at most ``max_pixels`` random pixels of them
  enter the fit (plenty for a 3-D PCA and percentiles). Macenko's H&E plane
  is the top-2 PCA plane of the stained pixels' OD, so a few very dark
  off-plane pixels (the very ink and pigment to be mined) tilt it; each of
  ``refits`` refits drops the ``trim`` share of stained pixels farthest from
  the current plane (trimmed PCA) and estimates again.
  """
  tw, th = min(tile, slide.width), min(tile, slide.height)
  xs = rng.integers(0, slide.width - tw + 1, n_tiles)
  ys = rng.integers(0, slide.height - th + 1, n_tiles)
  pix = np.concatenate([slide.read(int(x), int(y), tw, th).reshape(-1, 3)
                        for x, y in zip(xs, ys)])
  if len(pix) > max_pixels:
    pix = pix[rng.choice(len(pix), max_pixels, replace=False)]
  m = stain_lib.macenko(pix)[0]
  stained = np.all(stain_lib.rgb_to_od(pix) >= stain_lib.MACENKO_BETA, axis=1)
  for _ in range(refits):
    r = np.abs(stain_lib.unmix(pix, m)[:, 2])
    cut = np.quantile(r[stained], 1.0 - trim) if stained.any() else np.inf
    m = stain_lib.macenko(pix[~stained | (r <= cut)])[0]
  return m


def residual_map(slide: slides_lib.Slide, stain_matrix: np.ndarray, block: int = 4,
                 tile: int = 1024, white: int = 220
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Block-averaged residual OD and tissue fraction of a whole image.

  The residual concentration ``c_r`` is the OD component along the unit
  vector orthogonal to the H and E vectors, so ``|c_r|`` is how far a pixel's
  colour lies outside the H&E plane. The image is read ``tile`` px at a time
  and averaged over ``block`` x ``block`` pixel blocks, so memory is the
  tile plus a map 1/block^2 of the image.

  Returns:
    float32 maps (ceil(H / block), ceil(W / block)): mean ``|c_r|`` and the
    share of pixels that are not white background (any channel < ``white``).
  """
  tile = max(block, tile // block * block)
  gh, gw = -(-slide.height // block), -(-slide.width // block)
  res = np.zeros((gh, gw), np.float32)
  tissue = np.zeros((gh, gw), np.float32)
  for y in range(0, slide.height, tile):
    for x in range(0, slide.width, tile):
      th = min(tile, gh * block - y)
      tw = min(tile, gw * block - x)
      rgb = slide.read(x, y, tw, th)  # past the border: white padding
      r = np.abs(stain_lib.unmix(rgb, stain_matrix)[..., 2])
      t = (rgb.min(-1) < white).astype(np.float32)
      shape = (th // block, block, tw // block, block)
      res[y // block:(y + th) // block, x // block:(x + tw) // block] = \
          r.reshape(shape).mean((1, 3))
      tissue[y // block:(y + th) // block, x // block:(x + tw) // block] = \
          t.reshape(shape).mean((1, 3))
  return res, tissue


def residual_peaks(res: np.ndarray, tissue: np.ndarray, k: int, block: int,
                   min_sep_px: float = 50.0, smooth_px: float = 8.0,
                   min_residual: float = 0.1, min_tissue: float = 0.5
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Centres (full-resolution pixels) of the ``k`` strongest residual blobs.

  The block map is smoothed (Gaussian, ``smooth_px`` full-res px) so single
  noisy pixels do not win; candidates are local maxima of the smoothed map on
  tissue (``tissue >= min_tissue``) with value ``>= min_residual``, taken in
  decreasing order and kept when at least ``min_sep_px`` from every kept one.

  Returns:
    float64 (n, 2) (x, y) centres, n <= k, and their float32 (n,) values.
  """
  sm = ndimage.gaussian_filter(res, sigma=max(smooth_px / block, 1e-3), mode="nearest")
  win = 2 * int(np.ceil(min_sep_px / block / 2)) + 1
  peak = (sm == ndimage.maximum_filter(sm, size=win, mode="nearest"))
  peak &= (tissue >= min_tissue) & (sm >= min_residual)
  gy, gx = np.nonzero(peak)
  vals = sm[gy, gx]
  order = np.argsort(-vals, kind="stable")
  # Block centre in full-res pixel coordinates (pixel i spans [i-.5, i+.5]).
  xy = np.stack([(gx + 0.5) * block - 0.5, (gy + 0.5) * block - 0.5], 1)[order]
  vals = vals[order]
  kept = []
  for j in range(len(xy)):  # candidates, not pixels: plateau ties are few
    if len(kept) >= k:
      break
    if all(np.hypot(*(xy[j] - xy[i])) >= min_sep_px for i in kept):
      kept.append(j)
  return xy[kept].astype(np.float64).reshape(-1, 2), vals[kept].astype(np.float32)


def stain_mined_negatives(unlabeled_cases: Sequence[Case], case_offset: int,
                          top_k_per_case: int, *, seed: int = 0,
                          fit_tiles: int = 16, fit_tile_px: int = 256,
                          block: int = 4, tile_px: int = 1024,
                          min_sep_px: float = 50.0, smooth_px: float = 8.0,
                          min_residual: float = 0.1, white: int = 220
                          ) -> tuple[np.ndarray, dict]:
  """Stain-unmixing negatives from the unlabeled images (Lafarge & Koelzer, part a).

  Per image: Macenko on ``fit_tiles`` random ``fit_tile_px`` tiles gives the
  H, E and residual directions; ``residual_map`` and ``residual_peaks`` give
  the centres of the ``top_k_per_case`` strongest out-of-H&E-plane blobs
  (ink, pigment), at least ``min_sep_px`` apart and off white background.
  An image Macenko cannot fit (blank) is skipped and reported.

  Args:
    unlabeled_cases: the images to mine.
    case_offset: added to each image's position, so the pool indexes the
      combined case list (``ExperimentData.pool_cases``, the training cases
      then the unlabeled ones: ``len(train_cases)``).
    top_k_per_case: at most this many centres per image.
    seed: seeds the tile sample of the Macenko fit (per image id).

  Returns:
    ``(pool, report)``: float64 (N, 3) rows (case_index, x, y) and a
    JSON-ready dict with per-image stain matrices, counts and residuals.
  """
  rows, per_case, skipped = [], [], []
  for i, case in enumerate(unlabeled_cases):
    slide = slides_lib.open_slide(case.path)
    rng = np.random.default_rng([int(seed), int(case.image_id), 17])
    try:
      m = fit_stains(slide, rng, fit_tiles, fit_tile_px)
    except ValueError as e:  # blank image: nothing stained to fit
      skipped.append(dict(image=case.file_name, reason=str(e)))
      continue
    res, tissue = residual_map(slide, m, block=block, tile=tile_px, white=white)
    xy, vals = residual_peaks(res, tissue, top_k_per_case, block, min_sep_px=min_sep_px,
                              smooth_px=smooth_px, min_residual=min_residual)
    rows.append(np.column_stack([np.full(len(xy), case_offset + i, np.float64), xy]))
    per_case.append(dict(image=case.file_name, image_id=int(case.image_id),
                         found=len(xy), stain_matrix=np.round(m, 4).tolist(),
                         residuals=[round(float(v), 4) for v in vals]))
  pool = np.concatenate(rows).reshape(-1, 3) if rows else np.zeros((0, 3))
  return pool, dict(total=len(pool), cases=per_case, skipped=skipped)
