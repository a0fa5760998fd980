"""Simulated raters: calibrated agreement, the MIDOG++ ``labels`` format, F1."""

from __future__ import annotations

import numpy as np
import pytest

from midog_jax.data.synthetic import raters

N = 3000  # cells, about a MIDOG++ tumour type's worth


def _likeness(seed=0, n=N, ambiguous_fraction=0.3):
  rng = np.random.default_rng(seed)
  kind = rng.random(n) < 0.45  # about the real mitosis share of annotations
  return kind, raters.draw_likeness(rng, n, kind, ambiguous_fraction)


def test_likeness_distribution():
  kind, m = _likeness(ambiguous_fraction=0.3)
  assert m.shape == (N,) and m.min() >= 0 and m.max() <= 1
  middle = (m > raters.CLEAR_SPAN) & (m < 1 - raters.CLEAR_SPAN)
  # Clear cells lie within 0.25 of their kind's end, so the middle holds only
  # ambiguous ones: the fraction asked for (0.3) times the 90% of each
  # ambiguous band ([0.3, 0.8] or [0.2, 0.7]) that lies inside (0.25, 0.75).
  assert 0.2 < middle.mean() < 0.3
  assert np.median(m[kind]) > 0.85 and np.median(m[~kind]) < 0.15
  # Ambiguous cells lean towards their kind.
  assert m[kind & middle].mean() > 0.5 > m[~kind & middle].mean()
  _, none = _likeness(ambiguous_fraction=0.0)
  assert not ((none > 0.25) & (none < 0.75)).any()
  with pytest.raises(ValueError, match="shape"):
    raters.draw_likeness(np.random.default_rng(0), 3, np.ones(4, bool), 0.2)
  with pytest.raises(ValueError, match="ambiguous_fraction"):
    raters.draw_likeness(np.random.default_rng(0), 3, np.ones(3, bool), 1.5)


def test_vote_probability():
  m = np.linspace(0, 1, 101)
  for s in (0.0, 0.7, 2.0, 50.0):
    p = raters.vote_probability(m, s)
    assert np.all(np.diff(p) >= 0) and p[50] == 0.5
  assert np.allclose(raters.vote_probability(m, 1.0), m)  # sharpness 1: p = m
  assert np.all(raters.vote_probability(m, 0.0) == 0.5)  # a coin flip
  # Sharper: further from 0.5 everywhere off the middle.
  assert np.all(np.abs(raters.vote_probability(m, 4.0) - 0.5)
                >= np.abs(raters.vote_probability(m, 1.0) - 0.5))
  # Unmistakable cells are unanimous once sharpness >= 1 / (2 |m - 0.5|).
  assert raters.vote_probability(np.array([0.1, 0.9]), 1.25).tolist() == [0.0, 1.0]
  with pytest.raises(ValueError):
    raters.vote_probability(m, -1.0)


def test_expected_agreement_formula():
  # p = [1, 0.5, 0]: sum p^2 / sum p = 1.25 / 1.5.
  m = np.array([1.0, 0.5, 0.0])
  assert raters.expected_agreement(m, 2.0) == pytest.approx(1.25 / 1.5)
  assert raters.expected_agreement(np.linspace(0, 1, 11), 0.0) == pytest.approx(0.5)
  assert np.isnan(raters.expected_agreement(np.zeros(4), 2.0))


@pytest.mark.parametrize("target", [0.6, 0.76, 0.9])
def test_simulation_reproduces_requested_agreement(target):
  _, m = _likeness(seed=1)
  s = raters.calibrate(m, target)
  assert raters.expected_agreement(m, s) == pytest.approx(target, abs=1e-9)
  votes = raters.simulate(np.random.default_rng(2), m, s)
  assert abs(raters.agreement(votes) - target) < 0.03


def test_votes_have_the_midogpp_format():
  kind, m = _likeness(seed=3)
  votes = raters.simulate(np.random.default_rng(4), m, raters.calibrate(m, 0.76))
  assert len(votes) == N
  assert all(type(x) is int and x in (1, 2) for v in votes for x in v)
  two = [v for v in votes if len(v) == 2]
  three = [v for v in votes if len(v) == 3]
  assert len(two) + len(three) == N
  assert all(v[0] == v[1] for v in two) and all(v[0] != v[1] for v in three)
  # At 0.76 about a fifth of the cells go to the tie-breaker, as in MIDOG++
  # (5,515 of 26,286 annotations).
  assert 0.15 < len(three) / N < 0.3
  cons = raters.consensus(votes)
  assert cons.dtype == np.int64
  majority = [1 if v.count(1) > len(v) / 2 else 2 for v in votes]
  assert cons.tolist() == majority
  assert np.mean((cons == 1) == kind) > 0.8  # the consensus follows the kind


def test_consensus_by_hand():
  votes = [[1, 1], [2, 2], [1, 2, 1], [2, 1, 2], [2, 1, 1], [1, 2, 2]]
  assert raters.consensus(votes).tolist() == [1, 2, 1, 2, 1, 2]
  with pytest.raises(ValueError, match="tied"):
    raters.consensus([[1, 2]])
  with pytest.raises(ValueError, match="1s and 2s"):
    raters.consensus([[1, 3, 1]])


def test_agreement_is_f1_of_the_mitosis_sets():
  # Rater 1 calls cells 0-3 mitoses, rater 2 cells 0-1 and 4; cells 5-19 are
  # non-mitoses for both. F1 = 2 * 2 / (4 + 3) = 4/7.
  votes = ([[1, 1]] * 2 + [[1, 2, 1]] * 2 + [[2, 1, 2]] + [[2, 2]] * 15)
  f1 = raters.agreement(votes)
  assert f1 == pytest.approx(4 / 7)
  # Percent agreement and Cohen's kappa count the 15 shared non-mitoses and
  # give other numbers: F1 it must be.
  a = np.array([v[0] == 1 for v in votes])
  b = np.array([v[1] == 1 for v in votes])
  percent = np.mean(a == b)
  chance = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
  kappa = (percent - chance) / (1 - chance)
  assert percent == pytest.approx(17 / 20)
  assert abs(percent - f1) > 0.2 and abs(kappa - f1) > 0.03
  # The real MIDOG++ vote patterns give the published ~0.76.
  real = {(1, 1): 8917, (2, 2): 8810, (2, 2, 2): 3044, (1, 2, 1): 1623,
          (2, 1, 2): 1560, (2, 1, 1): 1397, (1, 2, 2): 935}
  real_votes = [list(k) for k, n in real.items() for _ in range(n)]
  assert raters.agreement(real_votes) == pytest.approx(0.7638, abs=1e-4)
  assert np.isnan(raters.agreement([[2, 2]]))


def test_calibration_out_of_range_raises():
  _, m = _likeness()
  with pytest.raises(ValueError, match=r"achievable range \[0\.5000, 1\.0000\]"):
    raters.calibrate(m, 0.4)
  with pytest.raises(ValueError, match="achievable range"):
    raters.calibrate(m, 1.01)
  # A cell at exactly 0.5 is a coin flip at any sharpness, so 1.0 is out of
  # reach: (1 + 0.25) / (1 + 0.5) with one certain and one 0.5 cell.
  with pytest.raises(ValueError, match=r"\[0\.5000, 0\.8333\]"):
    raters.calibrate(np.array([1.0, 0.5, 0.0]), 0.9)
  # Only unmistakable non-mitoses: sharper raters agree less and less, and
  # 0.5 (all coin flips) is the best they can do.
  with pytest.raises(ValueError, match=r"achievable range \[0\.0\d+, 0\.5000\]"):
    raters.calibrate(np.zeros(5), 0.76)
  with pytest.raises(ValueError, match="no cells"):
    raters.calibrate(np.zeros(0), 0.76)


def test_deterministic_in_the_rng():
  _, m1 = _likeness(seed=5)
  _, m2 = _likeness(seed=5)
  np.testing.assert_array_equal(m1, m2)
  s = raters.calibrate(m1, 0.76)
  assert s == raters.calibrate(m2, 0.76)
  v1 = raters.simulate(np.random.default_rng(6), m1, s)
  assert v1 == raters.simulate(np.random.default_rng(6), m2, s)
  assert v1 != raters.simulate(np.random.default_rng(7), m1, s)
  # One cell's votes do not depend on the cells after it.
  head = raters.simulate(np.random.default_rng(6), m1[:100], s)
  assert head == v1[:100]
