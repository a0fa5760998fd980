"""The round-1 heads on a tiny cached set: dense head, random forest, ensemble rule."""

from __future__ import annotations

import numpy as np
import pytest

from midog_jax.image_level import heads as H
from midog_jax.image_level import metrics as M


def _data(n=80, d=24, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  x = rng.normal(size=(n, d)).astype(np.float32)
  x[:, 3] += 3.5 * y  # one informative feature
  return x, y


def test_forest_arrays_reproduce_sklearn():
  x, y = _data()
  rf = H.train_forest(x, y, trees=15, seed=0)
  assert rf.n_estimators == 15 and rf.bootstrap is False
  forest = H.forest_arrays(rf)
  xt, _ = _data(seed=1)
  np.testing.assert_allclose(forest.predict(xt), rf.predict_proba(xt)[:, 1], atol=1e-12)


def test_forest_trains_predicts_and_round_trips(tmp_path):
  x, y = _data()
  forest = H.forest_arrays(H.train_forest(x, y, trees=30, seed=0))
  xt, yt = _data(seed=2)
  p = forest.predict(xt)
  assert ((p >= 0.5) == yt).mean() > 0.8
  forest.save(tmp_path / "f.npz")
  np.testing.assert_array_equal(H.Forest.load(tmp_path / "f.npz").predict(xt), p)
  with pytest.raises(ValueError, match="both classes"):
    H.train_forest(x, np.zeros(len(x), int))


def test_dense_head_trains_keeps_the_best_epoch_and_predicts():
  x, y = _data(n=96)
  xv, yv = _data(n=40, seed=3)
  cfg = H.DenseConfig(hidden=16, l1=1e-4, l2=1e-4, out_l1=1e-4, out_l2=1e-4, epochs=20,
                      batch_size=16, lr=3e-3)
  params, hist = H.train_dense(x, y, xv, yv, cfg)
  assert len(hist) == 20 and sum(bool(r.get("best")) for r in hist) >= 1
  best = min(hist, key=lambda r: r["val_bce"])
  p = H.predict_dense(params, xv, cfg)
  assert p.shape == (40,) and ((p >= 0) & (p <= 1)).all()
  got = float(-np.mean(yv * np.log(p) + (1 - yv) * np.log(1 - p)))
  assert got == pytest.approx(best["val_bce"], rel=1e-4)  # the best epoch's weights
  assert M.roc_auc(yv, p) > 0.9  # it learnt the informative feature


def test_penalty_is_keras_l1_l2_of_both_kernels():
  cfg = H.DenseConfig()
  params = {"hidden": {"kernel": np.array([[1.0, -2.0]]), "bias": np.array([5.0, 5.0])},
            "out": {"kernel": np.array([[3.0], [-1.0]]), "bias": np.array([7.0])}}
  want = 0.2 * 3 + 0.03 * 5 + 0.01 * 4 + 0.01 * 10  # biases are not penalised
  assert float(H.penalty(params, cfg)) == pytest.approx(want)


def test_ensemble_agreement_keeps_the_answer():
  score, label = H.ensemble(np.array([0.9, 0.1]), np.array([0.7, 0.3]), 0.5, 0.5, 1.5)
  assert label.tolist() == [1, 0]
  assert score[0] >= 0.5 > score[1]


def test_ensemble_disagreement_the_more_confident_wins():
  # Dense says yes weakly (0.6: confidence 0.2), forest says no strongly (0.1: 0.8).
  _, label = H.ensemble(np.array([0.6]), np.array([0.1]), 0.5, 0.5, 1.5)
  assert label.tolist() == [0]
  # Dense says yes strongly (0.95: 0.9), forest says no weakly (0.4: 0.2).
  score, label = H.ensemble(np.array([0.95]), np.array([0.4]), 0.5, 0.5, 1.5)
  assert label.tolist() == [1] and score[0] == pytest.approx(0.95)


def test_ensemble_weight_tips_the_balance_to_the_dense_head():
  # Dense 0.7 (confidence 0.4) against forest 0.25 (0.5): the forest wins at
  # weight 1, the dense head at weight 1.5 (0.6 > 0.5).
  p_d, p_f = np.array([0.7]), np.array([0.25])
  assert H.ensemble(p_d, p_f, 0.5, 0.5, 1.0)[1].tolist() == [0]
  assert H.ensemble(p_d, p_f, 0.5, 0.5, 1.5)[1].tolist() == [1]


def test_ensemble_votes_at_each_heads_threshold():
  # Dense threshold 0.8: 0.7 is a "no" with confidence 0.125; forest threshold
  # 0.2: 0.3 is a "yes" with confidence 0.125. Tie -> the dense head.
  score, label = H.ensemble(np.array([0.7]), np.array([0.3]), 0.8, 0.2, 1.0)
  assert label.tolist() == [0] and score[0] < 0.5
  assert H.recentre(np.array([0.8, 0.2, 1.0, 0.0]), 0.8).tolist() == pytest.approx(
      [0.5, 0.125, 1.0, 0.0])


def test_ensemble_weight_is_chosen_on_validation_above_one():
  from midog_jax.image_level.round1 import choose_weight
  # Validation where trusting the dense head more pays: on the disputed items
  # the dense head is right and slightly less confident than the forest.
  p_d = np.array([0.62, 0.64, 0.9, 0.1, 0.2])
  p_f = np.array([0.3, 0.25, 0.8, 0.2, 0.1])
  y = np.array([1, 1, 1, 0, 0])
  w = choose_weight(p_d, p_f, 0.5, 0.5, y)
  assert w in H.WEIGHT_GRID and w > 1
  f1 = {v: M.binary_metrics(y, H.ensemble(p_d, p_f, 0.5, 0.5, v)[0], 0.5)["f1"]
        for v in H.WEIGHT_GRID}
  assert f1[w] == max(f1.values()) == 1.0 and min(f1.values()) < 1.0
