"""EfficientNet B0-B7 (models/efficientnet.py) without torch.

Sizes are torchvision's published ones (parameter counts from its weight
metadata); the parity against torchvision itself is in
tests/weights/test_parity_backbones.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midog_jax.models import count_params
from midog_jax.models import efficientnet as effnet_lib
from midog_jax.models.efficientnet import FEATURES, EfficientNet


def _abstract(model, size=32):
  x = jnp.zeros((1, size, size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def test_feature_widths_are_torchvisions():
  assert FEATURES == {"b0": 1280, "b1": 1280, "b2": 1408, "b3": 1536,
                      "b4": 1792, "b5": 2048, "b6": 2304, "b7": 2560}


@pytest.mark.parametrize("variant,params", [
    ("b0", 5_288_548), ("b1", 7_794_184), ("b4", 19_341_616), ("b7", 66_347_960)])
def test_parameter_counts_match_torchvision(variant, params):
  # torchvision's EfficientNet_*_Weights.meta["num_params"] (1000 classes):
  # checks widths, depths (rounding rules) and the SE widths at once.
  v = _abstract(EfficientNet(variant, num_classes=1000))
  assert count_params(v["params"]) == params


def test_stage_table_rounds_like_torchvision():
  # B4: width 1.4 (multiples of 8, never < 90 %), depth 1.8 (ceil).
  assert [r[4] for r in effnet_lib.stage_table("b4")] == [24, 32, 56, 112, 160, 272, 448]
  assert [r[5] for r in effnet_lib.stage_table("b4")] == [2, 4, 4, 6, 6, 8, 2]
  assert effnet_lib.make_divisible(3.2) == 8 and effnet_lib.make_divisible(44.8) == 48


def test_features_logits_and_collections():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  feat_model = EfficientNet("b0")
  v = jax.jit(lambda r: feat_model.init(r, x))(jax.random.key(0))
  assert set(v) == {"params", "batch_stats"}
  f = jax.jit(lambda v, x: feat_model.apply(v, x, train=False))(v, x)
  assert f.shape == (2, 1280) and f.dtype == jnp.float32
  clf = EfficientNet("b0", num_classes=3)
  vc = jax.eval_shape(lambda: clf.init(jax.random.key(0), x))
  assert jax.eval_shape(lambda v: clf.apply(v, x), vc).shape == (2, 3)
  assert vc["params"]["classifier"]["kernel"].shape == (1280, 3)
  # A NCHW or grey input is a clear error, not a silent broadcast.
  with pytest.raises(ValueError, match="NHWC"):
    feat_model.apply(v, jnp.zeros((2, 3, 32, 32)))


def test_training_uses_batch_statistics_stochastic_depth_and_dropout():
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  model = EfficientNet("b0", num_classes=2, dropout=0.5, stochastic_depth=0.5)
  v = jax.jit(lambda r: model.init(r, x))(jax.random.key(0))
  run = jax.jit(lambda key: model.apply(v, x, train=True, rngs={"dropout": key},
                                        mutable=["batch_stats"]))
  (a, upd), (b, _) = run(jax.random.key(2)), run(jax.random.key(3))
  assert not np.allclose(a, b)  # different drops under different keys
  (a2, _) = run(jax.random.key(2))
  np.testing.assert_array_equal(a, a2)
  moved = jax.tree.map(lambda p, q: bool(jnp.any(p != q)), upd["batch_stats"],
                       v["batch_stats"])
  assert all(jax.tree.leaves(moved))
  # Evaluation is deterministic, needs no rng, and ignores the drops.
  evaluate = jax.jit(lambda v: model.apply(v, x, train=False))
  e1 = evaluate(v)
  np.testing.assert_array_equal(e1, evaluate(v))
  assert not np.allclose(e1, a)
  with pytest.raises(Exception):
    model.apply(v, x, train=True, mutable=["batch_stats"])  # no dropout rng


def test_stochastic_depth_drops_whole_samples_and_keeps_the_mean():
  class Wrap(effnet_lib.nn.Module):
    @effnet_lib.nn.compact
    def __call__(self, x):
      return effnet_lib.stochastic_depth(x, 0.25, True, self)

  x = jnp.ones((4000, 2, 2, 3))
  y = np.asarray(Wrap().apply({}, x, rngs={"dropout": jax.random.key(0)}))
  per_sample = y.reshape(4000, -1)
  # Each sample is either all 0 or all 1 / (1 - p).
  assert set(np.unique(per_sample.min(1))) <= {0.0, np.float32(1 / 0.75)}
  assert np.all(per_sample.min(1) == per_sample.max(1))
  assert abs(per_sample.mean() - 1.0) < 0.05
  assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="b9"):
    _abstract(EfficientNet("b9"))
