"""Output formats: challenge JSON (mm), GeoJSON, CSV, overlay PNG, atomic writes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from midog_jax import evaluate, export
from midog_jax.detections import Detections
from midog_jax.errors import DataError
from midog_jax.fileio import write_json_atomic


def _dets():
  return Detections(xy=[[100.0, 200.0], [4000.5, 10.0]], scores=[0.9, 0.25],
                           classes=[1, 2])


def test_challenge_json_round_trip_in_mm(tmp_path):
  obj = export.to_challenge_json(_dets(), spacing_um=0.25)
  assert obj["type"] == "Multiple points"
  assert obj["version"] == {"major": 1, "minor": 0}
  # By hand: 100 px * 0.25 um/px = 25 um = 0.025 mm; 4000.5 px -> 1.000125 mm.
  p0, p1 = obj["points"]
  assert p0["point"] == pytest.approx([0.025, 0.05, 0])
  assert p0["name"] == "mitotic figure" and p0["probability"] == pytest.approx(0.9)
  assert p1["point"] == pytest.approx([1.000125, 0.0025, 0])
  assert p1["name"] == "non-mitotic figure"
  path = write_json_atomic(obj, tmp_path / "001.json")
  xy_mm, probs, names = evaluate.from_challenge_json(path)
  np.testing.assert_allclose(xy_mm, [[0.025, 0.05], [1.000125, 0.0025]], rtol=1e-12)
  np.testing.assert_allclose(probs, [0.9, 0.25], rtol=1e-6)
  assert names == ["mitotic figure", "non-mitotic figure"]
  back = Detections.from_mm(xy_mm, probs, names, spacing_um=0.25)
  np.testing.assert_allclose(back.xy, _dets().xy, rtol=1e-6)
  assert back.classes.tolist() == [1, 2]


def test_challenge_json_old_format_defaults(tmp_path):
  # The 2021 format had neither name nor probability; the organisers' reader
  # treats such points as mitotic figures with probability 0.5.
  f = tmp_path / "old.json"
  f.write_text(json.dumps({"points": [{"point": [0.1, 0.2, 0]}]}))
  xy, probs, names = evaluate.from_challenge_json(f)
  assert xy.tolist() == [[0.1, 0.2]] and probs.tolist() == [0.5]
  assert names == ["mitotic figure"]


@pytest.mark.parametrize("text, problem", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"type": "Multiple points"}', "missing key 'points'"),
    ('{"points": {}}', "'points' must be a list"),
    ('{"points": [{"probability": 0.5}]}', "missing key 'point'"),
    ('{"points": [{"point": "1,2"}]}', "finite numbers"),
    ('{"points": [{"point": [NaN, 0.1, 0]}]}', "finite numbers"),
    ('{"points": [{"point": [0.1, 0.1, 0], "probability": Infinity}]}', "probability"),
    ('{"points": [{"point": [0.1, 0.1, 0], "probability": "high"}]}', "probability"),
    ('{"points": [{"point": [0.1, 0.1, 0], "name": "mitosis"}]}', "'mitosis'"),
    ('{"type": "Multiple polygons", "points": []}', "Multiple points"),
])
def test_malformed_challenge_json(tmp_path, text, problem):
  f = tmp_path / "bad.json"
  f.write_text(text)
  with pytest.raises(DataError, match=problem) as e:
    evaluate.from_challenge_json(f)
  assert str(f) in str(e.value)


def test_geojson_structure_for_qupath():
  gj = export.to_geojson(_dets())
  json.dumps(gj, allow_nan=False)  # plain JSON, no NaN
  assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
  f0, f1 = gj["features"]
  assert f0["type"] == "Feature"
  assert f0["geometry"] == {"type": "Point", "coordinates": [100.0, 200.0]}
  props = f0["properties"]
  assert props["objectType"] == "annotation"
  assert props["classification"]["name"] == "Mitotic figure"
  color = props["classification"]["color"]
  assert len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in color)
  assert props["measurements"]["score"] == pytest.approx(0.9)
  assert f1["properties"]["classification"]["name"] == "Non-mitotic figure"
  assert f0["id"] != f1["id"]


def test_csv_columns_and_values(tmp_path):
  path = export.to_csv(_dets(), tmp_path / "d.csv", spacing_um=0.25)
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  with open(path, newline="") as f:
    assert next(csv.reader(f)) == list(export.CSV_COLUMNS)
  assert len(rows) == 2
  assert float(rows[0]["x_px"]) == 100.0 and float(rows[0]["y_px"]) == 200.0
  assert float(rows[0]["x_mm"]) == pytest.approx(0.025)
  assert float(rows[1]["x_mm"]) == pytest.approx(1.000125)
  assert float(rows[1]["probability"]) == pytest.approx(0.25)
  assert [r["name"] for r in rows] == ["mitotic figure", "non-mitotic figure"]


def _count(img: np.ndarray, color) -> int:
  return int(np.all(img == np.array(color, np.uint8), axis=-1).sum())


def test_overlay_png_size_and_colours(tmp_path):
  image = np.full((200, 300, 3), 128, np.uint8)  # H=200, W=300
  dets = Detections(xy=[[50, 50], [250, 150]], scores=[0.9, 0.8])
  truth = np.array([[52, 50], [150, 100]], np.float32)  # first found, second missed
  imposters = np.array([[250, 40]], np.float32)
  out = tmp_path / "overlay.png"
  scale = export.overlay_png(image, dets, truth, imposters, out, match_radius_px=10,
                             max_side=None)
  assert scale == 1.0
  with Image.open(out) as im:
    assert im.size == (300, 200) and im.format == "PNG"
    px = np.asarray(im.convert("RGB"))
  c = export.OVERLAY_COLORS
  for kind in ("tp", "fp", "fn", "imposter"):
    assert _count(px, c[kind]) > 0, kind
  # The FP circle is drawn around (250, 150), not around the TP at (50, 50).
  red = np.argwhere(np.all(px == c["fp"], axis=-1))
  assert np.abs(red.mean(0) - [150, 250]).max() < 2

  small = tmp_path / "small.png"
  scale = export.overlay_png(image, dets, truth, imposters, small, 10, max_side=150)
  assert scale == pytest.approx(0.5)
  with Image.open(small) as im:
    assert im.size == (150, 100)


def test_outputs_of_one_image_are_all_or_nothing(tmp_path):
  from midog_jax import predict
  dets = Detections(xy=[[10.0, 20.0]], scores=[0.9])
  paths = predict.output_paths(tmp_path, "001", ("json", "csv"), overlays=True)
  (tmp_path / "001.json").write_text("the previous run's output")
  # The overlay fails (no image to draw on) after the JSON and CSV are done:
  # nothing new appears and the previous JSON is kept, not deleted.
  with pytest.raises(AttributeError):
    predict.write_outputs(dets, 0.25, paths, slide=None)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["001.json"]
  assert (tmp_path / "001.json").read_text() == "the previous run's output"
  del paths["png"]
  predict.write_outputs(dets, 0.25, paths)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["001.csv", "001.json"]
  assert json.loads((tmp_path / "001.json").read_text())["points"][0]["probability"] == \
      pytest.approx(0.9)
