"""End to end: ``midog_jax.main`` with configs/image_level.py (rounds 1 and 2) and ``classify``."""

from __future__ import annotations

import csv

import pytest
from support import run_module

from midog_jax.fileio import read_json

pytestmark = pytest.mark.e2e


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_round1_trains_evaluates_caches_and_classifies(tiny_dataset, tmp_path):
  cache = tmp_path / "cache"
  args = ["--config=configs/image_level.py:tiny", f"--config.data.root={tiny_dataset}",
          f"--config.image_level.cache_dir={cache}"]
  r = run_module("midog_jax.main", f"--workdir={tmp_path / 'w1'}", *args)
  assert "extracting features" in r.stdout and "heldout_domain" in r.stdout
  w = tmp_path / "w1"
  summary = read_json(w / "eval" / "summary.json")
  held = summary["results"]["heldout_domain"]
  assert set(held) == {"dense", "forest", "ensemble"}
  for head in held:
    assert held[head]["n"] > 0 and "Leica GT450" in held[head]["per_domain"]
    for name in ("metrics.json", "probabilities.csv", "roc.png", "pr.png"):
      assert (w / "eval" / "heldout_domain" / head / name).exists()
  model = read_json(w / "image_level" / "model.json")
  assert model["balance"]["train"]["all"]["positive"] > 0
  # A second run reads every field's features from the cache.
  r2 = run_module("midog_jax.main", f"--workdir={tmp_path / 'w2'}", *args)
  assert "extracting features" not in r2.stdout
  assert read_json(tmp_path / "w2" / "eval" / "summary.json")["results"] == summary["results"]

  out = tmp_path / "preds.csv"
  r = run_module("midog_jax.classify", "--workdir", w, "--images", tiny_dataset,
                 tmp_path / "missing.tiff", "--out", out, check=False)
  assert r.returncode == 1 and "missing.tiff" in r.stderr
  rows = _rows(out)
  assert len(rows) == 8 and all(r["path"].endswith(".tiff") for r in rows)
  t = model["thresholds"]["ensemble"]
  assert all(int(r["label"]) == int(float(r["probability"]) >= t) for r in rows)
  r = run_module("midog_jax.classify", "--workdir", w, "--images", tiny_dataset / "001.tiff",
                 "--out", out, "--head", "forest", "--threshold", "0")
  assert _rows(out)[0]["label"] == "1"


def test_round2_two_stages_through_the_shared_loop(tiny_dataset, tmp_path):
  common = [f"--config.data.root={tiny_dataset}", "--config.total_steps=1",
            "--config.eval_every=1", "--config.checkpoint_every=1"]
  a, b = tmp_path / "a", tmp_path / "b"
  run_module("midog_jax.main", "--config=configs/image_level.py:round=2,stage=a,tiny",
             f"--workdir={a}", *common)
  assert (a / "checkpoints" / "latest").is_dir()
  r = run_module("midog_jax.main", "--config=configs/image_level.py:round=2,stage=b,tiny",
                 f"--workdir={b}", f"--config.init_from={a}", *common)
  assert "init_from" in r.stdout
  got = read_json(b / "eval" / "summary.json")["results"]["heldout_domain"]
  assert got["n"] > 0 and got["auc"] is not None
  assert (b / "eval" / "heldout_domain" / "roc.png").exists()
  out = tmp_path / "p.csv"
  run_module("midog_jax.classify", "--workdir", b, "--images", tiny_dataset, "--out", out)
  assert len(_rows(out)) == 8
