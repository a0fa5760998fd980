"""grain pipeline: fixed shapes, determinism, resume, per-process shards, workers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from midog_jax.data import midog, pipeline

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
