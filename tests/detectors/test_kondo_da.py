"""Kondo's candidate classifier: loss, sampling, whole-image output, adaptation parts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midog_jax import candidates as cand_lib
from midog_jax import config_files, detectors, infer
from midog_jax.detectors import kondo_da
from midog_jax.detectors.kondo_da import adaptation
from midog_jax.models import dann as dann_lib


def tiny_config(root=None, **over):
  c = config_files.get_config("kondo_da", "tiny")
  if root is not None:
    c.data.root = str(root)
  for k, v in over.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture(scope="module")
def trained(tiny_dataset):
  """A tiny detector with its store built and random weights."""
  det = detectors.build(tiny_config(tiny_dataset))
  data = det.load_data()
  variables = det.init_variables(jax.random.key(0, impl="rbg"))
  return det, variables, data


def test_build_and_interface():
  det = detectors.build(tiny_config())
  assert isinstance(det, kondo_da.KondoDA)
  assert det.input_mean == (0.485, 0.456, 0.406) and det.patch_size == 64
  variables = det.init_variables(jax.random.key(0))
  mask = det.trainable_mask(variables["params"])
  assert all(jax.tree.leaves(mask))  # tiny: all five backbone layers train
  frozen = detectors.build(tiny_config(**{"model.trainable_backbone_layers": 0}))
  m = frozen.trainable_mask(variables["params"])
  assert not any(jax.tree.leaves(m["backbone"])) and all(jax.tree.leaves(m["mitosis_head"]))


def test_loss_is_the_sum_of_both_cross_entropies():
  det = detectors.build(tiny_config(**{"kondo.grl": "constant"}))
  variables = det.init_variables(jax.random.key(1))
  rng = np.random.default_rng(0)
  batch = dict(image=rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8),
               label=np.array([0, 1, 0, 1], np.int32), domain=np.array([0, 1, 2, 0], np.int32),
               progress=np.zeros(4, np.float32))
  loss, (metrics, _) = det.loss(variables["params"], variables["batch_stats"], batch, False)
  (mit, dom), _ = det.apply(variables["params"], variables["batch_stats"], batch["image"],
                            1.0, False)
  want_mit = optax.softmax_cross_entropy_with_integer_labels(mit, batch["label"]).mean()
  want_dom = optax.softmax_cross_entropy_with_integer_labels(dom, batch["domain"]).mean()
  np.testing.assert_allclose(float(loss), float(want_mit + want_dom), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["domain_loss"]), float(want_dom), rtol=1e-5)


def test_grl_lambda_schedule():
  det = detectors.build(tiny_config())
  assert float(det.grl_lambda(jnp.float32(0.0))) == 0.0
  np.testing.assert_allclose(float(det.grl_lambda(jnp.float32(0.5))),
                             2 / (1 + np.exp(-5.0)) - 1, rtol=1e-6)
  const = detectors.build(tiny_config(**{"kondo.grl": "constant", "kondo.grl_lambda": 0.3}))
  np.testing.assert_allclose(float(const.grl_lambda(jnp.float32(0.0))), 0.3, rtol=1e-6)


def test_best_f1_threshold_by_hand():
  labels = np.array([1, 0, 1, 0, 0])
  scores = np.array([0.9, 0.8, 0.7, 0.2, 0.7])
  r = kondo_da.best_f1_threshold(labels, scores)
  # Cut at 0.9: P 1, R 0.5, F1 0.667; at 0.7 (three positives, ties together):
  # P 2/4, R 1 -> 0.667; 0.9 wins (first best).
  assert r["threshold"] == 0.9 and r["f1"] == pytest.approx(2 / 3)
  r = kondo_da.best_f1_threshold(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1]))
  assert r == dict(f1=1.0, precision=1.0, recall=1.0, threshold=0.8)


def test_balanced_batches(trained):
  det, _, data = trained
  ds = det.make_dataset(data.train, seed=0, batch_size=8)
  for b in (ds[0], ds[3]):
    assert b["image"].shape == (8, 64, 64, 3) and b["image"].dtype == np.uint8
    np.testing.assert_array_equal(b["label"], [1, 1, 1, 1, 0, 0, 0, 0])
  assert set(np.unique(ds[0]["domain"])) <= {0, 1, 2}
  np.testing.assert_allclose(ds[2]["progress"], 2 / 4)
  # Only the training images' candidates.
  train_ids = {c.image_id for c in data.train}
  assert set(det.store.image_ids[det.indices_of(data.train)]) == train_ids


def test_whole_image_equals_classifying_find_candidates(trained, tiny_dataset):
  det, variables, data = trained
  path = data.heldout["heldout_domain"][0].path
  no_merge = tiny_config(tiny_dataset, **{"eval.merge_radius_px": 0.0})
  got = det.make_tiler(variables, no_merge, score_thresh=0.0).detect(path)
  xy = cand_lib.find_candidates(path, det.settings)
  patches = cand_lib.patches_for(path, xy, 64)
  x = jnp.asarray(patches, jnp.float32) / 255.0
  x = (x - jnp.asarray(det.input_mean)) / jnp.asarray(det.input_std)
  mit, _ = det.model.apply(variables, x, 0.0, train=False)
  want = np.asarray(jax.nn.softmax(mit, -1)[:, 1])
  assert len(xy) > 5
  np.testing.assert_array_equal(got.xy, xy)
  np.testing.assert_allclose(got.scores, want, rtol=1e-5, atol=1e-6)
  # The candidate cut-off (eval.score_thresh, as evaluation.make_tiler):
  # only candidates at or above it.
  t = float(np.median(want))
  cfg = tiny_config(tiny_dataset, **{"eval.score_thresh": t, "eval.merge_radius_px": 0.0})
  above = det.make_tiler(variables, cfg).detect(path)
  np.testing.assert_array_equal(above.xy, xy[want >= t])
  # With a merge radius: the distance suppression of every method's output
  # (highest score first; nothing closer than the radius to a kept point).
  cfg = tiny_config(tiny_dataset, **{"eval.score_thresh": 0.0, "eval.merge_radius_px": 25.0})
  merged = det.make_tiler(variables, cfg).detect(path)
  keep = infer.suppress_by_distance(xy, want.astype(np.float32), 25.0)
  assert 0 < len(merged) == len(keep) < len(xy)
  np.testing.assert_array_equal(np.sort(merged.xy, 0), np.sort(xy[keep], 0))
  d = np.hypot(*(merged.xy[:, None] - merged.xy[None]).transpose(2, 0, 1))
  assert (d[~np.eye(len(d), dtype=bool)] > 25.0).all()


def test_choose_confident_counts_and_order():
  labels = np.array([1, 1, 1, 0, 0, 0, 0, -1, 1, 0, 0, 0, 0, 0])
  domains = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
  probs = np.array([.9, .5, .8, .1, .05, .3, .2, .0, .6, .4, .01, .3, .2, .7])
  pick = adaptation.choose_confident(labels, domains, probs, per_domain=4, mitotic=2)
  # Domain 0: the two most mitotic (0.9, 0.8), the two least (0.05, 0.1);
  # domain 1 has one mitotic candidate: it and the three least mitotic negatives.
  np.testing.assert_array_equal(pick, [0, 2, 3, 4, 8, 10, 11, 12])
  assert 7 not in pick  # unlabelled never


def test_select_source_requested_counts(trained):
  det, variables, data = trained
  idx = det.indices_of(data.train)
  sel = adaptation.select_source(det, variables, idx, per_domain=10, mitotic=2)
  counts = sel.counts()
  assert sorted(counts) == [0, 1, 2]
  for d, c in counts.items():
    have = int(((det.store.domains[idx] == d) & (det.store.labels[idx] == 1)).sum())
    assert c == dict(patches=10, mitotic=min(2, have))
  assert sel.patches.shape == (30, 64, 64, 3)
  np.testing.assert_array_equal(sel.patches[0], det.store[int(sel.indices[0])]["patch"])
  # The mitotic ones are the most confident mitotic candidates of their domain.
  probs = det.score_patches(variables, det.store_patches(idx))
  for d in range(3):
    pos = (det.store.domains[idx] == d) & (det.store.labels[idx] == 1)
    top = np.sort(probs[pos])[::-1][:2]
    np.testing.assert_allclose(np.sort(sel.probs[(sel.domains == d) & (sel.labels == 1)])[::-1],
                               top, rtol=1e-6)


def _grads(det, params, stats, src, tgt):
  def f(p):
    return adaptation.adaptation_loss(det, p, stats, src[0], src[1], src[2], tgt, 1.0)[0]
  return jax.grad(f)(params)


def test_adaptation_target_patches_only_reach_the_domain_head():
  det = detectors.build(tiny_config())
  v = det.init_variables(jax.random.key(2))
  grown = det.with_model(det.model.grown())
  params = dann_lib.grow_domain_head(v["params"], jax.random.key(3))
  rng = np.random.default_rng(1)
  img = lambda n: rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
  src = (img(6), np.array([1, 0, 0, 1, 0, 0], np.int32), np.array([0, 1, 2, 0, 1, 2], np.int32))
  g1 = _grads(grown, params, v["batch_stats"], src, img(3))
  g2 = _grads(grown, params, v["batch_stats"], src, img(3))
  for a, b in zip(jax.tree.leaves(g1["mitosis_head"]), jax.tree.leaves(g2["mitosis_head"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... while the domain head and the backbone do see them.
  diff = lambda k: max(float(jnp.abs(a - b).max()) for a, b in
                       zip(jax.tree.leaves(g1[k]), jax.tree.leaves(g2[k])))
  assert diff("domain_head") > 0 and diff("backbone") > 0

  # Control: one BatchNorm pass over the mixed batch would leak the target
  # patches into the mitosis head's gradient (what the two passes avoid).
  def mixed(p, tgt):
    x = np.concatenate([src[0], tgt])
    (mit, dom), _ = grown.apply(p, v["batch_stats"], x, 1.0, True)
    mask = jnp.r_[jnp.ones(6), jnp.zeros(3)]
    return dann_lib.dann_loss(mit, dom, jnp.r_[src[1], jnp.zeros(3, jnp.int32)],
                              jnp.r_[src[2], jnp.full(3, 3, jnp.int32)], mask,
                              jnp.ones(9))[0]
  m1 = jax.grad(mixed)(params, img(3))["mitosis_head"]
  m2 = jax.grad(mixed)(params, img(3))["mitosis_head"]
  assert max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(m1), jax.tree.leaves(m2))) > 0


def test_split_batch():
  assert adaptation.split_batch(128, 30_000, 17_000) == (128 - 46, 46)
  assert adaptation.split_batch(8, 1000, 1) == (7, 1)
  assert adaptation.split_batch(8, 1, 1000) == (1, 7)
