"""Image-level metrics: ROC AUC by hand, confusion, F1-best threshold, curves, outputs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from midog_jax.fileio import read_json
from midog_jax.image_level import metrics as M


def test_roc_auc_hand_computed_example():
  # Positives 0.9, 0.6, 0.35; negatives 0.8, 0.35, 0.1. Pairs (pos > neg):
  # 0.9 beats all 3; 0.6 beats 0.35, 0.1 (2); 0.35 ties 0.35 (1/2) and beats
  # 0.1 (1): (3 + 2 + 1.5) / 9.
  y = [1, 0, 1, 1, 0, 0]
  s = [0.9, 0.8, 0.6, 0.35, 0.35, 0.1]
  assert M.roc_auc(y, s) == pytest.approx(6.5 / 9)
  assert M.roc_auc(y[::-1], s[::-1]) == pytest.approx(6.5 / 9)  # order-free
  assert M.roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
  assert M.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
  assert M.roc_auc([1, 0], [0.5, 0.5]) == 0.5
  assert M.roc_auc([1, 1], [0.2, 0.3]) is None


def test_roc_curve_area_matches_auc():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 200)
  s = np.round(rng.random(200) * 0.5 + 0.3 * y, 2)  # many ties
  fpr, tpr = M.roc_curve(y, s)
  assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
  assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(y, s))


def test_binary_metrics_and_confusion_by_hand():
  y = [1, 1, 1, 0, 0, 0, 0]
  s = [0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.6]
  m = M.binary_metrics(y, s, 0.6)  # >= 0.6: 0.9, 0.6 (tp), 0.7, 0.6 (fp)
  assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 2, 1, 2)
  assert m["precision"] == 0.5 and m["recall"] == pytest.approx(2 / 3)
  assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
  assert m["accuracy"] == pytest.approx(4 / 7)


def test_best_threshold_maximises_f1():
  y = [1, 1, 0, 1, 0, 0]
  s = [0.95, 0.8, 0.7, 0.6, 0.3, 0.1]
  t = M.best_threshold(y, s)
  assert t == 0.6  # all three positives, one false positive: F1 6/7
  assert M.binary_metrics(y, s, t)["f1"] == pytest.approx(6 / 7)
  assert M.best_threshold([0, 0], [0.2, 0.4]) == 0.5  # no positives: the default


def test_per_domain_and_outputs(tmp_path):
  y = np.array([1, 0, 1, 0])
  s = np.array([0.9, 0.2, 0.4, 0.6])
  r = M.write_set(tmp_path, ["a", "b", "c", "d"], ["X", "X", "Y", "Y"], y, s, 0.5, "t")
  assert r["per_domain"]["X"]["f1"] == 1.0 and r["per_domain"]["X"]["auc"] == 1.0
  assert r["per_domain"]["Y"]["f1"] == 0.0 and r["per_domain"]["Y"]["auc"] == 0.0
  assert read_json(tmp_path / "metrics.json")["per_domain"]["Y"]["fp"] == 1
  rows = list(csv.DictReader(open(tmp_path / "probabilities.csv")))
  assert [r["name"] for r in rows] == ["a", "b", "c", "d"]
  assert [int(r["predicted"]) for r in rows] == [1, 0, 0, 1]
  for name in ("roc.png", "pr.png"):
    img = np.asarray(Image.open(tmp_path / name))
    assert img.ndim == 3 and (img == [200, 30, 30]).all(-1).sum() > 50  # the curve is drawn
  assert "Y" in M.format_table({"val": {"dense": r}})
