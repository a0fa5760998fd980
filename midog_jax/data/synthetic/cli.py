"""``python -m midog_jax.data.synthetic``: the generator's command line.

Legacy presets (``--preset tiny|small|midog21``) through :func:`write.generate`,
benchmark suites (``--suite midog21|midogpp --preset tiny|small|full``) through
:func:`suite_write.generate_suite`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from midog_jax.data.synthetic import suite_write
from midog_jax.data.synthetic.plan import PRESETS
from midog_jax.data.synthetic.suites import SUITE_PRESETS, SUITES
from midog_jax.data.synthetic.write import generate, read_manifest
from midog_jax.errors import DataError


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m midog_jax.data.synthetic",
      description="Write a synthetic data set in the MIDOG 2021 layout.")
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--suite", choices=SUITES, default=None,
                  help="write a benchmark suite (train/ and test/ in the MIDOG++ "
                  "format; presets tiny|small|full) instead of a legacy preset")
  ap.add_argument("--preset", choices=tuple(dict.fromkeys(PRESETS + SUITE_PRESETS)),
                  default="tiny")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workers", type=int, default=None)
  g = ap.add_mutually_exclusive_group()
  g.add_argument("--ids", default=None, help="comma-separated image ids")
  g.add_argument("--limit", type=int, default=None,
                 help="first N images, round-robin over the domains")
  ap.add_argument("--scale", type=float, default=1.0,
                  help="midog21 only: shrink sizes/positions (testing)")
  ap.add_argument("--force", action="store_true",
                  help="write even into a folder holding a data set this generator "
                  "did not write")
  a = ap.parse_args(argv)
  ids = None
  if a.ids:
    try:
      ids = [int(s) for s in a.ids.split(",") if s.strip()]
    except ValueError:
      ap.error(f"--ids must be comma-separated integers, got {a.ids!r}")
  t0 = time.perf_counter()
  try:
    if Path(a.out).exists() and not Path(a.out).is_dir():
      raise DataError(a.out, "--out exists and is not a folder")
    if a.suite:
      if ids is not None or a.limit is not None or a.scale != 1.0:
        raise ValueError("--ids, --limit and --scale do not apply to --suite")
      out = suite_write.generate_suite(a.out, a.suite, a.preset, a.seed, a.workers,
                                       force=a.force)
      print(json.dumps(dict(suite_write.read_suite(out), out=str(out),
                            seconds=round(time.perf_counter() - t0, 2))))
      return 0
    if a.preset == "full":
      raise ValueError("preset 'full' belongs to the benchmark suites: add --suite")
    path = generate(a.out, a.preset, a.seed, a.workers, ids, a.limit, a.scale,
                    force=a.force)
  except DataError as e:  # bad input data or a folder it must not touch
    print(f"error: {e}", file=sys.stderr)
    return 1
  except ValueError as e:  # bad arguments
    print(f"error: {e}", file=sys.stderr)
    return 2
  man = read_manifest(path.parent)
  print(json.dumps(dict(man, out=str(path.parent),
                        seconds=round(time.perf_counter() - t0, 2))))
  return 0
