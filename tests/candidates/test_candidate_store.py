"""The candidate store: contents, keys, atomic builds, grain, the CLI."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import grain.python as grain
import numpy as np
import pytest

from midog_jax.candidates import (CandidateStore, Settings, build_store, find_candidates,
                                  label_candidates, patches_for, store)
from midog_jax.data import midog
from midog_jax.data.synthetic import TRUTH
from midog_jax.errors import DataError

FAST = Settings(tile_px=200)  # several tiles per ~512 px image


@pytest.fixture()
def data(tiny_dataset, tmp_path):
  """A private copy of the tiny data set (tests below edit files)."""
  d = tmp_path / "data"
  shutil.copytree(tiny_dataset, d)
  return d


def _cases(d, ids=(1, 51, 151)):
  return [c for c in midog.load_midog(d / "MIDOG.json").cases if c.image_id in ids]


def test_store_equals_fresh_extraction(data, tmp_path):
  cases = _cases(data)
  s = build_store(cases, tmp_path / "stores", FAST, workers=1)
  assert s.domain_names == sorted({c.domain for c in cases})
  assert len(s) == len(s.labels) == len(s.domains) == len(s.image_ids) == len(s.xy)
  assert s.xy.dtype == np.float32 and s.labels.dtype == np.int32
  for c in cases:
    sel = np.flatnonzero(s.image_ids == c.image_id)
    xy = find_candidates(c.path)  # default tiles: a different tiling, same set
    np.testing.assert_array_equal(s.xy[sel], xy)
    assert (s.domains[sel] == s.domain_names.index(c.domain)).all()
    if c.labeled:
      np.testing.assert_array_equal(s.labels[sel], label_candidates(xy, c.mitoses, c.spacing_um)[0])
      assert s.labels[sel].sum() > 0
    else:
      assert (s.labels[sel] == -1).all()  # the unlabeled scanner
    want = patches_for(c.path, xy, 64)
    for k in np.random.default_rng(0).choice(len(sel), 12, replace=False):
      item = s[sel[k]]
      np.testing.assert_array_equal(item["patch"], want[k])
      assert item["patch"].shape == (64, 64, 3) and item["patch"].dtype == np.uint8
      assert int(item["label"]) == s.labels[sel[k]] and int(item["image_id"]) == c.image_id
      np.testing.assert_array_equal(item["xy"], xy[k])


def test_recall_per_domain(data, tmp_path):
  ds = midog.attach_truth(midog.load_midog(data / "MIDOG.json"), data / TRUTH)
  s = build_store(ds.cases, tmp_path / "stores", FAST, workers=1)
  rec = s.recall_per_domain()
  assert set(rec) == {c.domain for c in ds.cases}  # truth attached: all labelled
  for dom, row in rec.items():
    cs = [c for c in ds.cases if c.domain == dom]
    assert row["figures"] == sum(len(c.mitoses) for c in cs)
    found = sum(label_candidates(find_candidates(c.path), c.mitoses, c.spacing_um)[1] for c in cs)
    assert row["found"] == found
    assert row["recall"] == pytest.approx(found / row["figures"])


def test_same_inputs_reuse_and_changes_rebuild(data, tmp_path, monkeypatch):
  root = tmp_path / "stores"
  cases = _cases(data, (1, 2))
  first = build_store(cases, root, FAST, workers=1)

  def no_build(job):
    raise AssertionError("rebuilt a store that exists")

  monkeypatch.setattr(store, "_build_image", no_build)
  again = build_store(_cases(data, (1, 2)), root, Settings(tile_px=128), workers=1)
  assert again.path == first.path  # tile_px does not change the output
  monkeypatch.undo()

  changed = build_store(cases, root, Settings(k_std=2.5, tile_px=200), workers=1)
  assert changed.path != first.path and len(changed) != len(first)
  np.testing.assert_array_equal(changed.xy[changed.image_ids == 1],
                                find_candidates(data / "001.tiff", Settings(k_std=2.5)))

  # The annotation file with one figure moved: labels change, so a new store.
  ann = json.loads((data / "MIDOG.json").read_text())
  a = next(a for a in ann["annotations"] if a["image_id"] == 1 and a["category_id"] == 1)
  a["bbox"] = [v + 40 for v in a["bbox"]]
  (data / "MIDOG.json").write_text(json.dumps(ann))
  moved = build_store(_cases(data, (1, 2)), root, FAST, workers=1)
  assert moved.path != first.path
  np.testing.assert_array_equal(moved.xy, first.xy)

  # A touched image (same bytes, new mtime) rebuilds: the store cannot know.
  st = os.stat(data / "002.tiff")
  os.utime(data / "002.tiff", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  touched = build_store(_cases(data, (1, 2)), root, FAST, workers=1)
  assert touched.path not in (first.path, moved.path)
  assert len({p.name for p in root.iterdir()}) == 4  # no temp folders left


def test_a_failed_build_leaves_nothing_trusted(data, tmp_path, monkeypatch):
  root = tmp_path / "stores"
  cases = _cases(data, (1, 2))
  real, calls = store._build_image, []

  def dies_on_second(job):
    calls.append(job)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(job)

  monkeypatch.setattr(store, "_build_image", dies_on_second)
  with pytest.raises(KeyboardInterrupt):
    build_store(cases, root, FAST, workers=1)
  assert list(root.iterdir()) == []
  monkeypatch.undo()
  # A builder killed outright leaves its temp folder: removed by the next build
  # once its process is gone; the store is then built whole.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = root / f".tmp-{'0' * 24}-{dead.pid}-abcd"
  (stale / "x").mkdir(parents=True)
  s = build_store(cases, root, FAST, workers=1)
  assert not stale.exists() and len(s) > 0
  assert sorted(p.name for p in root.iterdir()) == [s.path.name]


def test_a_concurrent_builder_that_finishes_first_wins(data, tmp_path, monkeypatch):
  root = tmp_path / "stores"
  cases = _cases(data, (1,))
  real, other = store._run_jobs, []

  def racing(jobs, workers):
    if not other:  # another process builds and renames the same store meanwhile
      monkeypatch.setattr(store, "_run_jobs", real)
      other.append(build_store(cases, root, FAST, workers=1))
      monkeypatch.setattr(store, "_run_jobs", racing)
    return real(jobs, workers)

  monkeypatch.setattr(store, "_run_jobs", racing)
  s = build_store(cases, root, FAST, workers=1)
  assert s.path == other[0].path and len(s) == len(other[0]) > 0
  assert [p.name for p in root.iterdir()] == [s.path.name]  # our temp folder is gone


def test_a_bad_image_is_one_data_error_from_a_worker(data, tmp_path):
  (data / "051.tiff").write_bytes(b"not a tiff at all")
  cases = _cases(data, (1, 51))
  with pytest.raises(DataError, match="051.tiff"):
    build_store(cases, tmp_path / "stores", FAST, workers=2)
  assert [p.name for p in (tmp_path / "stores").iterdir()] == []
  (data / "002.tiff").unlink()
  with pytest.raises(DataError, match="002.tiff"):
    build_store(_cases(data, (2,)), tmp_path / "stores", FAST, workers=2)


def test_workers_give_the_same_store(data, tmp_path):
  cases = _cases(data, (1, 2, 51, 101))
  one = build_store(cases, tmp_path / "a", FAST, workers=1)
  two = build_store(cases, tmp_path / "b", FAST, workers=2)
  assert one.path.name == two.path.name
  for f in ("xy", "labels", "domains", "image_ids"):
    np.testing.assert_array_equal(getattr(one, f), getattr(two, f))
  for i in (0, len(one) // 2, len(one) - 1):
    np.testing.assert_array_equal(one[i]["patch"], two[i]["patch"])


def test_grain_reads_the_store(data, tmp_path):
  s = build_store(_cases(data, (1, 51)), tmp_path / "stores", FAST, workers=1)
  ds = grain.MapDataset.source(s).map(lambda d: dict(d, mean=d["patch"].mean()))
  assert len(ds) == len(s)
  for i in (0, 7, len(s) - 1):
    np.testing.assert_array_equal(ds[i]["patch"], s[i]["patch"])
    assert ds[i]["mean"] == s[i]["patch"].mean()
  batch = next(iter(grain.MapDataset.source(s).shuffle(seed=0).batch(16)))
  assert batch["patch"].shape == (16, 64, 64, 3) and batch["label"].shape == (16,)
  # Picklable (grain workers), readable after a round trip; a reopened store too.
  back = pickle.loads(pickle.dumps(s))
  np.testing.assert_array_equal(back[3]["patch"], s[3]["patch"])
  np.testing.assert_array_equal(CandidateStore(s.path)[3]["patch"], s[3]["patch"])
  with pytest.raises(IndexError):
    s[len(s)]


@pytest.mark.e2e
def test_cli(tiny_dataset, tmp_path):
  cmd = [sys.executable, "-m", "midog_jax.candidates", "--data", str(tiny_dataset),
         "--out", str(tmp_path / "stores"), "--workers", "1", "--tile_px", "256"]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  s = CandidateStore(out["store"])
  assert out["candidates"] == len(s) and out["images"] == 8
  assert out["mitotic_candidates"] == int((s.labels == 1).sum()) > 0
  assert sum(v["candidates"] for v in out["candidates_per_domain"].values()) == len(s)
  # Without --truth the unlabeled scanner has no recall (its labels are -1).
  assert "Leica GT450" not in out["recall_per_domain"]
  assert all(v["recall"] >= 0.8 for v in out["recall_per_domain"].values())
  bad = subprocess.run(cmd[:4] + [str(tmp_path / "missing")] + cmd[5:],
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
  assert "missing" in bad.stderr
