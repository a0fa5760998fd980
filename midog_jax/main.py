"""Train, then evaluate: ``python -m midog_jax.main --config=configs/retina.py:quick --workdir=DIR``.

Resumes from DIR if it holds checkpoints (then ``config.init_from``, then
scratch). SIGTERM or Ctrl-C: the current step finishes, a checkpoint is saved
and the program exits 0 saying how to resume. Any config key can be overridden: ``--config.total_steps=100``.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from midog_jax import errors, parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and outputs")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  parallel.initialize_distributed()

  def run():
    from midog_jax import train  # after distributed init: it touches devices
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)

  # Exit codes: 0 done (or stopped by SIGTERM/SIGINT with a checkpoint), 1 bad
  # data, 3 non-finite loss (midog_jax.errors.exit_code).
  sys.exit(errors.exit_code(run))


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
