"""Image-level fields: the labelling rule, the field grid, CSV items, class balance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from midog_jax.data import midog
from midog_jax.errors import DataError
from midog_jax.image_level import fields as F

# A 100 px field at (200, 300); margin 30 px (7.5 um at 0.25 um/px).
X0, Y0, SIDE, M = 200, 300, 100, 30.0
LO_X, LO_Y = X0 - 0.5, Y0 - 0.5          # pixel k spans [k - 0.5, k + 0.5]
HI_X, HI_Y = LO_X + SIDE, LO_Y + SIDE


def label(*pts):
  return F.field_label(np.asarray(pts, np.float32).reshape(-1, 2), X0, Y0, SIDE, M)


def test_no_figures_is_negative():
  assert label() == F.NEGATIVE


def test_figure_deep_inside_is_positive():
  assert label((LO_X + 50, LO_Y + 50)) == F.POSITIVE


def test_inside_exactly_at_the_margin_is_positive_just_short_is_excluded():
  assert label((LO_X + M, LO_Y + 50)) == F.POSITIVE
  assert label((HI_X - M, HI_Y - M)) == F.POSITIVE
  assert label((LO_X + M - 0.5, LO_Y + 50)) == F.EXCLUDED
  assert label((LO_X + 50, HI_Y - M + 0.5)) == F.EXCLUDED


def test_outside_far_is_negative_near_is_excluded():
  assert label((LO_X - M, LO_Y + 50)) == F.NEGATIVE       # exactly m away
  assert label((HI_X + 100, HI_Y + 100)) == F.NEGATIVE
  assert label((LO_X - M + 0.5, LO_Y + 50)) == F.EXCLUDED  # a cut cell reaches in
  assert label((HI_X + 5, LO_Y + 50)) == F.EXCLUDED


def test_outside_near_a_corner_uses_the_euclidean_distance():
  d = M / np.sqrt(2)  # within m on each axis, but m away diagonally
  assert label((HI_X + d + 0.1, HI_Y + d + 0.1)) == F.NEGATIVE
  assert label((HI_X + d - 1, HI_Y + d - 1)) == F.EXCLUDED


def test_one_figure_deep_inside_wins_over_a_border_figure():
  assert label((LO_X + 2, LO_Y + 50), (LO_X + 50, LO_Y + 50)) == F.POSITIVE
  assert label((LO_X + 2, LO_Y + 50), (HI_X + 200, LO_Y)) == F.EXCLUDED


def _tiff(path, w, h, spacing=0.25, value=200):
  img = np.full((h, w, 3), value, np.uint8)
  img[:, : w // 2, 0] = 10  # left half differs, so resampling is visible
  kw = {}
  if spacing:
    kw = dict(resolution=(1e4 / spacing, 1e4 / spacing), resolutionunit="CENTIMETER")
  tifffile.imwrite(path, img, photometric="rgb", **kw)
  return path


def _case(path, mitoses, w, h, domain="A"):
  return midog.Case(image_id=1, file_name=Path(path).name, path=Path(path), width=w,
                    height=h, scanner=domain, tumor_type="", lab="", species="",
                    domain=domain, spacing_um=0.25, labeled=True,
                    mitoses=np.asarray(mitoses, np.float32).reshape(-1, 2),
                    imposters=np.zeros((0, 2), np.float32))


def test_case_fields_grid_labels_and_exclusions(tmp_path):
  # 0.0016 mm^2 = 40 um = 160 px at 0.25 um/px; 400 px image -> origins 0, 160, 240.
  path = _tiff(tmp_path / "a.tif", 400, 400)
  case = _case(path, [[80, 80], [161, 80]], 400, 400)
  items, excluded = F.case_fields(case, 0.0016, 64)
  got = {(it.x, it.y): it.label for it in items}
  assert all(it.w == it.h == 160 and it.out_px == 64 for it in items)
  assert got[(0, 0)] == F.POSITIVE                       # (80, 80) deep inside
  assert (160, 0) not in got                # (161, 80) lies 1.5 px inside its border
  assert got[(240, 0)] == F.NEGATIVE        # ... and 78.5 px left of this one
  assert got[(0, 160)] == F.NEGATIVE and got[(240, 240)] == F.NEGATIVE
  assert excluded == 1 and len(items) == 8
  # Row-major, the last field flush with the border.
  assert [(it.x, it.y) for it in items][:1] == [(0, 0)] and max(it.x for it in items) == 240
  px = F.read_item(items[0])
  assert px.shape == (64, 64, 3) and px.dtype == np.uint8


def test_case_spacing_from_tags_sets_the_field_size(tmp_path):
  path = _tiff(tmp_path / "b.tif", 400, 400, spacing=0.5)
  items, _ = F.case_fields(_case(path, [], 400, 400), 0.0016, 64)
  assert items[0].w == 80  # 40 um at 0.5 um/px, not the nominal 0.25


def test_label_csv_rescale_physical_and_splits(tmp_path):
  _tiff(tmp_path / "big.tif", 300, 200, spacing=0.25)
  _tiff(tmp_path / "small.tif", 50, 50, spacing=0.5)
  (tmp_path / "l.csv").write_text(
      "path,label,domain,split\nbig.tif,1,X,train\nsmall.tif,0,Y,val\nbig.tif,0,Y,test\n")
  by = F.read_label_csv(tmp_path / "l.csv", 64, "rescale", 0.25)
  assert [len(by[s]) for s in F.SPLITS] == [1, 1, 1]
  big = by["train"][0]
  assert (big.x, big.y, big.w, big.h, big.label, big.domain) == (0, 0, 300, 200, 1, "X")
  assert F.read_item(big).shape == (64, 64, 3)
  by = F.read_label_csv(tmp_path / "l.csv", 64, "physical", 0.25)
  big, small = by["train"][0], by["val"][0]
  assert (big.w, big.x, big.y) == (64, 118, 68)          # centred 64 px at the same spacing
  assert (small.w, small.x) == (32, 9)                   # 64 px at 0.25 = 32 px at 0.5
  wide = F.image_item(tmp_path / "small.tif", 128, "physical", 0.25)
  assert (wide.w, wide.x, wide.y) == (64, -7, -7)         # larger than the image
  px = F.read_item(wide)
  assert (px[0, 0] == 255).all() and not (px[64, 64] == 255).all()  # white beyond it


def test_label_csv_errors_name_the_row(tmp_path):
  _tiff(tmp_path / "a.tif", 40, 40, spacing=None)
  (tmp_path / "bad.csv").write_text("path,label\na.tif,2\n")
  with pytest.raises(DataError, match="row 2: label"):
    F.read_label_csv(tmp_path / "bad.csv", 32, "rescale", 0.25)
  (tmp_path / "nospacing.csv").write_text("path,label\na.tif,1\n")
  with pytest.raises(DataError, match="pixel spacing"):
    F.read_label_csv(tmp_path / "nospacing.csv", 32, "physical", 0.25)
  (tmp_path / "missing.csv").write_text("path,label\nnope.tif,1\n")
  with pytest.raises(DataError, match="row 2"):
    F.read_label_csv(tmp_path / "missing.csv", 32, "rescale", 0.25)


def test_stratified_split_keeps_every_group_on_both_sides():
  items = [F.Item(f"p{i}", 0, 0, 1, 1, 1, i % 2, "AB"[i // 10 % 2], f"n{i}")
           for i in range(40)]
  train, val = F.stratified_split(items, 0.2, seed=0)
  assert len(train) + len(val) == 40 and not {i.name for i in train} & {i.name for i in val}
  for dom in "AB":
    for lab in (0, 1):
      assert sum(i.domain == dom and i.label == lab for i in val) == 2
  assert [i.name for i in F.stratified_split(items, 0.2, seed=0)[1]] == [i.name for i in val]


def test_balance_counts_per_domain():
  items = [F.Item("p", 0, 0, 1, 1, 1, lab, dom, "n")
           for lab, dom in [(1, "A"), (0, "A"), (0, "A"), (1, "B")]]
  b = F.balance(items)
  assert b == {"all": dict(positive=2, negative=2), "A": dict(positive=1, negative=2),
               "B": dict(positive=1, negative=0)}
  assert "A" in F.format_balance({"train": items})
