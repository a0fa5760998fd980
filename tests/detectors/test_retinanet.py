"""RetinaNet: anchors, box coding, matching, freezing, shapes, postprocess."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midog_jax.detectors.retinanet import anchors as A
from midog_jax.detectors.retinanet import losses as L
from midog_jax.detectors.retinanet.decode import postprocess
from midog_jax.models import count_params
from midog_jax.models import resnet as R
from midog_jax.models.resnet import trainable_mask
from midog_jax.models.retinanet import RetinaNet, retinanet_tiny
from midog_jax.optim import freeze

PRIOR = -math.log(0.99 / 0.01)
# Test-only: XLA's CPU backend optimisations cost far more compile time than
# these tiny graphs ever run; the numerics are the same.
FAST = {"xla_backend_optimization_level": 0}


def _jit(fn, **kw):
  return jax.jit(fn, compiler_options=FAST, **kw)


def _shapes(model, size, batch=2):
  """Parameter and output shapes without compiling anything."""
  x = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  return variables, jax.eval_shape(model.apply, variables, x)


# ---------------------------------------------------------------- anchors


@pytest.mark.parametrize("size,levels,ratios", [
    ((128, 128), (3, 4, 5, 6, 7), A.DEFAULT_RATIOS),
    ((96, 160), (3, 4, 5, 6, 7), A.TORCHVISION_RATIOS),
    ((100, 70), (2, 3, 4, 5), A.DEFAULT_RATIOS),
])
def test_anchor_count_formula(size, levels, ratios):
  anchors = A.generate_anchors(size, levels, ratios=ratios)
  per_loc = 3 * len(ratios)
  expect = sum(math.ceil(size[0] / 2**l) * math.ceil(size[1] / 2**l) * per_loc
               for l in levels)
  assert anchors.shape == (expect, 4) and anchors.dtype == np.float32
  assert A.num_anchors_per_location(ratios=ratios) == per_loc
  # First anchors: P_lo cell (0, 0), centred on the origin, the default sizes.
  first = anchors[:per_loc]
  np.testing.assert_allclose((first[:, :2] + first[:, 2:]) / 2, 0, atol=1e-5)
  area = (first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1])
  s = np.asarray(A.default_sizes(levels)[0], np.float32)
  np.testing.assert_allclose(np.sort(area), np.sort(np.tile(s**2, len(ratios))),
                             rtol=1e-5)
  assert not anchors.flags.writeable  # cached: must not be mutated


def test_anchor_order_matches_model_flattening():
  # Anchor 3 * (row * W + col) + k sits at (col * 8, row * 8) on P3.
  a = A.generate_anchors((64, 96), levels=(3, 4))
  row, col = 5, 7
  i = 3 * (row * 12 + col)
  centre = (a[i:i + 3, :2] + a[i:i + 3, 2:]) / 2
  np.testing.assert_allclose(centre, [[col * 8, row * 8]] * 3, atol=1e-5)
  # P4 (4 x 6 cells) starts after the 8 x 12 x 3 P3 anchors; cell 13 = (2, 1).
  np.testing.assert_allclose(a[8 * 12 * 3 + 3 * 13, :2] + 32, [16, 32],
                             atol=1e-5)


def test_encode_decode_round_trip():
  rng = np.random.default_rng(0)
  anchors = jnp.asarray(A.generate_anchors((64, 64))[:200])
  xy = rng.uniform(-20, 60, (200, 2))
  wh = rng.uniform(5, 120, (200, 2))
  boxes = jnp.asarray(np.concatenate([xy, xy + wh], 1), jnp.float32)
  deltas = A.encode(anchors, boxes)
  np.testing.assert_allclose(A.decode(anchors, deltas), boxes, atol=1e-3)
  # Identity: a box equal to its anchor encodes to zero.
  np.testing.assert_allclose(A.encode(anchors, anchors), 0, atol=1e-6)
  # Scale clamp at log(1000/16): no overflow from a wild head.
  big = A.decode(anchors[:1], jnp.array([[0.0, 0.0, 50.0, 50.0]]))
  w = float(anchors[0, 2] - anchors[0, 0])
  np.testing.assert_allclose(big[0, 2] - big[0, 0], w * 1000 / 16, rtol=1e-4)


@pytest.mark.parametrize("levels", [(3, 4, 5, 6, 7), (2, 3, 4, 5), (3, 4, 5)])
def test_every_50px_box_gets_a_foreground_anchor(levels):
  size = (160, 224)
  anchors = jnp.asarray(A.generate_anchors(size, levels))
  rng = np.random.default_rng(1)
  # Centres anywhere a whole 50x50 box fits, including the extreme corners.
  cx = np.concatenate([rng.uniform(25, size[1] - 25, 300), [25, size[1] - 25]])
  cy = np.concatenate([rng.uniform(25, size[0] - 25, 300), [size[0] - 25, 25]])
  boxes = np.stack([cx - 25, cy - 25, cx + 25, cy + 25], 1).astype(np.float32)
  iou = np.asarray(_jit(A.box_iou)(jnp.asarray(boxes), anchors))
  assert iou.max(1).min() >= 0.5  # on merit, not through low-quality matches
  # One box per image through the matcher, without the low-quality rule.
  _, labels = _jit(A.match_anchors, static_argnames="allow_low_quality")(
      anchors, jnp.asarray(boxes)[:, None], jnp.ones((len(boxes), 1), bool),
      allow_low_quality=False)
  assert np.all(np.asarray(labels == A.FG).sum(1) >= 1)


def test_matcher_thresholds_padding_and_low_quality():
  anchors = jnp.array([[0, 0, 10, 10], [0, 0, 10, 11], [0, 0, 10, 14],
                       [0, 0, 10, 23], [100, 100, 110, 110]], jnp.float32)
  # IoU with the gt box [0,0,10,10]: 1, 10/11, 10/14=0.71, 10/23=0.43, 0.
  gt = jnp.array([[0, 0, 10, 10], [0, 0, 0, 0], [50, 50, 60, 60]], jnp.float32)
  mask = jnp.array([True, False, True])
  match = _jit(A.match_anchors, static_argnames="allow_low_quality")
  matched, labels = match(anchors, gt, mask)
  np.testing.assert_array_equal(labels, [A.FG, A.FG, A.FG, A.IGNORE, A.BG])
  np.testing.assert_array_equal(matched[:3], [0, 0, 0])
  # Low-quality: a box overlapping only the last anchor (IoU 0.14) claims it.
  gt2 = jnp.array([[105, 105, 115, 115]], jnp.float32)
  _, lq = match(anchors, gt2, jnp.array([True]))
  _, strict = match(anchors, gt2, jnp.array([True]), allow_low_quality=False)
  assert int(lq[4]) == A.FG and int(strict[4]) == A.BG
  # No valid box: everything background.
  _, none = match(anchors, gt, jnp.zeros(3, bool))
  assert np.all(np.asarray(none) == A.BG)


# ---------------------------------------------------------------- backbone


def test_param_counts_match_torchvision():
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  count = lambda m: count_params(
      jax.eval_shape(m.init, jax.random.PRNGKey(0), x)["params"])
  # torchvision resnet50 / resnet18 without the fc layer.
  assert count(R.resnet("resnet50")) == 25_557_032 - 2_049_000
  assert count(R.resnet("resnet18")) == 11_689_512 - 513_000
  # retinanet_resnet50_fpn_v2 (91 COCO classes, 9 anchors): 38,198,935.
  assert count(RetinaNet(num_classes=91, num_anchors=9)) == 38_198_935


def test_trainable_mask_follows_torchvision():
  variables, _ = _shapes(retinanet_tiny(), (64, 64))
  params = variables["params"]
  assert set(params["backbone"]) == {"conv1", "bn1", "layer1_0", "layer2_0",
                                     "layer3_0", "layer4_0"}

  def trained(mask):
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return {(p[0].key, p[1].key) for p, v in flat if v}

  heads = {("fpn", k) for k in params["fpn"]} | {
      ("cls_head", k) for k in params["cls_head"]} | {
          ("box_head", k) for k in params["box_head"]}
  bb = lambda *names: {("backbone", n) for n in names}
  assert trained(trainable_mask(params, 0)) == heads
  assert trained(trainable_mask(params, 3)) == heads | bb(
      "layer2_0", "layer3_0", "layer4_0")
  assert trained(trainable_mask(params, 5)) == heads | bb(
      "conv1", "bn1", "layer1_0", "layer2_0", "layer3_0", "layer4_0")
  # A bare backbone's params work too.
  bare = params["backbone"]
  assert trained(trainable_mask({"x": bare}, 1, backbone_key="x")) == {
      ("x", "layer4_0")}
  with pytest.raises(ValueError):
    trainable_mask(params, 6)


def test_frozen_params_really_do_not_move():
  variables, _ = _shapes(retinanet_tiny(), (64, 64))
  params = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype),
                                  variables["params"])
  mask = trainable_mask(params, 2)
  tx = freeze(optax.adamw(0.1, weight_decay=0.1), mask)

  @_jit
  def step(params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  new = step(params, params)  # gradient of ones everywhere
  moved = jax.tree_util.tree_map(
      lambda a, b: bool(np.any(a != np.asarray(b))), params, new)
  assert moved == mask  # exactly the trainable leaves changed
  assert not moved["backbone"]["layer2_0"]["conv1"]["kernel"]
  assert moved["backbone"]["layer3_0"]["conv1"]["kernel"]


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("size,num_classes", [((128, 128), 1),
                                               ((96, 160), 2)])
def test_output_shapes(size, num_classes):
  model = retinanet_tiny(num_classes=num_classes)
  variables, (cls, box) = _shapes(model, size)
  n = A.generate_anchors(size).shape[0]
  assert cls.shape == (2, n, num_classes) and box.shape == (2, n, 4)
  assert cls.dtype == jnp.float32 and box.dtype == jnp.float32
  assert variables["params"]["fpn"]["p6"]["kernel"].shape[2] == 64  # from C5


def test_level_and_p6_variants():
  size = (96, 160)
  # Levels 2..5 (C2 feeds P2): no extra levels, anchors line up.
  v, (cls, _) = _shapes(retinanet_tiny(levels=(2, 3, 4, 5)), size)
  assert cls.shape[1] == A.generate_anchors(size, (2, 3, 4, 5)).shape[0]
  assert "p6" not in v["params"]["fpn"] and "inner2" in v["params"]["fpn"]
  # v1: P6 from P5 (FPN width in), bf16 compute still returns float32.
  v1, (cls, _) = _shapes(retinanet_tiny(p6_input="p5", dtype=jnp.bfloat16),
                         size)
  assert v1["params"]["fpn"]["p6"]["kernel"].shape[2] == 16
  assert v1["params"]["fpn"]["p6"]["kernel"].dtype == jnp.float32
  assert cls.dtype == jnp.float32
  # A width override keeps the layout: ResNet-50 at width 16 ends in 512 ch.
  v, _ = _shapes(retinanet_tiny(backbone="resnet50", backbone_width=16), size)
  assert v["params"]["fpn"]["inner5"]["kernel"].shape[2] == 16 * 8 * 4
  with pytest.raises(ValueError, match="levels"):
    _shapes(retinanet_tiny(levels=(3, 5)), size)


def test_forward_prior_loss_and_gradient():
  model = retinanet_tiny(num_classes=2, head_depth=1)
  size = (64, 64)
  anchors = A.generate_anchors(size)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, *size, 3))
  # rbg keys: the default threefry init takes far longer to compile on CPU.
  variables = _jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x)
  gt_boxes = jnp.array([[[5, 5, 55, 55], [0, 0, 0, 0]],
                        [[10, 12, 60, 62], [2, 2, 52, 52]]], jnp.float32)
  gt_classes = jnp.array([[0, 0], [1, 0]])
  gt_mask = jnp.array([[True, False], [True, True]])

  def loss_fn(params):
    (cls, box), _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    parts = L.retinanet_loss(cls, box, anchors, gt_boxes, gt_classes, gt_mask)
    loss, _ = L.normalize(parts)
    return loss, (jax.nn.sigmoid(cls).mean(), parts)

  (loss, (mean_prob, parts)), grads = _jit(
      jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  # Prior: bias -log(99), so the initial foreground probability is ~0.01.
  np.testing.assert_allclose(variables["params"]["cls_head"]["out"]["bias"],
                             PRIOR, rtol=1e-6)
  assert abs(float(mean_prob) - 0.01) < 2e-3
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert np.all(np.asarray(parts["num_pos"]) >= 1)
  for path in [("backbone", "conv1", "kernel"), ("fpn", "p7", "kernel"),
               ("cls_head", "out", "bias"), ("box_head", "conv0", "kernel")]:
    g = grads
    for k in path:
      g = g[k]
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path


# ---------------------------------------------------------------- postprocess


def _point_anchors(points):
  """10x10 anchors centred on ``points`` (zero deltas decode to them)."""
  p = np.asarray(points, np.float32)
  return jnp.asarray(np.concatenate([p - 5, p + 5], 1))


def test_postprocess_suppresses_duplicates_greedily():
  # Scores descending: A, B (20 px from A), C (20 px from B, 40 from A), D far.
  pts = [(50, 50), (70, 50), (90, 50), (200, 200), (0, 0)]
  logits = jnp.array([[[4.0], [3.0], [2.0], [1.0], [-9.0]]])
  pts_out, scores, classes, valid = _jit(postprocess, static_argnums=(3, 4, 5))(
      logits, jnp.zeros((1, 5, 4)), _point_anchors(pts), 0.05, 5, 25.0)
  # Greedy: A kills B; C survives because B is gone; D is far; E is too low.
  assert int(valid.sum()) == 3
  np.testing.assert_allclose(pts_out[0, :3], [[50, 50], [90, 50], [200, 200]])
  np.testing.assert_allclose(scores[0, :3], jax.nn.sigmoid(
      jnp.array([4.0, 2.0, 1.0])), rtol=1e-6)
  assert not bool(valid[0, 3:].any()) and float(scores[0, 3:].max()) == 0.0


def test_postprocess_per_class_and_agnostic():
  # One location, two classes; a second peak of class 0 far away.
  logits = jnp.array([[[3.0, 2.0], [1.0, -9.0]]])
  anchors = _point_anchors([(40, 40), (140, 40)])
  args = (logits, jnp.zeros((1, 2, 4)), anchors)
  run = _jit(postprocess, static_argnames=("topk", "class_agnostic"))
  _, _, classes, valid = run(*args, topk=4)
  assert int(valid.sum()) == 3
  np.testing.assert_array_equal(classes[0, :3], [0, 1, 0])
  _, _, classes, valid = run(*args, topk=4, class_agnostic=True)
  assert int(valid.sum()) == 2
  np.testing.assert_array_equal(classes[0, :2], [0, 0])


def test_detector_takes_rectangular_tiles():
  # Whole-image regions are rectangles: the anchors, the model.resize_to
  # rescale and the tile function all take (h, w); an int is a square.
  from midog_jax import config_files, detectors  # pylint: disable=g-import-not-at-top
  h, w = 64, 100
  for resize_to in (0, 96):
    cfg = config_files.get_config("retina", "tiny")
    cfg.data.patch_size, cfg.model.resize_to = 64, resize_to
    det = detectors.build(cfg)
    r = (resize_to or 64) / 64
    net = det.net_size((h, w))
    assert net == (round(h * r), round(w * r)) and det.net_size(h) == det.net_size((h, h))
    a = np.asarray(det.anchors((h, w)))
    want = A.generate_anchors(net, tuple(cfg.model.levels), det._sizes())
    scale = np.asarray([w / net[1], h / net[0]] * 2, np.float32)
    np.testing.assert_allclose(a, want * scale, rtol=1e-6)
    assert np.allclose(a, want) == (not resize_to)  # x and y scaled back, separately
    np.testing.assert_array_equal(np.asarray(det.anchors(h)), np.asarray(det.anchors((h, h))))
  # The tile function (resize_to 96: the network sees 96 x 150) on rectangles.
  variables = det.init_variables(jax.random.key(0, impl="rbg"))
  tiles = np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
  (cls, _), _ = jax.jit(lambda v, x: det._apply(v, x, train=False))(variables, tiles)
  assert cls.shape[1] == a.shape[0]
  pts, _, _, valid = map(np.asarray, det.make_tile_fn(0.0)(variables, tiles))
  p = pts[valid]
  assert len(p) and (p > -25).all() and (p[:, 0] < w + 25).all() and (p[:, 1] < h + 25).all()
  assert p[:, 0].max() > h  # points along the long side too
