"""The leaderboard's content (``leaderboard.json``) from the runs' results.

Run results are what ``runner.Runner.run`` saves (``result.json``); the test
cases are the suite's scored cases. Everything in the markdown and the charts
is read from the object built here, so the JSON holds every number shown.
"""

from __future__ import annotations

from typing import Sequence

from midog_jax.benchmark import methods, scoring
from midog_jax.benchmark.runner import detection_arrays
from midog_jax.benchmark.suite import GROUPS, ScoredCase

DETECTION_KEYS = ("f1", "precision", "recall", "ap", "froc_auc", "froc_score", "tp", "fp", "fn")
FIELD_KEYS = ("f1", "precision", "recall", "accuracy", "auc", "n", "positives")


def _rank(rows: dict[str, dict], key: str) -> list[str]:
  """Method names by decreasing seed-mean ``key`` (methods without it last)."""
  def value(name):
    v = rows[name]["summary"]["all"][key]["mean"]
    return -v if v is not None else float("inf")
  return sorted(rows, key=lambda n: (value(n), n))


def _drop_curves(run: dict) -> dict:
  return {k: v for k, v in run.items() if k not in ("pr", "froc", "counts")}


def build(results: dict[str, Sequence[dict]], cases: Sequence[ScoredCase], *, meta: dict,
          n_boot: int = 1000) -> tuple[dict, dict]:
  """(leaderboard object, curves for the charts) from the runs' results.

  Args:
    results: method name -> its runs' ``result.json`` contents (one per seed).
    cases: the scored test cases, in the order the results refer to them.
    meta: suite, protocol, budget, seeds, commands ... copied into the object.
    n_boot: bootstrap resamples for the confidence intervals.

  Returns:
    The JSON-ready leaderboard and ``{method: [{"pr", "froc"} per seed]}``.
  """
  board = dict(meta)
  board["test_cases"] = dict(total=len(cases), **{g: sum(c.group == g for c in cases)
                                                  for g in GROUPS})
  board["domains"] = {d: next(c.group for c in cases if c.domain == d)
                      for d in sorted({c.domain for c in cases})}
  board["roi_types"] = sorted({c.roi_type for c in cases})
  detection, fields, curves_out, human = {}, {}, {}, None
  for name, runs in results.items():
    m = methods.get(name)
    info = dict(title=m.title, kind=m.kind, note=m.note, seeded=m.seeded,
                threshold_label=m.threshold_label,
                seeds=[r["seed"] for r in runs])
    if m.kind == methods.REFERENCE:
      scored = scoring.score_human(cases)
      if scored is not None:
        human = dict(info, summary=scoring.aggregate([scored], DETECTION_KEYS),
                     ci=dict(f1=scoring.f1_interval([scored], n_boot), ap=None))
        raters = scoring.score_raters_vs_consensus(cases)
        # Mean and spread over the two raters (not seeds).
        human["vs_consensus"] = dict(
            summary=scoring.aggregate(raters, DETECTION_KEYS),
            ci=dict(f1=scoring.f1_interval(raters, n_boot), ap=None))
      continue
    if not runs:
      continue
    if m.kind == methods.IMAGE_LEVEL:
      scored = [scoring.score_fields(cases, r["fields"]) for r in runs]
      fields[name] = dict(info, summary=scoring.aggregate(scored, FIELD_KEYS),
                          runs=[dict(seed=r["seed"], **s) for r, s in zip(runs, scored)])
      continue
    arrays = [detection_arrays(r, cases) for r in runs]
    scored = [scoring.score_detections(cases, rank, op, t) for rank, op, t in arrays]
    ranking = [[(c.truth_mm, p, s) for c, (p, s) in zip(cases, rank)] for rank, _, _ in arrays]
    detection[name] = dict(
        info, summary=scoring.aggregate(scored, DETECTION_KEYS),
        threshold=scoring.spread([s["threshold"] for s in scored]),
        ci=dict(f1=scoring.f1_interval(scored, n_boot), ap=scoring.ap_interval(ranking, n_boot)),
        runs=[dict(seed=r["seed"], **_drop_curves(s)) for r, s in zip(runs, scored)])
    curves_out[name] = [dict(seed=r["seed"], pr=s["pr"], froc=s["froc"])
                        for r, s in zip(runs, scored)]
  board["detection"] = detection
  board["human"] = human
  board["image_level"] = fields
  board["rankings"] = dict(f1=_rank(detection, "f1"), ap=_rank(detection, "ap"),
                           image_level_f1=_rank(fields, "f1"))
  return board, curves_out
