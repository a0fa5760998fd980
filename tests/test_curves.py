"""AP, FROC, bootstrap intervals and grouped tables on worked examples.

Coordinates are in millimetres; 1 um = 0.001. Boxes for AP are 22.5 um squares
(half-side 11.25 um), so two boxes offset by (dx, dy) um overlap
(22.5 - dx)(22.5 - dy) and IoU = overlap / (2 * 506.25 - overlap).
"""

from __future__ import annotations

import numpy as np
import pytest

from midog_jax import curves
from midog_jax import metrics

UM = 0.001
FAR = [(3.0, 3.0), (3.5, 3.0), (4.0, 3.0)]  # nowhere near any truth below


def _case(truth, pred, scores):
  return (np.asarray(truth, float).reshape(-1, 2),
          np.asarray(pred, float).reshape(-1, 2), np.asarray(scores, float))


# ----------------------------------------------------------------------------
# Average precision.


def test_perfect_detector_scores_ap_one():
  cases = [_case([(1, 1), (1.5, 1)], [(1.5, 1), (1, 1)], [0.3, 0.9]),
           _case([(2, 2)], [(2, 2)], [0.6])]
  r = curves.pr_curve(cases)
  assert r["ap"] == pytest.approx(1.0, abs=1e-12)
  assert r["n_truth"] == 3
  np.testing.assert_allclose(r["recall"], [1 / 3, 2 / 3, 1.0])
  np.testing.assert_allclose(r["precision"], 1.0)


def test_ap_is_cocos_101_point_interpolation():
  # Three figures; ranked detections TP, FP, TP, FP, TP:
  #   precision 1, 1/2, 2/3, 2/4, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 1.
  # Precision made monotone from the right: 1, 2/3, 2/3, 3/5, 3/5.
  # COCO (the organisers): recall levels 0, 0.01, ..., 1 each read the first
  #   rank reaching them: 0..0.33 (34 levels) -> 1, 0.34..0.66 (33) -> 2/3,
  #   0.67..1 (34) -> 3/5: AP = (34 + 22 + 20.4) / 101 = 76.4 / 101 = 0.75644.
  # VOC 2010 all-point area: (1 + 2/3 + 3/5) / 3 = 0.75556.
  # VOC 2007 11-point: (4 * 1 + 3 * 2/3 + 4 * 3/5) / 11 = 8.4 / 11 = 0.76364.
  # Trapezoid under the raw points from (0, 1): 1/3 * (1 + 1) / 2
  #   + 1/3 * (1/2 + 2/3) / 2 + 1/3 * (1/2 + 3/5) / 2 = 0.71111.
  truth = [(1, 1), (1.5, 1), (2, 1)]
  pred = [(1, 1), FAR[0], (1.5, 1), FAR[1], (2, 1)]
  r = curves.pr_curve([_case(truth, pred, [0.9, 0.8, 0.7, 0.6, 0.5])])
  assert r["ap"] == pytest.approx(76.4 / 101, abs=1e-9)
  for other in (0.755556, 0.763636, 0.711111):
    assert abs(r["ap"] - other) > 5e-4
  np.testing.assert_allclose(r["thresholds"], [0.9, 0.8, 0.7, 0.6, 0.5], rtol=1e-6)
  np.testing.assert_allclose(r["precision"], [1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
  np.testing.assert_allclose(r["recall"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])


def test_duplicate_detection_of_one_figure_is_a_false_positive():
  # Figures A, B. Ranked: A (TP), A again (FP: A is taken), B (TP):
  #   precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; monotone: 1, 2/3, 2/3.
  #   Levels 0..0.50 (51) -> 1, 0.51..1 (50) -> 2/3: AP = (51 + 100/3) / 101.
  # Counting the duplicate as a hit would give 1.
  truth = [(1, 1), (1.5, 1)]
  pred = [(1, 1), (1 + 1 * UM, 1), (1.5, 1)]
  r = curves.pr_curve([_case(truth, pred, [0.9, 0.8, 0.7])])
  assert r["ap"] == pytest.approx((51 + 100 / 3) / 101, abs=1e-9)
  assert r["precision"][1] == pytest.approx(0.5)


def test_detection_beyond_the_box_overlap_is_a_false_positive():
  one = lambda dx, dy: curves.pr_curve(
      [_case([(1, 1)], [(1 + dx * UM, 1 + dy * UM)], [0.9])])["ap"]
  # 8 um to the side: overlap 22.5 * 14.5 = 326.25, IoU 326.25 / 686.25 = 0.475.
  assert one(8, 0) == 0.0
  # 7 um to the side: 22.5 * 15.5 = 348.75, IoU 348.75 / 663.75 = 0.525: a hit.
  assert one(7, 0) == pytest.approx(1.0)
  # 5 um each way (7.07 um away): 17.5^2 = 306.25, IoU 306.25 / 706.25 = 0.434:
  # a miss for AP, as in the organisers' box IoU, though F1's 7.5 um circle
  # counts it as a hit.
  assert one(5, 5) == 0.0
  assert metrics.match([(1, 1)], [(1.005, 1.005)])[0].tp == 1
  # 3 um each way: 19.5^2 = 380.25, IoU 380.25 / 632.25 = 0.601: a hit.
  assert one(3, 3) == pytest.approx(1.0)


def test_truth_without_predictions_scores_zero_and_no_truth_is_nan():
  assert curves.pr_curve([_case([(1, 1), (2, 2)], [], [])])["ap"] == 0.0
  # A case with truth but no predictions still counts its figures as missed:
  # one of two found, AP = 51/101 (levels up to 0.5 read precision 1).
  cases = [_case([(1, 1)], [(1, 1)], [0.9]), _case([(2, 2)], [], [])]
  assert curves.pr_curve(cases)["ap"] == pytest.approx(51 / 101, abs=1e-9)
  assert np.isnan(curves.pr_curve([_case([], [(1, 1)], [0.9])])["ap"])
  assert np.isnan(curves.pr_curve([])["ap"])


def test_ranking_matters():
  # The same two detections, a hit and a far miss. Hit ranked first: AP 1.
  # Miss first: precision 0, 1/2 at recall 0, 1; monotone 1/2, 1/2: AP 1/2.
  truth, pred = [(1, 1)], [(1, 1), FAR[0]]
  assert curves.pr_curve([_case(truth, pred, [0.9, 0.8])])["ap"] == pytest.approx(1.0)
  assert curves.pr_curve([_case(truth, pred, [0.8, 0.9])])["ap"] == pytest.approx(0.5)


def test_ap_matches_once_in_score_order_as_coco():
  # Figures t0 at 0 um, t1 at 5 um; a at 4 um (score 0.9), b at 11 um (0.8).
  # COCO: a takes the truth of highest IoU, t1 (IoU 0.915 against 0.698 for
  # t0); b is 11 um from t0 (IoU 0.343): FP. AP = 51 / 101.
  # The F1 matching (truth order) would give t0 <- a, t1 <- b and AP 1.
  r = curves.pr_curve([_case([(1, 1), (1.005, 1)], [(1.004, 1), (1.011, 1)],
                             [0.9, 0.8])])
  assert r["ap"] == pytest.approx(51 / 101, abs=1e-9)


def test_equal_iou_goes_to_the_later_truth_as_in_coco():
  # d at (1, 1) is 4 um from t0 (to the side) and from t1 (above): the same
  # IoU 0.698 to the last bit. COCO's scan keeps the later truth, t1; then e
  # (6 um from t0, IoU 0.579; 10.8 um from t1, IoU 0.296) takes t0: AP 1.
  # Taking the first truth would leave e a FP: AP 51/101.
  truth = [(1.004, 1), (1, 1.004)]
  r = curves.pr_curve([_case(truth, [(1, 1), (1.010, 1)], [0.9, 0.8])])
  assert r["ap"] == pytest.approx(1.0, abs=1e-12)


def test_scores_rank_as_float32_as_in_the_organisers_tensors():
  # 0.5 and 0.5 + 1e-12 are one float32 value: a tie, kept in input order, so
  # the far miss listed first ranks first: AP 1/2 (in double it would be 1).
  r = curves.pr_curve([_case([(1, 1)], [FAR[0], (1, 1)], [0.5, 0.5 + 1e-12])])
  assert r["ap"] == pytest.approx(0.5)
  assert len(r["thresholds"]) == 1


def test_recall_levels_are_the_organisers_floats():
  # 20 figures; ranked 7 TP, 1 FP, 1 TP: recall 0.05..0.35, 0.35, 0.40;
  # monotone precision 1 (x7), 8/9, 8/9. Their level 0.35 is the float just
  # above 7/20, so it reads the 9th rank (8/9): levels 0..0.34 -> 1 (35),
  # 0.35..0.40 -> 8/9 (6), the rest 0: AP = (35 + 6 * 8/9) / 101 = 0.39934.
  # Levels computed as i / 100 would read 1 at 0.35: (36 + 5 * 8/9) / 101.
  truth = [(0.1 * i, 1) for i in range(20)]
  pred = truth[:7] + [FAR[0], truth[7]]
  r = curves.pr_curve([_case(truth, pred, [0.99, 0.98, 0.97, 0.96, 0.95, 0.94,
                                           0.93, 0.92, 0.91])])
  assert r["ap"] == pytest.approx((35 + 6 * 8 / 9) / 101, abs=1e-9)


def _ref_cases(seed):
  """Random cases with points on the IoU-0.5 boundary (7.5 um to the side)
  and tied scores."""
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(4):
    truth = rng.uniform(0.5, 1.0, (6, 2))
    near = truth[rng.integers(0, 6, 10)] + rng.normal(0, 0.005, (10, 2))
    edge = truth[:3] + [0.0075, 0.0]
    pred = np.concatenate([near, edge, rng.uniform(0.5, 1.0, (5, 2))])
    cases.append((truth, pred, np.round(rng.uniform(0, 1, len(pred)), 1)))
  return cases


@pytest.mark.parametrize("seed, expected", [
    (0, 0.39661667560425007), (1, 0.384085785786266), (2, 0.3654717938476102)])
def test_ap_equals_pycocotools_on_the_organisers_path(seed, expected):
  # Reference values from pycocotools' COCOeval fed as torchmetrics feeds it
  # in the organisers' container (float32 boxes, recThrs np.arange, maxDets
  # 1e6), stats[1]. Computing the box IoU in plain double instead gives
  # 0.196, 0.331, 0.261: the boundary points fall the other way.
  assert curves.pr_curve(_ref_cases(seed))["ap"] == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------
# FROC.


def _froc_cases():
  # Case A: figures a1, a2. a1 (1.0), far (1.0), a2 (0.0), far (0.0), far (0.0).
  # Case B: figures b1, b2. b1 (1.0), far (0.0).
  # The 40 thresholds span [0, 1]: all but t = 0 keep the score-1 points.
  #   t > 0: TP a1, b1 = 2; FP 1.        t = 0: TP 3; FP 3 + 1 = 4.
  a = _case([(1, 1), (1.5, 1)], [(1, 1), FAR[0], (1.5, 1), FAR[1], FAR[2]],
            [1, 1, 0, 0, 0])
  b = _case([(1, 1), (1.5, 1)], [(1, 1), FAR[0]], [1, 0])
  return [a, b]


def test_froc_per_case_hand_example():
  # FP per case: 1/2 at sensitivity 2/4, 4/2 at 3/4. Linear in between, 0
  # below 0.5, 0.75 above 2: at 1 FP, 0.5 + 0.25 * (0.5 / 1.5) = 0.58333.
  r = curves.froc(_froc_cases())
  np.testing.assert_allclose(r["curve_fp"], [0.5, 2.0])
  np.testing.assert_allclose(r["curve_sens"], [0.5, 0.75], rtol=1e-6)
  expected = [0, 0, 0.5, 0.5 + 0.25 / 3, 0.75, 0.75, 0.75]
  np.testing.assert_allclose(r["sensitivity"], expected, rtol=1e-6)
  assert r["score"] == pytest.approx(sum(expected) / 7, rel=1e-6)
  # froc_auc: trapezoid over x_k = 8k/49, k = 0..49: y = 0 for k <= 3,
  # 0.5 + (x_k - 0.5) / 6 for k = 4..12 (sum of k: 72), 0.75 for k >= 13;
  # area = 8/49 * (sum of y - (y_0 + y_49) / 2).
  ys = 9 * 0.5 + (8 / 49 * 72 - 9 * 0.5) / 6 + 37 * 0.75
  assert r["auc"] == pytest.approx(8 / 49 * (ys - 0.75 / 2), rel=1e-6)
  assert r["auc"] == pytest.approx(5.4015, abs=1e-4)


def test_froc_per_square_millimetre():
  # Areas 1 and 3 mm^2: FP per mm^2 1/4 at 0.5, 4/4 at 0.75; at 0.5 FP/mm^2:
  # 0.5 + 0.25 * (0.25 / 0.75) = 0.58333.
  r = curves.froc(_froc_cases(), areas_mm2=[1.0, 3.0])
  np.testing.assert_allclose(r["curve_fp"], [0.25, 1.0])
  np.testing.assert_allclose(r["sensitivity"],
                             [0, 0.5, 0.5 + 0.25 / 3, 0.75, 0.75, 0.75, 0.75],
                             rtol=1e-6)
  with pytest.raises(ValueError):
    curves.froc(_froc_cases(), areas_mm2=[1.0])


def test_froc_uses_forty_evenly_spaced_thresholds():
  # Figures T1, T2 found at scores 1.0 and 0.999; misses at 0.998 and 0.
  # The organisers' thresholds are k/39: none falls in (0.998, 0.999], so the
  # point (0 FP, both found) is never seen: the curve is (0, 1/2), (1, 1),
  # (2, 1), and at 0.5 FP it reads 3/4. Every distinct score as a threshold
  # would see (0, 1) and read 1.
  case = _case([(1, 1), (1.5, 1)], [(1, 1), (1.5, 1), FAR[0], FAR[1]],
                [1.0, 0.999, 0.998, 0.0])
  r = curves.froc([case], fp_rates=[0.5])
  assert r["sensitivity"][0] == pytest.approx(0.75, rel=1e-5)
  assert curves.froc([case], fp_rates=[0.5], n_thresholds=None)[
      "sensitivity"][0] == pytest.approx(1.0, rel=1e-5)


def test_froc_rematches_with_the_f1_matching_at_each_threshold():
  # The AP example above: at the lowest threshold the F1 matching finds both
  # figures (t0 <- a, t1 <- b), which matching once COCO style would not.
  r = curves.froc([_case([(1, 1), (1.005, 1)], [(1.004, 1), (1.011, 1)],
                         [0.9, 0.8])])
  assert r["curve_sens"].max() == pytest.approx(1.0, rel=1e-5)
  # And on random cases every curve point is what metrics.match gives there.
  rng = np.random.default_rng(3)
  cases = []
  for _ in range(5):
    truth = rng.uniform(0, 0.05, (8, 2))
    pred = np.r_[truth[rng.integers(0, 8, 12)] + rng.normal(0, 0.004, (12, 2)),
                 rng.uniform(0, 0.05, (6, 2))]
    cases.append((truth, pred, rng.uniform(0, 1, 18)))
  r = curves.froc(cases, n_thresholds=None)
  for t, fp, sens in zip(r["thresholds"], r["curve_fp"], r["curve_sens"]):
    total = metrics.pooled(metrics.match(tr, p[s >= t])[0] for tr, p, s in cases)
    assert fp == pytest.approx(total.fp / 5)
    assert sens == pytest.approx(total.tp / (40 + 1e-6))


# ----------------------------------------------------------------------------
# Bootstrap.


def test_bootstrap_interval_of_a_proportion_matches_the_normal_approximation():
  x = np.r_[np.ones(200), np.zeros(200)]
  low, high, point = curves.bootstrap_ci(400, lambda i: x[i].mean(), n_boot=2000)
  half = 1.96 * np.sqrt(0.5 * 0.5 / 400)  # 0.049
  assert point == 0.5
  assert low == pytest.approx(0.5 - half, abs=0.01)
  assert high == pytest.approx(0.5 + half, abs=0.01)


def test_bootstrap_is_deterministic_given_the_seed():
  x = np.random.default_rng(0).uniform(size=50)
  stat = lambda i: x[i].mean()
  assert curves.bootstrap_ci(50, stat, seed=1) == curves.bootstrap_ci(50, stat, seed=1)
  assert curves.bootstrap_ci(50, stat, seed=1) != curves.bootstrap_ci(50, stat, seed=2)


def _counts(rng, n):
  return [metrics.Counts(*map(int, rng.integers(0, 6, 3))) for _ in range(n)]


def test_f1_ci_is_the_pooled_f1_bootstrap():
  counts = _counts(np.random.default_rng(0), 30)
  low, high, point = curves.f1_ci(counts, n_boot=300, seed=4)
  assert point == metrics.pooled(counts).f1
  assert low < point < high
  # The same resamples as bootstrap_ci, pooled (not a mean of per-case F1s).
  ref = curves.bootstrap_ci(
      30, lambda i: metrics.pooled(counts[j] for j in i).f1, n_boot=300, seed=4)
  assert (low, high) == pytest.approx(ref[:2], abs=1e-12)


def test_f1_ci_of_a_proportion_matches_the_normal_approximation():
  # A good case (1 TP) or a bad one (1 FP, 1 FN): pooled F1 = 2K / (2K +
  # 2(n - K)) = K / n, the proportion of good cases.
  counts = [metrics.Counts(1, 0, 0)] * 200 + [metrics.Counts(0, 1, 1)] * 200
  low, high, point = curves.f1_ci(counts, n_boot=2000)
  half = 1.96 * np.sqrt(0.5 * 0.5 / 400)
  assert point == pytest.approx(0.5)
  assert low == pytest.approx(0.5 - half, abs=0.01)
  assert high == pytest.approx(0.5 + half, abs=0.01)


def test_f1_ci_resamples_cases_not_detections():
  # 10 cases with 10 TP, 10 with 10 FP + 10 FN: with K good cases drawn,
  # F1 = 20K / (20K + 20(20 - K)) = K / 20, K ~ Binomial(20, 1/2), whose
  # 2.5% and 97.5% points are 6 and 14: about [0.30, 0.70]. Resampling the 400
  # single TP/FP/FN events instead gives about [0.45, 0.55].
  counts = [metrics.Counts(10, 0, 0)] * 10 + [metrics.Counts(0, 10, 10)] * 10
  low, high, point = curves.f1_ci(counts, n_boot=2000)
  assert point == pytest.approx(0.5)
  assert 0.2 <= low <= 0.31 and 0.69 <= high <= 0.8


def test_ap_ci_is_the_bootstrap_of_pr_curve():
  rng = np.random.default_rng(7)
  cases = []
  for _ in range(6):
    truth = rng.uniform(0, 0.1, (5, 2))
    pred = np.r_[truth[:4] + rng.normal(0, 0.003, (4, 2)), rng.uniform(0, 0.1, (4, 2))]
    cases.append((truth, pred, rng.uniform(0, 1, 8)))  # distinct scores
  low, high, point = curves.ap_ci(cases, n_boot=60, seed=5)
  ref = curves.bootstrap_ci(
      6, lambda i: curves.pr_curve([cases[j] for j in i])["ap"], n_boot=60, seed=5)
  assert (low, high, point) == pytest.approx(ref, abs=1e-12)
  assert point == curves.pr_curve(cases)["ap"]
  assert low < high


# ----------------------------------------------------------------------------
# Grouped tables.


def test_grouped_uses_the_organisers_pooled_counts_per_group():
  rng = np.random.default_rng(2)
  groups = {}
  for key, n in (("hotspot", 3), ("random", 2)):
    groups[key] = []
    for _ in range(n):
      truth = rng.uniform(0, 0.1, (6, 2))
      pred = np.r_[truth[:5] + rng.normal(0, 0.004, (5, 2)), rng.uniform(0, 0.1, (5, 2))]
      groups[key].append((truth, pred, rng.uniform(0, 1, 10)))
  table = curves.grouped(groups, threshold=0.4)
  assert set(table) == {"hotspot", "random"}
  for key, cases in groups.items():
    total = metrics.pooled(metrics.match(t, p[s >= 0.4])[0] for t, p, s in cases)
    row = table[key]
    assert (row["tp"], row["fp"], row["fn"]) == (total.tp, total.fp, total.fn)
    assert row["f1"] == total.f1 and row["precision"] == total.precision
    assert row["recall"] == total.recall and row["n_cases"] == len(cases)
    assert row["ap"] == curves.pr_curve(cases)["ap"]
    assert row["froc_auc"] == curves.froc(cases)["auc"]
