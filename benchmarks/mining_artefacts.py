"""What stain-residual mining finds on a benchmark suite, and how much of it is artefact.

Runs the P4 method's stain-mined negatives (Lafarge & Koelzer part a: Macenko
per image, the OD residual outside the H&E plane, its strongest blobs) on the
unlabeled images of a synthetic suite's ``train/`` folder, with the P4 config's
settings (``stain_top_k``), and checks every mined centre against the
generator's own record of where it put artefacts (re-planned from the suite's
seed): a centre within ``--radius_um`` of a pigment cluster, a debris
fragment, a bubble rim, inside an ink blob or a fold counts as an artefact.
Prints one JSON object::

  python benchmarks/mining_artefacts.py --data DIR [--top_k 8] [--radius_um 15]

(DIR from ``python -m midog_jax.data.synthetic --suite midog21 --preset small
--out DIR``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from midog_jax.config_files import get_config
from midog_jax.data import midog
from midog_jax.data.synthetic import suite_write, suites
from midog_jax.mining import stain_mined_negatives


def _near_artefact(x: float, y: float, arts, radius_px: float) -> str | None:
  """The kind of the artefact a point lies on or near, or None."""
  for a in arts:
    d = math.hypot(x - a.x, y - a.y)
    if a.kind in ("pigment", "debris") and d <= a.size + radius_px:
      return a.kind
    if a.kind == "ink" and d <= 1.2 * a.size + radius_px:
      return a.kind
    if a.kind == "bubble" and abs(d - a.size) <= radius_px:
      return a.kind
    if a.kind == "fold":
      off = abs(-(x - a.x) * math.sin(a.angle) + (y - a.y) * math.cos(a.angle))
      if off <= a.size + radius_px:
        return a.kind
  return None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", required=True, help="a suite folder (with suite.json)")
  p.add_argument("--top_k", type=int, default=None,
                 help="mined centres per image (default: the P4 config's stain_top_k)")
  p.add_argument("--radius_um", type=float, default=15.0)
  a = p.parse_args(argv)
  man = suite_write.read_suite(a.data)
  if man is None:
    print(f"error: {a.data}: no complete suite (suite.json missing)", file=sys.stderr)
    return 1
  top_k = a.top_k or int(get_config("p4_resnet", "quick").mining.stain_top_k)
  ds = midog.load_midog(Path(a.data) / "train" / "MIDOG++.json")
  cases = ds.unlabeled
  pool, _ = stain_mined_negatives(cases, 0, top_k, seed=0)
  slots = {s.image_id: s for s in suites.slots(man["suite"], man["preset"])}
  # Each mined image's artefacts, planned once (not once per mined centre).
  arts = {i: suites.plan_slot(slots[cases[i].image_id], man["preset"], man["seed"])[0].artefacts
          for i in {int(ci) for ci in pool[:, 0]}}
  kinds: dict[str, int] = {}
  n_art = 0
  for ci, x, y in pool:
    case = cases[int(ci)]
    kind = _near_artefact(x, y, arts[int(ci)], a.radius_um / case.spacing_um)
    kinds[kind or "none"] = kinds.get(kind or "none", 0) + 1
    n_art += kind is not None
  print(json.dumps(dict(data=str(a.data), images=len(cases), top_k=top_k,
                        mined=int(len(pool)), on_artefacts=n_art,
                        fraction_artefacts=round(n_art / max(len(pool), 1), 3),
                        by_kind=kinds, radius_um=a.radius_um)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
