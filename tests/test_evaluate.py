"""The evaluator against worked examples, computed by hand in the comments.

Unless said otherwise cases have 0.25 um/px, so the 7.5 um radius is 30 px.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from midog_jax import evaluate
from midog_jax import export
from midog_jax.detections import Detections
from midog_jax.fileio import write_json_atomic
from midog_jax import metrics
from midog_jax.data.midog import Case
from midog_jax.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _case(image_id=1, mitoses=(), imposters=(), domain="A", spacing=0.25,
          labeled=True):
  return Case(image_id=image_id, file_name=f"{image_id:03d}.tiff",
              path=Path(f"/nonexistent/{image_id:03d}.tiff"), width=1000,
              height=1000, scanner=domain, tumor_type="", lab="", species="",
              domain=domain, spacing_um=spacing, labeled=labeled,
              mitoses=np.asarray(mitoses, np.float32).reshape(-1, 2),
              imposters=np.asarray(imposters, np.float32).reshape(-1, 2))


def _pred(*points, scores=None):
  xy = np.asarray(points, np.float32).reshape(-1, 2)
  s = np.ones(len(xy)) if scores is None else np.asarray(scores, np.float64)
  return xy, s


def _counts(r):
  return r["tp"], r["fp"], r["fn"]


def test_two_detections_on_one_figure():
  # Figure at (100,100); detections at 0 px and 5 px (1.25 um). The figure
  # claims the nearest one -> TP 1; the duplicate is unclaimed -> FP 1.
  # P = 1/2, R = 1, F1 = 2*1 / (2*1 + 1 + 0) = 2/3.
  r = evaluate.evaluate_points([_case(mitoses=[[100, 100]])],
                               {1: _pred([100, 100], [105, 100])})
  assert _counts(r) == (1, 1, 0)
  assert r["precision"] == pytest.approx(0.5)
  assert r["recall"] == pytest.approx(1.0)
  assert r["f1"] == pytest.approx(2 / 3)


def test_midway_detection_goes_to_first_truth():
  # Figures A=(100,100), B=(140,100); one detection at (120,100), 20 px = 5 um
  # from both. Greedy in truth order: A (first) claims it, B is left -> FN.
  truth = np.array([[100, 100], [140, 100]], np.float64) * 0.25e-3
  pred = np.array([[120, 100]], np.float64) * 0.25e-3
  counts, assigned = metrics.match(truth, pred)
  assert (counts.tp, counts.fp, counts.fn) == (1, 0, 1)
  assert assigned.tolist() == [0]  # claimed by the first truth point
  counts, assigned = metrics.match(truth[::-1], pred)
  assert assigned.tolist() == [0]  # ... whichever comes first
  r = evaluate.evaluate_points([_case(mitoses=[[100, 100], [140, 100]])],
                               {1: _pred([120, 100])})
  assert _counts(r) == (1, 0, 1)


@pytest.mark.parametrize("offset_px, spacing, hit", [
    ((29.9, 0), 0.25, True),  # 7.475 um -> TP
    ((30.4, 0), 0.25, False),  # 30.4 px * 0.25 = 7.6 um -> miss
    ((32.5, 0), 0.23, True),  # 7.475 um at 0.23 um/px
    ((7.6 / 0.23, 0), 0.23, False),  # 7.6 um
    # Exactly 7.5 um on paper: 30 px at 0.25 um/px is 0.0075000000000000015 mm
    # after the conversion, and the organisers' "<= 7.5 um" (no slack) misses it.
    ((30, 0), 0.25, False),
])
def test_radius_at_7_5_um_without_slack(offset_px, spacing, hit):
  c = _case(mitoses=[[1000, 1200]], spacing=spacing)
  r = evaluate.evaluate_points([c], {1: _pred([1000 + offset_px[0],
                                                1200 + offset_px[1]])})
  # A hit is (TP 1, FP 0, FN 0); a miss is (0, 1, 1).
  assert _counts(r) == ((1, 0, 0) if hit else (0, 1, 1))


def test_empty_case_scores_one_as_the_organisers_formula_does():
  # No truth, no predictions: all counts 0; F1 = (0 + eps) / (0 + eps) = 1.
  r = evaluate.evaluate_points([_case()], {1: _pred()})
  assert _counts(r) == (0, 0, 0)
  assert r["precision"] == r["recall"] == 0.0 and r["f1"] == 1.0
  assert r["n_cases"] == 1
  best_t, best_f1, curve = evaluate.threshold_sweep([_case()], {1: _pred()})
  assert best_f1 == 1.0 and len(curve) == 1


def test_truth_without_predictions():
  # Three figures, nothing predicted: FN 3, recall 0, F1 0.
  r = evaluate.evaluate_points([_case(mitoses=[[10, 10], [200, 200], [400, 400]])],
                               {1: _pred()})
  assert _counts(r) == (0, 0, 3)
  assert r["recall"] == 0.0 and r["f1"] == pytest.approx(1e-6 / 3, rel=1e-3)  # eps / (3 + eps)


def test_pooled_f1_differs_from_mean_of_per_case_f1():
  # Case 1: one figure, found -> TP 1 (per-case F1 = 1).
  # Case 2: three figures, none predicted -> FN 3 (per-case F1 = 0).
  # Pooled: TP 1, FP 0, FN 3 -> F1 = 2 / (2 + 0 + 3) = 0.4; mean of per-case
  # F1s = (1 + 0) / 2 = 0.5.
  cases = [_case(1, mitoses=[[100, 100]]),
           _case(2, mitoses=[[100, 100], [300, 300], [500, 500]])]
  preds = {1: _pred([101, 100]), 2: _pred()}
  r = evaluate.evaluate_points(cases, preds, per_case=True)
  assert _counts(r) == (1, 0, 3)
  assert r["f1"] == pytest.approx(0.4)
  per_case = [v["f1"] for v in r["per_case"].values()]
  assert per_case == pytest.approx([1.0, 0.0], abs=1e-5)
  assert abs(r["f1"] - np.mean(per_case)) > 0.09


def test_per_domain_is_pooled_within_domain():
  # Domain A: cases 1 (TP 1) and 2 (FP 1, FN 1) -> TP 1, FP 1, FN 1, F1 = 0.5.
  # Domain B: case 3 (TP 1) -> F1 = 1. Overall: TP 2, FP 1, FN 1 -> F1 = 4/6.
  cases = [_case(1, [[100, 100]], domain="A"), _case(2, [[100, 100]], domain="A"),
           _case(3, [[100, 100]], domain="B")]
  preds = {1: _pred([100, 100]), 2: _pred([500, 500]), 3: _pred([100, 100])}
  r = evaluate.evaluate_points(cases, preds)
  assert _counts(r) == (2, 1, 1) and r["f1"] == pytest.approx(4 / 6)
  assert _counts(r["per_domain"]["A"]) == (1, 1, 1)
  assert r["per_domain"]["A"]["f1"] == pytest.approx(0.5)
  assert r["per_domain"]["A"]["n_cases"] == 2
  assert r["per_domain"]["B"]["f1"] == pytest.approx(1.0)


def test_non_mitotic_points_are_ignored():
  # A "non-mitotic figure" point on the figure neither matches it (FN stays)
  # nor counts as a false positive.
  dets = Detections(xy=[[100, 100], [600, 600]], scores=[0.9, 0.9],
                           classes=[2, 2])
  r = evaluate.evaluate_points([_case(mitoses=[[100, 100]])], {1: dets})
  assert _counts(r) == (0, 0, 1)


def test_imposters_are_not_truth():
  # A detection on an imposter is an FP; the imposter is no FN.
  r = evaluate.evaluate_points([_case(imposters=[[200, 200]])], {1: _pred([200, 200])})
  assert _counts(r) == (0, 1, 0)


def test_threshold_drops_low_scores_and_unlabeled_cases_are_skipped():
  cases = [_case(1, [[100, 100]]), _case(2, labeled=False)]
  preds = {1: _pred([100, 100], [600, 600], scores=[0.8, 0.3]),
           2: _pred([5, 5])}
  assert _counts(evaluate.evaluate_points(cases, preds)) == (1, 1, 0)
  r = evaluate.evaluate_points(cases, preds, threshold=0.5)
  assert _counts(r) == (1, 0, 0) and r["n_cases"] == 1


def test_missing_predictions_raise_unless_allowed():
  cases = [_case(1, [[100, 100]]), _case(2, [[100, 100]])]
  with pytest.raises(KeyError, match=r"\[2\]"):
    evaluate.evaluate_points(cases, {1: _pred([100, 100])})
  r = evaluate.evaluate_points(cases, {1: _pred([100, 100])}, allow_missing=True)
  assert _counts(r) == (1, 0, 1)


def test_threshold_sweep_picks_the_best_threshold():
  # Figures at (100,100) and (300,100). Detections (score): on figure 1 (0.9),
  # on figure 2 (0.6), far away (0.7) and (0.3). Keeping scores >= t:
  #   t=0.3: TP 2, FP 2, FN 0 -> F1 = 4/6 = 0.667
  #   t=0.6: TP 2, FP 1, FN 0 -> F1 = 4/5 = 0.8   <- best
  #   t=0.7: TP 1, FP 1, FN 1 -> F1 = 2/4 = 0.5
  #   t=0.9: TP 1, FP 0, FN 1 -> F1 = 2/3 = 0.667
  cases = [_case(mitoses=[[100, 100], [300, 100]])]
  preds = {1: _pred([100, 100], [300, 100], [500, 500], [700, 700],
                    scores=[0.9, 0.6, 0.7, 0.3])}
  best_t, best_f1, curve = evaluate.threshold_sweep(cases, preds)
  assert best_t == pytest.approx(0.6) and best_f1 == pytest.approx(0.8)
  assert [t for t, *_ in curve] == pytest.approx([0.3, 0.6, 0.7, 0.9])
  assert [f for *_, f in curve] == pytest.approx([4 / 6, 0.8, 0.5, 2 / 3])
  # Explicit thresholds: 0.65 keeps {0.9, 0.7} -> F1 0.5.
  _, _, curve = evaluate.threshold_sweep(cases, preds, thresholds=[0.65])
  assert curve[0][3] == pytest.approx(0.5)


def test_threshold_sweep_equals_evaluate_points_per_threshold():
  # Duplicates compete for the same figures, so the greedy matching changes
  # with the threshold; the sweep must give exactly the per-threshold numbers.
  rng = np.random.default_rng(0)
  cases, preds = [], {}
  for i in range(6):
    truth = rng.uniform(0, 400, (rng.integers(0, 6), 2))
    near = (truth[rng.integers(0, len(truth), 8)] + rng.normal(0, 15, (8, 2))
            if len(truth) else np.zeros((0, 2)))
    xy = np.concatenate([near, rng.uniform(0, 400, (5, 2))])
    cases.append(_case(i, truth, domain="AB"[i % 2]))
    preds[i] = (xy, rng.uniform(0, 1, len(xy)))
  _, _, curve = evaluate.threshold_sweep(cases, preds)
  assert len(curve) > 20
  for t, p, r, f in curve:
    ref = evaluate.evaluate_points(cases, preds, threshold=t)
    assert (p, r, f) == pytest.approx((ref["precision"], ref["recall"], ref["f1"]),
                                      abs=1e-12)


# ---------------------------------------------------------------------------
# Files and the command line.


def _write_midog(root: Path) -> Path:
  """MIDOG.json with cases 1 (Hamamatsu XR, 0.23 um/px), 101 (Aperio CS2,
  0.25 um/px) and 151 (Leica GT450, unlabeled)."""
  def box(x, y):
    return [x - 25, y - 25, x + 25, y + 25]
  data = {
      "categories": [{"id": 1, "name": "mitotic figure"},
                     {"id": 2, "name": "not mitotic figure"}],
      "images": [{"id": i, "file_name": f"{i:03d}.tiff", "width": 2000,
                  "height": 2000} for i in (1, 101, 151)],
      "annotations": [
          {"id": 1, "image_id": 1, "category_id": 1, "bbox": box(1000, 1000)},
          {"id": 2, "image_id": 1, "category_id": 2, "bbox": box(1500, 1500)},
          {"id": 3, "image_id": 101, "category_id": 1, "bbox": box(200, 200)},
          {"id": 4, "image_id": 101, "category_id": 1, "bbox": box(800, 800)},
      ],
  }
  path = root / "MIDOG.json"
  path.write_text(json.dumps(data))
  return path


def _write_preds(outdir: Path):
  outdir.mkdir(exist_ok=True)
  # Case 1 (0.23 um/px): on the figure (TP), on the imposter (FP), a
  # non-mitotic point on the figure (ignored).
  d1 = Detections(xy=[[1000, 1000], [1500, 1500], [1000, 1000]],
                         scores=[0.9, 0.8, 0.9], classes=[1, 1, 2])
  write_json_atomic(export.to_challenge_json(d1, 0.23), outdir / "001.json")
  # Case 101 (0.25 um/px): on figure (200,200) 10 px away (TP), (800,800)
  # missed (FN), a weak far-away point (FP with probability 0.1).
  d2 = Detections(xy=[[210, 200], [1500, 100]], scores=[0.7, 0.1])
  write_json_atomic(export.to_challenge_json(d2, 0.25), outdir / "101.json")


def test_cli_end_to_end(tmp_path):
  ann = _write_midog(tmp_path)
  _write_preds(tmp_path / "preds")
  cmd = [sys.executable, "-m", "midog_jax.evaluate", "--annotations", str(ann),
         "--predictions", str(tmp_path / "preds")]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
  r = json.loads(out.stdout)
  for key in ("tp", "fp", "fn", "precision", "recall", "f1", "per_domain", "n_cases"):
    assert key in r
  # Pooled: TP 2 (one per case), FP 2 (imposter hit, weak point), FN 1.
  # F1 = 4 / (4 + 2 + 1) = 4/7. The unlabeled GT450 case is not evaluated.
  assert _counts(r) == (2, 2, 1) and r["n_cases"] == 2
  assert r["f1"] == pytest.approx(4 / 7)
  assert set(r["per_domain"]) == {"Hamamatsu XR", "Aperio CS2"}
  assert _counts(r["per_domain"]["Hamamatsu XR"]) == (1, 1, 0)
  assert _counts(r["per_domain"]["Aperio CS2"]) == (1, 1, 1)
  # --threshold 0.5 drops the weak point: FP 1 -> F1 = 4 / 6.
  out = subprocess.run(cmd + ["--threshold", "0.5"], capture_output=True, text=True,
                       cwd=REPO, check=True)
  r = json.loads(out.stdout)
  assert _counts(r) == (2, 1, 1) and r["f1"] == pytest.approx(4 / 6)


def test_cli_missing_prediction_file(tmp_path, capsys):
  ann = _write_midog(tmp_path)
  _write_preds(tmp_path / "preds")
  (tmp_path / "preds" / "101.json").unlink()
  args = ["--annotations", str(ann), "--predictions", str(tmp_path / "preds")]
  assert evaluate.main(args) == 1
  assert "101.json" in capsys.readouterr().err
  assert evaluate.main(args + ["--allow-missing"]) == 0
  r = json.loads(capsys.readouterr().out)
  # Case 1 as before (TP 1, FP 1); case 101's two figures are FN.
  assert _counts(r) == (1, 1, 2) and r["missing_predictions"] == ["101.json"]


def test_cli_malformed_prediction_names_the_file(tmp_path, capsys):
  ann = _write_midog(tmp_path)
  _write_preds(tmp_path / "preds")
  bad = tmp_path / "preds" / "101.json"
  bad.write_text('{"points": [{"point": [0.1, "x", 0]}]}')
  with pytest.raises(DataError, match="101.json"):
    evaluate.load_prediction_dir(tmp_path / "preds",
                                 evaluate.midog.load_midog(ann).cases)
  assert evaluate.main(["--annotations", str(ann), "--predictions",
                        str(tmp_path / "preds")]) == 1
  err = capsys.readouterr().err
  assert str(bad) in err and "finite numbers" in err


def test_cli_spacing_from_tiff_tags_and_extra_truth(tmp_path, capsys):
  # The TIFF of case 1 says 0.5 um/px (not the scanner's nominal 0.23). The
  # figure at (1000,1000) px is then at 0.5 mm; a prediction written at
  # 0.5 mm matches only with the tag spacing (with 0.23 it would be 0.23 mm,
  # 270 um away).
  ann = _write_midog(tmp_path)
  images = tmp_path / "images"
  images.mkdir()
  tifffile.imwrite(images / "001.tiff", np.zeros((16, 16, 3), np.uint8),
                   resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
  preds = tmp_path / "preds"
  _write_preds(preds)
  d1 = Detections(xy=[[1000, 1000]], scores=[0.9])
  write_json_atomic(export.to_challenge_json(d1, 0.5), preds / "001.json")
  args = ["--annotations", str(ann), "--predictions", str(preds)]
  assert evaluate.main(args + ["--images", str(images), "--allow-missing"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert _counts(r["per_domain"]["Hamamatsu XR"]) == (1, 0, 0)
  # Without the images the nominal 0.23 um/px applies and the point misses.
  assert evaluate.main(args) == 0
  r = json.loads(capsys.readouterr().out)
  assert _counts(r["per_domain"]["Hamamatsu XR"]) == (0, 1, 1)


def _write_midogpp(root: Path, image_ids, annotations, name) -> Path:
  """A MIDOG++-style file (tumour types, no metadata CSV: a case without
  annotations counts as unlabeled)."""
  data = {"categories": [{"id": 1, "name": "mitotic figure"},
                         {"id": 2, "name": "not mitotic figure"}],
          "images": [{"id": i, "file_name": f"{i:03d}.tiff", "width": 500,
                      "height": 500, "tumor_type": t} for i, t in image_ids],
          "annotations": annotations}
  path = root / name
  path.write_text(json.dumps(data))
  return path


def test_cli_extra_truth_and_heldout_split(tmp_path, capsys):
  # Case 1 (lymphoma) is labelled; case 2 (melanoma) has no labels in the
  # main file, its truth comes from --truth. Default spacing 0.25 um/px.
  ims = [(1, "lymphoma"), (2, "melanoma")]
  ann = _write_midogpp(tmp_path, ims, [
      {"id": 1, "image_id": 1, "category_id": 1, "bbox": [75, 75, 125, 125]}],
      "MIDOG++.json")
  truth = _write_midogpp(tmp_path, ims[1:], [
      {"id": 9, "image_id": 2, "category_id": 1, "bbox": [275, 275, 325, 325]}],
      "truth.json")
  preds = tmp_path / "preds"
  preds.mkdir()
  for i, xy in ((1, [100, 100]), (2, [300, 300])):
    write_json_atomic(export.to_challenge_json(
        Detections(xy=[xy], scores=[0.5]), 0.25), preds / f"{i:03d}.json")
  args = ["--annotations", str(ann), "--predictions", str(preds)]
  assert evaluate.main(args) == 0
  r = json.loads(capsys.readouterr().out)
  assert _counts(r) == (1, 0, 0) and set(r["per_domain"]) == {"lymphoma"}
  assert evaluate.main(args + ["--truth", str(truth)]) == 0
  r = json.loads(capsys.readouterr().out)
  assert _counts(r) == (2, 0, 0) and r["n_cases"] == 2
  assert evaluate.main(args + ["--truth", str(truth), "--split", "heldout"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert _counts(r) == (1, 0, 0) and set(r["per_domain"]) == {"melanoma"}


def test_extra_truth_for_midog21_unlabeled_ids(tmp_path):
  ann = _write_midog(tmp_path)
  truth = json.loads(ann.read_text())
  truth["images"] = [im for im in truth["images"] if im["id"] == 151]
  truth["annotations"] = [{"id": 9, "image_id": 151, "category_id": 1,
                           "bbox": [75, 75, 125, 125]}]
  (tmp_path / "truth.json").write_text(json.dumps(truth))
  ds = evaluate.midog.attach_truth(evaluate.midog.load_midog(ann),
                                   tmp_path / "truth.json")
  assert ds.by_id(151).labeled and len(ds.by_id(151).mitoses) == 1


def test_same_stem_in_two_folders_is_refused_and_pixels_are_flagged(tmp_path, capsys):
  preds = tmp_path / "preds"
  preds.mkdir()
  a = _case(image_id=1)
  b = dataclasses.replace(_case(image_id=2), file_name="other/001.tiff",
                          path=Path("/nonexistent/other/001.tiff"))
  assert a.stem == b.stem == "001"
  write_json_atomic(export.to_challenge_json(Detections(xy=[[100, 100]], scores=[0.9]),
                                             0.25), preds / "001.json")
  with pytest.raises(DataError, match=r"share the name '001'"):
    evaluate.load_prediction_dir(preds, [a, b])
  # Pixel coordinates written where millimetres belong: a warning names the file.
  (preds / "001.json").write_text(json.dumps({
      "type": "Multiple points", "version": {"major": 1, "minor": 0},
      "points": [{"point": [800.0, 640.0, 0], "probability": 0.9,
                  "name": "mitotic figure"}]}))
  evaluate.load_prediction_dir(preds, [a])
  err = capsys.readouterr().err
  assert f"warning: {preds / '001.json'}: points beyond the image's" in err
  # Millimetres inside the image: no warning.
  write_json_atomic(export.to_challenge_json(Detections(xy=[[100, 100]], scores=[0.9]),
                                             0.25), preds / "001.json")
  evaluate.load_prediction_dir(preds, [a])
  assert "warning" not in capsys.readouterr().err
