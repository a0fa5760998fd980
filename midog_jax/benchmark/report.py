"""``leaderboard.md``, ``leaderboard.json`` and the two PNGs of a benchmark folder.

Everything shown is read from the leaderboard object
(:func:`leaderboard.build`): per method the mean, standard deviation and
min-max over seeds, the bootstrap 95 % interval over test cases, the held-out
versus unseen-domain rows, per-domain and per-ROI-type tables, the rankings by
F1 and by AP (they can disagree), the image-level table, and the commands
that reproduce every number.
"""

from __future__ import annotations

from pathlib import Path

from midog_jax.benchmark import charts
from midog_jax.benchmark.suite import GROUPS, HELD_OUT, UNSEEN
from midog_jax.fileio import atomic_output, write_json_atomic


def _num(x, digits: int = 3) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def _spread(s: dict | None, digits: int = 3) -> str:
  """``mean ± std (min-max)`` over seeds; the value alone for one run."""
  if not s or s.get("mean") is None:
    return "–"
  if s["n"] == 1:
    return _num(s["mean"], digits)
  return (f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} "
          f"({s['min']:.{digits}f}-{s['max']:.{digits}f})")


def _mean(s: dict | None) -> str:
  return "–" if not s or s.get("mean") is None else (
      f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["n"] > 1 else ""))


def _ci(ci) -> str:
  return "–" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _humans(board: dict) -> list[tuple[str, dict]]:
  """The human reference rows: rater vs rater, and one rater vs the consensus."""
  human = board.get("human")
  if not human:
    return []
  rows = [("human agreement (rater 1 vs rater 2)", human)]
  if human.get("vs_consensus"):
    rows.append(("one rater vs the consensus (mean of raters 1 and 2)",
                 human["vs_consensus"]))
  return rows


def _detection_table(board: dict) -> list[str]:
  det = board["detection"]
  ap_rank = {n: i + 1 for i, n in enumerate(board["rankings"]["ap"])}
  rows = []
  for label, h in _humans(board):
    s = h["summary"]["all"]
    rows.append(["–", "–", f"**{label}**", _num(s["f1"]["mean"]),
                 _ci(h["ci"]["f1"]), _num(s["precision"]["mean"]),
                 _num(s["recall"]["mean"]), "–", "–", "–", "–", "–"])
  for i, name in enumerate(board["rankings"]["f1"]):
    d = det[name]
    s = d["summary"]["all"]
    rows.append([str(i + 1), str(ap_rank[name]), f"`{name}`", _spread(s["f1"]), _ci(d["ci"]["f1"]),
                 _mean(s["precision"]), _mean(s["recall"]), _spread(s["ap"]),
                 _ci(d["ci"]["ap"]), _mean(s["froc_auc"]),
                 d.get("threshold_label") or _mean(d["threshold"]),
                 str(len(d["runs"]))])
  return _table(["F1 rank", "AP rank", "method", "F1 mean ± std (min-max)", "F1 95% CI",
                 "precision", "recall", "AP mean ± std (min-max)", "AP 95% CI",
                 "FROC AUC (area over 0-8 FP/image)", "threshold", "runs"], rows)


def _group_table(board: dict) -> list[str]:
  rows = []
  names = board["rankings"]["f1"]
  entries = _humans(board) + [(f"`{n}`", board["detection"][n]) for n in names]
  for label, d in entries:
    g = d["summary"]["group"]
    f1 = [g.get(k, {}).get("f1") for k in GROUPS]
    ap = [g.get(k, {}).get("ap") for k in GROUPS]
    drop = (f"{f1[0]['mean'] - f1[1]['mean']:+.3f}" if all(x and x["mean"] is not None
                                                         for x in f1) else "–")
    rows.append([label, _mean(f1[0]), _mean(f1[1]), drop, _mean(ap[0]), _mean(ap[1])])
  n = board["test_cases"]
  return _table(["method", f"F1 {HELD_OUT} (images: {n[HELD_OUT]})",
                 f"F1 {UNSEEN} (images: {n[UNSEEN]})", "F1 held-out minus unseen",
                 "AP held-out", "AP unseen"], rows)


def _keyed_table(board: dict, grouping: str, keys: list[str], metric: str,
                 label=lambda k: k) -> list[str]:
  names = board["rankings"]["f1"]
  entries = (_humans(board) if metric == "f1" else []) + [
      (f"`{n}`", board["detection"][n]) for n in names]
  rows = [[lab] + [_mean(d["summary"][grouping].get(k, {}).get(metric)) for k in keys]
          for lab, d in entries]
  return _table(["method"] + [label(k) for k in keys], rows)


def _image_level(board: dict) -> list[str]:
  il = board["image_level"]
  if not il:
    return []
  out = ["## Image-level classifiers (fields)", "",
         "The image-level classifier answers \"does this field hold a mitotic figure?\", not "
         "\"where\", so it has no points to match and no place on the detection table. Each "
         "test image is cut into the fields it was trained on; a field is positive when a "
         "mitotic figure lies inside it (fields with a figure cut by the border are left "
         "out, as in training); probabilities are thresholded at the value chosen on the "
         "validation fields.", ""]
  rows = []
  for name in board["rankings"]["image_level_f1"]:
    d = il[name]
    s, g = d["summary"]["all"], d["summary"]["group"]
    rows.append([f"`{name}`", _spread(s["f1"]), _mean(s["precision"]), _mean(s["recall"]),
                 _mean(s["auc"]), _mean(s["accuracy"]),
                 _mean(g.get(HELD_OUT, {}).get("f1")), _mean(g.get(UNSEEN, {}).get("f1")),
                 f"{int(s['n']['mean'] or 0)} ({int(s['positives']['mean'] or 0)} positive)",
                 str(len(d["runs"]))])
  return out + _table(["method", "field F1 mean ± std (min-max)", "precision", "recall",
                       "ROC AUC", "accuracy", "F1 held-out", "F1 unseen", "fields",
                       "runs"], rows)


def _commands(board: dict) -> list[str]:
  c = board["commands"]
  out = ["## Reproduce", "", "From the repository root. The whole benchmark (reruns skip "
         "finished runs):", "", "    " + c["benchmark"], ""]
  if c.get("data"):
    out += ["The data:", "", "    " + c["data"], ""]
  out += ["Each run (`--config.seed` is the seed; the training commands run under the "
          "test-folder guard, the prediction commands may read the test images only):", ""]
  for run, cmds in c["train"].items():
    out += [f"- {run}, training:", ""] + ["      " + x for x in cmds] + [""]
  for run, cmds in c["predict"].items():
    if cmds:
      out += [f"- {run}, prediction:", ""] + ["      " + x for x in cmds] + [""]
  return out


def _detection_sections(board: dict) -> list[str]:
  """The detection table, both rankings, held-out vs unseen, per domain, per ROI type."""
  if not (board["detection"] or board.get("human")):
    return []
  lines = ["## Detection, ranked by F1", ""] + _detection_table(board)
  if board["detection"]:
    lines += ["Ranked by AP: " + ", ".join(
        f"{i + 1}. `{m}` ({_num(board['detection'][m]['summary']['all']['ap']['mean'])})"
        for i, m in enumerate(board["rankings"]["ap"])), ""]
    if board["rankings"]["ap"] != board["rankings"]["f1"]:
      lines += ["The F1 and AP rankings disagree: F1 is one operating point chosen on "
                "validation images, AP the whole ranking of the detections.", ""]
  lines += ["## Held-out images of the training domains vs unseen domains", ""]
  lines += _group_table(board)
  domains = list(board["domains"])
  dlabel = lambda d: d + (" (unseen)" if board["domains"][d] == UNSEEN else "")
  lines += ["## F1 per domain (mean ± std over seeds)", ""]
  lines += _keyed_table(board, "domain", domains, "f1", dlabel)
  lines += ["## AP per domain", ""] + _keyed_table(board, "domain", domains, "ap", dlabel)
  rois = board["roi_types"]
  lines += ["## F1 per ROI type", ""] + _keyed_table(board, "roi_type", rois, "f1")
  lines += ["## AP per ROI type", ""] + _keyed_table(board, "roi_type", rois, "ap")
  if board["detection"]:
    lines += ["Charts: `per_domain.png` (F1 per domain), `curves.png` (precision-recall "
              "and FROC curves).", ""]
  return lines


def markdown(board: dict) -> str:
  """The leaderboard as markdown."""
  s, n = board["suite"], board["test_cases"]
  ha = s.get("human_agreement") or {}
  lines = [f"# Leaderboard: {s['suite']} suite ({s.get('preset') or '?'} preset), protocol "
           f"{board['protocol']}, budget {board['budget']}, {board['seeds']} seed(s)", "",
           f"Data `{board['data']}` (generator version {s.get('generator_version') or '?'}, "
           f"domains by {s['domain_key']}). Test set: {n['total']} images, {n[HELD_OUT]} "
           f"{HELD_OUT}, {n[UNSEEN]} of {UNSEEN} "
           f"({', '.join(d for d, g in board['domains'].items() if g == UNSEEN) or 'none'}). "
           f"Human agreement (rater 1 vs rater 2 F1): target {_num(ha.get('target'))}, "
           f"realised on the test set {_num(ha.get('f1'))}.", "",
           "F1, precision and recall: the organisers' matching (7.5 um, pooled over images) "
           "at each run's threshold chosen on its validation images; AP and FROC AUC: the "
           "MIDOG 2025 definitions (`midog_jax/curves.py`). Mean ± standard deviation "
           "(min-max) over seeds; 95% intervals: bootstrap over test images of the seed-mean "
           f"({board['n_boot']} resamples).", ""]
  lines += _detection_sections(board)
  lines += _image_level(board)
  lines += ["## Methods", ""]
  for group in (board["detection"], board["image_level"]):
    for name, d in group.items():
      lines.append(f"- `{name}`: {d['title']}. How: {d['note']}.")
  if board.get("human"):
    lines.append(f"- {board['human']['title']}; and each rater against the consensus (the "
                 "majority of two or three raters that every method is scored on): a model can "
                 "beat rater-vs-rater agreement because the consensus is less noisy than one "
                 "rater.")
  lines.append("")
  if board.get("failures"):
    lines += ["## Failed runs", ""] + [f"- {f}" for f in board["failures"]] + [""]
  if board.get("missing"):
    lines += ["## Runs not finished (not in the tables)", ""] + [
        f"- {m}" for m in board["missing"]] + [""]
  lines += _commands(board)
  return "\n".join(lines)


def write(out: str | Path, board: dict, curves: dict) -> list[Path]:
  """Writes the four files into ``out``; returns their paths."""
  out = Path(out)
  paths = [write_json_atomic(board, out / "leaderboard.json")]
  with atomic_output(out / "leaderboard.md", "w", encoding="utf-8") as f:
    f.write(markdown(board) + "\n")
  paths.append(out / "leaderboard.md")
  if board["detection"]:
    paths.append(charts.per_domain_png(board, out / "per_domain.png"))
    paths.append(charts.curves_png(board, curves, out / "curves.png"))
  return paths
