"""P4 group convolutions and the dense P4 ResNet (Lafarge & Koelzer, MIDOG 2022).

Rotation convention under test (see ``midog_jax.models.p4``): rotating the
input image by ``jnp.rot90(., axes=(1, 2))`` rotates every group feature map
the same way and rolls its orientation axis by +1; after pooling over
orientations the dense output map simply rotates. For the whole network this
is exact iff ``(in - RF) % 2 == 0`` in both axes, so that the map entering the
2x2 max-pool has even size and its pooling grid maps onto itself.

Weights are random (numpy-filled, including BN running statistics, so the
tests do not hinge on BN being the identity at init) and the network runs with
``train=False``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midog_jax.models import p4
from midog_jax.models import p4_resnet as pr

# A second small plan with other kernel mixes (5x5 lift, 1x1 before the
# pool, 3x3 pairs after it, width doubling): RF 1 + 6 + 1 + 2 * 6 = 20.
# Used for tiling, where a larger RF makes the tile overlaps non-trivial.
MID_PLAN = pr.LayerPlan(lift_kernel=5, pre_pool=((3, 1),),
                        post_pool=((3, 3), (1, 3)), post_pool_width_mult=2)


def random_variables(module, x_shape, seed=0):
  """Flax variables with random weights and random BN statistics.

  Shapes come from ``jax.eval_shape`` (tracing only) and values from numpy:
  far faster on CPU than compiling the initialisers of a 70-layer net.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros(x_shape, jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == "kernel":
      fan_in = math.prod(shape[:-1])  # (k, k, Cin[, 4]) for every conv here
      return rng.normal(0, math.sqrt(2 / fan_in), shape).astype(np.float32)
    if name == "scale":
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name == "bias":
      return rng.normal(0, 0.2, shape).astype(np.float32)
    if name == "mean":
      return rng.normal(0, 0.3, shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    raise AssertionError(f"unexpected variable {path}")

  return jax.tree_util.tree_map_with_path(fill, shapes)


def rel_err(a, b):
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _images(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, shape),
                     jnp.float32)


# ------------------------------------------------------------------ layers


def test_lift_kernel_layout():
  k = jnp.arange(3 * 3 * 2 * 5, dtype=jnp.float32).reshape(3, 3, 2, 5)
  full = p4.lift_kernel(k).reshape(3, 3, 2, 5, 4)
  for r in range(4):
    np.testing.assert_array_equal(full[..., r], jnp.rot90(k, r, axes=(0, 1)))


def test_group_kernel_layout():
  k = jnp.arange(3 * 3 * 2 * 4 * 3, dtype=jnp.float32).reshape(3, 3, 2, 4, 3)
  full = p4.group_kernel(k).reshape(3, 3, 2, 4, 3, 4)
  for r in range(4):
    rot = jnp.rot90(k, r, axes=(0, 1))
    for s in range(4):
      np.testing.assert_array_equal(full[:, :, :, s, :, r],
                                    rot[:, :, :, (s - r) % 4, :])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lift_and_group_conv_equivariance(k):
  x = _images((2, 13, 15, 3))
  lift = p4.P4Lift(4, 3, use_bias=True)
  conv = p4.P4Conv(5, 3, use_bias=True)
  lv = random_variables(lift, x.shape)
  g = lift.apply(lv, x)
  assert g.shape == (2, 11, 13, 4, 4)
  g_rot = lift.apply(lv, p4.rotate_image(x, k))
  assert rel_err(g_rot, p4.rotate_group(g, k)) <= 1e-6
  # The relation is not trivial: the plain spatial rotation alone is wrong.
  assert rel_err(g_rot, p4.rotate_image(g, k)) > 1e-2

  cv = random_variables(conv, g.shape, seed=2)
  o = conv.apply(cv, g)
  assert o.shape == (2, 9, 11, 5, 4)
  o_rot = conv.apply(cv, p4.rotate_group(g, k))
  assert rel_err(o_rot, p4.rotate_group(o, k)) <= 1e-6
  assert rel_err(o_rot, p4.rotate_image(o, k)) > 1e-2
  # Orientation pooling gives rotation-invariant features.
  for mode in ("max", "mean"):
    assert rel_err(p4.p4_pool(o_rot, mode),
                   p4.rotate_image(p4.p4_pool(o, mode), k)) <= 1e-6


def test_batchnorm_shares_stats_over_rotations():
  g = _images((3, 6, 7, 5, 4)) * jnp.arange(1, 5, dtype=jnp.float32)
  bn = p4.P4BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), g)
  assert v["params"]["scale"].shape == (5,)
  y, upd = bn.apply(v, g, mutable=["batch_stats"])
  y = np.asarray(y, np.float64)
  # Normalised jointly over (B, H, W, rotation), not per rotation.
  np.testing.assert_allclose(y.mean((0, 1, 2, 4)), 0, atol=1e-5)
  np.testing.assert_allclose(y.std((0, 1, 2, 4)), 1, atol=1e-3)
  assert np.abs(y.mean((0, 1, 2))).max() > 0.1
  np.testing.assert_allclose(upd["batch_stats"]["mean"],
                             0.1 * np.asarray(g).mean((0, 1, 2, 4)), rtol=1e-5)
  # Train-mode BN commutes with the group action.
  y_rot, _ = bn.apply(v, p4.rotate_group(g), mutable=["batch_stats"])
  assert rel_err(y_rot, p4.rotate_group(jnp.asarray(y))) <= 1e-6


def test_spatial_max_pool_on_group_maps():
  g = _images((1, 6, 8, 2, 4))
  y = p4.p4_max_pool2x2(g)
  assert y.shape == (1, 3, 4, 2, 4)
  np.testing.assert_array_equal(
      y, np.asarray(g).reshape(1, 3, 2, 4, 2, 2, 4).max((2, 4)))
  assert rel_err(p4.p4_max_pool2x2(p4.rotate_group(g)),
                 p4.rotate_group(y)) == 0


# ----------------------------------------------------------------- network


def test_full_plan_depth_pool_and_rf():
  """The paper's numbers: ~70 conv layers, exactly one max-pool, RF 78."""
  plan = pr.FULL_PLAN
  assert pr.receptive_field(plan) == 78
  assert pr.num_conv_layers(plan) == 70
  model = pr.P4ResNet(plan=plan, width=2)
  x = jnp.zeros((1, 80, 80, 3))
  variables = random_variables(model, x.shape)
  jaxpr = jax.make_jaxpr(lambda x: model.apply(variables, x))(x)
  prims = [e.primitive.name for e in _all_eqns(jaxpr.jaxpr)]
  # 70 main-path convs + the one projection shortcut where the width doubles.
  assert prims.count("conv_general_dilated") == 71
  assert prims.count("reduce_window_max") == 1
  assert model.receptive_field == 78
  assert pr.output_size(80, 95) == (2, 9)


def _all_eqns(jaxpr):
  """Every equation of a jaxpr, descending into nested (pjit, ...) jaxprs."""
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      sub = getattr(p, "jaxpr", p)  # ClosedJaxpr -> Jaxpr
      if hasattr(sub, "eqns"):
        yield from _all_eqns(sub)


@pytest.mark.parametrize("plan,width", [(pr.TINY_PLAN, 2), (pr.FULL_PLAN, 2)])
def test_receptive_field_by_gradient(plan, width):
  """d out[i, j] / d input is nonzero exactly on rows/cols 2i .. 2i + RF - 1."""
  rf = pr.receptive_field(plan)
  h, w = rf + 6, rf + 9
  model = pr.P4ResNet(plan=plan, width=width)
  variables = random_variables(model, (1, h, w, 3))
  oh, ow = pr.output_size(h, w, plan)
  i, j = 2, 1

  def pixel(x):
    # Samples are independent at train=False: one VJP gives all of them.
    return model.apply(variables, x)[:, i, j, 0].sum()

  xs = _images((4, h, w, 3), seed=3)
  grad = jax.jit(jax.grad(pixel))(xs)
  support = np.abs(np.asarray(grad)).sum((0, 3)) > 0  # union over inputs
  window = np.zeros_like(support)
  window[2 * i:2 * i + rf, 2 * j:2 * j + rf] = True
  # Nothing outside the window, and every row and column of it is reached
  # (a few single taps may read zero through ReLU / max-pool routing).
  assert not (support & ~window).any()
  assert support[2 * i:2 * i + rf].any(1).all()
  assert support[:, 2 * j:2 * j + rf].any(0).all()
  assert support.sum() >= 0.95 * rf * rf
  out = jax.eval_shape(model.apply, variables, xs[:1])
  assert out.shape == (1, oh, ow, 1)


def test_network_rotation_equivariance():
  """Tiny plan here; the full 70-layer plan is checked below."""
  plan = pr.TINY_PLAN
  rf = pr.receptive_field(plan)
  model = pr.P4ResNet(plan=plan, width=3, num_classes=2)
  apply = jax.jit(model.apply)
  # Two size families where (in - RF) is even in both axes; one non-square.
  for h, w in [(rf + 20, rf + 20), (rf + 16, rf + 30)]:
    assert pr.is_equivariant_size(h, plan) and pr.is_equivariant_size(w, plan)
    variables = random_variables(model, (2, h, w, 3), seed=h)
    x = _images((2, h, w, 3), seed=w)
    y = apply(variables, x)
    assert y.shape == (2, (h - rf) // 2 + 1, (w - rf) // 2 + 1, 2)
    assert np.std(y) > 1e-3  # a constant map would pass trivially
    for k in (1, 2, 3):
      y_rot = apply(variables, p4.rotate_image(x, k))
      assert rel_err(y_rot, p4.rotate_image(y, k)) <= 1e-5
  # (in - RF) odd: the pool drops a row and the grid shifts under rotation.
  h = rf + 21
  assert not pr.is_equivariant_size(h, plan)
  variables = random_variables(model, (1, h, h, 3))
  x = _images((1, h, h, 3))
  y = apply(variables, x)
  assert rel_err(apply(variables, p4.rotate_image(x)),
                 p4.rotate_image(y)) > 1e-2


def test_plain_control_is_not_equivariant():
  plan = pr.TINY_PLAN
  rf = pr.receptive_field(plan)
  model = pr.PlainResNet(plan=plan, width=3)
  h = rf + 20
  variables = random_variables(model, (2, h, h, 3))
  x = _images((2, h, h, 3))
  y = model.apply(variables, x)
  assert y.shape == (2, 11, 11, 1)
  assert rel_err(model.apply(variables, p4.rotate_image(x)),
                 p4.rotate_image(y)) > 1e-2


def test_full_depth_equivariance():
  model = pr.P4ResNet(plan=pr.FULL_PLAN, width=2)
  variables = random_variables(model, (1, 82, 82, 3))
  x = _images((1, 82, 82, 3))
  apply = jax.jit(model.apply)
  y = apply(variables, x)
  assert y.shape == (1, 3, 3, 1)
  assert np.std(y) > 1e-3  # a constant map would pass trivially
  y_rot = apply(variables, p4.rotate_image(x))
  # 70 float32 layers: compare in the norm, not elementwise. Rounding alone
  # gave 1.1e-5 here (XLA:CPU sums a rotated input's convolutions in another
  # order); a broken symmetry gives > 1e-2 (the controls above).
  err = np.linalg.norm(y_rot - p4.rotate_image(y)) / np.linalg.norm(y)
  assert err <= 1e-4


def test_output_size_and_too_small_inputs():
  assert pr.output_size(200, 232, MID_PLAN) == (
      (200 - pr.receptive_field(MID_PLAN)) // 2 + 1,
      (232 - pr.receptive_field(MID_PLAN)) // 2 + 1)
  with pytest.raises(ValueError, match="smaller than the RF"):
    pr.output_size(77, 100)
