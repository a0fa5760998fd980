"""Image-level scores: F1, precision, recall, ROC AUC, confusion, curves, outputs.

Labels are 0/1, scores probabilities; a prediction is positive when its score
is at least the threshold (``>=``, as the detectors' threshold sweep). ROC AUC
is the Mann-Whitney statistic: the probability that a random positive
outscores a random negative, ties counting one half (equal to the area under
the ROC curve with ties joined by straight lines). Undefined values (AUC of
a set with one class) are ``None``, so they stay valid JSON.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from midog_jax.fileio import atomic_output, atomic_path, write_json_atomic
from midog_jax.metrics import best_f1_threshold


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
  """tp, fp, fn, tn of 0/1 labels and 0/1 predictions."""
  y, p = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
  return dict(tp=int((y & p).sum()), fp=int((~y & p).sum()), fn=int((y & ~p).sum()),
              tn=int((~y & ~p).sum()))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
  """Area under the ROC curve (Mann-Whitney U with average ranks); None for one class."""
  y = np.asarray(labels).astype(bool)
  s = np.asarray(scores, np.float64)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if not n_pos or not n_neg:
    return None
  order = np.argsort(s, kind="mergesort")
  ranks = np.empty(len(s), np.float64)
  sorted_s = s[order]
  # Average ranks (1-based) within runs of equal scores.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
  ends = np.r_[starts[1:], len(s)]
  for a, b in zip(starts, ends):
    ranks[order[a:b]] = (a + 1 + b) / 2.0
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(false-positive rate, true-positive rate) from (0, 0) to (1, 1), one point per
  distinct score taken as the threshold (highest first)."""
  y = np.asarray(labels).astype(bool)
  s = np.asarray(scores, np.float64)
  thresholds = np.unique(s)[::-1]
  tpr = [0.0] + [float((y & (s >= t)).sum()) / max(y.sum(), 1) for t in thresholds]
  fpr = [0.0] + [float((~y & (s >= t)).sum()) / max((~y).sum(), 1) for t in thresholds]
  return np.asarray(fpr), np.asarray(tpr)


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(recall, precision), one point per distinct score taken as the threshold."""
  y = np.asarray(labels).astype(bool)
  s = np.asarray(scores, np.float64)
  rec, prec = [], []
  for t in np.unique(s)[::-1]:
    c = confusion(y, s >= t)
    rec.append(c["tp"] / max(c["tp"] + c["fn"], 1))
    prec.append(c["tp"] / max(c["tp"] + c["fp"], 1))
  return np.asarray(rec), np.asarray(prec)


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
  """F1, precision, recall, accuracy, confusion counts and ROC AUC at ``threshold``."""
  y = np.asarray(labels).astype(int)
  c = confusion(y, np.asarray(scores) >= threshold)
  prec = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
  rec = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
  f1 = 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) if c["tp"] + c["fp"] + c["fn"] else 0.0
  n = len(y)
  return dict(f1=float(f1), precision=float(prec), recall=float(rec),
              accuracy=float((c["tp"] + c["tn"]) / n) if n else 0.0,
              auc=roc_auc(y, scores), n=n, positives=int(y.sum()), threshold=float(threshold),
              **c)


def best_threshold(labels: np.ndarray, scores: np.ndarray, default: float = 0.5) -> float:
  """The threshold with the highest F1 among the distinct scores (``default`` if none).

  Ties go to the highest such threshold (the fewest positive calls);
  ``metrics.best_f1_threshold`` does the sweep.
  """
  if not len(scores) or not np.asarray(labels).astype(bool).any():
    return float(default)
  return best_f1_threshold(np.asarray(labels).astype(int), scores)["threshold"]


def evaluate(labels: np.ndarray, scores: np.ndarray, domains: Sequence[str],
             threshold: float) -> dict:
  """:func:`binary_metrics` of all items, plus ``per_domain``."""
  labels, scores = np.asarray(labels), np.asarray(scores)
  domains = np.asarray(list(domains), dtype=object)
  out = binary_metrics(labels, scores, threshold)
  out["per_domain"] = {str(d): binary_metrics(labels[domains == d], scores[domains == d],
                                              threshold)
                       for d in sorted(set(domains.tolist()))}
  return out


# ----------------------------------------------------------------------------
# Outputs.


def curve_png(x: np.ndarray, y: np.ndarray, path: str | Path, title: str, xlabel: str,
              ylabel: str, diagonal: bool = False, size: int = 360) -> Path:
  """A line plot on the unit square as PNG (Pillow; no plotting library needed)."""
  pad_l, pad_b, pad_t, pad_r = 46, 40, 44, 14
  w, h = size + pad_l + pad_r, size + pad_t + pad_b
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)

  def px(u: float, v: float) -> tuple[float, float]:
    return pad_l + u * size, pad_t + (1.0 - v) * size

  for k in range(6):  # grid and ticks every 0.2
    t = k / 5
    d.line([px(t, 0), px(t, 1)], fill=(230, 230, 230))
    d.line([px(0, t), px(1, t)], fill=(230, 230, 230))
    d.text((px(t, 0)[0] - 8, pad_t + size + 4), f"{t:.1f}", fill="black")
    d.text((4, px(0, t)[1] - 6), f"{t:.1f}", fill="black")
  d.rectangle([px(0, 1), px(1, 0)], outline="black")
  if diagonal:
    d.line([px(0, 0), px(1, 1)], fill=(160, 160, 160))
  pts = [px(float(u), float(v)) for u, v in zip(x, y)]
  if len(pts) > 1:
    d.line(pts, fill=(200, 30, 30), width=2)
  for p in pts if len(pts) < 60 else []:
    d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(200, 30, 30))
  d.text((pad_l, 4), title, fill="black")
  d.text((pad_l + size // 2 - 3 * len(xlabel), h - 16), xlabel, fill="black")
  d.text((4, pad_t - 18), ylabel, fill="black")
  path = Path(path)
  with atomic_path(path) as tmp:
    img.save(tmp, format="PNG")
  return path


def write_probabilities(path: str | Path, names: Sequence[str], domains: Sequence[str],
                        labels: Sequence[int], scores: Sequence[float],
                        threshold: float) -> Path:
  """CSV ``name,domain,label,probability,predicted`` (one row per image)."""
  with atomic_output(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["name", "domain", "label", "probability", "predicted"])
    for n, d, y, s in zip(names, domains, labels, scores):
      w.writerow([n, d, int(y), f"{float(s):.6f}", int(float(s) >= threshold)])
  return Path(path)


def write_set(out: str | Path, names: Sequence[str], domains: Sequence[str],
              labels: np.ndarray, scores: np.ndarray, threshold: float,
              title: str = "") -> dict:
  """``metrics.json``, ``probabilities.csv``, ``roc.png`` and ``pr.png`` in ``out``."""
  out = Path(out)
  result = evaluate(labels, scores, domains, threshold)
  write_probabilities(out / "probabilities.csv", names, domains, labels, scores, threshold)
  fpr, tpr = roc_curve(labels, scores)
  auc = result["auc"]
  curve_png(fpr, tpr, out / "roc.png",
            f"ROC {title} AUC {auc:.3f}" if auc is not None else f"ROC {title}",
            "false positive rate", "true positive rate", diagonal=True)
  rec, prec = pr_curve(labels, scores)
  curve_png(rec, prec, out / "pr.png", f"precision-recall {title}", "recall", "precision")
  write_json_atomic(result, out / "metrics.json")
  return result


def format_table(results: dict[str, dict]) -> str:
  """Per-set, per-method, per-domain F1 / AUC table (``results[set][method]``)."""
  lines = [f"{'set':<16}{'method':<10}{'domain':<22}{'F1':>7}{'prec':>7}{'recall':>8}"
           f"{'AUC':>7}{'pos':>6}{'n':>6}"]
  for name, methods in results.items():
    for method, r in methods.items():
      for dom, m in [("all", r)] + sorted(r.get("per_domain", {}).items()):
        auc = "   n/a" if m["auc"] is None else f"{m['auc']:>6.3f}"
        lines.append(f"{name:<16}{method:<10}{dom:<22}{m['f1']:>7.3f}{m['precision']:>7.3f}"
                     f"{m['recall']:>8.3f} {auc}{m['positives']:>6}{m['n']:>6}")
  return "\n".join(lines)
