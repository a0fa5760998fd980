"""grain pipeline: fixed shapes, determinism, resume, per-process shards, workers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from midog_jax.data import midog, pipeline, sampling

CFG = pipeline.PatchConfig(patch_size=96, max_points=8, shift=8, elastic_alpha=2.0,
                           elastic_sigma=6.0, colour="od")


@pytest.fixture(scope="module")
def cases(tiny_dataset):
  return midog.load_midog(tiny_dataset / "MIDOG.json").labeled


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_have_fixed_shapes_and_valid_labels(cases):
  ds = pipeline.make_dataset(cases, CFG, seed=0, batch_size=4)
  b = ds[0]
  assert b["image"].shape == (4, 96, 96, 3) and b["image"].dtype == np.uint8
  assert b["points"].shape == (4, 8, 2) and b["mask"].shape == (4, 8)
  pts = b["points"][b["mask"]]
  assert np.all((pts >= -0.5) & (pts < 95.5))
  assert set(np.unique(b["classes"][b["mask"]])) <= {1, 2}
  assert np.all(b["classes"][~b["mask"]] == 0)


def test_labels_in_window_use_the_pixel_rule(cases):
  # Points on both borders of the window of pixels 10..41 x 20..51: the left
  # and top borders are in, the right and bottom ones out.
  case = dataclasses.replace(
      cases[0], mitoses=np.float32([[9.5, 30], [41.5, 30], [20, 19.5]]),
      imposters=np.float32([[20, 51.5], [41.4, 51.4]]))
  pts, cls = pipeline._labels_in_window(case, 10, 20, 32)
  np.testing.assert_allclose(pts, [[-0.5, 10], [10, -0.5], [31.4, 31.4]],
                             atol=1e-5)
  np.testing.assert_array_equal(cls, [midog.MITOSIS, midog.MITOSIS,
                                      midog.IMPOSTER])
  everything = np.concatenate([case.mitoses, case.imposters])
  np.testing.assert_array_equal(pts, sampling.points_in_window(everything, 10,
                                                               20, 32)[0])


def test_mitosis_centred_p1_always_has_a_mitosis(cases):
  cfg = pipeline.PatchConfig(patch_size=96, p_mitosis=1.0, shift=0, d4=False,
                             colour="none")
  ds = pipeline.make_dataset(cases, cfg, seed=3, batch_size=8)
  b = ds[0]
  has = ((b["classes"] == midog.MITOSIS) & b["mask"]).any(axis=1)
  assert has.all()


def test_deterministic_and_seed_dependent(cases):
  a = pipeline.make_dataset(cases, CFG, seed=0, batch_size=4)[2]
  b = pipeline.make_dataset(cases, CFG, seed=0, batch_size=4)[2]
  c = pipeline.make_dataset(cases, CFG, seed=1, batch_size=4)[2]
  _assert_same(a, b)
  assert not np.array_equal(a["image"], c["image"])


def test_resume_from_saved_state_gives_identical_batches(cases):
  ds = pipeline.make_dataset(cases, CFG, seed=0, batch_size=2)
  it = pipeline.make_iterator(ds)
  _batches(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # survives serialisation
  expected = _batches(it, 3)
  it2 = pipeline.make_iterator(pipeline.make_dataset(cases, CFG, seed=0, batch_size=2))
  it2.set_state(state)
  for e, g in zip(expected, _batches(it2, 3)):
    _assert_same(e, g)


def test_process_shards_partition_the_global_batch(cases):
  cfg = pipeline.PatchConfig(patch_size=64, shift=0, d4=False, colour="none")
  whole = pipeline.make_dataset(cases, cfg, seed=5, batch_size=4)[1]
  shards = [pipeline.make_dataset(cases, cfg, seed=5, batch_size=4, process_index=p,
                                  process_count=2)[1] for p in range(2)]
  # Global examples 4..7: process 0 holds 4 and 6, process 1 holds 5 and 7.
  for p in range(2):
    np.testing.assert_array_equal(shards[p]["image"], whole["image"][p::2])


def test_balanced_and_domain_stratified(cases):
  cfg = pipeline.PatchConfig(patch_size=64, strategy="balanced", stratify_domains=True,
                             neg_min_dist_px=40, shift=0, d4=False, colour="none")
  b = pipeline.make_dataset(cases, cfg, seed=0, batch_size=12)[0]
  assert b["positive"].sum() == 6
  # Positive patches are centred on a mitotic figure.
  for i in np.flatnonzero(b["positive"]):
    pts = b["points"][i][b["mask"][i] & (b["classes"][i] == midog.MITOSIS)]
    assert len(pts) and np.min(np.abs(pts - 32).max(axis=1)) <= 8
  domains = sorted({c.domain for c in cases})
  counts = np.bincount(b["domain"], minlength=len(domains))
  assert np.all(counts == 12 // len(domains))


def test_worker_processes_match_in_process(cases):
  ds = pipeline.make_dataset(cases, CFG, seed=0, batch_size=2)
  serial = _batches(pipeline.make_iterator(ds), 2)
  parallel = _batches(pipeline.make_iterator(ds, num_workers=2), 2)
  for a, b in zip(serial, parallel):
    _assert_same(a, b)


@pytest.fixture(scope="module")
def with_unlabeled(tiny_dataset):
  ds = midog.load_midog(tiny_dataset / "MIDOG.json")
  return ds.labeled + ds.unlabeled


def _pool_for(cases):
  """Two centres in the first case and three in the first unlabeled one."""
  u = next(i for i, c in enumerate(cases) if not c.labeled)
  return np.array([[0, 100.0, 120.0], [0, 300.5, 40.0],
                   [u, 50.0, 60.0], [u, 200.0, 200.0], [u, 400.0, 330.0]])


def test_negative_pool_gives_every_negative(with_unlabeled):
  cases = with_unlabeled
  pool = _pool_for(cases)
  cfg = pipeline.PatchConfig(patch_size=64, strategy="balanced", shift=0, d4=False,
                             colour="none")
  ds = pipeline.make_dataset(cases, cfg, seed=2, batch_size=16, negatives=pool)
  by_id = {c.image_id: i for i, c in enumerate(cases)}
  hit = set()
  for b in (ds[0], ds[1]):
    assert list(b["positive"]) == [1, 0] * 8
    for k in range(1, 16, 2):
      ci = by_id[int(b["image_id"][k])]
      centre = np.array([b["x0"][k], b["y0"][k]]) + 32
      rows = np.flatnonzero(pool[:, 0] == ci)
      assert len(rows), f"negative from case {ci}, which has no pool entry"
      # Centred on a pool entry up to the +-3 px jitter (and pixel rounding).
      err = np.abs(pool[rows, 1:] - centre).max(axis=1)
      assert err.min() <= 3.5
      hit.add(int(rows[err.argmin()]))
  assert len(hit) >= 4  # drawn across the pool, unlabeled case included
  again = pipeline.make_dataset(cases, cfg, seed=2, batch_size=16, negatives=pool)[1]
  _assert_same(ds[1], again)


def test_negative_pool_pickles_and_keeps_positive_slots(with_unlabeled):
  import pickle
  cases = with_unlabeled
  cfg = pipeline.PatchConfig(patch_size=64, strategy="balanced", stratify_domains=True,
                             shift=4, colour="od")
  maker = pipeline.PatchMaker(cases, cfg, seed=1, negatives=_pool_for(cases).tolist())
  copy = pickle.loads(pickle.dumps(maker))
  for i in (3, 4):
    _assert_same(maker(i), copy(i))
  # The unlabeled domain (no figures) never takes a positive slot.
  b = pipeline.make_dataset(cases, cfg, seed=1, batch_size=12,
                            negatives=_pool_for(cases))[0]
  assert list(b["positive"]) == [1, 0] * 6


def test_negative_pool_is_checked(with_unlabeled):
  cases = with_unlabeled
  bal = pipeline.PatchConfig(patch_size=64, strategy="balanced")
  with pytest.raises(ValueError, match="strategy 'balanced'"):
    pipeline.PatchMaker(cases, pipeline.PatchConfig(patch_size=64), 0,
                        negatives=_pool_for(cases))
  with pytest.raises(ValueError, match=r"\(N, 3\)"):
    pipeline.PatchMaker(cases, bal, 0, negatives=np.zeros((4, 2)))
  with pytest.raises(ValueError, match="case indices"):
    pipeline.PatchMaker(cases, bal, 0, negatives=[[len(cases), 1.0, 1.0]])
  with pytest.raises(ValueError, match="non-finite"):
    pipeline.PatchMaker(cases, bal, 0, negatives=[[0, np.nan, 1.0]])
