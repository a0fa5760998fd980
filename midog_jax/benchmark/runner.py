"""Running the benchmark: data, then every (method, seed) run, resumably.

Each run has its own folder ``DIR/runs/<method>/seed<k>/``:

  work/          the training workdir (``main`` resumes from its checkpoints,
                 ``mining`` from its finished rounds)
  trained.json   written atomically when every training command succeeded:
                 a rerun skips training
  preds/         the prediction commands' output (challenge JSON per test image)
  logs/          one log per command; guard.log: reads the guard refused
  result.json    written atomically last: the run's commands and its detections
                 on every test image; a rerun skips the run

so a killed benchmark, run again with the same command, goes on where it
stopped. Training commands run under the strict test-folder guard, prediction
commands under the images-only one (``guard.py``); only this process, after
the commands, reads the test annotations to score.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from midog_jax import evaluate as eval_lib
from midog_jax import signals
from midog_jax.benchmark import guard, methods
from midog_jax.benchmark import suite as suite_lib
from midog_jax.detections import CHALLENGE_NAMES, MITOSIS
from midog_jax.errors import DataError, Stopped
from midog_jax.fileio import read_json, write_json_atomic

RESULT, TRAINED = "result.json", "trained.json"


class RunFailed(RuntimeError):
  """One run failed (a command's exit code, a guard violation, a bad output)."""


@dataclasses.dataclass(frozen=True)
class Options:
  """The benchmark's command line."""

  suite: str
  methods: tuple[str, ...]
  seeds: int
  budget: str
  out: Path
  data: Path | None
  preset: str
  protocol: str
  n_boot: int = 1000
  dry_run: bool = False
  steps: int = 0  # > 0: every training's total_steps (a smoke run)
  report_only: bool = False  # the leaderboard of the finished runs; run nothing


def display(argv: Sequence[str], root: Path) -> str:
  """A command as a user types it from the repository root (``python``, short paths)."""
  def short(a: str) -> str:
    if a == sys.executable:
      return "python"
    key, eq, value = a.partition("=")
    target = value if eq else a
    if os.path.isabs(target) and Path(target).is_relative_to(root):
      target = os.path.relpath(target, root)
    return f"{key}={target}" if eq else target
  return shlex.join(short(a) for a in argv)


class Runner:
  """Prepares the data, runs or skips every run, and collects the results."""

  def __init__(self, opts: Options, log: Callable[[str], None] = print):
    self.opts = opts
    self.log = log
    self.out = opts.out.resolve()
    self.config_dir, self.cwd = methods.config_dir()
    self.installed = os.path.isabs(self.config_dir)
    self.suite: suite_lib.Suite | None = None
    self.cases: list[suite_lib.ScoredCase] = []
    self.data_command: list[str] | None = None
    self.failures: list[str] = []
    self.missing: list[str] = []  # runs not finished (--report_only)
    self._guard_checked = False
    self._train_failed: dict[tuple[str, int], str] = {}  # a needed run is tried once

  # --- data ---------------------------------------------------------------------

  def data_root(self) -> Path:
    if self.opts.data is not None:
      return self.opts.data.resolve()
    return self.out / "data" / f"{self.opts.suite}-{self.opts.preset}"

  def prepare_data(self) -> suite_lib.Suite:
    """The suite (generated first when ``--data`` is not given and it is missing)."""
    root = self.data_root()
    self.data_command = None
    if self.opts.data is None:
      self.data_command = [sys.executable, "-m", "midog_jax.data.synthetic", "--suite",
                           self.opts.suite, "--preset", self.opts.preset, "--out", str(root)]
      if not (root / suite_lib.SUITE_FILE).exists():
        if self.opts.dry_run:
          raise DataError(root, "no suite here yet; a dry run does not generate it: run "
                          + display(self.data_command, self.cwd))
        self.log(f"generating the {self.opts.suite} suite ({self.opts.preset}) in {root} ...")
        logf = self.out / "logs" / "generate.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        with open(logf, "w", encoding="utf-8") as f:
          import subprocess  # pylint: disable=g-import-not-at-top
          code = subprocess.run(self.data_command, cwd=self.cwd, stdout=f,
                                stderr=subprocess.STDOUT, check=False).returncode
        if code != 0:
          raise DataError(logf, f"generating the suite failed (exit {code})")
    suite = suite_lib.load_suite(root)
    if suite.name != self.opts.suite:
      raise DataError(root / suite_lib.SUITE_FILE, f"this is the {suite.name!r} suite, "
                      f"--suite asks for {self.opts.suite!r}")
    suite_lib.check_protocol(suite, self.opts.protocol)
    self.suite = suite
    self.cases = suite_lib.load_test_cases(suite, self.opts.protocol)
    return suite

  # --- runs -----------------------------------------------------------------------

  def key(self) -> dict:
    """What a saved run depends on besides its method and seed: a rerun into the
    same folder with other settings must not reuse it."""
    s = self.suite
    key = dict(data=str(s.root), suite=s.name, preset=s.preset,
               generator_version=s.generator_version, protocol=self.opts.protocol,
               budget=self.opts.budget)
    if self.opts.steps:  # only when set: runs saved without it stay valid
      key["steps"] = self.opts.steps
    return key

  def _check_key(self, path: Path) -> dict:
    """The saved JSON at ``path``, refused when made with other settings."""
    saved = read_json(path, "saved run file")
    old = saved.get("key") if isinstance(saved, dict) else None
    if old is not None and old != self.key():
      diff = ", ".join(f"{k} {old.get(k)!r} (now {v!r})" for k, v in self.key().items()
                       if old.get(k) != v)
      raise DataError(path, f"made with other settings: {diff}; use another --out")
    return saved

  def context(self, method: str, seed: int) -> methods.Context:
    return methods.Context(suite=self.suite, protocol=self.opts.protocol,
                           budget=self.opts.budget, seed=seed, out=self.out,
                           config_dir=self.config_dir, method=method,
                           cases=tuple(self.cases), steps=self.opts.steps)

  def runs(self) -> list[tuple[str, int]]:
    """(method, seed) of every requested run, seed by seed (one run if unseeded)."""
    out = []
    for seed in range(self.opts.seeds):
      for name in self.opts.methods:
        if methods.get(name).seeded or seed == 0:
          out.append((name, seed))
    return out

  def _run_command(self, cmd: methods.Command, ctx: methods.Context, index: int) -> float:
    rd = ctx.run_dir(ctx.method)
    program = cmd.argv[2] if len(cmd.argv) > 2 and cmd.argv[1] == "-m" else "command"
    logf = rd / "logs" / f"{index:02d}-{cmd.stage}-{program}.log"
    if not self._guard_checked:
      guard.self_check(self.suite.test_dir, self.out)
      self._guard_checked = True
    t0 = time.perf_counter()
    with signals.StopRequest(f"the current command ({program})") as stop:
      code = guard.run_guarded(
          cmd.argv, deny=[self.suite.test_dir], log=rd / "guard.log", output=logf,
          cwd=self.cwd, images_only=cmd.images_only, stop=stop,
          sys_path=[str(Path(self.config_dir).parent)] if self.installed else ())
    # A training stopped by a signal saves a checkpoint and exits 0 (the
    # programs' contract), saying so in one line: that is not a finished run.
    if stop.requested or (code == 0 and _stopped(logf)):
      raise Stopped(stop.signal_name or "SIGTERM", (
          f"stopped during {ctx.method} seed {ctx.seed} ({program}; log {logf}): what "
          "finished is saved; run the same command again to resume"))
    if code != 0:
      tail = _last_line(logf)
      raise RunFailed(f"{logf}: {display(cmd.argv[:3], self.cwd)} ... exited {code}"
                      + (f": {tail}" if tail else ""))
    return time.perf_counter() - t0

  def train(self, method: str, seed: int, dry: list[str] | None = None) -> None:
    """Trains the run (and what it needs) unless ``trained.json`` says it is done."""
    m = methods.get(method)
    for need in m.needs:
      self.train(need, seed, dry)
    if (method, seed) in self._train_failed:
      raise RunFailed(f"needs {method} seed {seed}, whose training failed: "
                      f"{self._train_failed[(method, seed)]}")
    ctx = self.context(method, seed)
    stamp = ctx.run_dir(method) / TRAINED
    commands = m.train(ctx)
    if stamp.exists():
      self._check_key(stamp)
    if not commands or stamp.exists():
      if dry is not None and commands:
        dry.append(f"  train {method} seed {seed}: done ({stamp})")
      return
    if dry is not None:
      dry.extend(f"  train {method} seed {seed}: {display(c.argv, self.cwd)}" for c in commands)
      return
    self.log(f"{method} seed {seed}: training ({len(commands)} command(s); logs in "
             f"{ctx.run_dir(method) / 'logs'})")
    try:
      seconds = sum(self._run_command(c, ctx, i) for i, c in enumerate(commands))
    except (RunFailed, guard.GuardError) as e:
      self._train_failed[(method, seed)] = str(e)
      raise
    write_json_atomic(dict(method=method, seed=seed, seconds=seconds, key=self.key(),
                           commands=[display(c.argv, self.cwd) for c in commands]), stamp)

  def run(self, method: str, seed: int) -> dict:
    """One run end to end (or its saved result); returns ``result.json``'s content."""
    m = methods.get(method)
    ctx = self.context(method, seed)
    rd = ctx.run_dir(method)
    if (rd / RESULT).exists():
      self.log(f"{method} seed {seed}: done earlier ({rd / RESULT})")
      return self._check_key(rd / RESULT)
    t0 = time.perf_counter()
    self.train(method, seed)
    predict = m.predict(ctx)
    for i, c in enumerate(predict):
      self._run_command(c, ctx, 50 + i)
    result = dict(method=method, seed=seed, kind=m.kind, key=self.key(),
                  predict_commands=[display(c.argv, self.cwd) for c in predict],
                  seconds=time.perf_counter() - t0)
    if m.kind in (methods.DETECTOR, methods.BASELINE):
      folder, threshold = m.operating(ctx)
      result["threshold"] = float(threshold)
      result["detections"] = read_detections(rd / "preds", self.cases, mitotic_only=False)
      if folder != rd / "preds":
        result["operating"] = read_detections(folder, self.cases, mitotic_only=True)
    elif m.kind == methods.IMAGE_LEVEL:
      result["fields"] = read_json(rd / "preds" / "fields.json", "field scores")
    write_json_atomic(result, rd / RESULT)
    self.log(f"{method} seed {seed}: done in {result['seconds']:.0f} s")
    return result

  def dry_run(self) -> list[str]:
    """The commands a real run would execute now (nothing is run)."""
    lines = []
    for method, seed in self.runs():
      rd = self.context(method, seed).run_dir(method)
      if (rd / RESULT).exists():
        self._check_key(rd / RESULT)
        lines.append(f"skip {method} seed {seed}: done ({rd / RESULT})")
        continue
      lines.append(f"run {method} seed {seed}:")
      self.train(method, seed, dry=lines)
      m = methods.get(method)
      trained = all((self.context(n, seed).run_dir(n) / TRAINED).exists()
                    or not methods.get(n).train(self.context(n, seed))
                    for n in methods.with_needs([method]))
      if trained:
        lines.extend(f"  predict {method} seed {seed}: {display(c.argv, self.cwd)}"
                     for c in m.predict(self.context(method, seed)))
      else:
        lines.append(f"  predict {method} seed {seed}: (its commands are built after "
                     "training, from the chosen weights and threshold)")
    return lines

  def run_all(self) -> dict[str, list[dict]]:
    """Every run (failures recorded, the others go on); results by method."""
    results: dict[str, list[dict]] = {m: [] for m in self.opts.methods}
    todo = self.runs()
    if self.opts.report_only:
      for method, seed in todo:
        path = self.context(method, seed).run_dir(method) / RESULT
        if path.exists():
          results[method].append(self._check_key(path))
        else:
          self.missing.append(f"{method} seed {seed}")
      return results
    for k, (method, seed) in enumerate(todo):
      self.log(f"[{k + 1}/{len(todo)}] {method} seed {seed}")
      try:
        results[method].append(self.run(method, seed))
      except (RunFailed, guard.GuardError, DataError) as e:
        self.failures.append(f"{method} seed {seed}: {e}")
        self.log(f"error: {method} seed {seed}: {e}")
    return results

  def trained_commands(self) -> dict[str, list[str]]:
    """Training commands of every trained run (needs included), by run."""
    out = {}
    for seed in range(self.opts.seeds):
      for name in methods.with_needs(list(self.opts.methods)):
        stamp = self.context(name, seed).run_dir(name) / TRAINED
        if stamp.exists():
          out[f"{name} seed {seed}"] = read_json(stamp, "training stamp")["commands"]
    return out


def _stopped(log: Path) -> bool:
  """Whether a program's log ends with its "stopped ... on SIGTERM/SIGINT" line."""
  line = _last_line(log)
  return line.startswith("stopped ") and (" on SIGTERM" in line or " on SIGINT" in line)


def _last_line(path: Path) -> str:
  """The last non-empty line of a log (a program's one-line error), shortened."""
  try:
    lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
  except OSError:
    return ""
  return lines[-1][:300] if lines else ""


def read_detections(folder: Path, cases: Sequence[suite_lib.ScoredCase],
                    mitotic_only: bool) -> dict[str, list]:
  """Per test image ``[[x_mm, y_mm, score, mitotic], ...]`` from ``<stem>.json`` files."""
  out = {}
  for c in cases:
    f = folder / f"{c.stem}.json"
    if not f.exists():
      raise DataError(f, "no prediction file for this test image (see the run's logs)")
    xy, probs, names = eval_lib.from_challenge_json(f)
    mit = np.array([n == CHALLENGE_NAMES[MITOSIS] for n in names], bool).reshape(-1)
    keep = mit if mitotic_only else np.ones(len(mit), bool)
    # Unrounded: the matching has no slack at 7.5 um, so neither may the copy.
    out[c.stem] = [[float(x), float(y), float(p), int(m)]
                   for (x, y), p, m in zip(xy[keep], probs[keep], mit[keep])]
  return out


def detection_arrays(result: dict, cases: Sequence[suite_lib.ScoredCase]
                     ) -> tuple[list[tuple], list[tuple], float]:
  """(ranking, operating points, threshold) of a result, per case as (pred_mm, scores).

  The ranking is every written point (AP, FROC); the operating points are the
  mitotic ones that F1 counts at the threshold (the ensemble's own output).
  """
  def arr(rows, mitotic):
    a = np.asarray(rows, np.float64).reshape(-1, 4)
    if mitotic:
      a = a[a[:, 3] == 1]
    return a[:, :2], a[:, 2]

  ranking = [arr(result["detections"][c.stem], False) for c in cases]
  source = result.get("operating") or result["detections"]
  operating = [arr(source[c.stem], True) for c in cases]
  return ranking, operating, float(result["threshold"])
