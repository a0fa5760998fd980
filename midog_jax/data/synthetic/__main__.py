"""``python -m midog_jax.data.synthetic``: the generator's command line."""

import sys

from midog_jax.data.synthetic.cli import main

# Guarded: spawned render workers import this module again as __mp_main__.
if __name__ == "__main__":
  sys.exit(main())
