"""TFDS array_record patches of a tiny MIDOG-format set, read back with grain, no TF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import tensorflow_datasets as tfds

from midog_jax.data import slides, tfds_midog
from midog_jax.errors import DataError
from support import REPO

PATCH = 128
CONFIG = tfds_midog.patch_config("midog21", patch_size=PATCH, stride=PATCH)
NAME = f"midog_patches/{CONFIG.name}"

# image id -> (width, mitosis centres, imposter centres). Ids pick the scanner
# (1-50 XR, 51-100 S360, 101-150 CS2, 151+ GT450 = unlabeled). Three XR cases
# so that split_train_val sends one of them to "val". Case 51 is 320 px wide:
# its last patch column sits flush at x0 = 192 and overlaps the one at 128.
CASES = {
    1: (256, [(40, 60), (128, 150)], [(200, 20)]),  # 128: first pixel of a patch
    2: (256, [(10, 250)], [(127.5, 127.5)]),  # on the border of 4 patches
    3: (256, [], [(130, 5)]),
    51: (320, [(200, 100), (300, 250)], [(60, 200)]),
    101: (256, [(255, 255)], [(0, 0)]),
    151: (256, [], []),
}
HEIGHT = 256


def _write_set(root: Path) -> dict[int, np.ndarray]:
  """MIDOG.json + tiled RGB TIFFs; returns the pixels of each case."""
  rng = np.random.default_rng(0)
  images, anns, pixels = [], [], {}
  for image_id, (width, mitoses, imposters) in CASES.items():
    img = rng.integers(0, 256, (HEIGHT, width, 3), dtype=np.uint8)
    tifffile.imwrite(root / f"{image_id:03d}.tiff", img, tile=(64, 64),
                     photometric="rgb", compression="zlib")
    pixels[image_id] = img
    images.append(dict(id=image_id, file_name=f"{image_id:03d}.tiff",
                       width=width, height=HEIGHT))
    for cat, points in ((1, mitoses), (2, imposters)):
      for x, y in points:
        anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=cat,
                         bbox=[x - 25, y - 25, x + 25, y + 25]))
  (root / "MIDOG.json").write_text(json.dumps(dict(
      images=images, annotations=anns,
      categories=[dict(id=1, name="mitotic figure"),
                  dict(id=2, name="not mitotic figure")])))
  return pixels


def _prepare(manual_dir: Path, data_dir: Path) -> tfds.core.DatasetBuilder:
  builder = tfds_midog.MidogPatches(config=CONFIG, data_dir=os.fspath(data_dir),
                                    file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir)))
  return builder


# Runs in a fresh interpreter so that nothing imported by the build (or by
# other tests) hides a TensorFlow import made while reading.
_READER = """
import json, sys
import grain
import numpy as np
from midog_jax.data import tfds_midog
data_dir, name, out = sys.argv[1:]
arrays, meta = {}, {}
for split in ("train", "val", "unlabeled"):
  ds = grain.MapDataset.source(tfds_midog.load_patches(data_dir, name, split))
  rows = [ds[i] for i in range(len(ds))]
  meta[split] = [dict(image_id=int(r["image_id"]), x0=int(r["x0"]),
                      y0=int(r["y0"]), domain=r["domain"].decode(),
                      scanner=r["scanner"].decode(),
                      spacing_um=float(r["spacing_um"])) for r in rows]
  for i, r in enumerate(rows):
    for key in ("image", "mitoses", "imposters"):
      arrays[f"{split}/{i}/{key}"] = np.asarray(r[key])
np.savez(out + ".npz", **arrays)
json.dump(dict(meta=meta, tensorflow="tensorflow" in sys.modules), open(out, "w"))
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds_midog")
  manual, data_dir = root / "manual", root / "data"
  manual.mkdir()
  pixels = _write_set(manual)
  builder = _prepare(manual, data_dir)
  out = root / "read.json"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.fspath(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _READER, os.fspath(data_dir), NAME,
                         os.fspath(out)], capture_output=True, text=True, env=env,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  arrays = dict(np.load(os.fspath(out) + ".npz"))
  return builder, pixels, result, arrays


def _expected_points(points, x0, y0):
  # Pixel-index coordinates: the patch's pixels x0 .. x0 + PATCH - 1 span
  # [x0 - 0.5, x0 + PATCH - 0.5).
  return sorted((float(x - x0), float(y - y0)) for x, y in points
                if x0 - 0.5 <= x < x0 + PATCH - 0.5
                and y0 - 0.5 <= y < y0 + PATCH - 0.5)


def test_no_tensorflow_while_reading(prepared):
  _, _, result, _ = prepared
  assert result["tensorflow"] is False


def test_splits_and_grid_counts(prepared):
  builder, _, result, _ = prepared
  meta = result["meta"]
  # 2x2 patches per 256x256 case, 3x2 for the 320x256 one.
  assert {s: len(m) for s, m in meta.items()} == {"train": 18, "val": 4,
                                                  "unlabeled": 4}
  assert builder.info.splits["train"].num_examples == 18
  ids = {s: sorted({r["image_id"] for r in m}) for s, m in meta.items()}
  assert ids["unlabeled"] == [151]
  assert len(ids["val"]) == 1 and ids["val"][0] in (1, 2, 3)
  assert sorted(ids["train"] + ids["val"]) == [1, 2, 3, 51, 101]
  origins = sorted((r["x0"], r["y0"]) for r in meta["train"] if r["image_id"] == 51)
  assert origins == [(x, y) for x in (0, 128, 192) for y in (0, 128)]
  # Stored in case / row / column order.
  keys = [(r["image_id"], r["y0"], r["x0"]) for r in meta["train"]]
  assert keys == sorted(keys)
  r101 = next(r for r in meta["train"] if r["image_id"] == 101)
  assert (r101["scanner"], r101["domain"]) == ("Aperio CS2", "Aperio CS2")
  assert r101["spacing_um"] == pytest.approx(0.25)


def test_patch_pixels_and_points(prepared):
  _, pixels, result, arrays = prepared
  for split, rows in result["meta"].items():
    for i, r in enumerate(rows):
      x0, y0 = r["x0"], r["y0"]
      image = arrays[f"{split}/{i}/image"]
      assert image.shape == (PATCH, PATCH, 3) and image.dtype == np.uint8
      np.testing.assert_array_equal(
          image, pixels[r["image_id"]][y0:y0 + PATCH, x0:x0 + PATCH])
      _, mitoses, imposters = CASES[r["image_id"]]
      for key, points in (("mitoses", mitoses), ("imposters", imposters)):
        got = arrays[f"{split}/{i}/{key}"]
        assert got.dtype == np.float32 and got.shape[1:] == (2,)
        assert sorted(map(tuple, got.tolist())) == _expected_points(points, x0, y0)
  # Spot checks by hand: (128, 150) of case 1 is at (0, 22) of patch (128, 128);
  # (200, 100) of case 51 is in both overlapping columns 128 and 192.
  where = {(r["image_id"], r["x0"], r["y0"]): f"{split}/{i}"
           for split, rows in result["meta"].items() for i, r in enumerate(rows)}
  np.testing.assert_array_equal(arrays[f"{where[1, 128, 128]}/mitoses"], [[0, 22]])
  np.testing.assert_array_equal(arrays[f"{where[51, 128, 0]}/mitoses"], [[72, 100]])
  np.testing.assert_array_equal(arrays[f"{where[51, 192, 0]}/mitoses"], [[8, 100]])
  # (127.5, 127.5) of case 2 lies on the corner of pixel (128, 128): in that
  # patch only, at (-0.5, -0.5), not at (127.5, 127.5) of the patch at (0, 0).
  np.testing.assert_array_equal(arrays[f"{where[2, 128, 128]}/imposters"],
                                [[-0.5, -0.5]])
  for x0, y0 in ((0, 0), (128, 0), (0, 128)):
    assert arrays[f"{where[2, x0, y0]}/imposters"].shape == (0, 2)


def test_grid_origins():
  np.testing.assert_array_equal(slides.grid_origins(256, 128, 128), [0, 128])
  np.testing.assert_array_equal(slides.grid_origins(320, 128, 128),
                                [0, 128, 192])
  np.testing.assert_array_equal(slides.grid_origins(300, 128, 100),
                                [0, 100, 172])
  np.testing.assert_array_equal(slides.grid_origins(100, 128, 128), [0])


def test_midogpp_official_split_padding_and_tiff_spacing(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(1)
  # Case 1 (train) is smaller than one patch and says 0.5 um/px in its tags;
  # case 2 (test) has no tags; case 3 has no CSV row (unlabeled) and no TIFF.
  small = rng.integers(0, 256, (90, 100, 3), dtype=np.uint8)
  tifffile.imwrite(manual / "001.tiff", small, tile=(16, 16), photometric="rgb",
                   resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
  big = rng.integers(0, 256, (128, 256, 3), dtype=np.uint8)
  tifffile.imwrite(manual / "002.tiff", big, tile=(64, 64), photometric="rgb")
  images = [dict(id=1, file_name="001.tiff", width=100, height=90,
                 tumor_type="canine cutaneous mast cell tumor"),
            dict(id=2, file_name="002.tiff", width=256, height=128,
                 tumor_type="human melanoma"),
            dict(id=3, file_name="003.tiff", width=256, height=256,
                 tumor_type="human breast cancer")]
  anns = [dict(id=1, image_id=1, category_id=1, bbox=[25, 35, 75, 85]),
          dict(id=2, image_id=2, category_id=2, bbox=[175, 75, 225, 125])]
  (manual / "MIDOG++.json").write_text(json.dumps(dict(
      images=images, annotations=anns,
      categories=[dict(id=1, name="mitotic figure"),
                  dict(id=2, name="not mitotic figure")])))
  (manual / "datasets_xvalidation.csv").write_text(
      "Slide;Dataset;Tumor;Scanner;Origin;Species\n"
      "1;train;canine cutaneous mast cell tumor;Aperio CS2;VMU Vienna;Canine\n"
      "2;test;human melanoma;Hamamatsu XR;UMC Utrecht;Human\n")
  cfg = tfds_midog.patch_config("midogpp", patch_size=PATCH, stride=PATCH)
  data_dir = tmp_path / "data"
  builder = tfds_midog.MidogPatches(config=cfg, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual)))
  assert sorted(builder.info.splits) == ["test", "train"]
  name = f"midog_patches/{cfg.name}"
  train = tfds_midog.load_patches(data_dir, name, "train")
  assert len(train) == 1
  ex = train[0]
  assert ex["image"].shape == (PATCH, PATCH, 3)
  np.testing.assert_array_equal(ex["image"][:90, :100], small)
  assert np.all(ex["image"][90:] == 255) and np.all(ex["image"][:, 100:] == 255)
  np.testing.assert_array_equal(ex["mitoses"], [[50, 60]])
  assert ex["spacing_um"] == pytest.approx(0.5)
  assert ex["domain"] == b"canine cutaneous mast cell tumor"
  test = tfds_midog.load_patches(data_dir, name, "test")
  assert [(r["x0"], r["y0"]) for r in (test[0], test[1])] == [(0, 0), (128, 0)]
  np.testing.assert_array_equal(test[1]["image"], big[:, 128:])
  np.testing.assert_array_equal(test[1]["imposters"], [[72, 100]])
  assert test[1]["spacing_um"] == pytest.approx(0.23)  # nominal Hamamatsu XR
  with pytest.raises(ValueError, match="unlabeled"):
    tfds_midog.load_patches(data_dir, name, "unlabeled")


def test_corrupt_tiff_raises_and_leaves_nothing(tmp_path):
  manual, data_dir = tmp_path / "manual", tmp_path / "data"
  manual.mkdir()
  _write_set(manual)
  path = manual / "051.tiff"
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])  # header intact, later tiles cut off
  with pytest.raises(DataError, match="051.tiff"):
    _prepare(manual, data_dir)
  leftovers = [p for p in data_dir.rglob("*") if p.is_file()
               and ("array_record" in p.name or p.name == "dataset_info.json")]
  assert leftovers == []


def test_missing_image_and_size_mismatch(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_set(manual)
  os.remove(manual / "002.tiff")
  with pytest.raises(DataError, match=r"002\.tiff.*not found"):
    _prepare(manual, tmp_path / "data1")
  tifffile.imwrite(manual / "002.tiff", np.zeros((256, 200, 3), np.uint8),
                   tile=(64, 64), photometric="rgb")
  with pytest.raises(DataError, match=r"002\.tiff.*200x256"):
    _prepare(manual, tmp_path / "data2")
