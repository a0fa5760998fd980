"""Blue-ratio mitosis candidates and their store (Kondo, MIDOG 2021, stage 1).

``extract``: candidates of one image, streamed tile by tile (the rule is in its
docstring); ``labels``: mitotic / not by the MIDOG radius, candidate recall;
``store``: all candidates and 64x64 patches of a data set, built once and read
as a grain data source. Command line (builds a store, prints one JSON line)::

  python -m midog_jax.candidates --data DIR --out STORE_DIR [--workers N]
"""

from __future__ import annotations

from midog_jax.candidates.extract import (Settings, find_candidates,
                                          find_candidates_many,
                                          find_candidates_whole, patches_for)
from midog_jax.candidates.labels import label_candidates, within_radius
from midog_jax.candidates.store import CandidateStore, build_store, store_key

__all__ = ["CandidateStore", "Settings", "build_store", "find_candidates",
           "find_candidates_many", "find_candidates_whole", "label_candidates",
           "patches_for", "store_key", "within_radius"]
