"""Ensemble by agreement (Lafarge & Koelzer, MIDOG 2022): ``ensemble.combine``.

The end-to-end case (``predict --workdir A --workdir B``) is in
``test_predict.py``, beside the workdir it shares.
"""

from __future__ import annotations

import numpy as np
import pytest

from midog_jax import ensemble
from midog_jax.detections import Detections


def _dets(xy, p, classes=None):
  return Detections(np.asarray(xy, np.float32), np.asarray(p, np.float32), classes)


def test_agreement_keeps_matched_points_at_their_mean():
  a = _dets([[100, 100], [200, 200], [300, 50]], [0.9, 0.8, 0.6])
  b = _dets([[104, 103], [260, 200], [301, 50]], [0.7, 0.9, 0.4])
  out = ensemble.combine([a, b], radius_px=30.0)
  # (200, 200) has nothing of b within 30 px: dropped. Order: a's scores.
  np.testing.assert_allclose(out.xy, [[102, 101.5], [300.5, 50]])
  np.testing.assert_allclose(out.scores, [0.8, 0.5])
  assert list(out.classes) == [1, 1]
  # Agreement is symmetric in which points survive (here), not in order.
  back = ensemble.combine([b, a], radius_px=30.0)
  np.testing.assert_allclose(back.xy, [[102, 101.5], [300.5, 50]])


def test_radius_is_inclusive_and_sharp():
  a = _dets([[100, 100]], [0.6])
  on = _dets([[118, 124]], [0.2])  # 3-4-5: exactly 30 px away
  off = _dets([[118, 124.05]], [0.2])
  assert len(ensemble.combine([a, on], radius_px=30.0)) == 1
  assert len(ensemble.combine([a, off], radius_px=30.0)) == 0
  assert len(ensemble.combine([a, off], radius_px=30.1)) == 1


def test_one_point_vouches_for_one_detection_and_every_member_must_agree():
  a = _dets([[100, 100], [110, 100]], [0.5, 0.9])
  b = _dets([[105, 100]], [0.7])
  out = ensemble.combine([a, b], radius_px=30.0)
  # Both of a's points are near b's one; the higher-scoring one claims it.
  np.testing.assert_allclose(out.xy, [[107.5, 100]])
  np.testing.assert_allclose(out.scores, [0.8])
  c = _dets([[400, 400]], [0.9])
  assert len(ensemble.combine([a, b, c], radius_px=30.0)) == 0
  c = _dets([[100, 104]], [0.3])
  out = ensemble.combine([a, b, c], radius_px=30.0)
  np.testing.assert_allclose(out.scores, [(0.9 + 0.7 + 0.3) / 3], rtol=1e-6)
  np.testing.assert_allclose(out.xy, [[(110 + 105 + 100) / 3, 104 / 3 + 200 / 3]])


def test_classes_match_only_their_own_class():
  a = _dets([[100, 100], [300, 300]], [0.9, 0.8], [1, 2])
  b = _dets([[101, 100], [301, 300]], [0.9, 0.8], [2, 2])
  out = ensemble.combine([a, b], radius_px=30.0)
  assert list(out.classes) == [2]
  np.testing.assert_allclose(out.xy, [[300.5, 300]])


def test_single_member_and_bad_calls():
  a = _dets([[1, 2]], [0.5])
  assert ensemble.combine([a]) is a
  assert ensemble.combine([a], radius_px=30.0) is a
  empty = _dets(np.zeros((0, 2)), [])
  assert len(ensemble.combine([a, empty], radius_px=30.0)) == 0
  assert len(ensemble.combine([empty, a], radius_px=30.0)) == 0
  with pytest.raises(ValueError, match="radius"):
    ensemble.combine([a, a])
  with pytest.raises(ValueError, match="at least one"):
    ensemble.combine([])
