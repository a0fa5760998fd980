"""The benchmark's command line.

  python -m midog_jax.benchmark --suite midog21|midogpp --methods retinanet,p4,... \\
      --seeds 3 --budget quick|full --out DIR [--data DIR] [--preset tiny|small|full] \\
      [--protocol official|lodo:<domain>] [--n_boot 1000] [--dry_run]

Generates the suite into ``DIR/data/<suite>-<preset>`` (unless ``--data``
names one), trains and predicts every (method, seed) run in
``DIR/runs/<method>/seed<k>`` (a rerun of the same command skips finished
runs and resumes unfinished trainings), then writes ``DIR/leaderboard.md``,
``leaderboard.json``, ``per_domain.png`` and ``curves.png``. ``--dry_run``
prints the commands a real run would execute now, and runs nothing.

Exit codes: 0 done, or stopped by SIGTERM/SIGINT after the current command
saved its work (a training its checkpoint; one line says so, rerun to
resume); 1 bad data or a failed run (one line each; the leaderboard still
shows the runs that finished); 2 a bad command line (an unknown method lists
the registered ones); 130 stopped at once by a second signal.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from midog_jax.benchmark import methods
from midog_jax.benchmark import suite as suite_lib
from midog_jax.errors import DataError, Stopped

PRESETS = ("tiny", "small", "full")


class _Parser(argparse.ArgumentParser):
  """argparse with its usage errors as one line (exit 2), as every program here."""

  def error(self, message):
    print(f"error: bad command line: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m midog_jax.benchmark",
              description="Every method on one benchmark suite: leaderboard, charts and "
              "the commands that reproduce them.")
  p.add_argument("--suite", required=True, choices=suite_lib.SUITES)
  p.add_argument("--methods", required=True,
                 help="comma-separated registered methods, or all: " + ", ".join(methods.REGISTRY))
  p.add_argument("--seeds", type=int, default=3, help="runs per method (seeds 0..N-1)")
  p.add_argument("--budget", default="quick", choices=methods.BUDGETS,
                 help="quick: each config's :quick argument; full: the default; tiny: "
                 "test-sized configs (a smoke run of the harness)")
  p.add_argument("--out", required=True, help="benchmark folder (runs, leaderboard)")
  p.add_argument("--data", default=None, help="an existing suite folder (with suite.json)")
  p.add_argument("--preset", default="small", choices=PRESETS,
                 help="suite preset generated when --data is not given")
  p.add_argument("--protocol", default="official", help="official or lodo:<domain>")
  p.add_argument("--n_boot", "--n-boot", type=int, default=1000,
                 help="bootstrap resamples of the 95%% intervals")
  p.add_argument("--steps", type=int, default=0,
                 help="override every training's total_steps (a smoke run; 0: the budget's)")
  p.add_argument("--report_only", "--report-only", action="store_true",
                 help="write the leaderboard of the runs finished so far; run nothing")
  p.add_argument("--dry_run", "--dry-run", action="store_true",
                 help="print the commands that would run; run nothing")
  return p


def options(argv: Sequence[str] | None = None):
  """Parsed and checked options (exit 2 on a usage error)."""
  from midog_jax.benchmark.runner import Options  # pylint: disable=g-import-not-at-top
  a = parser().parse_args(argv)
  try:
    names = methods.parse_methods(a.methods)
    suite_lib.parse_protocol(a.protocol)
    if a.seeds < 1:
      raise ValueError(f"--seeds must be at least 1, got {a.seeds}")
    if a.steps < 0:
      raise ValueError(f"--steps must be >= 0, got {a.steps}")
    if a.n_boot < 1:
      raise ValueError(f"--n_boot must be at least 1, got {a.n_boot}")
  except ValueError as e:
    print(f"error: bad command line: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  out = Path(a.out)
  if out.exists() and not out.is_dir():
    print(f"error: {out}: --out is a file, not a folder", file=sys.stderr, flush=True)
    sys.exit(2)
  return Options(suite=a.suite, methods=tuple(names), seeds=a.seeds, budget=a.budget,
                 out=out, data=Path(a.data) if a.data else None, preset=a.preset,
                 protocol=a.protocol, n_boot=a.n_boot, dry_run=a.dry_run, steps=a.steps,
                 report_only=a.report_only)


def _run(opts, argv: Sequence[str]) -> int:
  from midog_jax.benchmark import leaderboard, report, runner  # pylint: disable=g-import-not-at-top
  r = runner.Runner(opts)
  suite = r.prepare_data()
  if opts.dry_run:
    for line in r.dry_run():
      print(line)
    return 0
  results = r.run_all()
  display = lambda cmd: runner.display(cmd, r.cwd)
  meta = dict(
      suite=dict(root=str(suite.root), suite=suite.name, preset=suite.preset, seed=suite.seed,
                 generator_version=suite.generator_version, domain_key=suite.domain_key,
                 train_domains=list(suite.train_domains),
                 unlabeled_domains=list(suite.unlabeled_domains),
                 unseen_domains=list(suite.unseen_domains),
                 human_agreement=suite.human_agreement),
      protocol=opts.protocol, budget=opts.budget, seeds=opts.seeds, n_boot=opts.n_boot,
      data=display([str(suite.root)]),
      failures=r.failures, missing=r.missing,
      commands=dict(
          benchmark="python -m midog_jax.benchmark " + shlex.join(argv),
          data=display(r.data_command) if r.data_command else None,
          train=r.trained_commands(),
          predict={f"{m} seed {res['seed']}": res.get("predict_commands", [])
                   for m, runs in results.items() for res in runs}))
  board, curves = leaderboard.build(results, r.cases, meta=meta, n_boot=opts.n_boot)
  paths = report.write(r.out, board, curves)
  print(f"leaderboard: {', '.join(str(p) for p in paths)}", flush=True)
  for f in r.failures:
    print(f"error: {' '.join(f.split())}", file=sys.stderr, flush=True)
  return 1 if r.failures else 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  opts = options(argv)
  try:
    return _run(opts, argv)
  except (DataError, OSError) as e:
    if os.environ.get("MIDOG_TRACEBACK"):
      raise
    where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
    print(f"error: {where}{' '.join(str(e).split()) if not where else e.strerror}",
          file=sys.stderr, flush=True)
    return 1
  except suite_lib.UsageError as e:
    print(f"error: bad command line: {e}", file=sys.stderr, flush=True)
    return 2
  except Stopped as e:  # SIGTERM/SIGINT: the current command saved its work
    print(e.message, file=sys.stderr, flush=True)
    return 0
  except KeyboardInterrupt:
    print("interrupted: run the same command again to resume", file=sys.stderr, flush=True)
    return 130
