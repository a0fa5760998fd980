"""Running a search: the Optuna study in ``DIR/study.db``, one training run per trial.

Each trial trains through ``train.train_and_evaluate`` in ``DIR/trials/NNNN``
with the base config plus the trial's values. Every validation of the run
(``config.eval_every``) is reported to Optuna as it happens, through the
metric writer that ``train`` accepts, and a trial the pruner (median rule)
finds worse than the others at the same step stops there. The objective is
the trial's best validation F1 (maximised) or lowest validation loss
(minimised) in its ``metrics.jsonl``: the value of its best checkpoint when
``config.best_metric`` is the same metric.

Why not segments of ``total_steps``: the learning-rate schedule is a
function of ``total_steps`` (cosine), so training a trial in raised segments
would train a different schedule from the one ``best_config.py`` gives, and
every segment would run the final evaluation.

Resuming: one search at a time holds ``DIR/.lock``. A trial still RUNNING in
the study when a search starts was left by a search that was killed; it is
resumed first (same number, same values, same workdir, whose training resumes
from its own checkpoint), so it is neither lost nor counted twice. The
search ends when ``trials`` trials are COMPLETE or PRUNED. The sampler is
reseeded from ``(seed, trial number)`` before each new trial, so a resumed
search draws the values an uninterrupted one would have drawn.

A trial whose loss turns non-finite (a learning rate too high) is PRUNED and
marked "diverged" (Optuna's TPE then treats it as a bad trial); any other
error marks it FAIL and ends the search with that error.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna

from midog_jax import signals
from midog_jax.errors import DataError, NonFiniteLossError, Stopped
from midog_jax.fileio import atomic_output
from midog_jax.metric_writer import MetricWriter
from midog_jax.search import space as space_lib
from midog_jax.workdir import WorkdirLock, config_differences

DIRECTIONS = {"f1": "maximize", "val_loss": "minimize"}
SCALARS = {"f1": "val_f1", "val_loss": "val_loss"}  # what train.validate writes
STUDY_NAME = "search"
# Config keys a resumed search may change: how it logs, saves and reads data,
# never what its trials learn.
RESUMABLE_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "num_workers",
                  "debug_step_sleep", "eval.write_overlays", "eval.tile_batch")
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class _ReportingWriter:
  """``train``'s metric writer that also reports each validation to the trial.

  Raises ``optuna.TrialPruned`` from inside training when the pruner says so
  (the run stops at that validation; a pruned trial is never resumed).
  """

  def __init__(self, workdir: Path, trial, metric: str, reported: set, prune: bool):
    self._inner = MetricWriter(workdir)
    self.trial, self.key, self.reported, self.prune = trial, SCALARS[metric], reported, prune

  def write_scalars(self, step: int, scalars) -> None:
    self._inner.write_scalars(step, scalars)
    value = scalars.get(self.key)
    # A step reported before a kill is not reported again (Optuna keeps the first).
    if value is None or int(step) in self.reported or not math.isfinite(float(value)):
      return
    self.trial.report(float(value), int(step))
    self.reported.add(int(step))
    if self.prune and self.trial.should_prune():
      raise optuna.TrialPruned(f"pruned at step {step} ({self.key} {float(value):.4g})")

  def __getattr__(self, name: str):
    if name == "_inner":  # not set yet: no recursion
      raise AttributeError(name)
    return getattr(self._inner, name)


def trial_value(workdir: Path, metric: str) -> float | None:
  """The best validation value in a trial's ``metrics.jsonl`` (None without one)."""
  path, key = Path(workdir) / "metrics.jsonl", SCALARS[metric]
  if not path.exists():
    return None
  got = []
  for line in path.read_text().splitlines():
    v = json.loads(line).get(key) if line.strip() else None
    if isinstance(v, (int, float)) and math.isfinite(v):
      got.append(float(v))
  if not got:
    return None
  return max(got) if DIRECTIONS[metric] == "maximize" else min(got)


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def open_study(study_dir: Path, config, params, metric: str, seed: int,
               startup_trials: int, prune: bool, prune_after: int) -> optuna.Study:
  """The study in ``study_dir/study.db`` (created, or loaded and checked to match)."""
  storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir / 'study.db'}")
  pruner = (optuna.pruners.MedianPruner(n_startup_trials=prune_after) if prune
            else optuna.pruners.NopPruner())
  study = optuna.create_study(storage=storage, study_name=STUDY_NAME,
                              direction=DIRECTIONS[metric], pruner=pruner,
                              sampler=_sampler(seed, 0, startup_trials),
                              load_if_exists=True)
  meta = dict(metric=metric, space=space_lib.space_text(params), seed=int(seed),
              config=_config_json(config))
  if not study.user_attrs:
    for k, v in meta.items():
      study.set_user_attr(k, v)
    return study
  old = study.user_attrs
  diff = [f"{k} (was {old.get(k)!r}, now {meta[k]!r})" for k in ("metric", "space", "seed")
          if old.get(k) != meta[k]]
  diff += [f"config {d}" for d in config_differences(old.get("config", {}), meta["config"],
                                                      resumable=RESUMABLE_KEYS)]
  if diff:
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    raise DataError(study_dir / "study.db", "this study was started with other settings, "
                    f"refusing to resume it: {shown}. Use a new --study folder, or the same "
                    f"settings (a resume may change --trials and {', '.join(RESUMABLE_KEYS)})")
  return study


def _sampler(seed: int, number: int, startup_trials: int) -> optuna.samplers.TPESampler:
  """TPE seeded from (seed, trial number): the same draws whether or not resumed."""
  s = int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0])
  return optuna.samplers.TPESampler(seed=s, n_startup_trials=startup_trials)


def _next_trial(study, seed: int, startup_trials: int) -> tuple[optuna.Trial, bool]:
  """A trial left RUNNING by a killed search (resumed), else a new one."""
  running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
  if running:
    return optuna.trial.Trial(study, running[0]._trial_id), True  # pylint: disable=protected-access
  study.sampler = _sampler(seed, len(study.get_trials(deepcopy=False)), startup_trials)
  return study.ask(), False


def run_trial(study, trial, params, config, study_dir: Path, metric: str, prune: bool,
              train_fn: Callable, log: Callable) -> str:
  """Trains one trial and tells the study; returns its state's name."""
  values = {p.key: p.suggest(trial) for p in params}
  cfg = space_lib.apply_params(config, values)
  workdir = study_dir / "trials" / f"{trial.number:04d}"
  trial.set_user_attr("workdir", os.path.relpath(workdir, study_dir))
  frozen = study._storage.get_trial(trial._trial_id)  # pylint: disable=protected-access
  writer = _ReportingWriter(workdir, trial, metric, set(frozen.intermediate_values), prune)
  shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
  log(f"search: trial {trial.number}: {shown} in {workdir}")
  try:
    train_fn(cfg, str(workdir), writer=writer)
  except optuna.TrialPruned as e:
    log(f"search: trial {trial.number} {e}")
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return "PRUNED"
  except NonFiniteLossError as e:
    trial.set_user_attr("diverged", " ".join(str(e).split())[:200])
    log(f"search: trial {trial.number} diverged (pruned): {e}")
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return "PRUNED"
  except (Stopped, KeyboardInterrupt):
    raise  # left RUNNING: the next search resumes it from its checkpoint
  except BaseException:
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    raise
  finally:
    writer.close()
  value = trial_value(workdir, metric)
  if value is None:
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    raise DataError(workdir / "metrics.jsonl", f"no {SCALARS[metric]} was written: the "
                    "search needs validation images (data.val_fraction, data.split)"
                    + (" and data.val_patches > 0" if metric == "val_loss" else ""))
  study.tell(trial, value)
  log(f"search: trial {trial.number} complete: {metric} {value:.4g}")
  return "COMPLETE"


def run_search(config, params, trials: int, study_dir: str | os.PathLike, *,
               metric: str = "f1", seed: int = 0, startup_trials: int = 10,
               prune: bool = True, prune_after: int = 5, train_fn: Callable | None = None,
               log: Callable = print, command: str = "") -> optuna.Study:
  """Runs (or resumes) a search until ``trials`` trials are COMPLETE or PRUNED.

  Args:
    config: the base config (a method's ``configs/<name>.py``, overrides applied).
    params: the parsed space (:func:`space.parse_space`).
    trials: COMPLETE + PRUNED trials wanted in the study (a resumed study
      counts the ones it has).
    study_dir: the study folder: ``study.db``, ``trials/NNNN/``, ``summary.md``,
      ``best_config.py``.
    metric: "f1" (maximise the validation F1) or "val_loss" (minimise).
    seed: the sampler's seed.
    startup_trials: random trials before TPE models the results.
    prune: stop trials the median rule finds bad; ``prune_after`` finished
      trials before it starts.
    train_fn: ``train.train_and_evaluate`` (default) or a stand-in with its
      signature (``config, workdir, writer=``).
    command: the command line, quoted in ``summary.md``.

  Raises:
    errors.Stopped: after SIGTERM/SIGINT (the running trial saved a
      checkpoint and stays RUNNING; the same command resumes it).
  """
  if metric not in DIRECTIONS:
    raise ValueError(f"metric must be one of {sorted(DIRECTIONS)}, got {metric!r}")
  if train_fn is None:
    from midog_jax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # the search logs its own lines
  study_dir = Path(study_dir)
  study_dir.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(study_dir):
    study = open_study(study_dir, config, params, metric, seed, startup_trials, prune,
                       prune_after)
    report = lambda: write_reports(study, study_dir, config, params, metric, trials, command)
    with signals.StopRequest("the current trial") as stop:
      while True:
        report()
        done = len(study.get_trials(deepcopy=False, states=COUNTED))
        if done >= trials:
          break
        if stop.requested:
          raise Stopped(stop.signal_name, f"search stopped on {stop.signal_name} after "
                        f"{done} of {trials} trials; run the same command to go on")
        trial, resumed = _next_trial(study, seed, startup_trials)
        if resumed:
          log(f"search: resuming trial {trial.number} (left running by a stopped search)")
        try:
          run_trial(study, trial, params, config, study_dir, metric, prune, train_fn, log)
        except Stopped as e:
          report()
          where = e.message.split(":", 1)[0]  # "stopped at step S of T on SIGTERM"
          raise Stopped(e.signal_name, f"search stopped on {e.signal_name} during trial "
                        f"{trial.number} ({where}, checkpoint saved); run the same "
                        "search command to resume it") from None
    log(f"search: {done} trials done; summary in {study_dir / 'summary.md'}")
  return study


def _fmt(v: Any) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def best_trial(study) -> optuna.trial.FrozenTrial | None:
  """The best COMPLETE trial (None before the first one)."""
  done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
  return study.best_trial if done else None


def write_reports(study, study_dir: Path, config, params, metric: str, trials: int,
                  command: str = "") -> None:
  """``summary.md`` (every trial) and ``best_config.py`` (once a trial is COMPLETE)."""
  best = best_trial(study)
  rows, counts = [], {}
  for t in study.get_trials(deepcopy=False):
    counts[t.state.name] = counts.get(t.state.name, 0) + 1
    if t.state == optuna.trial.TrialState.COMPLETE:
      value = _fmt(t.value)
    elif t.intermediate_values:
      step = max(t.intermediate_values)
      value = f"({_fmt(t.intermediate_values[step])} at step {step})"
    else:
      value = ""
    state = t.state.name + (" (diverged)" if "diverged" in t.user_attrs else "")
    steps = str(max(t.intermediate_values)) if t.intermediate_values else ""
    cells = [str(t.number), state, value, steps]
    cells += [_fmt(p.decode(t.params[p.key])) if p.key in t.params else "" for p in params]
    rows.append("| " + " | ".join(cells + [t.user_attrs.get("workdir", "")]) + " |")
  head = ["trial", "state", metric, "last validated step"] + [p.key for p in params] + ["workdir"]
  lines = [f"# Hyper-parameter search: {study_dir}", ""]
  if command:
    lines += [f"    {command}", ""]
  lines += [f"- objective: {metric} ({DIRECTIONS[metric]}), validation of each trial's run",
            f"- space: `{space_lib.space_text(params)}`",
            f"- trials: {trials} requested; "
            + ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())),
            f"- best: " + (f"trial {best.number}, {metric} {_fmt(best.value)}: "
                           "`python -m midog_jax.main --config="
                           f"{study_dir / 'best_config.py'} --workdir=...`"
                           if best else "none complete yet"),
            "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + rows
  with atomic_output(study_dir / "summary.md") as f:
    f.write("\n".join(lines) + "\n")
  if best is not None:
    values = {p.key: p.decode(best.params[p.key]) for p in params}
    write_best_config(study_dir / "best_config.py", space_lib.apply_params(config, values),
                      f"trial {best.number} of the search in {study_dir}, "
                      f"{metric} {_fmt(best.value)}; searched: "
                      + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))


def _literal(obj: Any, indent: int = 0) -> str:
  """Python source for a config value (dicts, tuples, lists, scalars)."""
  pad, inner = "  " * indent, "  " * (indent + 1)
  if isinstance(obj, dict):
    if not obj:
      return "{}"
    items = [f"{inner}{k!r}: {_literal(v, indent + 1)}," for k, v in obj.items()]
    return "{\n" + "\n".join(items) + f"\n{pad}}}"
  if isinstance(obj, (tuple, list)):
    body = ", ".join(_literal(v, indent + 1) for v in obj)
    if isinstance(obj, tuple):
      return f"({body},)" if len(obj) == 1 else f"({body})"
    return f"[{body}]"
  if isinstance(obj, float) and not math.isfinite(obj):
    return f"float({str(obj)!r})"
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return repr(obj)
  raise TypeError(f"cannot write a config value of type {type(obj).__name__}: {obj!r}")


def write_best_config(path: Path, config, what: str) -> None:
  """A config file that ``python -m midog_jax.main --config=PATH`` accepts.

  The whole config as a literal (it imports only ``ml_collections``), so it
  runs from anywhere and does not change when the method's config file does.
  """
  text = (f'"""The best configuration found by ``python -m midog_jax.search``.\n\n'
          f"{what}.\n\n"
          f"  python -m midog_jax.main --config={path} --workdir=runs/best\n"
          '"""\n\nimport ml_collections\n\n'
          f"CONFIG = {_literal(config.to_dict())}\n\n\n"
          "def get_config(arg=None):\n"
          "  if arg:\n"
          "    raise ValueError(f'best_config.py takes no argument, got {arg!r}')\n"
          "  return ml_collections.ConfigDict(CONFIG)\n")
  with atomic_output(path) as f:
    f.write(text)


def load_summary_rows(study_dir: str | os.PathLike) -> list[dict]:
  """The trials of a study as dicts (number, state, value, params, workdir) for scripts."""
  storage = f"sqlite:///{Path(study_dir) / 'study.db'}"
  if not (Path(study_dir) / "study.db").exists():
    raise DataError(Path(study_dir) / "study.db", "no study here")
  study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
  return [dict(number=t.number, state=t.state.name, value=t.value, params=dict(t.params),
               workdir=t.user_attrs.get("workdir"), diverged="diverged" in t.user_attrs,
               intermediate=dict(t.intermediate_values))
          for t in study.get_trials(deepcopy=False)]
