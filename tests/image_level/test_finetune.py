"""Round 2: the two fine-tuning stages (frozen backbone, then unfrozen), the head, the data."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tifffile

from midog_jax import config_files, optim, train
from midog_jax.image_level import features
from midog_jax.image_level import fields as F
from midog_jax.image_level import finetune as FT


def _method(stage: str, **overrides) -> FT.Finetune:
  c = config_files.get_config("image_level", f"round=2,stage={stage},tiny")
  c.image_level.bn_calibration = 0  # no data needed to build it
  for k, v in overrides.items():
    setattr(c.model, k, v)
  return FT.Finetune(c)


@pytest.fixture(scope="module")
def start():
  # init_variables' BatchNorm calibration, on random images instead of fields:
  # with the initial statistics the signal (and the backbone's gradients)
  # vanish in a random EfficientNet.
  det = _method("a")
  v = det.init_variables(jax.random.key(0, impl="rbg"))
  body = {k: p for k, p in v["params"].items() if k != FT.HEAD}
  images = np.random.default_rng(9).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  stats = features.calibrate_batch_stats(det.backbone.clone(stochastic_depth=0.0),
                                         dict(params=body, batch_stats=v["batch_stats"]),
                                         images)["batch_stats"]
  return dict(v, batch_stats=stats)


def _batch():
  rng = np.random.default_rng(0)
  return dict(image=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
              label=np.array([1, 0, 1, 0], np.float32), rng=np.arange(4, dtype=np.int32))


def _steps(det, variables, n=2):
  params, stats = variables["params"], variables["batch_stats"]
  tx, _ = optim.make_optimizer(det.config.optimizer, 10, det.trainable_mask(params))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
               opt_state=tx.init(params))
  step = jax.jit(functools.partial(train.train_step, detector=det, tx=tx))
  for _ in range(n):
    state, metrics = step(state, _batch())
  assert np.isfinite(float(metrics["loss"]))
  return state


def _changed(before, after) -> dict[str, bool]:
  return {k: any(not np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k])))
          for k in before}


def test_stage_a_trains_only_the_head(start):
  det = _method("a")
  assert det.config.model.train_layers == "head"
  state = _steps(det, start)
  changed = _changed(start["params"], state["params"])
  assert changed.pop("classifier")
  assert not any(changed.values()), [k for k, v in changed.items() if v]
  for a, b in zip(jax.tree.leaves(start["batch_stats"]), jax.tree.leaves(state["batch_stats"])):
    np.testing.assert_array_equal(a, b)  # BatchNorm in inference mode: statistics frozen too


def test_stage_b_fine_tunes_the_backbone_at_a_lower_rate(start):
  a, b = _method("a"), _method("b")
  assert b.config.model.train_layers == "all"
  assert b.config.optimizer.lr < a.config.optimizer.lr
  state = _steps(b, start)
  changed = _changed(start["params"], state["params"])
  assert all(changed.values()), [k for k, v in changed.items() if not v]


def test_layer_mask_from_a_stage(start):
  mask = FT.layer_mask(start["params"], "from:6")
  top = {k: all(jax.tree.leaves(v)) for k, v in mask.items()}
  assert top["stem_conv"] is False and top["stage5_0"] is False
  assert top["stage6_0"] and top["stage7_0"] and top["head_conv"] and top["classifier"]
  with pytest.raises(ValueError):
    FT.layer_mask(start["params"], "lower")


def test_head_logits_are_the_efficientnet_classifier(start):
  det = _method("a")
  head = start["params"]["classifier"]
  n = head["kernel"].shape[0]
  assert head["kernel"].shape == (n, 1) and not np.asarray(head["bias"]).any()
  assert np.abs(head["kernel"]).max() <= np.sqrt(6 / (n + 1))  # a new Keras Dense(1)
  images = _batch()["image"]
  logits, _ = det.logits(start["params"], start["batch_stats"], images, train=False)
  x = FT.normalize(images, FT.IMAGENET_MEAN, FT.IMAGENET_STD)
  want = det.model.apply(start, x, train=False)[:, 0]
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  probs = det.predict_images(start, images)
  np.testing.assert_allclose(probs, jax.nn.sigmoid(want), rtol=1e-5, atol=1e-6)
  loss, (metrics, _) = det.loss(start["params"], start["batch_stats"], _batch(), False)
  want_loss = optax.sigmoid_binary_cross_entropy(want, _batch()["label"]).mean()
  assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)


def test_item_maker_balances_augments_and_is_deterministic(tmp_path):
  items = []
  for i in range(6):
    img = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / f"{i}.tif", img, photometric="rgb")
    items.append(F.Item(str(tmp_path / f"{i}.tif"), 0, 0, 40, 40, 40, int(i < 2), "AB"[i % 2],
                        f"i{i}"))
  maker = FT.ItemMaker(items, seed=3, augment=True, balanced=True)
  labels = [float(maker(i)["label"]) for i in range(20)]
  assert labels == [1.0, 0.0] * 10  # 2 positives among 6 items, yet half of the examples
  a, b = maker(7), maker(7)
  np.testing.assert_array_equal(a["image"], b["image"])
  val = FT.ItemMaker(items, seed=3, augment=False, balanced=True)
  for i in range(6):
    np.testing.assert_array_equal(val(i)["image"], F.read_item(items[i]))  # in order, as is
  # Augmented examples are D4 transforms of an item's pixels.
  ex = maker(4)["image"]
  d4 = [np.rot90(p, k)[:, ::f] for it in items for p in [F.read_item(it)]
        for k in range(4) for f in (1, -1)]
  assert any(np.array_equal(ex, t) for t in d4)
