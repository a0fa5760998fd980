"""The benchmark suites of the synthetic generator (issue 12): layout, protocols,
raters, artefacts, and that the data is hard in the intended ways."""

from __future__ import annotations

import json

import numpy as np
import pytest

from midog_jax.data import experiment, midog
from midog_jax.data.synthetic import artefacts, raters, stats, suite_write, suites
from midog_jax.errors import DataError
from configs import common


@pytest.fixture(scope="module")
def s21(tmp_path_factory):
  out = tmp_path_factory.mktemp("s21")
  suite_write.generate_suite(out, "midog21", "tiny", seed=0)
  return out


@pytest.fixture(scope="module")
def spp(tmp_path_factory):
  out = tmp_path_factory.mktemp("spp")
  suite_write.generate_suite(out, "midogpp", "tiny", seed=0)
  return out


def _json(path):
  return json.loads(path.read_text())


def test_midog21_layout_and_protocol(s21):
  man = suite_write.read_suite(s21)
  assert man["domain_key"] == "scanner"
  assert man["train_domains"] == ["Aperio CS2", "Hamamatsu S360", "Hamamatsu XR"]
  assert man["unlabeled_domains"] == ["Leica GT450"]
  assert man["unseen_domains"] == ["3D Histech", "Zeiss Axioscan Z1"]
  train = midog.load_midog(s21 / "train" / "MIDOG++.json")
  test = midog.load_midog(s21 / "test" / "MIDOG++.json")
  # One tumour type: the domain is the scanner without being asked.
  assert {c.domain for c in train.labeled} == set(man["train_domains"])
  assert {c.domain for c in train.unlabeled} == {"Leica GT450"}
  assert all(not len(c.mitoses) and not len(c.imposters) for c in train.unlabeled)
  # The unlabeled scanner is not a test scanner; the unseen ones are only in test/.
  assert {c.domain for c in test.cases} == set(man["train_domains"]) | set(man["unseen_domains"])
  assert not {c.image_id for c in train.cases} & {c.image_id for c in test.cases}
  assert not list((s21 / "train").glob(f"{test.cases[0].image_id:03d}.tiff"))
  # Spacing follows the scanner (Zeiss 0.22 um/px, not the 0.25 default).
  assert {c.spacing_um for c in test.cases if c.domain == "Zeiss Axioscan Z1"} == {0.22}


def test_midog21_trains_from_train_folder_alone(s21):
  d = common.data_config()
  d.root = str(s21 / "train")
  data = experiment.load_experiment(d)
  assert data.unlabeled and {c.domain for c in data.unlabeled} == {"Leica GT450"}
  assert not data.heldout  # no truth file: the test set lives in test/ only
  assert all("/test/" not in str(c.path) for c in data.all_cases())


def test_labels_are_rater_votes_with_majority_category(s21):
  anns = _json(s21 / "test" / "MIDOG++.json")["annotations"]
  assert anns
  for a in anns:
    v = a["labels"]
    assert len(v) == (2 if v[0] == v[1] else 3)
    assert a["category_id"] == (1 if sum(x == 1 for x in v) >= 2 else 2)
  # Disagreements exist (label noise), and both categories occur.
  assert any(len(a["labels"]) == 3 for a in anns)
  assert {a["category_id"] for a in anns} == {1, 2}
  man = suite_write.read_suite(s21)
  votes = [a["labels"] for a in anns]
  assert man["human_agreement"]["f1"] == pytest.approx(raters.agreement(votes))


def test_roi_types_and_artefacts_recorded(s21):
  ims = _json(s21 / "train" / "MIDOG++.json")["images"] + \
      _json(s21 / "test" / "MIDOG++.json")["images"]
  assert {im["roi_type"] for im in ims} <= set(suites.ROI_TYPES)
  assert len({im["roi_type"] for im in ims}) >= 2
  kinds = {a.kind for s in suites.slots("midog21", "small")
           for a in suites.plan_slot(s, "small", 0)[0].artefacts}
  assert kinds == set(artefacts.KINDS)


def test_challenging_rois_have_more_lookalikes_and_hotspots_more_mitoses():
  per = {r: [] for r in suites.ROI_TYPES}
  for s in suites.slots("midogpp", "small"):
    p, _ = suites.plan_slot(s, "small", 0)
    n_mit = sum(f.kind in suites.SUITE_MITOSIS_KINDS for f in p.figures)
    per[p.roi_type].append((n_mit, len(p.figures) - n_mit))
  mit = {r: np.mean([a for a, _ in v]) for r, v in per.items()}
  ratio = {r: np.sum([b for _, b in v]) / np.sum([a for a, _ in v]) for r, v in per.items()}
  assert mit["hotspot"] > 1.5 * mit["random"]
  assert ratio["challenging"] > 1.6 * ratio["random"]
  assert 1.0 <= ratio["random"] <= 1.8  # look-alikes per mitosis, real 1.2-1.6


def test_midogpp_domains_metadata_and_splits(spp):
  man = suite_write.read_suite(spp)
  assert man["domain_key"] == "tumor_type" and len(man["train_domains"]) == 7
  train = midog.load_midog(spp / "train" / "MIDOG++.json")
  assert {c.domain for c in train.cases} == {t[0] for t in suites.TUMOURS}
  lymph = [c for c in train.cases if c.domain == "canine lymphosarcoma"]
  assert {(c.scanner, c.lab, c.species) for c in lymph} == {("3D Histech", "VMU Vienna",
                                                              "Canine")}
  assert {c.official_split for c in train.cases} == {"train"}
  rest, held = midog.leave_one_domain_out(train.labeled, "human melanoma")
  assert held and all(c.domain != "human melanoma" for c in rest)


def test_generation_is_deterministic(s21, tmp_path):
  again = suite_write.generate_suite(tmp_path / "again", "midog21", "tiny", seed=0,
                                     workers=1)
  for sub in ("train", "test"):
    assert (again / sub / "MIDOG++.json").read_bytes() == \
        (s21 / sub / "MIDOG++.json").read_bytes()
    tif = sorted((s21 / sub).glob("*.tiff"))[0]
    assert (again / sub / tif.name).read_bytes() == tif.read_bytes()


def test_refuses_foreign_folder(tmp_path):
  (tmp_path / "train").mkdir()
  (tmp_path / "train" / "MIDOG++.json").write_text("{}")
  with pytest.raises(DataError, match="did not write"):
    suite_write.generate_suite(tmp_path, "midog21", "tiny")


def test_tissue_is_dense_and_textured(s21):
  """Issue 12 item 5: most of a region is stained tissue, with fine texture."""
  cov, hf = [], []
  for tif in sorted((s21 / "train").glob("*.tiff")):
    st = stats.image_stats(tif)
    cov.append(st["tissue_coverage"])
    hf.append(st["high_frequency_energy"])
  assert np.mean(cov) > 0.5  # legacy presets: 0.05-0.29
  assert np.mean(hf) > 3.0  # legacy presets: 1.4-2.4
