"""Seed 001's negative mining: initial pool, stain-mined negatives, hard-negative rounds.

The patch classifier of seed 001 trains on balanced mini-batches whose
negatives come from an explicit pool of (case_index, x, y) centres
(``pipeline.make_dataset(..., negatives=pool)``):

  * ``initial_negative_pool``: random centres far from every mitotic figure
    of the labelled training cases, plus every imposter (imposters ARE
    negatives for a mitosis classifier).
  * ``stain_mined_negatives``: part (a) of the seed. Each unlabeled image's
    stain matrix is estimated with Macenko; the part of the optical density
    that lies outside the H&E plane (the residual) is large on ink, pigment
    and other non-H&E impostors, so the centres of the strongest residual
    blobs become extra negatives.
  * ``score_negatives`` / ``drop_easy``: hard-negative mining. A trained
    model scores every pool centre; the easy ones (low mitosis probability)
    are removed.
  * ``run_rounds``: round 0 trains on the initial (+ stain-mined) pool; each
    next round scores the pool with the previous round's best weights, drops
    the easy negatives and fine-tunes from those weights, until validation F1
    stops improving. Writes ``WORKDIR/mining.json``.

  python -m midog_jax.mining --config=configs/p4_resnet.py:quick \\
      --workdir=runs/p4_mining --rounds=3

Pool case indices refer to ``train_cases + unlabeled_cases`` (the order
``train.train_and_evaluate`` uses when it is given a pool).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from midog_jax.data import sampling
from midog_jax.data import slides as slides_lib
from midog_jax.data import stain as stain_lib
from midog_jax.data.midog import Case
from midog_jax.data.pipeline import check_negatives
from midog_jax.errors import DataError

SOURCES = ("random", "imposter", "stain")

# config.mining keys and their defaults (a config without a ``mining`` block
# mines with these).
MINING_DEFAULTS = dict(
    random_per_case=200,     # random far-from-mitosis centres per training image
    min_dist_px=0.0,         # 0 = config.data.neg_min_dist_px
    stain_top_k=0,           # stain-mined negatives per unlabeled image (0 = off)
    keep_fraction=0.5,       # share of the pool kept (the hardest) per round
    score_threshold=-1.0,    # >= 0: keep scores >= this instead of a fraction
    score_batch=32,          # patches per score_fn call
    score_patch_size=0,      # 0 = config.data.patch_size
)


# ----------------------------------------------------------------------------
# The initial pool.


def _far_from(points: np.ndarray, xy: np.ndarray, min_dist: float) -> np.ndarray:
  """Mask of the rows of ``xy`` at distance >= ``min_dist`` from all ``points``."""
  if not len(points) or not len(xy):
    return np.ones(len(xy), bool)
  d2 = ((xy[:, None, :] - points[None, :, :]) ** 2).sum(-1).min(1)
  return d2 >= np.float32(min_dist) ** 2


def _random_far_centres(case: Case, n: int, rng: np.random.Generator,
                        min_dist: float, max_rounds: int = 32) -> np.ndarray:
  """``n`` random pixel centres at >= ``min_dist`` from the case's mitoses."""
  mit = np.asarray(case.mitoses, np.float32).reshape(-1, 2)
  got, need = [], n
  for _ in range(max_rounds):
    cand = np.stack([rng.integers(0, case.width, 2 * need + 16),
                     rng.integers(0, case.height, 2 * need + 16)], 1).astype(np.float32)
    cand = cand[_far_from(mit, cand, min_dist)][:need]
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
    far = _far_from(np.asarray(case.mitoses, np.float32).reshape(-1, 2), imp,
                    dist + 3.0 * np.sqrt(2))
    near += int((~far).sum())
    rows_i.append(np.column_stack([np.full(int(far.sum()), ci), imp[far]]))
  rand = np.concatenate(rows_r) if rows_r else np.zeros((0, 3))
  imps = np.concatenate(rows_i) if rows_i else np.zeros((0, 3))
  pool = np.concatenate([rand, imps]).astype(np.float64).reshape(-1, 3)
  return pool, dict(random=len(rand), imposter=len(imps), imposter_near_mitosis=near)


# ----------------------------------------------------------------------------
# Stain-mined negatives (seed 001, part a).


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
  stained = np.all(stain_lib.rgb_to_od(pix) >= 0.15, axis=1)  # macenko's beta
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
  """Seed 001's stain-unmixing negatives from the unlabeled images.

  Per image: Macenko on ``fit_tiles`` random ``fit_tile_px`` tiles gives the
  H, E and residual directions; ``residual_map`` and ``residual_peaks`` give
  the centres of the ``top_k_per_case`` strongest out-of-H&E-plane blobs
  (ink, pigment), at least ``min_sep_px`` apart and off white background.
  An image Macenko cannot fit (blank) is skipped and reported.

  Args:
    unlabeled_cases: the images to mine.
    case_offset: added to each image's position, so the pool indexes the
      combined case list (``train_cases + unlabeled_cases``:
      ``len(train_cases)``).
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


# ----------------------------------------------------------------------------
# Hard-negative mining.


def read_centred(case: Case, x: float, y: float, size: int) -> np.ndarray:
  """The ``size`` x ``size`` uint8 patch centred on (x, y), as the pipeline cuts it."""
  req = sampling.centred_request(0, x, y, size, "negative")
  return slides_lib.open_slide(case.path).read(req.x0, req.y0, size, size)


def score_negatives(score_fn: Callable[[np.ndarray], np.ndarray],
                    cases: Sequence[Case], pool: np.ndarray, patch_size: int,
                    batch_size: int = 32) -> np.ndarray:
  """Mitosis probability of every pool centre, float32 (N,).

  ``score_fn`` maps a uint8 (B, P, P, 3) batch of patches centred on the
  pool centres to (B,) probabilities. Patches are read in case order (slide
  locality) and every call gets exactly ``batch_size`` patches (the last
  batch is padded by repetition), so a jitted ``score_fn`` compiles once.
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


# ----------------------------------------------------------------------------
# The rounds driver.


def mining_settings(config) -> dict:
  """``config.mining`` over ``MINING_DEFAULTS`` (unknown keys are an error)."""
  got = config.get("mining", None) or {}
  got = got.to_dict() if hasattr(got, "to_dict") else dict(got)
  bad = sorted(set(got) - set(MINING_DEFAULTS))
  if bad:
    raise ValueError(f"unknown config.mining keys {bad}; known: {sorted(MINING_DEFAULTS)}")
  return {**MINING_DEFAULTS, **got}


def _weights_dir(round_dir: Path) -> Path:
  """The orbax step folder of a round's best (else latest) checkpoint."""
  for name in ("best", "latest"):
    d = round_dir / "checkpoints" / name
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
    if steps:
      return d / str(max(steps))
  raise DataError(round_dir / "checkpoints", "no checkpoint found after training")


def _count(sources: np.ndarray) -> dict:
  return {s: int((sources == k).sum()) for k, s in enumerate(SOURCES)}


def _val_f1(results: dict, round_dir: Path) -> float | None:
  """Validation F1 of a finished round (None without validation images)."""
  if "val" in results:
    return float(results["val"]["f1"])
  summary = round_dir / "eval" / "summary.json"
  if summary.exists():
    best = json.loads(summary.read_text()).get("best", {})
    if best.get("f1", -1.0) >= 0:
      return float(best["f1"])
  return None


def _save_pool(path: Path, pool: np.ndarray, sources: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp.npz")
  np.savez(tmp, pool=pool, sources=sources)
  os.replace(tmp, path)


def run_rounds(config, workdir: str | os.PathLike, rounds: int, *,
               train_fn: Callable | None = None, log: Callable = print) -> dict:
  """Seed 001's hard-negative mining rounds (see the module docstring).

  Round ``k`` trains in ``workdir/round_<k>`` (``train_fn(config, dir,
  negatives=pool)``, default ``train.train_and_evaluate``) on the pool saved
  as ``round_<k>/negatives.npz``; a round whose folder already holds that
  file (and ``eval/summary.json``) is resumed (skipped) rather than redone.
  Round ``k > 0`` first scores the pool with round ``k - 1``'s best weights
  (``method.make_patch_score_fn(variables, patch_size)``), keeps the hard
  negatives (``config.mining.keep_fraction`` or ``score_threshold``) and
  starts from those weights (``config.init_from``). Rounds stop once
  validation F1 does not improve (without validation images all ``rounds``
  run).

  Returns:
    The ``mining.json`` object: settings, stain report, per-round pool
    sizes, added / removed counts by source, validation F1, best round.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from midog_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from midog_jax import export, methods  # pylint: disable=g-import-not-at-top
  from midog_jax.data import experiment  # pylint: disable=g-import-not-at-top

  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  if config.data.strategy != "balanced":
    raise ValueError("negative mining trains on a negative pool, which needs "
                     f"config.data.strategy='balanced' (got {config.data.strategy!r})")
  ms = mining_settings(config)
  method = methods.build(config)
  if rounds > 1 and not hasattr(method, "make_patch_score_fn"):
    raise ValueError(f"method {config.method!r} has no make_patch_score_fn(variables, "
                     "patch_size), which hard-negative rounds need to score the pool; "
                     "use --rounds=1 or a patch-classifier method")
  if train_fn is None:
    from midog_jax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  is_main = jax.process_index() == 0
  workdir = Path(workdir)
  data = experiment.load_experiment(config.data)
  cases = data.train + data.unlabeled
  min_dist = float(ms["min_dist_px"]) or float(config.data.neg_min_dist_px)
  psize = int(ms["score_patch_size"]) or int(config.data.patch_size)

  # Round 0's pool: random + imposters (+ stain-mined).
  pool, counts = initial_negative_pool(data.train, int(ms["random_per_case"]),
                                       np.random.default_rng([int(config.seed), 1001]),
                                       min_dist)
  sources = np.repeat(np.arange(2, dtype=np.int8), [counts["random"], counts["imposter"]])
  stain_report = None
  if ms["stain_top_k"] > 0:
    stain, stain_report = stain_mined_negatives(
        data.unlabeled, len(data.train), int(ms["stain_top_k"]), seed=int(config.seed))
    pool = np.concatenate([pool, stain])
    sources = np.concatenate([sources, np.full(len(stain), 2, np.int8)])
  log(f"mining: initial pool {len(pool)} negatives ({counts['random']} random, "
      f"{counts['imposter']} imposters, {int((sources == 2).sum())} stain-mined; "
      f"{counts['imposter_near_mitosis']} imposters near a mitosis left out)")

  summary = dict(settings=ms, rounds=[], stain=stain_report, best_round=None,
                 unlabeled_images_used=bool(ms["stain_top_k"] > 0 and data.unlabeled))
  best_f1, prev = None, None
  for k in range(rounds):
    rdir = workdir / f"round_{k}"
    added = _count(sources) if k == 0 else {s: 0 for s in SOURCES}
    removed = {s: 0 for s in SOURCES}
    saved = rdir / "negatives.npz"
    if saved.exists():  # resumed round: train on exactly the pool it started with
      with np.load(saved) as z:
        new_pool, new_sources = z["pool"], z["sources"]
      if k > 0:
        gone = np.bincount(sources, minlength=3) - np.bincount(new_sources, minlength=3)
        removed = {s: int(gone[j]) for j, s in enumerate(SOURCES)}
      pool, sources = new_pool, new_sources
    elif k > 0:
      variables, _ = ckpt_lib.load_for_inference(prev, "best")
      score_fn = method.make_patch_score_fn(variables, psize)
      scores = score_negatives(score_fn, cases, pool, psize, int(ms["score_batch"]))
      thr = float(ms["score_threshold"])
      keep = hard_mask(scores, None if thr >= 0 else float(ms["keep_fraction"]),
                       thr if thr >= 0 else None)
      removed = _count(sources[~keep])
      log(f"mining: round {k}: scored {len(pool)} negatives (median "
          f"{np.median(scores):.3f}); dropping {int((~keep).sum())} easy ones")
      pool, sources = pool[keep], sources[keep]
    if is_main and not saved.exists():
      _save_pool(saved, pool, sources)
    cfg = copy.deepcopy(config)
    if k > 0:
      with cfg.unlocked():
        cfg.init_from = str(_weights_dir(prev))
    done = rdir / "eval" / "summary.json"
    if done.exists():
      results = json.loads(done.read_text()).get("results", {})
      log(f"mining: round {k} already trained in {rdir}")
    else:
      results = train_fn(cfg, str(rdir), negatives=pool)
    f1 = _val_f1(results, rdir)
    improved = f1 is not None and (best_f1 is None or f1 > best_f1)
    if improved:
      best_f1 = f1
    if improved or f1 is None:  # without validation the latest round stands
      summary["best_round"] = k
    entry = dict(round=k, workdir=str(rdir), pool_size=int(len(pool)),
                 by_source=_count(sources), added=added, removed=removed,
                 val_f1=f1, improved=improved if k > 0 else None)
    summary["rounds"].append(entry)
    log(f"mining: round {k}: pool {len(pool)} (added {added}, removed {removed}), "
        f"val F1 {'n/a' if f1 is None else f'{f1:.4f}'}")
    if is_main:
      export.write_json_atomic(summary, workdir / "mining.json")
    if k > 0 and f1 is not None and not improved:
      log(f"mining: validation F1 did not improve in round {k}; stopping "
          f"(best: round {summary['best_round']})")
      break
    prev = rdir
  return summary


def main(argv):
  """CLI: ``--config`` (config file), ``--workdir``, ``--rounds``."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  from midog_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed()
  f = flags.FLAGS
  run_rounds(f.config, f.workdir, f.rounds)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "experiment config file",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "directory for the rounds and mining.json")
  flags.DEFINE_integer("rounds", 3, "at most this many training rounds")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
