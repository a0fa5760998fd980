"""The hard-negative mining rounds driver and its command line.

Round 0 trains on the initial (+ stain-mined) pool; each next round scores
the pool with the previous round's best weights, drops the easy negatives
and fine-tunes from those weights, until validation F1 stops improving
(Lafarge & Koelzer, MIDOG 2022). Writes ``WORKDIR/mining.json``.

  python -m midog_jax.mining --config=configs/p4_resnet.py:quick \\
      --workdir=runs/p4_mining --rounds=3
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from midog_jax import errors
from midog_jax.errors import DataError
from midog_jax.fileio import atomic_output, read_json, write_json_atomic
from midog_jax.mining.negatives import (SOURCES, initial_negative_pool,
                                        stain_mined_negatives)
from midog_jax.mining.scoring import hard_mask, score_negatives

# config.mining keys and their defaults (a config without a ``mining`` block
# mines with these).
MINING_DEFAULTS = dict(
    random_per_case=200,     # random far-from-mitosis centres per training image
    min_dist_px=0.0,         # 0 = config.data.neg_min_dist_px
    stain_top_k=0,           # stain-mined negatives per unlabeled image (0 = off)
    keep_fraction=0.5,       # share of the pool kept (the hardest) per round
    score_threshold=-1.0,    # >= 0: keep scores >= this instead of a fraction
    score_batch=32,          # patches per score_fn call
    score_patch_size=0,      # 0 = the detector's patch_size
)

_RANDOM, _IMPOSTER, _STAIN = (SOURCES.index(s) for s in ("random", "imposter", "stain"))


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
  from midog_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  for name in ("best", "latest"):
    d = round_dir / "checkpoints" / name
    step = ckpt_lib.newest_step(d)  # the step load_for_inference reads
    if step is not None:
      return d / str(step)
  raise DataError(round_dir / "checkpoints", "no checkpoint found after training")


def _count(sources: np.ndarray) -> dict:
  return {s: int((sources == k).sum()) for k, s in enumerate(SOURCES)}


def _val_f1(results: dict, round_dir: Path) -> float | None:
  """Validation F1 of a finished round (None without validation images)."""
  if "val" in results:
    return float(results["val"]["f1"])
  summary = round_dir / "eval" / "summary.json"
  if summary.exists():
    best = read_json(summary, "round summary").get("best", {})
    if best.get("f1", -1.0) >= 0:
      return float(best["f1"])
  return None


def _save_pool(path: Path, pool: np.ndarray, sources: np.ndarray) -> None:
  with atomic_output(path, "wb") as f:
    np.savez(f, pool=pool, sources=sources)


def run_rounds(config, workdir: str | os.PathLike, rounds: int, *,
               train_fn: Callable | None = None, log: Callable = print) -> dict:
  """Hard-negative mining rounds (see the package and module docstrings).

  Round ``k`` trains in ``workdir/round_<k>`` (``train_fn(config, dir,
  negatives=pool)``, default ``train.train_and_evaluate``) on the pool saved
  as ``round_<k>/negatives.npz``; a round whose folder already holds that
  file (and ``eval/summary.json``) is resumed (skipped) rather than redone.
  Round ``k > 0`` first scores the pool with round ``k - 1``'s best weights
  (the detector's ``make_patch_score_fn``), keeps the hard
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
  from midog_jax import detectors  # pylint: disable=g-import-not-at-top
  from midog_jax.data import experiment  # pylint: disable=g-import-not-at-top

  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  if config.data.strategy != "balanced":
    raise ValueError("negative mining trains on a negative pool, which needs "
                     f"config.data.strategy='balanced' (got {config.data.strategy!r})")
  ms = mining_settings(config)
  detector = detectors.build(config)
  if train_fn is None:
    from midog_jax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  is_main = jax.process_index() == 0
  workdir = Path(workdir)
  data = experiment.load_experiment(config.data)
  cases = data.pool_cases
  min_dist = float(ms["min_dist_px"]) or float(config.data.neg_min_dist_px)
  psize = int(ms["score_patch_size"]) or detector.patch_size

  # Round 0's pool: random + imposters (+ stain-mined).
  pool, counts = initial_negative_pool(data.train, int(ms["random_per_case"]),
                                       np.random.default_rng([int(config.seed), 1001]),
                                       min_dist)
  sources = np.concatenate([np.full(counts["random"], _RANDOM, np.int8),
                            np.full(counts["imposter"], _IMPOSTER, np.int8)])
  stain_report = None
  if ms["stain_top_k"] > 0:
    stain, stain_report = stain_mined_negatives(
        data.unlabeled, len(data.train), int(ms["stain_top_k"]), seed=int(config.seed))
    pool = np.concatenate([pool, stain])
    sources = np.concatenate([sources, np.full(len(stain), _STAIN, np.int8)])
  log(f"mining: initial pool {len(pool)} negatives ({counts['random']} random, "
      f"{counts['imposter']} imposters, {int((sources == _STAIN).sum())} stain-mined; "
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
        gone = (np.bincount(sources, minlength=len(SOURCES))
                - np.bincount(new_sources, minlength=len(SOURCES)))
        removed = {s: int(gone[j]) for j, s in enumerate(SOURCES)}
      pool, sources = new_pool, new_sources
    elif k > 0:
      variables, _ = ckpt_lib.load_for_inference(prev, "best")
      score_fn = detector.make_patch_score_fn(variables, psize)
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
      results = read_json(done, "round summary").get("results", {})
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
      write_json_atomic(summary, workdir / "mining.json")
    if k > 0 and f1 is not None and not improved:
      log(f"mining: validation F1 did not improve in round {k}; stopping "
          f"(best: round {summary['best_round']})")
      break
    prev = rdir
  return summary


def main(argv):
  """CLI: ``--config`` (config file), ``--workdir``, ``--rounds``.

  The flags are defined by ``midog_jax.mining.__main__``. Exits 3 when
  training hits a non-finite loss and 1 on bad input data (``DataError``),
  each with one ``error:`` line on stderr; 0 when a signal stopped a round
  after its checkpoint (a rerun resumes that round).
  """
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  from midog_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed()
  f = flags.FLAGS
  # 0 done (or stopped by SIGTERM/SIGINT after a checkpoint: rerun to resume),
  # 1 bad data, 3 non-finite loss.
  sys.exit(errors.exit_code(lambda: run_rounds(f.config, f.workdir, f.rounds)))
