"""Train, then evaluate: ``python -m midog_jax.main --config=configs/retina.py:quick --workdir=DIR``.

Resumes from DIR if it holds checkpoints (then ``config.init_from``, then
scratch). Any config key can be overridden: ``--config.total_steps=100``.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from midog_jax import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and outputs")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  parallel.initialize_distributed()
  from midog_jax import train  # after distributed init: it touches devices
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  app.run(main)
