"""The predict CLI on a really trained (3-step) tiny workdir and real TIFF files.

One workdir (and a second seed for the ensemble case) is trained through
``python -m midog_jax.main``; the end-to-end cases run ``python -m
midog_jax.predict`` as a subprocess, the rest call ``predict_images`` /
``main`` in-process.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from midog_jax import checkpoint as ckpt_lib
from midog_jax import ensemble, predict
from midog_jax.data import slides as slides_lib
from midog_jax.detections import CHALLENGE_NAMES, Detections
from support import REPO, cpu_env, train_workdir



# Session scope: trained once per worker even when other modules' tests run
# in between (a module fixture is torn down and rebuilt then).
@pytest.fixture(scope="session")
def workdir(tiny_dataset, tmp_path_factory) -> Path:
  return train_workdir("configs/retina.py:tiny", tiny_dataset,
                       tmp_path_factory.mktemp("predict") / "work",
                       "--config.total_steps=3", "--config.checkpoint_every=3",
                       "--config.eval_every=1000")


@pytest.fixture(scope="session")
def second_workdir(tiny_dataset, tmp_path_factory) -> Path:
  """Another member for the ensemble: the same run with another seed."""
  return train_workdir("configs/retina.py:tiny", tiny_dataset,
                       tmp_path_factory.mktemp("predict") / "seed1",
                       "--config.seed=1", "--config.total_steps=3",
                       "--config.checkpoint_every=3", "--config.eval_every=1000")


@pytest.fixture(scope="session")
def images(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
  """Two good tiled JPEG TIFFs in a folder, and the first one again without tags."""
  d = tmp_path_factory.mktemp("images")
  good = d / "good"
  good.mkdir()
  for name in ("001.tiff", "051.tiff"):
    shutil.copy(tiny_dataset / name, good / name)
  # Same pixels, no resolution tags (tifffile writes unit NONE by default).
  notags = d / "notags.tif"
  tifffile.imwrite(notags, slides_lib.Slide(good / "001.tiff").read_all(),
                   photometric="rgb")
  # Same pixels, a 72 dpi placeholder (352.8 um/px) in the tags.
  dpi72 = d / "dpi72.tif"
  tifffile.imwrite(dpi72, slides_lib.Slide(good / "001.tiff").read_all(),
                   photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
  return dict(folder=good, first=good / "001.tiff", notags=notags, dpi72=dpi72)


def _points(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
  obj = json.loads(path.read_text())
  assert obj["type"] == "Multiple points"
  assert obj["version"] == {"major": 1, "minor": 0}
  pts = obj["points"]
  for p in pts:
    assert set(p) == {"point", "probability", "name"}
    assert len(p["point"]) == 3 and p["point"][2] == 0
    assert p["name"] in ("mitotic figure", "non-mitotic figure")
  xyz = np.asarray([p["point"] for p in pts], np.float64).reshape(-1, 3)
  return xyz[:, :2], np.asarray([p["probability"] for p in pts]), [p["name"] for p in pts]


def _csv_px(path: Path) -> np.ndarray:
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  return np.asarray([[float(r["x_px"]), float(r["y_px"])] for r in rows]).reshape(-1, 2)


@pytest.mark.e2e
def test_cli_writes_challenge_json_and_skips_bad_images(workdir, images, tmp_path):
  corrupt = tmp_path / "x.tiff"
  corrupt.write_bytes(np.random.default_rng(0).bytes(5000))
  # A cut copy of a good image: its tiles past the cut cannot be read.
  data = images["first"].read_bytes()
  cut = tmp_path / "cut.tiff"
  cut.write_bytes(data[:len(data) * 2 // 3])
  missing = tmp_path / "missing.tiff"
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "midog_jax.predict", f"--workdir={workdir}",
         "--images", str(images["folder"]), str(corrupt), str(missing), str(cut),
         "--out", str(out), "--threshold", "0", "--formats", "json,geojson,csv"]
  r = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert f"{corrupt}: not a readable TIFF" in r.stderr
  assert f"{missing}: image file not found" in r.stderr
  assert f"{cut}:" in r.stderr and "truncated" in r.stderr
  # Exactly the good images' outputs, nothing for the bad ones, no temp files.
  assert sorted(p.name for p in out.iterdir()) == [
      "001.csv", "001.geojson", "001.json", "051.csv", "051.geojson", "051.json"]
  lines = r.stdout.strip().splitlines()
  assert any(l.startswith("001: ") and "detections" in l for l in lines)
  assert any(l.startswith("051: ") and "detections" in l for l in lines)
  assert lines[-1].startswith("done: 2 of 5 images written")

  for stem in ("001", "051"):
    spacing = slides_lib.Slide(images["folder"] / f"{stem}.tiff").spacing_um
    assert spacing is not None and 0.2 < spacing < 0.3
    mm, probs, _ = _points(out / f"{stem}.json")
    assert len(mm) > 0  # threshold 0 keeps every candidate
    assert (probs >= 0).all() and (probs <= 1).all()
    px = _csv_px(out / f"{stem}.csv")
    np.testing.assert_allclose(mm, px * spacing / 1000.0, rtol=1e-12, atol=1e-12)
    geo = json.loads((out / f"{stem}.geojson").read_text())
    gxy = np.asarray([f["geometry"]["coordinates"] for f in geo["features"]])
    np.testing.assert_array_equal(gxy, px)
    w, h = slides_lib.Slide(images["folder"] / f"{stem}.tiff").shape[1::-1]
    assert (px >= 0).all() and (px[:, 0] < w).all() and (px[:, 1] < h).all()


@pytest.mark.e2e
def test_spacing_override_and_missing_tags(workdir, images, tmp_path, capsys):
  out = tmp_path / "tags"
  res = predict.predict_images(workdir, [images["first"], images["notags"]], out,
                               threshold=0.0, formats=("json", "csv"))
  err = capsys.readouterr().err
  assert res["001"]["n"] > 0
  assert "error" in res["notags"] and "no pixel spacing" in res["notags"]["error"]
  assert f"{images['notags']}: no pixel spacing" in err and "--spacing_um" in err
  assert not list(out.glob("notags*"))
  # A placeholder resolution is refused, not turned into millimetres 1,500x too large.
  placeholder = predict.predict_images(workdir, [images["dpi72"]], out, threshold=0.0)
  assert "352.8 um/px" in placeholder["dpi72"]["error"]
  assert "--spacing_um" in placeholder["dpi72"]["error"]
  assert not list(out.glob("dpi72*"))

  over = tmp_path / "override"
  res2 = predict.predict_images(workdir, [images["first"], images["notags"]], over,
                                threshold=0.0, spacing_um=0.5, formats=("json", "csv"))
  assert res2["notags"]["n"] == res2["001"]["n"] == res["001"]["n"]
  tag_mm, _, _ = _points(out / "001.json")
  px = _csv_px(out / "001.csv")
  for stem in ("001", "notags"):
    # Same pixels (the untagged copy holds the same image): same detections,
    # millimetres from the override, not from the tags.
    mm, _, _ = _points(over / f"{stem}.json")
    np.testing.assert_allclose(_csv_px(over / f"{stem}.csv"), px, atol=1e-3)
    np.testing.assert_allclose(mm, _csv_px(over / f"{stem}.csv") * 0.5 / 1000.0,
                               rtol=1e-12)
  spacing = slides_lib.Slide(images["first"]).spacing_um
  np.testing.assert_allclose(_points(over / "001.json")[0], tag_mm * 0.5 / spacing,
                             rtol=1e-9)


@pytest.mark.e2e
def test_default_threshold_comes_from_the_checkpoint(workdir, images, tmp_path):
  _, meta = ckpt_lib.load_for_inference(workdir, "best")
  t = float(meta["threshold"])
  res = predict.predict_images(workdir, [images["first"]], tmp_path / "a",
                               verbose=False)
  _, probs, _ = _points(tmp_path / "a" / "001.json")
  assert len(probs) == res["001"]["n"]
  assert (probs >= t).all()
  # The same as asking for that threshold explicitly.
  predict.predict_images(workdir, [images["first"]], tmp_path / "b", threshold=t,
                         verbose=False)
  assert (tmp_path / "a" / "001.json").read_text() == (tmp_path / "b" / "001.json").read_text()

  res = predict.predict_images(workdir, [images["first"]], tmp_path / "c",
                               threshold=1.0, verbose=False)  # no score of a 3-step model reaches 1
  assert res["001"]["n"] == 0
  assert _points(tmp_path / "c" / "001.json")[0].shape == (0, 2)


@pytest.mark.e2e
def test_workdir_errors_exit_1_and_usage_errors_exit_2(workdir, images, tmp_path, capsys):
  empty = tmp_path / "empty_workdir"
  empty.mkdir()
  shutil.copy(workdir / "config.json", empty / "config.json")
  args = ["--images", str(images["first"]), "--out", str(tmp_path / "o")]
  assert predict.main([f"--workdir={empty}", *args]) == 1  # a data error
  assert "no checkpoint found" in capsys.readouterr().err
  assert predict.main([f"--workdir={tmp_path / 'nope'}", *args]) == 1
  assert "workdir not found" in capsys.readouterr().err
  assert predict.main([f"--workdir={workdir}", *args, "--formats", "json,xml"]) == 2
  assert "formats" in capsys.readouterr().err
  assert predict.main([f"--workdir={workdir}", "--out", str(tmp_path / "o")]) == 2
  for bad in ("1.5", "-0.1", "nan"):  # a probability, or a usage error
    assert predict.main([f"--workdir={workdir}", *args, "--threshold", bad]) == 2
    assert "--threshold must be a probability in [0, 1]" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_config_json_rebuilds_the_method(workdir):
  config = predict.load_config(workdir)
  # JSON turned the tuples into lists; the model must still be the trained one.
  assert isinstance(config.model.levels, (list, tuple))
  p = predict.load_predictor(workdir, threshold=0.3, checkpoint="latest")
  assert p.threshold == 0.3 and p.tiler.tile_cfg.tile_size == config.eval.tile_size
  assert p.tiler.tile_cfg.score_thresh == min(config.eval.score_thresh, 0.3)


def _read_csv(path: Path) -> Detections:
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  names = {v: k for k, v in CHALLENGE_NAMES.items()}
  return Detections([[float(r["x_px"]), float(r["y_px"])] for r in rows],
                           [float(r["probability"]) for r in rows],
                           [names[r["name"]] for r in rows])


@pytest.mark.e2e
def test_cli_ensemble_agrees_with_each_member(workdir, second_workdir, tiny_dataset,
                                              tmp_path):
  """Several --workdir: the agreement (ensemble.combine) of the members' outputs."""
  workdirs = [workdir, second_workdir]
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


@pytest.mark.e2e
def test_tta_flag_runs_the_eight_views(workdir, images, tmp_path, capsys):
  # The RetinaNet workdir: --tta averages the eight D4 views; --exact_rotation
  # is for the P4 method only (a usage error here).
  assert predict.main([f"--workdir={workdir}", "--images", str(images["first"]),
                       "--out", str(tmp_path / "t"), "--threshold", "0", "--tta"]) == 0
  predict.predict_images(workdir, [images["first"]], tmp_path / "p", threshold=0.0,
                         verbose=False)
  tta_mm, tta_p, _ = _points(tmp_path / "t" / "001.json")
  mm, p, _ = _points(tmp_path / "p" / "001.json")
  assert len(tta_mm) > 0 and len(mm) > 0
  # Means over eight views: not the plain run's output.
  assert (tta_p >= 0).all() and (tta_p <= 1).all()
  assert not (len(tta_mm) == len(mm) and np.allclose(tta_mm, mm))
  capsys.readouterr()
  assert predict.main([f"--workdir={workdir}", "--images", str(images["first"]),
                       "--out", str(tmp_path / "x"), "--exact_rotation"]) == 2
  assert "--exact_rotation is for the P4 method" in capsys.readouterr().err


@pytest.mark.e2e
def test_inference_flag_picks_regions(workdir, images, tmp_path, capsys):
  # --inference regions: the image in a few large regions of the RetinaNet's
  # stride multiple (here one region: the tiny image is below the bound);
  # --skip_blank reaches the tiler too; an unknown mode is a usage error.
  p = predict.load_predictor(workdir, 0.0, inference="regions", skip_blank=True)
  cfg = p.tiler.tile_cfg
  assert (cfg.mode, cfg.multiple, cfg.skip_blank) == ("regions", 32, True)
  assert predict.load_predictor(workdir, 0.0).tiler.tile_cfg.mode == "tiles"
  assert predict.main([f"--workdir={workdir}", "--images", str(images["first"]),
                       "--out", str(tmp_path / "r"), "--threshold", "0",
                       "--inference", "regions"]) == 0
  mm, prob, _ = _points(tmp_path / "r" / "001.json")
  assert len(mm) > 0 and (prob >= 0).all() and (mm >= 0).all()
  capsys.readouterr()
  assert predict.main([f"--workdir={workdir}", "--images", str(images["first"]),
                       "--out", str(tmp_path / "x"), "--inference", "region"]) == 2
  assert "--inference" in capsys.readouterr().err
