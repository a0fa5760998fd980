"""``python -m midog_jax.adapt``: a tiny kondo_da workdir adapted to held-out images."""

from __future__ import annotations

import json

import pytest
from support import run_module, train_workdir


def test_usage_and_workdir_errors(tmp_path):
  r = run_module("midog_jax.adapt", "--workdir", tmp_path / "none", "--images",
                 tmp_path / "x.tiff", "--out", tmp_path / "out", check=False)
  assert r.returncode == 1 and r.stderr.strip().startswith("error:")
  assert len(r.stderr.strip().splitlines()) == 1 and "workdir not found" in r.stderr
  r = run_module("midog_jax.adapt", "--workdir", tmp_path, "--images", "x.tiff",
                 "--out", tmp_path / "out", "--per", "slide", check=False)
  assert r.returncode == 2


@pytest.mark.e2e
def test_train_then_adapt_writes_challenge_json(tiny_dataset, tmp_path):
  work = train_workdir("configs/kondo_da.py:tiny", tiny_dataset, tmp_path / "work")
  summary = json.loads((work / "eval" / "summary.json").read_text())
  assert "heldout_domain" in summary["results"]
  metrics = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert any("val_candidate_f1" in m for m in metrics)  # both validation F1s logged

  target = tiny_dataset / "151.tiff"
  out = tmp_path / "out"
  r = run_module("midog_jax.adapt", "--workdir", work, "--images", target,
                 "--out", out, "--formats", "json,csv")
  assert "151: " in r.stdout and "adaptation" in r.stdout
  pred = json.loads((out / "151.json").read_text())
  assert pred["type"] == "Multiple points"
  assert all(p["name"] == "mitotic figure" and len(p["point"]) == 3 for p in pred["points"])
  assert (out / "151.csv").exists()
  # The source selection is stored once per model, and reused.
  stored = list((work / "adapt").glob("source-*.npz"))
  assert len(stored) == 1 and "source selection:" in r.stdout
  r2 = run_module("midog_jax.adapt", "--workdir", work, "--images", target,
                  tiny_dataset / "152.tiff", tmp_path / "missing.tiff",
                  "--out", tmp_path / "out2", "--per", "domain", check=False)
  assert r2.returncode == 1  # the missing image; the others are written
  assert "source selection:" not in r2.stdout
  assert (tmp_path / "out2" / "151.json").exists() and (tmp_path / "out2" / "152.json").exists()
  assert "missing.tiff" in r2.stderr and not (tmp_path / "out2" / "missing.json").exists()
