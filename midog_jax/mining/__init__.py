"""Negative mining after Lafarge & Koelzer (MIDOG 2022): pools, stain-mined negatives, rounds.

The P4 patch classifier trains on balanced mini-batches whose negatives come
from an explicit pool of (case_index, x, y) centres
(``pipeline.make_dataset(..., negatives=pool)``):

  * ``negatives``: where negatives come from.
    ``initial_negative_pool``: random centres far from every mitotic figure
    of the labelled training cases, plus every imposter (imposters ARE
    negatives for a mitosis classifier). ``stain_mined_negatives``: part (a)
    of the paper, stain unmixing of unlabeled images. Each image's stain
    matrix is estimated with Macenko; the part of the optical density that
    lies outside the H&E plane (the residual) is large on ink, pigment and
    other non-H&E impostors, so the centres of the strongest residual blobs
    become extra negatives.
  * ``scoring``: hard-negative mining. ``score_negatives``: a trained
    detector (``make_patch_score_fn``) scores every pool centre;
    ``drop_easy`` / ``hard_mask`` remove the easy ones (low mitosis
    probability).
  * ``rounds``: ``run_rounds``: round 0 trains on the initial
    (+ stain-mined) pool; each next round scores the pool with the previous
    round's best weights, drops the easy negatives and fine-tunes from those
    weights, until validation F1 stops improving. Writes
    ``WORKDIR/mining.json``. Settings: ``config.mining`` over
    ``MINING_DEFAULTS``.

  python -m midog_jax.mining --config=configs/p4_resnet.py:quick \\
      --workdir=runs/p4_mining --rounds=3

Pool case indices refer to ``ExperimentData.pool_cases`` (the training
cases, then the unlabeled ones), the cases ``train.train_and_evaluate``
samples from when it is given a pool.
"""

from __future__ import annotations

from midog_jax.mining.negatives import (SOURCES, fit_stains, initial_negative_pool,
                                        residual_map, residual_peaks,
                                        stain_mined_negatives)
from midog_jax.mining.rounds import MINING_DEFAULTS, main, mining_settings, run_rounds
from midog_jax.mining.scoring import drop_easy, hard_mask, read_centred, score_negatives

__all__ = [
    "MINING_DEFAULTS", "SOURCES", "drop_easy", "fit_stains", "hard_mask",
    "initial_negative_pool", "main", "mining_settings", "read_centred",
    "residual_map", "residual_peaks", "run_rounds", "score_negatives",
    "stain_mined_negatives",
]
