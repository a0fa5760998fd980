"""``python -m midog_jax.benchmark``: every method on one suite, one leaderboard (``cli.py``)."""

from __future__ import annotations

import sys

from midog_jax.benchmark.cli import main

if __name__ == "__main__":
  sys.exit(main())
