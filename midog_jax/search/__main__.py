"""``python -m midog_jax.search``: a hyper-parameter search over any method's config.

  python -m midog_jax.search --config=configs/retina.py:quick \\
      --space=optimizer.lr=loguniform:1e-6:1e-1 --trials=20 --study=runs/search_lr

Exit codes: 0 done (or stopped by SIGTERM/SIGINT: the same command
resumes), 1 bad data or a study started with other settings, 2 a bad
command line (an unknown config key in ``--space`` included), 3 a
non-finite loss outside a trial's training.
"""

# The flags are defined only here, when the package runs as a program, so
# importing ``midog_jax.search`` defines none.

from __future__ import annotations

import shlex
import sys


def main(argv) -> None:
  """Checks the flags and the space (exit 2), then runs the search."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  from midog_jax import errors  # pylint: disable=g-import-not-at-top
  from midog_jax.search import space as space_lib  # pylint: disable=g-import-not-at-top
  from midog_jax.search import study  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config
  metric = f.metric or config.get("best_metric", "f1")
  try:
    if f.trials < 1:
      raise space_lib.UsageError(f"--trials must be at least 1, got {f.trials}")
    if metric not in study.DIRECTIONS:
      raise space_lib.UsageError(f"--metric must be f1 or val_loss, got {metric!r}")
    if metric == "val_loss" and not config.data.val_patches:
      raise space_lib.UsageError("--metric=val_loss needs validation patches: set "
                                 "--config.data.val_patches (> 0)")
    params = space_lib.parse_space(f.space, config)
  except space_lib.UsageError as e:
    print(f"error: bad command line: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  command = "python -m midog_jax.search " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  sys.exit(errors.exit_code(lambda: study.run_search(
      config, params, f.trials, f.study, metric=metric, seed=f.seed,
      startup_trials=f.startup_trials, prune=f.prune, prune_after=f.prune_after,
      command=command)))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  from midog_jax import errors

  config_flags.DEFINE_config_file("config", None, "experiment config file (the base of "
                                  "every trial)", lock_config=True)
  flags.DEFINE_string("space", None, "searched keys: KEY=KIND:ARGS,... (KIND uniform, "
                      "loguniform, int, choice) or a JSON file of them")
  flags.DEFINE_integer("trials", None, "finish when this many trials are complete or pruned")
  flags.DEFINE_string("study", None, "study folder: study.db, trials/, summary.md, "
                      "best_config.py")
  flags.DEFINE_string("metric", None, "objective: f1 (validation F1, maximised) or val_loss "
                      "(minimised); default: the config's best_metric")
  flags.DEFINE_integer("seed", 0, "the sampler's seed")
  flags.DEFINE_integer("startup_trials", 10, "random trials before TPE models the results")
  flags.DEFINE_bool("prune", True, "stop trials whose validation is below the median")
  flags.DEFINE_integer("prune_after", 5, "trials that finish before pruning starts")
  flags.mark_flags_as_required(["config", "space", "trials", "study"])
  app.run(main, flags_parser=errors.parse_flags)
