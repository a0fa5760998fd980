"""MIDOG readers on the real annotation files, splits, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from midog_jax.data import midog
from midog_jax.errors import DataError


def test_midog21_counts_and_scanners(real_midog_dir):
  ds = midog.load_midog(real_midog_dir / "MIDOG.json")
  assert ds.kind == "midog21"
  assert len(ds.cases) == 200
  assert sum(len(c.mitoses) for c in ds.cases) == 1721
  assert sum(len(c.imposters) for c in ds.cases) == 2714
  table = midog.count_table(ds.cases)
  assert table["Hamamatsu XR"]["mitotic_figures"] == 451
  assert table["Hamamatsu S360"]["mitotic_figures"] == 582
  assert table["Aperio CS2"]["mitotic_figures"] == 688
  assert table["Leica GT450"] == dict(images=50, labeled_images=0,
                                      mitotic_figures=0, imposters=0)
  c = ds.by_id(120)
  assert c.scanner == "Aperio CS2" and c.spacing_um == 0.25 and c.labeled
  assert not ds.by_id(151).labeled


def test_box_centres_float_and_off_border(real_midog_dir):
  ds = midog.load_midog(real_midog_dir / "MIDOG.json")
  raw = json.loads((real_midog_dir / "MIDOG.json").read_text())
  # Annotation 17: bbox [1291.5, 2758, 1341.5, 2808] -> centre (1316.5, 2783).
  a = next(a for a in raw["annotations"] if a["id"] == 17)
  assert a["bbox"] == [1291.5, 2758, 1341.5, 2808]
  assert np.any(np.all(ds.by_id(2).mitoses == [1316.5, 2783], axis=1))
  # A box reaching past the top border keeps its (on-image) centre.
  a = next(a for a in raw["annotations"] if a["id"] == 433)
  assert a["bbox"][1] < 0
  cx, cy = (a["bbox"][0] + a["bbox"][2]) / 2, (a["bbox"][1] + a["bbox"][3]) / 2
  assert np.any(np.all(np.isclose(ds.by_id(24).mitoses, [cx, cy]), axis=1))


def test_midogpp_metadata_and_official_split(real_midog_dir):
  ds = midog.load_midog(real_midog_dir / "MIDOG++.json")
  assert ds.kind == "midogpp"
  assert len(ds.domains) == 7
  assert sum(len(c.mitoses) for c in ds.cases) == 11937
  assert len(ds.labeled) == 503
  train, test = midog.official_split(ds.cases)
  assert (len(train), len(test)) == (392, 111)
  c = ds.by_id(1)
  assert c.scanner == "Hamamatsu XR"  # the CSV's "Hamammatsu XR" normalised
  assert c.lab == "UMC Utrecht" and c.species == "Human"
  by_scanner = midog.load_midog(real_midog_dir / "MIDOG++.json", domain_key="scanner")
  assert "3D Histech" in by_scanner.domains


def test_split_is_stratified_and_excludes_unlabeled(real_midog_dir):
  ds = midog.load_midog(real_midog_dir / "MIDOG.json")
  train, val = midog.split_train_val(ds.cases, 0.2, seed=0)
  assert len(train) + len(val) == 150
  assert not {c.image_id for c in train} & {c.image_id for c in val}
  assert all(c.labeled for c in train + val)
  for d in ("Hamamatsu XR", "Hamamatsu S360", "Aperio CS2"):
    assert sum(c.domain == d for c in val) == 10
  # Label stratification: validation's share of mitoses is close to 20%.
  share = sum(len(c.mitoses) for c in val) / 1721
  assert 0.15 < share < 0.25
  # Seeded: same seed same split, another seed another split.
  assert [c.image_id for c in midog.split_train_val(ds.cases, 0.2, seed=0)[1]] == \
      [c.image_id for c in val]
  assert [c.image_id for c in midog.split_train_val(ds.cases, 0.2, seed=1)[1]] != \
      [c.image_id for c in val]


def test_leave_one_domain_out(real_midog_dir):
  ds = midog.load_midog(real_midog_dir / "MIDOG.json")
  rest, held = midog.leave_one_domain_out(ds.cases, "Aperio CS2")
  assert len(held) == 50 and len(rest) == 100
  assert all(c.domain != "Aperio CS2" for c in rest)
  with pytest.raises(ValueError, match="Leica GT450"):
    midog.leave_one_domain_out(ds.cases, "Leica GT450")


def _write(tmp_path, data, name="MIDOG.json"):
  p = tmp_path / name
  p.write_text(json.dumps(data))
  return p


def _minimal():
  return dict(images=[dict(id=1, file_name="001.tiff", width=100, height=80)],
              categories=[dict(id=1, name="mitotic figure"),
                          dict(id=2, name="not mitotic figure")],
              annotations=[dict(id=1, image_id=1, category_id=1,
                                bbox=[10, 10, 60, 60])])


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("annotations"), "missing top-level key 'annotations'"),
    (lambda d: d["images"][0].pop("width"), "missing key 'width'"),
    (lambda d: d["annotations"][0].update(category_id=7), "unknown category id 7"),
    (lambda d: d["categories"].append(dict(id=3, name="x")), "unknown category ids [3]"),
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id 1"),
    (lambda d: d["annotations"][0].update(bbox=[200, 200, 250, 250]),
     "lies wholly outside image 1"),
    (lambda d: d["annotations"][0].update(bbox=[10, 10, 60]), "bbox must be four"),
    (lambda d: d["annotations"][0].update(image_id=9), "unknown image id 9"),
    (lambda d: d["images"][0].update(file_name="../../etc/passwd"), "escapes the data root"),
    (lambda d: d["images"][0].update(file_name="/etc/passwd"), "escapes the data root"),
    # Types: Python counts True as an int, JSON ids may be strings or lists.
    (lambda d: d["images"][0].update(id="1"), "id must be an integer, got '1'"),
    (lambda d: d["images"][0].update(id=[1]), "id must be an integer, got [1]"),
    (lambda d: d["images"][0].update(id=True), "id must be an integer, got True"),
    (lambda d: d["images"][0].update(width=True), "bad size True"),
    (lambda d: d["annotations"][0].update(image_id="1"), "image_id must be an integer"),
    (lambda d: d["annotations"][0].update(category_id=True), "unknown category id True"),
    (lambda d: d["annotations"][0].update(bbox=[True, True, True, True]), "bbox must be four"),
])
def test_bad_annotation_files(tmp_path, mutate, message):
  data = _minimal()
  mutate(data)
  path = _write(tmp_path, data)
  with pytest.raises(DataError) as e:
    midog.load_midog(path)
  assert message in str(e.value)
  assert str(path) in str(e.value)


def test_malformed_and_missing_json(tmp_path):
  p = tmp_path / "MIDOG.json"
  p.write_text('{"images": [')
  with pytest.raises(DataError, match="malformed JSON") as e:
    midog.load_midog(p)
  assert str(p) in str(e.value)
  with pytest.raises(DataError, match="not found"):
    midog.load_midog(tmp_path / "nope.json")


def test_missing_image_reported(tmp_path):
  path = _write(tmp_path, _minimal())
  assert midog.load_midog(path).cases[0].path == (tmp_path / "001.tiff").resolve()
  with pytest.raises(DataError, match="001.tiff.*not found"):
    midog.load_midog(path, check_images=True)


def test_summary_cli_on_real_file(real_midog_dir):
  out = subprocess.run(
      [sys.executable, "-m", "midog_jax.data.summary", "--annotations",
       str(real_midog_dir / "MIDOG.json"), "--json"],
      capture_output=True, text=True, check=True).stdout
  s = json.loads(out)
  assert (s["images"], s["mitotic_figures"], s["imposters"]) == (200, 1721, 2714)
  assert s["per_domain"]["Aperio CS2"]["imposters"] == 924


def test_summary_cli_reports_bad_file(tmp_path):
  p = tmp_path / "MIDOG.json"
  p.write_text("[]")
  r = subprocess.run([sys.executable, "-m", "midog_jax.data.summary",
                      "--annotations", str(p)], capture_output=True, text=True)
  assert r.returncode == 1
  assert str(p) in r.stderr and "JSON object" in r.stderr
