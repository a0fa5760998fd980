"""Experiment data (data/experiment.py): splits and the up-front image checks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile

from configs import common
from midog_jax.data import experiment
from midog_jax.errors import DataError


def _cfg(root):
  d = common.data_config()
  d.root = str(root)
  return d


def test_every_case_is_read_once_and_the_splits_do_not_overlap(tiny_dataset):
  data = experiment.load_experiment(_cfg(tiny_dataset))
  ids = [c.image_id for c in data.all_cases()]
  assert len(ids) == len(set(ids)) == 8
  assert not {c.image_id for c in data.train} & {c.image_id for c in data.val}
  assert [c.image_id for c in data.pool_cases] == (
      [c.image_id for c in data.train] + [c.image_id for c in data.unlabeled])


def test_a_missing_root_or_image_is_reported_before_training(tiny_dataset, tmp_path):
  with pytest.raises(DataError, match="the data root does not exist"):
    experiment.load_experiment(_cfg(tmp_path / "nope"))
  root = tmp_path / "copy"
  shutil.copytree(tiny_dataset, root)
  (root / "052.tiff").unlink()  # a validation or training image, either way
  with pytest.raises(DataError) as e:
    experiment.load_experiment(_cfg(root))
  assert e.value.path.endswith("052.tiff") and "not found" in str(e.value)


def test_an_image_smaller_than_its_annotations_is_refused(tiny_dataset, tmp_path):
  root = tmp_path / "copy"
  shutil.copytree(tiny_dataset, root)
  with tifffile.TiffFile(root / "001.tiff") as t:
    h, w = t.pages.first.shape[:2]
  tifffile.imwrite(root / "001.tiff", np.full((h // 2, w, 3), 200, np.uint8),
                   photometric="rgb")
  with pytest.raises(DataError, match=rf"001\.tiff: image is {w}x{h // 2} px but .*MIDOG\.json"
                                      rf" says {w}x{h}"):
    experiment.load_experiment(_cfg(root))
