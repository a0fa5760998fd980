"""Ensemble by agreement (Lafarge & Koelzer, MIDOG 2022): ``ensemble.combine`` and the multi-workdir CLI.

The end-to-end case trains two tiny RetinaNet workdirs (3 steps, different
seeds) through ``python -m midog_jax.main`` and runs ``python -m
midog_jax.predict`` with both.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from midog_jax import ensemble, export, predict
from support import REPO, cpu_env
from midog_jax.detections import CHALLENGE_NAMES, Detections
from midog_jax.data import slides as slides_lib

# One worker for the module: its tests share a trained workdir fixture.
pytestmark = pytest.mark.xdist_group("ensemble")


def _dets(xy, p, classes=None):
  return Detections(np.asarray(xy, np.float32), np.asarray(p, np.float32), classes)


def test_agreement_keeps_matched_points_at_their_mean():
  a = _dets([[100, 100], [200, 200], [300, 50]], [0.9, 0.8, 0.6])
  b = _dets([[104, 103], [260, 200], [301, 50]], [0.7, 0.9, 0.4])
  out = ensemble.combine([a, b], radius_px=30.0)
  # (200, 200) has nothing of b within 30 px: dropped. Order: a's scores.
  np.testing.assert_allclose(out.xy, [[102, 101.5], [300.5, 50]])
  np.testing.assert_allclose(out.scores, [0.8, 0.5])
  assert list(out.classes) == [1, 1]
  # Agreement is symmetric in which points survive (here), not in order.
  back = ensemble.combine([b, a], radius_px=30.0)
  np.testing.assert_allclose(back.xy, [[102, 101.5], [300.5, 50]])


def test_radius_is_inclusive_and_sharp():
  a = _dets([[100, 100]], [0.6])
  on = _dets([[118, 124]], [0.2])  # 3-4-5: exactly 30 px away
  off = _dets([[118, 124.05]], [0.2])
  assert len(ensemble.combine([a, on], radius_px=30.0)) == 1
  assert len(ensemble.combine([a, off], radius_px=30.0)) == 0
  assert len(ensemble.combine([a, off], radius_px=30.1)) == 1


def test_one_point_vouches_for_one_detection_and_every_member_must_agree():
  a = _dets([[100, 100], [110, 100]], [0.5, 0.9])
  b = _dets([[105, 100]], [0.7])
  out = ensemble.combine([a, b], radius_px=30.0)
  # Both of a's points are near b's one; the higher-scoring one claims it.
  np.testing.assert_allclose(out.xy, [[107.5, 100]])
  np.testing.assert_allclose(out.scores, [0.8])
  c = _dets([[400, 400]], [0.9])
  assert len(ensemble.combine([a, b, c], radius_px=30.0)) == 0
  c = _dets([[100, 104]], [0.3])
  out = ensemble.combine([a, b, c], radius_px=30.0)
  np.testing.assert_allclose(out.scores, [(0.9 + 0.7 + 0.3) / 3], rtol=1e-6)
  np.testing.assert_allclose(out.xy, [[(110 + 105 + 100) / 3, 104 / 3 + 200 / 3]])


def test_classes_match_only_their_own_class():
  a = _dets([[100, 100], [300, 300]], [0.9, 0.8], [1, 2])
  b = _dets([[101, 100], [301, 300]], [0.9, 0.8], [2, 2])
  out = ensemble.combine([a, b], radius_px=30.0)
  assert list(out.classes) == [2]
  np.testing.assert_allclose(out.xy, [[300.5, 300]])


def test_single_member_and_bad_calls():
  a = _dets([[1, 2]], [0.5])
  assert ensemble.combine([a]) is a
  assert ensemble.combine([a], radius_px=30.0) is a
  empty = _dets(np.zeros((0, 2)), [])
  assert len(ensemble.combine([a, empty], radius_px=30.0)) == 0
  assert len(ensemble.combine([empty, a], radius_px=30.0)) == 0
  with pytest.raises(ValueError, match="radius"):
    ensemble.combine([a, a])
  with pytest.raises(ValueError, match="at least one"):
    ensemble.combine([])


# ----------------------------------------------------------------------------
# End to end.


# Session scope: trained once per worker even when other modules' tests run
# in between (a module fixture is torn down and rebuilt then).
@pytest.fixture(scope="session")
def workdirs(tiny_dataset, tmp_path_factory) -> list[Path]:
  """Two tiny RetinaNets trained for 3 steps with different seeds (in parallel)."""
  root = tmp_path_factory.mktemp("ensemble")
  runs = []
  for seed in (0, 1):
    w = root / f"seed{seed}"
    cmd = [sys.executable, "-m", "midog_jax.main", "--config=configs/retina.py:tiny",
           f"--workdir={w}", f"--config.data.root={tiny_dataset}", f"--config.seed={seed}",
           "--config.total_steps=3", "--config.checkpoint_every=3",
           "--config.eval_every=1000"]
    runs.append((w, subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)))
  for w, proc in runs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"training failed:\n{err[-4000:]}"
  return [w for w, _ in runs]


def _read_csv(path: Path) -> Detections:
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  names = {v: k for k, v in CHALLENGE_NAMES.items()}
  return Detections([[float(r["x_px"]), float(r["y_px"])] for r in rows],
                           [float(r["probability"]) for r in rows],
                           [names[r["name"]] for r in rows])


@pytest.mark.e2e
def test_cli_ensemble_agrees_with_each_member(workdirs, tiny_dataset, tmp_path):
  image = tiny_dataset / "001.tiff"
  spacing = slides_lib.Slide(image).spacing_um
  radius = 7.5 / spacing
  # The members on their own, threshold 0 (every candidate, so they have
  # plenty to agree and disagree on).
  with slides_lib.Slide(image) as slide:
    singles = predict.detect_image([predict.load_predictor(w, 0.0) for w in workdirs],
                                   slide)
  assert all(len(s) > 0 for s in singles)
  out = tmp_path / "ensemble"
  cmd = [sys.executable, "-m", "midog_jax.predict", "--workdir", str(workdirs[0]),
         "--workdir", str(workdirs[1]), "--images", str(image), "--out", str(out),
         "--threshold", "0", "--formats", "json,csv"]
  r = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip().splitlines()[-1].startswith("done: 1 of 1 images written")
  obj = json.loads((out / "001.json").read_text())
  assert obj["type"] == "Multiple points" and obj["version"] == {"major": 1, "minor": 0}
  ens = _read_csv(out / "001.csv")
  mm = np.asarray([p["point"] for p in obj["points"]], np.float64).reshape(-1, 3)
  np.testing.assert_allclose(mm[:, :2], ens.xy * spacing / 1000.0, rtol=1e-6)
  assert all(p["point"][2] == 0 and 0 <= p["probability"] <= 1 for p in obj["points"])

  assert 0 < len(ens) <= min(len(s) for s in singles)
  for s in singles:
    d = np.sqrt(((ens.xy[:, None] - s.xy[None]) ** 2).sum(-1))
    assert np.all(d.min(1) <= radius + 1e-3)
  # Exactly the agreement of the members' own outputs.
  want = ensemble.combine(singles, radius_px=radius)
  np.testing.assert_allclose(ens.xy, want.xy, atol=1e-3)
  np.testing.assert_allclose(ens.scores, want.scores, atol=1e-6)


def test_workdir_lists_and_comma_separated_values():
  assert predict._workdirs("a") == ["a"]
  assert predict._workdirs(Path("a")) == ["a"]
  assert predict._workdirs(["a,b", "c"]) == ["a", "b", "c"]
  assert predict._workdirs("a, b") == ["a", "b"]
  args = predict._parser().parse_args(["--workdir", "a", "--workdir", "b,c", "--images",
                                       "x.tif", "--out", "o"])
  assert predict._workdirs(args.workdir) == ["a", "b", "c"]
