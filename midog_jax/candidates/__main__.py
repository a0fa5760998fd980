"""Builds (or finds) the candidate store of a data set and prints a summary.

  python -m midog_jax.candidates --data DIR --out STORE_DIR [--workers N]
      [--truth none|auto|PATH] [--k_std 3] [--tile_px 2048]

``--data`` is a folder with ``MIDOG.json`` (or the annotation file itself).
``--truth auto`` attaches ``MIDOG_unlabeled_truth.json`` when it is beside the
annotations, so the unlabeled domain gets labels and a recall (for reporting;
a training store keeps the default ``none``: those images get label -1).
Prints one JSON object: store path, candidates, mitotic candidates, images,
candidates (and mitotic ones) per domain, recall per domain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from midog_jax import errors
from midog_jax.candidates import Settings, build_store
from midog_jax.data import midog
from midog_jax.data.synthetic import TRUTH
from midog_jax.errors import DataError


def run(args: argparse.Namespace, settings: Settings) -> dict:
  data = Path(args.data)
  ann = data / "MIDOG.json" if data.is_dir() else data
  if not ann.exists():
    raise DataError(ann, "annotation file not found")
  ds = midog.load_midog(ann)
  truth = args.truth
  if truth == "auto":
    truth = ann.parent / TRUTH if (ann.parent / TRUTH).exists() else None
  if truth not in (None, "none"):
    ds = midog.attach_truth(ds, truth)
  store = build_store(ds.cases, args.out, settings, workers=args.workers)
  per_domain = {}
  for i, name in enumerate(store.domain_names):
    on = store.domains == i
    per_domain[name] = dict(candidates=int(on.sum()),
                            mitotic_candidates=int((store.labels[on] == 1).sum()))
  return dict(store=str(store.path), candidates=len(store),
              mitotic_candidates=int((store.labels == 1).sum()),
              images=len(store.images), candidates_per_domain=per_domain,
              recall_per_domain=store.recall_per_domain())


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m midog_jax.candidates",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--data", required=True, help="folder with MIDOG.json, or the JSON")
  ap.add_argument("--out", required=True, help="folder holding the stores")
  ap.add_argument("--workers", type=int, default=2, help="processes (one image each)")
  ap.add_argument("--truth", default="none",
                  help="truth file of the unlabeled domain: none, auto or a path")
  ap.add_argument("--k_std", type=float, default=Settings.k_std)
  ap.add_argument("--tile_px", type=int, default=Settings.tile_px)
  args = ap.parse_args(argv)  # usage errors: argparse prints one line, exit 2
  if args.workers < 1:
    ap.error(f"--workers must be >= 1, got {args.workers}")
  try:
    settings = Settings(k_std=args.k_std, tile_px=args.tile_px)
  except ValueError as e:
    ap.error(str(e))
  return errors.exit_code(lambda: print(json.dumps(run(args, settings)), flush=True))


if __name__ == "__main__":
  sys.exit(main())
