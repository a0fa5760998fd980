"""Hard-negative mining rounds (Lafarge & Koelzer, MIDOG 2022); writes WORKDIR/mining.json.

  python -m midog_jax.mining --config=configs/p4_resnet.py:quick \\
      --workdir=runs/p4_mining --rounds=3

Exits 3 when training hits a non-finite loss, 1 on bad input data.
"""

# The flags are defined only here, when the package runs as a program, so
# importing ``midog_jax.mining`` defines none.

from __future__ import annotations

if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  from midog_jax.mining.rounds import main

  config_flags.DEFINE_config_file("config", None, "experiment config file",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "directory for the rounds and mining.json")
  flags.DEFINE_integer("rounds", 3, "at most this many training rounds")
  flags.mark_flags_as_required(["config", "workdir"])
  from midog_jax import errors

  app.run(main, flags_parser=errors.parse_flags)
