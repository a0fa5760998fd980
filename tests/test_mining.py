"""Negative mining (Lafarge & Koelzer, MIDOG 2022): stain-mined ink, pool, rounds.

Images are real tiled TIFFs rendered through Beer-Lambert with known H&E
vectors, dark (in-plane) hematoxylin nuclei and a few blobs of dark green ink
(out of the H&E plane); the rounds driver trains for real on the tiny set.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from midog_jax import mining
from midog_jax.data import experiment, midog, stain
from midog_jax.data.midog import Case

H = np.array([0.65, 0.70, 0.29])
E = np.array([0.07, 0.99, 0.11])
INK = ((80.0, 90.0), (300.0, 100.0), (200.0, 250.0))
W, HT = 384, 320


def _render(path: Path, ink=INK, seed=0) -> Path:
  """H&E tissue (white strip on the right), dark nuclei, dark green ink blobs.

  The tissue is as dense as a MIDOG region (about 90% of the pixels pass
  Macenko's transparency cut, OD 0.15 in log10 units, in every channel).
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:HT, 0:W].astype(np.float32)

  def field(sigma, lo, hi):
    f = ndimage.gaussian_filter(rng.random((HT, W)), sigma)
    return lo + (f - f.min()) / (f.max() - f.min()) * (hi - lo)

  ch, ce = field(6, 0.8, 1.6), field(8, 0.5, 1.5)
  for cx, cy in rng.uniform(20, [W - 20, HT - 20], (15, 2)):
    ch = ch + 1.6 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 6.0 ** 2))
  tissue = (xx < W - 40)[..., None]
  rgb = stain.od_to_rgb((ch[..., None] * H + ce[..., None] * E) * tissue).astype(np.float32)
  for cx, cy in ink:
    m = (xx - cx) ** 2 + (yy - cy) ** 2 <= 9 ** 2
    rgb[m] = rgb[m] * 0.15 + np.array([20, 60, 25]) * 0.85
  rgb = np.clip(rgb + rng.normal(0, 2, rgb.shape), 0, 255).round().astype(np.uint8)
  tifffile.imwrite(path, rgb, photometric="rgb", tile=(128, 128), compression="zlib",
                   resolution=(40000, 40000), resolutionunit="CENTIMETER")
  return path


def _case(path: Path, image_id: int, mitoses=(), imposters=(), labeled=False) -> Case:
  return Case(image_id=image_id, file_name=path.name, path=path, width=W, height=HT,
              scanner="s", tumor_type="", lab="", species="", domain="d",
              spacing_um=0.25, labeled=labeled,
              mitoses=np.asarray(mitoses, np.float32).reshape(-1, 2),
              imposters=np.asarray(imposters, np.float32).reshape(-1, 2))


@pytest.fixture(scope="module")
def ink_case(tmp_path_factory) -> Case:
  return _case(_render(tmp_path_factory.mktemp("ink") / "ink.tif"), 151)


def test_stain_mining_finds_the_ink_not_the_nuclei(ink_case, tmp_path):
  clean = _case(_render(tmp_path / "clean.tif", ink=()), 152)
  pool, report = mining.stain_mined_negatives([ink_case, clean], case_offset=7,
                                              top_k_per_case=5)
  # Only the three ink blobs: the dark nuclei lie in the H&E plane and the
  # clean image has nothing above the residual floor.
  assert pool.shape == (3, 3) and report["total"] == 3
  assert np.all(pool[:, 0] == 7)
  d = np.hypot(*(pool[:, None, 1:] - np.asarray(INK)[None]).transpose(2, 0, 1))
  assert np.all(d.min(1) <= 4.0)
  assert sorted(d.argmin(1)) == [0, 1, 2]  # one centre per blob
  assert [c["found"] for c in report["cases"]] == [3, 0]
  # The fit ignored the ink: the residual direction is the true H x E normal.
  normal = np.cross(H, E) / np.linalg.norm(np.cross(H, E))
  for c in report["cases"]:
    assert abs(np.dot(c["stain_matrix"][2], normal)) > 0.99
  two, _ = mining.stain_mined_negatives([ink_case], 0, top_k_per_case=2)
  assert len(two) == 2 and np.hypot(*(two[0, 1:] - two[1, 1:])) >= 50


def test_initial_pool_is_far_from_mitoses_and_holds_the_imposters(tiny_dataset, tmp_path):
  ds = midog.load_midog(tiny_dataset / "MIDOG.json")
  cases = ds.labeled + ds.unlabeled
  pool, counts = mining.initial_negative_pool(cases, 6, np.random.default_rng(0), 40.0)
  n_lab = len(ds.labeled)
  assert counts["random"] == 6 * n_lab
  assert len(pool) == counts["random"] + counts["imposter"]
  assert pool[:, 0].max() < n_lab  # no random point on an unlabeled image
  for ci, case in enumerate(ds.labeled):
    rows = pool[pool[:, 0] == ci, 1:]
    rand = pool[:counts["random"]][pool[:counts["random"], 0] == ci, 1:]
    assert len(rand) == 6
    if len(case.mitoses):
      d = np.hypot(*(rand[:, None] - case.mitoses[None]).transpose(2, 0, 1))
      assert d.min() >= 40.0
    # Every imposter far from the mitoses is in the pool.
    for p in case.imposters:
      far = not len(case.mitoses) or np.hypot(*(case.mitoses - p).T).min() >= 40 + 3 * np.sqrt(2)
      assert far == bool(np.any(np.all(rows == p, axis=1)))
  again, _ = mining.initial_negative_pool(cases, 6, np.random.default_rng(0), 40.0)
  np.testing.assert_array_equal(pool, again)
  # An imposter right beside a mitosis would make a "negative" showing one.
  c = _case(tmp_path / "x.tif", 1, mitoses=[[100, 100]], imposters=[[105, 100], [250, 200]],
            labeled=True)
  pool, counts = mining.initial_negative_pool([c], 50, np.random.default_rng(1), 30.0)
  assert counts == dict(random=50, imposter=1, imposter_near_mitosis=1)
  np.testing.assert_array_equal(pool[-1], [0, 250, 200])
  assert np.hypot(pool[:50, 1] - 100, pool[:50, 2] - 100).min() >= 30


def test_drop_easy_keeps_the_hard_negatives():
  pool = np.arange(18, dtype=np.float64).reshape(6, 3)
  scores = np.array([0.9, 0.1, 0.5, 0.05, 0.7, 0.3])
  kept, removed = mining.drop_easy(pool, scores, keep_fraction=0.5)
  assert removed == 3
  np.testing.assert_array_equal(kept, pool[[0, 2, 4]])  # pool order kept
  kept, removed = mining.drop_easy(pool, scores, threshold=0.3)
  assert removed == 2 and len(kept) == 4
  kept, removed = mining.drop_easy(pool, scores, threshold=0.95)
  np.testing.assert_array_equal(kept, pool[[0]])  # never empty: the hardest stays
  with pytest.raises(ValueError, match="exactly one"):
    mining.drop_easy(pool, scores)
  with pytest.raises(ValueError, match="scores"):
    mining.drop_easy(pool, scores[:5], keep_fraction=0.5)


def test_score_negatives_scores_centred_patches_in_pool_order(ink_case):
  tissue = [(40.0, 40.0), (150.0, 160.0), (250.0, 60.0), (120.0, 280.0)]
  pool = np.array([[0, *tissue[0]], [0, *INK[1]], [0, *tissue[1]], [0, *INK[0]],
                   [0, *tissue[2]], [0, *tissue[3]], [0, *INK[2]]])
  shapes = []

  def darkness(batch):  # a stand-in classifier: dark centre = "mitosis-like"
    shapes.append((batch.shape, batch.dtype))
    c = batch[:, 14:19, 14:19].astype(np.float32)
    return 1.0 - c.mean((1, 2, 3)) / 255.0

  scores = mining.score_negatives(darkness, [ink_case], pool, 32, batch_size=4)
  assert shapes == [((4, 32, 32, 3), np.uint8)] * 2  # padded last batch
  for j, (_, x, y) in enumerate(pool):
    patch = mining.read_centred(ink_case, x, y, 32)
    assert scores[j] == pytest.approx(darkness(patch[None])[0], abs=1e-6)
  kept, removed = mining.drop_easy(pool, scores, keep_fraction=3 / 7)
  assert removed == 4
  np.testing.assert_array_equal(kept, pool[[1, 3, 6]])  # the ink


def _retina_config(data_root, **mining_cfg):
  from configs import retina
  c = retina.get_config("tiny")
  c.data.root = str(data_root)
  c.data.strategy = "balanced"
  c.total_steps = 3
  c.checkpoint_every = 3
  c.eval_every = 1000
  c.mining = ml_collections.ConfigDict(mining_cfg)
  return c


def test_rounds_need_balanced_batches_and_known_settings(tiny_dataset, tmp_path):
  c = _retina_config(tiny_dataset)
  with pytest.raises(ValueError, match="rounds"):
    mining.run_rounds(c, tmp_path / "w", rounds=0)
  c.data.strategy = "mitosis_centred"
  with pytest.raises(ValueError, match="balanced"):
    mining.run_rounds(c, tmp_path / "w", rounds=1)
  c = _retina_config(tiny_dataset, typo=1)
  with pytest.raises(ValueError, match="typo"):
    mining.run_rounds(c, tmp_path / "w", rounds=1)
  assert not (tmp_path / "w").exists()


@pytest.mark.e2e
def test_round_zero_trains_on_the_mined_pool(tiny_dataset, tmp_path):
  c = _retina_config(tiny_dataset, random_per_case=4, stain_top_k=2)
  w = tmp_path / "mine"
  summary = mining.run_rounds(c, w, rounds=1)
  saved = json.loads((w / "mining.json").read_text())
  assert saved == json.loads(json.dumps(summary))
  (r0,) = saved["rounds"]
  data = experiment.load_experiment(c.data)
  n_imp = sum(len(k.imposters) for k in data.train)
  added = r0["added"]
  assert added["random"] == 4 * len(data.train) > 0
  assert 0 < added["imposter"] <= n_imp
  assert added["stain"] == saved["stain"]["total"] <= 2 * len(data.unlabeled)
  assert r0["pool_size"] == sum(added.values()) and r0["removed"] == dict(
      random=0, imposter=0, stain=0)
  with np.load(w / "round_0" / "negatives.npz") as z:
    assert z["pool"].shape == (r0["pool_size"], 3)
    np.testing.assert_array_equal(np.bincount(z["sources"], minlength=3),
                                  [added[s] for s in mining.SOURCES])
  assert (w / "round_0" / "checkpoints" / "latest" / "3").is_dir()
  assert saved["best_round"] == 0


@pytest.mark.e2e
def test_rounds_drop_the_easy_negatives_and_fine_tune(tiny_dataset, tmp_path):
  from midog_jax import checkpoint as ckpt_lib
  from midog_jax import detectors
  from configs import p4_resnet
  from midog_jax.mining import rounds as rounds_lib
  c = p4_resnet.get_config("tiny")
  c.data.root = str(tiny_dataset)
  c.mining = ml_collections.ConfigDict(dict(random_per_case=4, stain_top_k=2,
                                            keep_fraction=0.5))
  detector = detectors.build(c)
  assert c.data.patch_size == 0 and detector.patch_size > 0  # the detector's own
  w = tmp_path / "p4"
  summary = mining.run_rounds(c, w, rounds=2)
  r0, r1 = summary["rounds"]  # round 1 always runs; a stop comes after it
  n0, n1 = r0["pool_size"], r1["pool_size"]
  assert n1 == int(np.ceil(n0 / 2)) and sum(r1["removed"].values()) == n0 - n1
  assert r1["added"] == dict(random=0, imposter=0, stain=0)
  assert r1["improved"] == (r1["val_f1"] > r0["val_f1"])
  assert summary["best_round"] == (1 if r1["improved"] else 0)
  with np.load(w / "round_0" / "negatives.npz") as z:
    pool0 = z["pool"]
  with np.load(w / "round_1" / "negatives.npz") as z:
    pool1 = z["pool"]
  # Round 1 kept exactly the negatives round 0's best weights found hardest.
  data = experiment.load_experiment(c.data)
  variables, _ = ckpt_lib.load_for_inference(w / "round_0", "best")
  psize = detector.patch_size
  scores = mining.score_negatives(detector.make_patch_score_fn(variables, psize),
                                  data.pool_cases, pool0, psize)
  kept = (pool0[:, None] == pool1[None]).all(-1).any(1)
  assert kept.sum() == n1 and scores[kept].min() >= scores[~kept].max()
  cfg1 = json.loads((w / "round_1" / "config.json").read_text())
  assert cfg1["init_from"] == str(rounds_lib._weights_dir(w / "round_0"))
