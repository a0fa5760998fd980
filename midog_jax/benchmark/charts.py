"""The leaderboard's PNG charts: per-domain F1 bars and precision-recall / FROC curves.

matplotlib is imported inside each function, with the Agg backend (files
only, no display): nothing else in the package needs it, and importing it
costs about a second.
"""

from __future__ import annotations

from pathlib import Path

from midog_jax.benchmark.suite import UNSEEN
from midog_jax.fileio import atomic_path


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def per_domain_png(board: dict, path: str | Path) -> Path:
  """Per-domain F1 bars, methods side by side (mean over seeds, std as error bars).

  Domains the training never saw are marked "(unseen)"; the human-agreement
  ceiling, when known, is a black tick per domain.
  """
  plt = _pyplot()
  domains = list(board["domains"])
  names = board["rankings"]["f1"]
  fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(domains) * max(1, len(names)) / 3), 4.2))
  width = 0.8 / max(1, len(names))
  for i, name in enumerate(names):
    rows = board["detection"][name]["summary"]["domain"]
    mean = [(rows.get(d, {}).get("f1") or {}).get("mean") or 0.0 for d in domains]
    std = [(rows.get(d, {}).get("f1") or {}).get("std") or 0.0 for d in domains]
    xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(domains))]
    ax.bar(xs, mean, width, yerr=std, capsize=2, label=name)
  human = board.get("human")
  if human:
    for k, d in enumerate(domains):
      v = (human["summary"]["domain"].get(d, {}).get("f1") or {}).get("mean")
      if v is not None:
        ax.hlines(v, k - 0.45, k + 0.45, colors="black", linewidth=1.5,
                  label="human agreement" if k == 0 else None)
  labels = [d + ("\n(unseen)" if board["domains"][d] == UNSEEN else "") for d in domains]
  ax.set_xticks(range(len(domains)), labels, fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("F1 (organisers' matching)")
  ax.set_title(f"{board['suite']['suite']}: F1 per domain (mean and std over seeds)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  return _save(fig, plt, path)


def curves_png(board: dict, curves: dict, path: str | Path) -> Path:
  """Precision-recall (left) and FROC (right) curves, one line per method and seed.

  FP rates on a log axis (the usual FROC plot; a candidate detector such as
  the blue-ratio baseline sits far right of the 1/8..8 range scored). Curves
  of one or two points (a method without scores) are drawn as markers; the
  human-agreement ceiling is a black star.
  """
  plt = _pyplot()
  fig, (pr_ax, froc_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  max_fp = 8.0
  for i, name in enumerate(board["rankings"]["f1"]):
    colour = cycle[i % len(cycle)]
    ap = board["detection"][name]["summary"]["all"]["ap"]["mean"]
    for k, run in enumerate(curves.get(name, [])):
      label = (f"{name} (AP {ap:.3f})" if ap is not None else name) if k == 0 else None
      pr, fr = run["pr"], run["froc"]
      marker = "o" if len(pr["recall"]) <= 2 else None
      if pr["recall"]:
        pr_ax.step(pr["recall"], pr["precision"], where="post", color=colour, alpha=0.8,
                   linewidth=1, marker=marker, label=label)
      if fr["fp"]:
        max_fp = max(max_fp, max(fr["fp"]))
        froc_ax.plot(fr["fp"], fr["sensitivity"], color=colour, alpha=0.8, linewidth=1,
                     marker="o" if len(fr["fp"]) <= 2 else None,
                     label=name if k == 0 else None)
  human = board.get("human")
  if human:
    s, n = human["summary"]["all"], board["test_cases"]["total"]
    pr_ax.plot([s["recall"]["mean"]], [s["precision"]["mean"]], "k*", markersize=10,
               label="human agreement")
    froc_ax.plot([max(s["fp"]["mean"] / n, 1 / 16)], [s["recall"]["mean"]], "k*",
                 markersize=10, label="human agreement")
  pr_ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
            title="precision-recall (COCO matching, all seeds)")
  froc_ax.set_xscale("log")
  froc_ax.set(xlim=(1 / 16, 1.2 * max_fp), ylim=(0, 1.02), xlabel="false positives per image",
              ylabel="sensitivity", title="FROC (organisers' matching, all seeds)")
  froc_ax.axvspan(1 / 8, 8, color="grey", alpha=0.08, label="1/8..8 FP per image")
  pr_ax.legend(fontsize=7)
  froc_ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)
  return Path(path)
