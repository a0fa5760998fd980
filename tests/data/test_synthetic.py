"""The synthetic MIDOG-format generator and the blue-ratio baseline."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from midog_jax.baselines import blue_ratio
from midog_jax.data import midog, synthetic
from midog_jax.errors import DataError

GT450 = "Leica GT450"


def _all_boxes(root):
  main = json.loads((root / "MIDOG.json").read_text())
  truth = json.loads((root / synthetic.TRUTH).read_text())
  return main, truth


def test_loads_with_the_real_reader(tiny_dataset):
  ds = midog.load_midog(tiny_dataset / "MIDOG.json", check_images=True)
  assert ds.kind == "midog21"
  assert ds.domains == sorted(d.name for d in synthetic.DOMAINS)
  assert [c.image_id for c in ds.cases] == [1, 2, 51, 52, 101, 102, 151, 152]
  for c in ds.cases:
    assert c.labeled == (c.domain != GT450)
    if c.labeled:
      assert len(c.mitoses) >= 3
    else:
      assert len(c.mitoses) == 0 and len(c.imposters) == 0
  with_truth = midog.attach_truth(ds, tiny_dataset / synthetic.TRUTH)
  truth = {c.image_id: c.mitoses for c in with_truth.cases if c.domain == GT450}
  assert sorted(truth) == [151, 152]
  assert all(c.labeled for c in with_truth.cases)
  assert all(len(v) >= 3 for v in truth.values())
  man = synthetic.read_manifest(tiny_dataset)
  assert man == {"preset": "tiny", "seed": 0, "n_images": 8,
                 "ids": [1, 2, 51, 52, 101, 102, 151, 152], "scale": 1.0, "positions": "random",
                 "generator_version": synthetic.GENERATOR_VERSION}


def test_json_layout_and_boxes(tiny_dataset):
  main, truth = _all_boxes(tiny_dataset)
  assert list(main) == ["info", "licenses", "images", "categories", "annotations"]
  assert main["categories"] == [{"id": 1, "name": "mitotic figure"},
                                {"id": 2, "name": "not mitotic figure"}]
  assert list(main["images"][0]) == ["license", "file_name", "id", "width",
                                     "height"]
  assert main["images"][0]["file_name"] == "001.tiff"
  assert [im["id"] for im in truth["images"]] == [151, 152]
  sizes = {im["id"]: (im["width"], im["height"]) for im in main["images"]}
  anns = main["annotations"] + truth["annotations"]
  ids = [a["id"] for a in anns]
  assert len(set(ids)) == len(ids)  # unique across both files
  for a in anns:
    assert list(a) == ["bbox", "category_id", "image_id", "id"]
    x1, y1, x2, y2 = a["bbox"]
    assert x2 - x1 == 50 and y2 - y1 == 50
    w, h = sizes[a["image_id"]]
    assert 0 <= (x1 + x2) / 2 < w and 0 <= (y1 + y2) / 2 < h
  # Figures keep their distance (the generator promises >= 40 px).
  for im in main["images"] + truth["images"]:
    c = np.array([[(a["bbox"][0] + a["bbox"][2]) / 2, (a["bbox"][1] + a["bbox"][3]) / 2]
                  for a in anns if a["image_id"] == im["id"]])
    d = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1)) + np.eye(len(c)) * 1e9
    assert d.min() >= 40
  n_mit = sum(a["category_id"] == 1 for a in anns)
  n_imp = sum(a["category_id"] == 2 for a in anns)
  assert 1.2 <= n_imp / n_mit <= 2.0


def test_tiffs_tiled_jpeg_with_resolution(tiny_dataset):
  ds = midog.load_midog(tiny_dataset / "MIDOG.json")
  for c in ds.cases:
    with tifffile.TiffFile(c.path) as t:
      p = t.pages[0]
      assert p.is_tiled and p.tile == (256, 256)
      assert p.compression == tifffile.COMPRESSION.JPEG
      assert p.shape == (c.height, c.width, 3) and p.dtype == np.uint8
      assert p.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
      num, den = p.tags["XResolution"].value
      assert 1e4 / (num / den) == pytest.approx(c.spacing_um, rel=1e-4)
      num, den = p.tags["YResolution"].value
      assert 1e4 / (num / den) == pytest.approx(c.spacing_um, rel=1e-4)
  # Hamamatsu ids are 0.23 um/px, Aperio/Leica 0.25 (the loader agrees).
  assert ds.by_id(1).spacing_um == 0.23 and ds.by_id(101).spacing_um == 0.25


def test_domains_differ_in_colour(tiny_dataset):
  ds = midog.load_midog(tiny_dataset / "MIDOG.json")
  means = {}
  for c in ds.cases:
    px = tifffile.imread(c.path).reshape(-1, 3).astype(np.float64)
    means.setdefault(c.domain, []).append(px.mean(0))
  m = {k: np.mean(v, 0) for k, v in means.items()}
  names = sorted(m)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert np.linalg.norm(m[a] - m[b]) > 5.0, (a, b, m[a], m[b])


def test_figures_are_dark_where_annotated(tiny_dataset):
  # The annotation must sit on the rendered cell: hematoxylin-dark pixels
  # near every box centre, for mitoses and imposters alike.
  main, truth = _all_boxes(tiny_dataset)
  for a in main["annotations"] + truth["annotations"]:
    img = tifffile.imread(tiny_dataset / f"{a['image_id']:03d}.tiff")
    cx = int((a["bbox"][0] + a["bbox"][2]) / 2)
    cy = int((a["bbox"][1] + a["bbox"][3]) / 2)
    win = img[max(cy - 12, 0):cy + 13, max(cx - 12, 0):cx + 13].astype(int)
    assert win.sum(-1).min() < 330, a  # far darker than pink tissue (~500)


def test_deterministic_and_workers_do_not_matter(tiny_dataset, tmp_path):
  out = tmp_path / "again"
  synthetic.generate(out, preset="tiny", seed=0, workers=2)
  for name in ("MIDOG.json", synthetic.TRUTH, synthetic.MANIFEST):
    assert (out / name).read_bytes() == (tiny_dataset / name).read_bytes()
  for i in (1, 52, 101, 151):
    a = tifffile.imread(out / f"{i:03d}.tiff")
    b = tifffile.imread(tiny_dataset / f"{i:03d}.tiff")
    np.testing.assert_array_equal(a, b)
  # Another seed gives other figures and other pixels; a subset gives the
  # same pixels for the images it shares with the full set.
  other = tmp_path / "seed1"
  synthetic.generate(other, preset="tiny", seed=1, workers=1, ids=[1])
  m0 = json.loads((tiny_dataset / "MIDOG.json").read_text())
  m1 = json.loads((other / "MIDOG.json").read_text())
  assert [im["id"] for im in m1["images"]] == [1]
  assert ([a["bbox"] for a in m0["annotations"] if a["image_id"] == 1]
          != [a["bbox"] for a in m1["annotations"]])
  assert not (other / synthetic.TRUTH).exists()  # no unlabeled image chosen
  a = tifffile.imread(other / "001.tiff")
  b = tifffile.imread(tiny_dataset / "001.tiff")
  assert a.shape != b.shape or np.abs(a.astype(int) - b).mean() > 5


def test_band_rendering_has_no_seams():
  # Rendering a band directly equals the same rows cut from bigger bands:
  # everything before the blur is a pure function of pixel coordinates.
  plan = synthetic.plan_image("tiny", 0, 51)
  lay = synthetic.build_layout(plan)
  # Sensor noise (added after the blur) is drawn per band: switch it off.
  lay = dataclasses.replace(lay, domain=dataclasses.replace(lay.domain, noise=0.0))
  whole = synthetic.render_band(lay, 0, 256)
  for y0, y1 in ((100, 200), (37, 38), (0, 5), (250, 256)):
    np.testing.assert_array_equal(synthetic.render_band(lay, y0, y1),
                                  whole[y0:y1])
  assert whole.std() > 10  # not a blank image


def test_subset_options_and_bad_ids(tmp_path):
  assert synthetic._select(synthetic.preset_ids("small"), None, 6, "small") == [
      1, 2, 51, 52, 101, 151]
  with pytest.raises(ValueError, match=r"\[3\]"):
    synthetic.generate(tmp_path / "bad", preset="tiny", ids=[3])
  assert not (tmp_path / "bad").exists()  # nothing written for bad arguments
  r = subprocess.run([sys.executable, "-m", "midog_jax.data.synthetic", "--out",
                      str(tmp_path / "cli"), "--preset", "tiny", "--ids", "2,151",
                      "--workers", "1"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  man = json.loads(r.stdout)
  assert man["ids"] == [2, 151] and man["n_images"] == 2
  assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [
      "002.tiff", "151.tiff", "MIDOG.json", synthetic.TRUTH, synthetic.MANIFEST]
  r = subprocess.run([sys.executable, "-m", "midog_jax.data.synthetic", "--out",
                      str(tmp_path / "cli2"), "--preset", "tiny", "--ids", "x"],
                     capture_output=True, text=True)
  assert r.returncode != 0 and "--ids" in r.stderr


def test_midog21_real_positions_downscaled(real_midog_dir, tmp_path,
                                           monkeypatch):
  # Full-size images (7215x5412) take ~15 s each, too slow for the suite; the
  # same code path runs at scale 0.1 (positions and sizes scaled).
  monkeypatch.setenv("MIDOG_SHARED_DATA", str(real_midog_dir))
  out = tmp_path / "m21"
  synthetic.generate(out, preset="midog21", seed=0, workers=1, ids=[2, 151],
                     scale=0.1)
  real = json.loads((real_midog_dir / "MIDOG.json").read_text())
  main = json.loads((out / "MIDOG.json").read_text())
  im = {i["id"]: i for i in main["images"]}
  assert im[2]["width"] == round(7215 * 0.1) and im[2]["height"] == round(5412 * 0.1)
  want = sorted((a["id"], a["category_id"]) for a in real["annotations"]
                if a["image_id"] == 2)
  got = sorted((a["id"], a["category_id"]) for a in main["annotations"])
  assert got == want  # real annotation ids and classes, nothing for 151
  ra = {a["id"]: a["bbox"] for a in real["annotations"]}
  for a in main["annotations"]:
    cx = (a["bbox"][0] + a["bbox"][2]) / 2
    rx = (ra[a["id"]][0] + ra[a["id"]][2]) / 2 * 0.1
    assert abs(cx - rx) <= 1.0
  truth = midog.load_midog(out / synthetic.TRUTH, out, truth_file=True)
  assert [c.image_id for c in truth.cases] == [151] and len(truth.cases[0].mitoses) >= 1
  with tifffile.TiffFile(out / "151.tiff") as t:
    assert t.pages[0].shape == (round(4620 * 0.1), round(6218 * 0.1), 3)


def test_midog21_named_shared_file_missing_is_an_error(tmp_path, monkeypatch):
  monkeypatch.setenv("MIDOG_SHARED_DATA", str(tmp_path / "nowhere"))
  with pytest.raises(DataError, match="MIDOG_SHARED_DATA"):
    synthetic.generate(tmp_path / "out", preset="midog21", ids=[1])


def test_midog21_without_shared_file_generates_positions(tmp_path, monkeypatch):
  # A bare clone: no $MIDOG_SHARED_DATA, no ../shared beside the repository
  # (found from <repo>/midog_jax/data/synthetic/write.py).
  monkeypatch.delenv("MIDOG_SHARED_DATA", raising=False)
  monkeypatch.setattr(synthetic.write, "__file__",
                      str(tmp_path / "a" / "b" / "c" / "d.py"))
  out = tmp_path / "out"
  synthetic.generate(out, preset="midog21", ids=[2, 151], scale=0.08, workers=1)
  assert synthetic.read_manifest(out)["positions"] == "generated"
  ds = midog.load_midog(out / "MIDOG.json")
  case = ds.by_id(2)
  # The stand-in keeps the real XR region size and labels its figures.
  assert (case.width, case.height) == (round(7215 * 0.08), round(5412 * 0.08))
  assert len(case.mitoses) >= 1 and len(case.imposters) >= 1
  assert not ds.by_id(151).labeled


def test_blue_ratio_detect_size_filter():
  img = np.full((400, 400, 3), (230, 150, 200), np.uint8)
  img[50:60, 40:50] = (60, 40, 130)  # small dark nucleus: kept
  img[200:260, 200:260] = (60, 40, 130)  # 60 px wide blob: dropped
  img[300, 300] = (60, 40, 130)  # single pixel: dropped (< 2 px)
  det = blue_ratio.detect(img)
  assert det.shape == (1, 2)
  np.testing.assert_allclose(det[0], [44.5, 54.5], atol=0.01)


def test_blue_ratio_baseline_cli_on_tiny(tiny_dataset):
  r = subprocess.run([sys.executable, "-m", "midog_jax.baselines.blue_ratio",
                      "--data", str(tiny_dataset)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  res = json.loads(r.stdout)
  keys = {"tp", "fp", "fn", "precision", "recall", "f1"}
  assert keys | {"per_domain"} <= set(res)
  assert set(res["per_domain"]) == {d.name for d in synthetic.DOMAINS}
  for v in res["per_domain"].values():
    assert keys <= set(v)
  # Blue ratio finds the dark figures but cannot tell mitoses from imposters
  # and dark nuclei: the task needs learning.
  assert res["recall"] > 0.6
  assert res["f1"] <= 0.5
  # Pooled counts cover the labelled domains only.
  labelled = [v for k, v in res["per_domain"].items() if k != GT450]
  assert res["tp"] == sum(v["tp"] for v in labelled)
  assert res["fn"] == sum(v["fn"] for v in labelled)


def test_blue_ratio_bad_truth_file(tiny_dataset, tmp_path):
  bad = tmp_path / "truth.json"
  bad.write_text("{not json")
  with pytest.raises(DataError, match="truth.json"):
    blue_ratio.evaluate(tiny_dataset, truth=bad)


def test_a_data_set_it_did_not_write_is_never_overwritten(tmp_path):
  real = tmp_path / "MIDOG"
  real.mkdir()
  (real / "MIDOG.json").write_text('{"images": []}')
  (real / "001.tiff").write_bytes(b"the real pixels")
  before = {p.name: p.read_bytes() for p in real.iterdir()}
  r = subprocess.run([sys.executable, "-m", "midog_jax.data.synthetic", "--out", str(real),
                      "--preset", "tiny", "--ids", "1"], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 1
  assert r.stderr.strip() == (f"error: {real}: holds a data set this generator did not "
                              "write (001.tiff, MIDOG.json); refusing to overwrite it: "
                              "choose another --out, or pass --force")
  assert {p.name: p.read_bytes() for p in real.iterdir()} == before
  # Its own data set it may rewrite, and --force overrides the refusal.
  own = tmp_path / "own"
  synthetic.generate(own, preset="tiny", ids=[1], workers=1)
  synthetic.generate(own, preset="tiny", ids=[1], workers=1)
  synthetic.generate(real, preset="tiny", ids=[1], workers=1, force=True)
  assert (real / "001.tiff").read_bytes() != before["001.tiff"]
  assert not (own / synthetic.write.WRITING).exists()
