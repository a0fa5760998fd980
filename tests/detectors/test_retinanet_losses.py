"""Focal loss by hand, and the RetinaNet loss's matching, ignoring and sums."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midog_jax.detectors.retinanet import anchors as A
from midog_jax.detectors.retinanet import losses as L

FAST = {"xla_backend_optimization_level": 0}  # compile time >> run time here
_focal = jax.jit(L.sigmoid_focal_loss, static_argnums=(2, 3),
                 compiler_options=FAST)


def test_focal_loss_by_hand():
  # p = sigmoid(x); ce = -log(p_t); loss = alpha_t * (1 - p_t)^2 * ce.
  # x=0,  t=1: p=0.5;        ce=ln 2=0.693147;   (0.5)^2;      a_t=0.25
  # x=2,  t=0: p=0.880797;   ce=ln(1+e^2)=2.126928; (0.880797)^2; a_t=0.75
  # x=-1, t=1: p=0.268941;   ce=ln(1+e)=1.313262;   (0.731059)^2; a_t=0.25
  got = _focal(jnp.array([0.0, 2.0, -1.0]),
                             jnp.array([1.0, 0.0, 1.0]))
  np.testing.assert_allclose(got, [0.0433217, 1.2375586, 0.1754671],
                             rtol=1e-5)
  # Confident and right costs almost nothing; confident and wrong a lot.
  easy, hard = _focal(jnp.array([8.0, -8.0]),
                                    jnp.array([1.0, 1.0]))
  assert float(easy) < 1e-9 and float(hard) > 1.9


def test_focal_reduces_to_bce():
  x = np.linspace(-30.0, 30.0, 41, dtype=np.float32)  # saturated ends too
  for t in (0.0, 1.0):
    got = _focal(x, np.full_like(x, t), -1, 0)
    want = optax.sigmoid_binary_cross_entropy(x, np.full_like(x, t))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # ln(1 + e^-3), written out.
  np.testing.assert_allclose(
      _focal(jnp.array(3.0), jnp.array(1.0), -1, 0), 0.0485874,
      rtol=1e-5)


# A hand-made scene. IoU with gt0 = [0, 0, 50, 50]: a0 1.0 (fg), a1 0.818 (fg),
# a2 0.4545 (ignored); a3, a5 touch nothing (bg); a4 equals gt1 (fg, class 1).
ANCHORS = np.array([[0, 0, 50, 50], [5, 0, 55, 50], [0, 0, 50, 110],
                    [200, 200, 250, 250], [100, 0, 150, 50],
                    [300, 300, 350, 350]], np.float32)
GT = np.array([[[0, 0, 50, 50], [100, 0, 150, 50], [0, 0, 0, 0]],
               [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
CLASSES = np.array([[0, 1, 0], [0, 0, 0]], np.int32)
MASK = np.array([[True, True, False], [False, False, False]])
FG_CLASS = {0: 0, 1: 0, 4: 1}  # anchor -> class in image 0


@jax.jit
def _encode(anchors, boxes):
  return A.encode(anchors, boxes)


def _loss(box_loss):
  return jax.jit(lambda *a: L.retinanet_loss(*a, box_loss=box_loss),
                 compiler_options=FAST)


def _logits(seed=0):
  return np.random.default_rng(seed).normal(0, 2, (2, 6, 2)).astype(np.float32)


def _exact_deltas():
  """Deltas that decode every foreground anchor of image 0 onto its box."""
  d = np.zeros((2, 6, 4), np.float32)
  targets = GT[0][[0, 0, 1]]
  d[0, [0, 1, 4]] = np.asarray(_encode(ANCHORS[[0, 1, 4]], targets))
  return d


def test_loss_matches_hand_assignment():
  logits = _logits()
  parts = _loss("l1")(logits, _exact_deltas(), ANCHORS, GT, CLASSES, MASK)
  np.testing.assert_array_equal(parts["num_pos"], [3, 0])
  # Expected cls sum: one-hot targets on fg anchors, anchor a2 left out.
  target = np.zeros((2, 6, 2), np.float32)
  for a, c in FG_CLASS.items():
    target[0, a, c] = 1.0
  focal = np.asarray(_focal(logits, target))
  keep = np.ones((2, 6), bool)
  keep[0, 2] = False
  want = (focal * keep[..., None]).sum(axis=(1, 2))
  np.testing.assert_allclose(parts["cls_sum"], want, rtol=1e-5)
  np.testing.assert_allclose(parts["box_sum"], [0, 0], atol=1e-5)


def test_ignored_anchors_and_padding_contribute_nothing():
  run = _loss("smooth_l1")
  base = run(_logits(), _exact_deltas(), ANCHORS, GT, CLASSES, MASK)
  logits = _logits()
  logits[0, 2] = [40.0, -40.0]  # the ignored anchor, absurdly wrong
  gt = GT.copy()
  gt[:, 2] = [0, 0, 50, 50]  # padding that would match a0 if it counted
  classes = CLASSES.copy()
  classes[:, 2] = 1
  other = run(logits, _exact_deltas(), ANCHORS, gt, classes, MASK)
  for k in base:
    np.testing.assert_allclose(other[k], base[k], rtol=1e-6, atol=1e-7)
  # A negative class turns its box into an ignore region: a4 leaves the sums.
  classes = CLASSES.copy()
  classes[0, 1] = -1
  ign = run(_logits(), _exact_deltas(), ANCHORS, GT, classes, MASK)
  assert float(ign["num_pos"][0]) == 2
  a4 = float(_focal(_logits()[0, 4], jnp.array([0.0, 1.0])).sum())
  np.testing.assert_allclose(ign["cls_sum"][0], base["cls_sum"][0] - a4,
                             rtol=1e-5)


@pytest.mark.parametrize("box_loss,want", [
    ("l1", 0.1),
    ("smooth_l1", 0.5 * 0.1**2 * 9),  # |0.1| < beta = 1/9
    # a0 shifted by dx=0.1 (5 px): IoU 45*50/(2*2500-45*50)=0.818, hull 55x50
    # equals the union, so GIoU = IoU.
    ("giou", 1 - 2250 / 2750),
])
def test_box_loss_values(box_loss, want):
  deltas = _exact_deltas()
  deltas[0, 0, 0] += 0.1
  parts = _loss(box_loss)(_logits(), deltas, ANCHORS, GT, CLASSES, MASK)
  np.testing.assert_allclose(parts["box_sum"], [want, 0.0], rtol=1e-4,
                             atol=1e-5)


def test_gradients_finite_with_padding_and_normalize():
  def total(logits, deltas):
    parts = L.retinanet_loss(logits, deltas, ANCHORS, GT, CLASSES, MASK)
    return L.normalize(parts)

  (loss, metrics), (g_cls, g_box) = jax.jit(
      jax.value_and_grad(total, argnums=(0, 1), has_aux=True),
      compiler_options=FAST)(_logits(), np.full((2, 6, 4), 0.05, np.float32))
  assert np.all(np.isfinite(g_cls)) and np.all(np.isfinite(g_box))
  assert np.abs(np.asarray(g_cls)).max() > 0
  # Box gradients only on foreground anchors; none on padding-matched ones.
  moved = np.abs(np.asarray(g_box)).sum(-1) > 0
  np.testing.assert_array_equal(np.nonzero(moved[0])[0], [0, 1, 4])
  assert not moved[1].any()
  # Normalised by the positive count of the whole batch (3 + 0).
  assert float(metrics["num_pos"]) == 3
  np.testing.assert_allclose(loss, metrics["cls_loss"] + metrics["box_loss"],
                             rtol=1e-6)


def test_normalize_uses_global_positive_count():
  parts = dict(cls_sum=jnp.array([3.0, 5.0]), box_sum=jnp.array([1.0, 1.0]),
               num_pos=jnp.array([4.0, 0.0]))
  loss, m = L.normalize(parts)
  np.testing.assert_allclose(loss, (8.0 + 2.0) / 4.0, rtol=1e-6)
  empty = dict(cls_sum=jnp.array([2.0]), box_sum=jnp.array([0.0]),
               num_pos=jnp.array([0.0]))
  np.testing.assert_allclose(L.normalize(empty)[0], 2.0)  # max(1, 0)


def test_shape_mismatch_is_reported():
  with pytest.raises(ValueError, match="anchor count"):
    L.retinanet_loss(jnp.zeros((1, 5, 1)), jnp.zeros((1, 5, 4)), ANCHORS,
                     GT[:1], CLASSES[:1], MASK[:1])
  with pytest.raises(ValueError, match="box_loss"):
    L.retinanet_loss(jnp.zeros((1, 6, 1)), jnp.zeros((1, 6, 4)), ANCHORS,
                     GT[:1], CLASSES[:1], MASK[:1], box_loss="iou")


def test_giou_differs_from_iou_when_the_hull_exceeds_the_union():
  # pred [0,0,2,2] and target [3,0,5,2]: IoU 0, union 8, hull [0,0,5,2] = 10,
  # GIoU = 0 - (10 - 8) / 10 = -0.2, loss 1.2 (a 1 - IoU loss would say 1.0).
  # A diagonal pair [0,0,2,2] and [1,1,3,3]: overlap 1, union 7, hull 9,
  # GIoU = 1/7 - 2/9 (1 - IoU would say 6/7).
  pred = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
  target = jnp.array([[3.0, 0.0, 5.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
  got = np.asarray(L.giou_loss(pred, target))
  np.testing.assert_allclose(got, [1.2, 1 - (1 / 7 - 2 / 9)], rtol=1e-5)


def test_anchor_matching_thresholds_are_torchvisions():
  # One ground-truth box and anchors with IoU exactly 0.5, just under, 0.4,
  # just under 0.4: foreground at >= 0.5, background below 0.4, ignored between.
  gt = jnp.array([[0.0, 0.0, 10.0, 10.0]])
  anchors = jnp.array([[0.0, 0.0, 10.0, 5.0],     # IoU 0.5   -> FG
                       [0.0, 0.0, 10.0, 4.9],     # IoU 0.49  -> ignored
                       [0.0, 0.0, 10.0, 4.0],     # IoU 0.4   -> ignored
                       [0.0, 0.0, 10.0, 3.9],     # IoU 0.39  -> BG
                       [0.0, 0.0, 10.0, 10.0]])   # IoU 1     -> FG
  _, labels = A.match_anchors(anchors, gt, jnp.array([True]), allow_low_quality=False)
  assert np.asarray(labels).tolist() == [A.FG, A.IGNORE, A.IGNORE, A.BG, A.FG]
