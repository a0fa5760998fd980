"""The gradient reversal layer and the domain-adversarial classifier (models/dann.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midog_jax.models import dann as dann_lib
from midog_jax.models.dann import DANN, dann_loss, grow_domain_head
from midog_jax.models.grad_reverse import ganin_lambda, grad_reverse

# A test-sized model: resnet_tiny (width 8, one block per stage), small heads.
KW = dict(backbone="resnet_tiny", hidden=(16, 8), num_domains=3)


@pytest.fixture(scope="module")
def model_and_vars():
  model = DANN(**KW)
  x = jnp.zeros((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, 1.0, train=False)
  # Non-trivial running statistics, so train=False is not an identity BN.
  stats = jax.tree.map(lambda a: a + 0.1, variables["batch_stats"])
  return model, dict(variables, batch_stats=stats)


def _patches(seed, n=4):
  return jax.random.normal(jax.random.key(seed), (n, 32, 32, 3))


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_grad_reverse_forward_identity_backward_minus_lam(lam):
  x = jax.random.normal(jax.random.key(1), (3, 5))
  g = jax.random.normal(jax.random.key(2), (3, 5))
  y, vjp = jax.vjp(grad_reverse, x, jnp.float32(lam))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  gx, glam = vjp(g)
  np.testing.assert_array_equal(np.asarray(gx), np.asarray(-lam * g))
  assert float(glam) == 0.0


def test_grad_reverse_lam_is_traced_under_jit():
  traces = []

  @jax.jit
  def backward(x, lam, g):
    traces.append(1)  # runs once per compilation, not per call
    return jax.vjp(grad_reverse, x, lam)[1](g)[0]

  x = jax.random.normal(jax.random.key(3), (4, 7))
  g = jax.random.normal(jax.random.key(4), (4, 7))
  for lam in (0.1, 0.7, 1.9):
    np.testing.assert_allclose(np.asarray(backward(x, jnp.float32(lam), g)),
                               np.asarray(-lam * g), rtol=1e-6)
  assert len(traces) == 1  # one program serves every lam


def test_ganin_lambda():
  assert float(ganin_lambda(0.0)) == 0.0
  np.testing.assert_allclose(float(ganin_lambda(0.5)), 2 / (1 + np.exp(-5)) - 1, rtol=1e-6)
  np.testing.assert_allclose(float(ganin_lambda(0.2, gamma=3.0)),
                             2 / (1 + np.exp(-0.6)) - 1, rtol=1e-6)
  values = np.asarray(ganin_lambda(jnp.linspace(0, 1, 11)))
  assert np.all(np.diff(values) > 0) and 0.999 < values[-1] < 1.0


def test_output_shapes_and_dtypes(model_and_vars):
  model, variables = model_and_vars
  mit, dom = model.apply(variables, _patches(5, 6), 0.5, train=False)
  assert mit.shape == (6, 2) and dom.shape == (6, 3)
  assert mit.dtype == jnp.float32 and dom.dtype == jnp.float32
  p = variables["params"]
  assert set(p) == {"backbone", "mitosis_head", "domain_head"}
  # Three fully connected layers in each head; the backbone keeps torchvision's names.
  assert set(p["mitosis_head"]) == set(p["domain_head"]) == {"fc1", "fc2", "fc3"}
  assert "layer4_0" in p["backbone"] and "conv1" in p["backbone"]
  assert p["mitosis_head"]["fc1"]["kernel"].shape == (64, 16)  # resnet_tiny C5: 64 ch
  bf = DANN(**KW, dtype=jnp.bfloat16)
  mit16, _ = bf.apply(variables, _patches(5, 6), 0.5)
  assert mit16.dtype == jnp.float32


def _domain_loss(model, variables, x, labels, lam):
  def f(params):
    _, dom = model.apply(dict(variables, params=params), x, lam, train=False)
    return dann_loss(jnp.zeros((x.shape[0], 2)), dom, jnp.zeros(x.shape[0], jnp.int32),
                     labels, jnp.zeros(x.shape[0]), jnp.ones(x.shape[0]))[0]
  return f


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_backbone_receives_the_reversed_domain_gradient(model_and_vars, lam):
  """A finite-difference probe of the domain loss (no reversal in the forward pass).

  Backprop through the GRL gives the backbone ``g = -lam * dL/dtheta``, so the
  measured derivative of the loss along ``g`` is ``<dL/dtheta, g> = -|g|^2 / lam``
  (negative: a descent step on ``g`` makes the scanners harder to tell apart),
  while along the domain head's (unreversed) gradient it is ``+|g_head|^2``.
  """
  model, variables = model_and_vars
  x = _patches(6, 4)
  labels = jnp.array([0, 1, 2, 1])
  loss = jax.jit(_domain_loss(model, variables, x, labels, lam))
  grads = jax.jit(jax.grad(_domain_loss(model, variables, x, labels, lam)))(
      variables["params"])
  params = variables["params"]

  def along(part, eps):
    direction = {k: (grads[k] if k == part else jax.tree.map(jnp.zeros_like, grads[k]))
                 for k in grads}
    unit = jax.tree.map(lambda d: d * eps, direction)
    plus = jax.tree.map(jnp.add, params, unit)
    minus = jax.tree.map(jnp.subtract, params, unit)
    return (float(loss(plus)) - float(loss(minus))) / (2 * eps)

  sq = lambda t: float(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in jax.tree.leaves(t)))
  g_backbone, g_head = sq(grads["backbone"]), sq(grads["domain_head"])
  assert g_backbone > 0 and g_head > 0
  # Small steps: the loss curves fast along the backbone direction (at
  # 1e-2 of the gradient's norm the central difference is already 20% off).
  d_backbone = along("backbone", 3e-4 / np.sqrt(g_backbone))
  d_head = along("domain_head", 3e-4 / np.sqrt(g_head))
  assert d_backbone < 0 < d_head
  np.testing.assert_allclose(d_backbone, -g_backbone / lam, rtol=0.02)
  np.testing.assert_allclose(d_head, g_head, rtol=0.02)
  # The mitosis head is not on the domain loss's path at all.
  assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(grads["mitosis_head"]))


def _adaptation_grad_fn(model, variables, separate):
  """Gradients of dann_loss with 4 source (labelled) and 3 target (mit_mask 0) patches."""
  mit_labels = jnp.array([1, 0, 0, 1, 0, 0, 0])
  dom_labels = jnp.array([0, 1, 2, 0, 3, 3, 3])
  mit_mask = jnp.array([1.0, 1, 1, 1, 0, 0, 0])

  def f(params, source, target):
    v = dict(variables, params=params)
    if separate:  # train mode: each call normalises with its own batch statistics
      (ms, ds), _ = model.apply(v, source, 1.0, train=True, mutable=["batch_stats"])
      (mt, dt), _ = model.apply(v, target, 1.0, train=True, mutable=["batch_stats"])
      mit, dom = jnp.concatenate([ms, mt]), jnp.concatenate([ds, dt])
    else:
      mit, dom = model.apply(v, jnp.concatenate([source, target]), 1.0, train=False)
    return dann_loss(mit, dom, mit_labels, dom_labels, mit_mask, jnp.ones(7))[0]

  return jax.jit(jax.grad(f))


@pytest.mark.parametrize("separate", [False, True])
def test_target_patches_do_not_reach_the_mitosis_head(model_and_vars, separate):
  model, variables = model_and_vars
  model = model.grown()  # the adaptation phase: 4 scanner classes
  params = grow_domain_head(variables["params"], jax.random.key(9))
  grad_fn = _adaptation_grad_fn(model, variables, separate)
  source = _patches(10, 4)
  g1 = grad_fn(params, source, _patches(11, 3))
  g2 = grad_fn(params, source, 2.0 * _patches(12, 3) + 1.0)
  for a, b in zip(jax.tree.leaves(g1["mitosis_head"]), jax.tree.leaves(g2["mitosis_head"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # ... while the target patches do reach the domain head and the backbone.
  diff = lambda part: max(float(jnp.abs(a - b).max()) for a, b in
                          zip(jax.tree.leaves(g1[part]), jax.tree.leaves(g2[part])))
  assert diff("domain_head") > 1e-6 and diff("backbone") > 1e-6


def test_grow_domain_head_keeps_old_logits_and_adds_one(model_and_vars):
  model, variables = model_and_vars
  params = variables["params"]
  before = jax.tree.map(np.asarray, params)
  grown_params = grow_domain_head(params, jax.random.key(3))
  grown = model.grown()
  assert grown.num_domains == 4 and model.num_domains == 3
  # Same structure and shapes as a freshly initialised 4-class model.
  fresh = grown.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), 1.0)["params"]
  assert (jax.tree.map(jnp.shape, grown_params) == jax.tree.map(jnp.shape, fresh))
  x = _patches(13, 5)
  mit0, dom0 = model.apply(variables, x, 1.0)
  mit1, dom1 = grown.apply(dict(variables, params=grown_params), x, 1.0)
  assert dom1.shape == (5, 4)
  np.testing.assert_array_equal(np.asarray(mit1), np.asarray(mit0))
  np.testing.assert_array_equal(np.asarray(dom1[:, :3]), np.asarray(dom0))
  last = grown_params["domain_head"]["fc3"]
  assert float(jnp.std(last["kernel"][:, 3])) > 0 and float(last["bias"][3]) == 0.0
  # The input params are untouched, and the same key gives the same unit.
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
  again = grow_domain_head(params, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(again["domain_head"]["fc3"]["kernel"]),
                                np.asarray(last["kernel"]))
  with pytest.raises(ValueError, match="domain_head"):
    grow_domain_head({"backbone": {}}, jax.random.key(0))


def test_dann_loss_by_hand():
  mit = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
  dom = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 2.0, 0.0]])
  ce = lambda logits, k: float(jax.nn.logsumexp(logits) - logits[k])
  loss, parts = dann_loss(mit, dom, jnp.array([1, 1, 0]), jnp.array([0, 2, 1]),
                          jnp.array([1.0, 1.0, 0.0]), jnp.array([1.0, 0.0, 1.0]))
  want_mit = (ce(mit[0], 1) + ce(mit[1], 1)) / 2
  want_dom = (ce(dom[0], 0) + ce(dom[2], 1)) / 2
  np.testing.assert_allclose(float(parts["mitosis_loss"]), want_mit, rtol=1e-6)
  np.testing.assert_allclose(float(parts["domain_loss"]), want_dom, rtol=1e-6)
  np.testing.assert_allclose(float(loss), want_mit + want_dom, rtol=1e-6)
  # No mitosis example at all (a batch of target patches): 0, not NaN.
  loss0, parts0 = dann_loss(mit, dom, jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32),
                            jnp.zeros(3), jnp.ones(3))
  assert float(parts0["mitosis_loss"]) == 0.0 and np.isfinite(float(loss0))


def test_last_layer_is_found_by_number_not_name_order():
  assert dann_lib._last_layer_name({"fc1": 0, "fc10": 0, "fc2": 0}) == "fc10"
