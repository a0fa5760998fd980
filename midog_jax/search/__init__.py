"""Hyper-parameter search for any method's config (Optuna TPE), as Kondo tuned his learning rates.

  python -m midog_jax.search --config=configs/retina.py:quick \\
      --space=optimizer.lr=loguniform:1e-6:1e-1,batch_size=choice:4:8 \\
      --trials=20 --study=runs/search_lr [--metric=f1|val_loss] [--config.KEY=VALUE]

Kondo (MIDOG 2021) found both of his learning rates (1e-5 for training,
1.7e-6 for adaptation) with Optuna (Akiba et al., KDD 2019). Here the sampler
is Optuna's TPE (seeded), the study persists in ``STUDY/study.db`` (SQLite),
each trial trains through ``train.train_and_evaluate`` in
``STUDY/trials/NNNN``, each validation (``config.eval_every``) is reported
as it happens and the median rule prunes bad trials. After every trial the
search writes ``STUDY/summary.md`` (a table of all trials) and
``STUDY/best_config.py`` (the best trial's whole config, which
``python -m midog_jax.main --config=STUDY/best_config.py`` accepts).

A killed search resumes where it stopped when run again with the same
command: the trial it was running goes on from its own checkpoint, and the
search ends when ``--trials`` trials are complete or pruned. SIGTERM/SIGINT
stop it cleanly (the running trial saves a checkpoint). One search per
study folder at a time (``STUDY/.lock``); the search runs in one process.

  * ``space``: the ``--space`` syntax, checked against the config
    (:func:`space.parse_space`), and applying a trial's values.
  * ``study``: the study, the trial loop (:func:`study.run_search`), the
    reports.
"""

from __future__ import annotations

from midog_jax.search.space import UsageError, apply_params, parse_space
from midog_jax.search.study import run_search

__all__ = ["UsageError", "apply_params", "parse_space", "run_search"]
