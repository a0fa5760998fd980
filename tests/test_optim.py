"""Direct tests of ``midog_jax/optim.py``: schedules, optimizers, clipping, freezing.

Learning-rate schedules are checked value by value against closed forms
(constant, linear warmup then the main schedule from its own step 0, a
single cosine decaying to zero, a cosine restarted every ``cycle_steps``).
Optimizers are real optax transforms applied to a tiny pytree and compared
with updates computed by hand in numpy (coupled SGD weight decay with
momentum, AdamW's decoupled decay, global-norm clipping), and ``freeze``
must give frozen leaves exactly zero updates and no optimizer state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midog_jax import optim
from configs import common


def _cfg(name="sgd", lr=0.1, **kw):
  c = common.optimizer_config(name, lr)
  for k, v in kw.items():
    c[k] = v
  return c


def _params():
  return {"a": jnp.array([1.0, -2.0], jnp.float32),
          "b": {"c": jnp.array([[0.5, 3.0], [-1.5, 0.25]], jnp.float32)}}


def _grads(i):
  """Two different gradient pytrees (step 0 and step 1)."""
  g = [{"a": jnp.array([0.3, -0.7], jnp.float32),
        "b": {"c": jnp.array([[1.0, -0.2], [0.4, 0.9]], jnp.float32)}},
       {"a": jnp.array([-0.5, 0.1], jnp.float32),
        "b": {"c": jnp.array([[0.2, 0.6], [-0.8, 0.05]], jnp.float32)}}]
  return g[i]


def _run(tx, params, grads_list):
  """Applies ``tx`` for each gradient; returns the list of updates and final params."""
  state = tx.init(params)
  updates_out = []
  for g in grads_list:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    updates_out.append(jax.tree.map(np.asarray, updates))
  return updates_out, params


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _assert_tree_close(got, want, rtol=1e-5, atol=1e-7):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=atol),
               got, want)
  assert jax.tree.structure(got) == jax.tree.structure(want)


# --------------------------------------------------------------------------
# Schedules.


def _values(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


def test_constant_schedule_is_lr_everywhere():
  s = optim.make_schedule(_cfg(lr=0.03, schedule="constant"), total_steps=100)
  np.testing.assert_allclose(_values(s, [0, 1, 50, 99, 100, 10_000]), 0.03, rtol=1e-6)


def test_warmup_is_linear_and_reaches_lr_exactly_at_warmup_steps():
  s = optim.make_schedule(_cfg(lr=0.2, schedule="constant", warmup_steps=10), 100)
  np.testing.assert_allclose(_values(s, [0, 1, 5, 9]), [0.0, 0.02, 0.1, 0.18],
                             rtol=1e-6, atol=1e-9)
  assert float(s(10)) == pytest.approx(0.2, rel=1e-6)
  np.testing.assert_allclose(_values(s, [11, 50, 100]), 0.2, rtol=1e-6)


def test_warmup_then_cosine_starts_the_main_schedule_at_its_step_zero():
  lr, warm, total = 0.1, 10, 110
  s = optim.make_schedule(_cfg(lr=lr, schedule="cosine", warmup_steps=warm), total)
  # The cosine runs over total - warmup steps, starting at step ``warm``.
  for k in (0, 1, 25, 50, 75, 99, 100):
    want = lr * 0.5 * (1 + math.cos(math.pi * k / (total - warm)))
    assert float(s(warm + k)) == pytest.approx(want, rel=1e-5, abs=1e-6 * lr), k
  assert float(s(warm)) == pytest.approx(lr, rel=1e-6)
  assert float(s(total)) == pytest.approx(0.0, abs=1e-9)


def test_cosine_decays_from_lr_to_zero_at_the_end():
  lr, total = 0.5, 200
  s = optim.make_schedule(_cfg(lr=lr, schedule="cosine"), total)
  assert float(s(0)) == pytest.approx(lr, rel=1e-6)
  assert float(s(total // 2)) == pytest.approx(lr / 2, rel=1e-5)
  assert float(s(total)) == pytest.approx(0.0, abs=1e-9)
  v = _values(s, range(0, total + 1, 10))
  assert np.all(np.diff(v) < 0), "cosine must decrease monotonically"


def test_cosine_cyclic_restarts_every_cycle():
  lr, cycle, total = 0.1, 100, 400
  s = optim.make_schedule(_cfg(lr=lr, schedule="cosine_cyclic", cycle_steps=cycle), total)
  for k in (0, 1, 30, 50, 99):
    want = lr * 0.5 * (1 + math.cos(math.pi * k / cycle))
    for c in range(4):
      assert float(s(c * cycle + k)) == pytest.approx(want, rel=1e-5, abs=1e-6 * lr), (c, k)
  # The restart: step ``cycle`` is back at the top, right after the bottom.
  assert float(s(cycle)) == pytest.approx(float(s(0)), rel=1e-6)
  assert float(s(cycle - 1)) < 0.001 * lr
  # Not one cosine over the whole run (that would be 0.85 lr at step 100).
  single = lr * 0.5 * (1 + math.cos(math.pi * cycle / total))
  assert abs(float(s(cycle)) - single) > 0.1 * lr


def test_cosine_cyclic_with_warmup_starts_its_first_cycle_after_warmup():
  lr, warm, cycle = 0.1, 10, 50
  s = optim.make_schedule(_cfg(lr=lr, schedule="cosine_cyclic", cycle_steps=cycle,
                               warmup_steps=warm), 500)
  assert float(s(warm)) == pytest.approx(lr, rel=1e-6)
  assert float(s(warm + cycle // 2)) == pytest.approx(lr / 2, rel=1e-5)
  assert float(s(warm + cycle)) == pytest.approx(lr, rel=1e-6)
  assert float(s(warm + 2 * cycle)) == pytest.approx(lr, rel=1e-6)


def test_schedules_accept_traced_int32_steps():
  """optax calls the schedule with an int32 array count inside jit."""
  for name in ("constant", "cosine", "cosine_cyclic"):
    s = optim.make_schedule(_cfg(lr=0.1, schedule=name, cycle_steps=40,
                                 warmup_steps=5), 100)
    got = jax.jit(s)(jnp.int32(57))
    assert float(got) == pytest.approx(float(s(57)), rel=1e-6), name


def test_unknown_schedule_raises_value_error():
  with pytest.raises(ValueError, match="linear_decay"):
    optim.make_schedule(_cfg(schedule="linear_decay"), 100)


def test_unknown_optimizer_raises_value_error():
  with pytest.raises(ValueError, match="rmsprop"):
    optim.make_optimizer(_cfg(name="rmsprop"), 100)


# --------------------------------------------------------------------------
# Optimizers.


def test_sgd_momentum_weight_decay_matches_hand_computed_updates():
  """Coupled (L2) decay: ``wd * p`` is added to the gradient before momentum."""
  lr, mu, wd = 0.1, 0.9, 0.01
  tx, _ = optim.make_optimizer(_cfg("sgd", lr, momentum=mu, weight_decay=wd), 100)
  p0 = _params()
  updates, p2 = _run(tx, p0, [_grads(0), _grads(1)])

  P0, G0, G1 = _np(p0), _np(_grads(0)), _np(_grads(1))
  t1 = jax.tree.map(lambda g, p: g + wd * p, G0, P0)
  u1 = jax.tree.map(lambda t: -lr * t, t1)
  P1 = jax.tree.map(lambda p, u: p + u, P0, u1)
  t2 = jax.tree.map(lambda g, p, t: g + wd * p + mu * t, G1, P1, t1)
  u2 = jax.tree.map(lambda t: -lr * t, t2)
  _assert_tree_close(updates[0], u1)
  _assert_tree_close(updates[1], u2)
  _assert_tree_close(_np(p2), jax.tree.map(lambda p, u: p + u, P1, u2))

  # Without momentum step 2 would differ (decoupled decay: next test).
  no_momentum_u2 = jax.tree.map(lambda g, p: -lr * (g + wd * p), G1, P1)
  assert not np.allclose(updates[1]["a"], no_momentum_u2["a"], rtol=1e-3)


def test_sgd_weight_decay_is_not_decoupled():
  """Decoupled decay (``p -= lr * wd * p`` beside the momentum) gives another step 2."""
  lr, mu, wd = 0.1, 0.9, 0.5   # large wd so the difference is large
  tx, _ = optim.make_optimizer(_cfg("sgd", lr, momentum=mu, weight_decay=wd), 100)
  p0 = _params()
  updates, _ = _run(tx, p0, [_grads(0), _grads(1)])
  P0, G0, G1 = _np(p0), _np(_grads(0)), _np(_grads(1))
  # Decoupled: momentum over raw gradients, decay applied separately.
  P1 = jax.tree.map(lambda p, g: p - lr * g - lr * wd * p, P0, G0)
  dec_u2 = jax.tree.map(lambda g1, g0, p1: -lr * (g1 + mu * g0) - lr * wd * p1, G1, G0, P1)
  assert not np.allclose(updates[1]["a"], dec_u2["a"], rtol=1e-3)


def test_sgd_without_weight_decay_is_plain_momentum():
  lr, mu = 0.05, 0.9
  tx, _ = optim.make_optimizer(_cfg("sgd", lr, momentum=mu), 100)
  updates, _ = _run(tx, _params(), [_grads(0), _grads(1)])
  G0, G1 = _np(_grads(0)), _np(_grads(1))
  _assert_tree_close(updates[0], jax.tree.map(lambda g: -lr * g, G0))
  _assert_tree_close(updates[1], jax.tree.map(lambda g1, g0: -lr * (g1 + mu * g0), G1, G0))


def test_optimizer_follows_the_schedule_not_a_fixed_lr():
  """With warmup the first update is zero (lr 0), the second uses lr / warmup."""
  lr, warm = 0.1, 4
  tx, sched = optim.make_optimizer(_cfg("sgd", lr, momentum=0.0, warmup_steps=warm), 100)
  updates, _ = _run(tx, _params(), [_grads(0), _grads(1)])
  _assert_tree_close(updates[0], jax.tree.map(np.zeros_like, _np(_grads(0))))
  _assert_tree_close(updates[1], jax.tree.map(lambda g: -lr / warm * g, _np(_grads(1))))
  assert float(sched(1)) == pytest.approx(lr / warm)


def _adam_np(params, grads_list, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
  """Hand-written Adam(W) updates (decoupled decay ``lr * wd * p``)."""
  p = _np(params)
  m = jax.tree.map(np.zeros_like, p)
  v = jax.tree.map(np.zeros_like, p)
  out = []
  for t, g in enumerate(grads_list, start=1):
    g = _np(g)
    m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
    v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
    u = jax.tree.map(
        lambda m_, v_, p_: -lr * ((m_ / (1 - b1**t)) / (np.sqrt(v_ / (1 - b2**t)) + eps)
                                  + wd * p_), m, v, p)
    p = jax.tree.map(lambda p_, u_: p_ + u_, p, u)
    out.append(u)
  return out


def test_adam_without_weight_decay_matches_hand_computed_adam():
  lr = 1e-3
  tx, _ = optim.make_optimizer(_cfg("adam", lr), 100)
  updates, _ = _run(tx, _params(), [_grads(0), _grads(1)])
  want = _adam_np(_params(), [_grads(0), _grads(1)], lr, wd=0.0)
  _assert_tree_close(updates[0], want[0], rtol=1e-4)
  _assert_tree_close(updates[1], want[1], rtol=1e-4)
  # Step 1 of Adam is -lr * sign(g), whatever the parameters are.
  np.testing.assert_allclose(updates[0]["a"], -lr * np.sign(np.asarray(_grads(0)["a"])),
                             rtol=1e-5)


def test_adam_with_weight_decay_is_adamw():
  lr, wd = 1e-2, 0.1
  tx, _ = optim.make_optimizer(_cfg("adam", lr, weight_decay=wd), 100)
  updates, _ = _run(tx, _params(), [_grads(0), _grads(1)])
  want = _adam_np(_params(), [_grads(0), _grads(1)], lr, wd=wd)
  _assert_tree_close(updates[0], want[0], rtol=1e-4)
  _assert_tree_close(updates[1], want[1], rtol=1e-4)
  # Coupled L2 (decay added to the gradient before Adam) would be about
  # -lr * sign(g + wd * p) at step 1, not -lr * (sign(g) + wd * p).
  coupled = -lr * np.sign(np.asarray(_grads(0)["a"]) + wd * np.asarray(_params()["a"]))
  assert not np.allclose(updates[0]["a"], coupled, rtol=1e-3)


def test_grad_clip_clips_the_global_norm():
  lr = 0.1
  tx, _ = optim.make_optimizer(_cfg("sgd", lr, momentum=0.0, grad_clip=1.0), 100)
  # Global norm 10 over two leaves (6, 0 | 8): per-leaf clipping would differ.
  g = {"a": jnp.array([6.0, 0.0]), "b": {"c": jnp.array([[8.0, 0.0], [0.0, 0.0]])}}
  params = _params()
  updates, _ = _run(tx, params, [g])
  scaled = jax.tree.map(lambda x: x / 10.0, g)
  plain, _ = optim.make_optimizer(_cfg("sgd", lr, momentum=0.0), 100)
  want, _ = _run(plain, params, [scaled])
  _assert_tree_close(updates[0], want[0])
  np.testing.assert_allclose(updates[0]["a"], [-0.06, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates[0]["b"]["c"][0, 0], -0.08, rtol=1e-6)


def test_grad_clip_leaves_small_gradients_alone_and_zero_disables_it():
  lr = 0.1
  small = {"a": jnp.array([0.3, 0.0]), "b": {"c": jnp.array([[0.4, 0.0], [0.0, 0.0]])}}
  big = jax.tree.map(lambda x: 20.0 * x, small)   # norm 10
  clip, _ = optim.make_optimizer(_cfg("sgd", lr, momentum=0.0, grad_clip=1.0), 100)
  noclip, _ = optim.make_optimizer(_cfg("sgd", lr, momentum=0.0, grad_clip=0.0), 100)
  u_small, _ = _run(clip, _params(), [small])
  _assert_tree_close(u_small[0], jax.tree.map(lambda x: -lr * x, _np(small)))
  u_big, _ = _run(noclip, _params(), [big])
  _assert_tree_close(u_big[0], jax.tree.map(lambda x: -lr * x, _np(big)))


# --------------------------------------------------------------------------
# Freezing.

_MASK = {"a": True, "b": {"c": False}}


def test_frozen_leaves_get_exactly_zero_updates_even_with_weight_decay():
  cfg = _cfg("sgd", 0.1, momentum=0.9, weight_decay=0.5)
  tx, _ = optim.make_optimizer(cfg, 100, trainable=_MASK)
  p0 = _params()
  updates, p2 = _run(tx, p0, [_grads(0), _grads(1)])
  for u in updates:
    assert np.array_equal(u["b"]["c"], np.zeros((2, 2), np.float32))
  assert np.array_equal(np.asarray(p2["b"]["c"]), np.asarray(p0["b"]["c"]))
  # optax.masked alone passes the raw gradient through for masked-out leaves.
  masked = optax.masked(optim.make_optimizer(cfg, 100)[0], _MASK)
  m_updates, _ = _run(masked, p0, [_grads(0)])
  assert not np.array_equal(m_updates[0]["b"]["c"], np.zeros((2, 2)))


def _frozen_and_full_updates(cfg):
  """Two steps' updates with the ``_MASK`` freeze and without it."""
  frozen_tx, _ = optim.make_optimizer(cfg, 100, trainable=_MASK)
  full_tx, _ = optim.make_optimizer(cfg, 100)
  u_frozen, _ = _run(frozen_tx, _params(), [_grads(0), _grads(1)])
  u_full, _ = _run(full_tx, _params(), [_grads(0), _grads(1)])
  return u_frozen, u_full


def test_trainable_leaves_get_the_same_update_as_without_a_mask():
  u_frozen, u_full = _frozen_and_full_updates(
      _cfg("sgd", 0.1, momentum=0.9, weight_decay=0.01))
  for a, b in zip(u_frozen, u_full):
    np.testing.assert_allclose(a["a"], b["a"], rtol=1e-6)
  assert not np.allclose(u_full[0]["b"]["c"], 0.0)


def test_adam_frozen_leaves_zero_and_trainable_unchanged():
  u_frozen, u_full = _frozen_and_full_updates(_cfg("adam", 1e-2, weight_decay=0.1))
  for a, b in zip(u_frozen, u_full):
    np.testing.assert_allclose(a["a"], b["a"], rtol=1e-6)
    assert np.array_equal(a["b"]["c"], np.zeros((2, 2), np.float32))


def test_clip_norm_counts_only_trainable_gradients():
  """Frozen gradients are never applied, so they do not shrink the trainable step."""
  cfg = _cfg("sgd", 0.1, momentum=0.0, grad_clip=1.0)
  tx, _ = optim.make_optimizer(cfg, 100, trainable=_MASK)
  g = {"a": jnp.array([0.6, 0.0]), "b": {"c": jnp.full((2, 2), 100.0)}}
  updates, _ = _run(tx, _params(), [g])
  np.testing.assert_allclose(updates[0]["a"], [-0.06, 0.0], rtol=1e-6)
  assert np.array_equal(updates[0]["b"]["c"], np.zeros((2, 2), np.float32))


def test_frozen_leaves_have_no_optimizer_state():
  params = {"a": jnp.ones((2,)), "b": {"c": jnp.ones((7, 5))}}
  cfg = _cfg("adam", 1e-3)
  frozen_state = optim.make_optimizer(cfg, 100, trainable=_MASK)[0].init(params)
  full_state = optim.make_optimizer(cfg, 100)[0].init(params)
  shapes = lambda s: [np.shape(x) for x in jax.tree.leaves(s)]
  assert (7, 5) in shapes(full_state)          # mu and nu of the frozen leaf
  assert (7, 5) not in shapes(frozen_state)
  assert shapes(frozen_state).count((2,)) == 2  # mu and nu of the trainable leaf


def test_freeze_wraps_any_transform():
  tx = optim.freeze(optax.sgd(1.0), {"x": False, "y": True})
  params = {"x": jnp.ones(3), "y": jnp.ones(3)}
  g = {"x": jnp.full(3, 2.0), "y": jnp.full(3, 2.0)}
  updates, _ = tx.update(g, tx.init(params), params)
  assert np.array_equal(np.asarray(updates["x"]), np.zeros(3, np.float32))
  np.testing.assert_allclose(updates["y"], -2.0)
