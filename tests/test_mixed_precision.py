"""Mixed precision (``config.model.compute_dtype``, issue 13): bfloat16 compute, float32 state.

The one mechanism is ``detectors/interface.compute_dtype``: every detector
builds its Flax model with that computation ``dtype`` (parameters float32, the
networks' output layers float32). These tests build each detector through
``detectors.build`` from its test-sized config and check, on the same random
input and the same variables:

* bfloat16 outputs are close to float32 but not identical (a setting that is
  silently ignored gives identical numbers and fails);
* every detector's gradients and loss are float32, and one jitted
  ``train.train_step`` in bfloat16 keeps every parameter, optimizer-state and
  BatchNorm-statistic leaf float32, with a finite loss;
* the traced programs really convolve and multiply in bfloat16 (and not at all
  in float32 mode), weighted by multiply-adds, so a partial implementation
  (only some layers) fails too, and the layer that makes the logits computes
  in float32;
* the config key: every config has it (float32 by default), a bad value is
  refused, the pre-issue-13 name ``model.dtype`` is still read, and it may
  change on resume.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midog_jax import config_files, detectors, optim, train
from midog_jax.detections import IMPOSTER, MITOSIS
from midog_jax.detectors import interface
from midog_jax.workdir import RESUMABLE_KEYS, config_differences

# name -> (config module, argument, overrides). The image-level round-2
# EfficientNet runs BatchNorm on batch statistics with dropout and stochastic
# depth off: at random initialisation its running statistics shrink the signal
# to ~1e-14 (image_level/features.calibrate_batch_stats), which would make
# every output the same in both dtypes; bn_calibration 0 keeps the data out.
CASES = {
    "retina": ("retina", "tiny", {}),
    "p4": ("p4_resnet", "tiny", {}),
    "kondo_da": ("kondo_da", "tiny", {}),
    "image_level": ("image_level", "round=2,tiny", {
        "image_level.bn_calibration": 0, "model.bn_train": True, "model.dropout": 0.0,
        "model.stochastic_depth": 0.0}),
}


# The default suite compiles the cheapest network of each kind of check (the
# P4 ResNet for numbers, every method for the traced program); the other
# methods' numeric checks (about 2.5 min of compiling on 2 cores) run with
# MIDOG_ALL_BF16=1 and are reported as skipped otherwise.
_ALL = bool(os.environ.get("MIDOG_ALL_BF16"))


def _heavy(*cases: str) -> list:
  return [c if c == "p4" else pytest.param(c, marks=pytest.mark.skipif(
      not _ALL, reason="compile-heavy: set MIDOG_ALL_BF16=1")) for c in cases]


def _config(case: str, dtype: str, **more):
  name, arg, over = CASES[case]
  c = config_files.get_config(name, arg)
  c.model.compute_dtype = dtype
  for key, value in {**over, **more}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _detector(case: str, dtype: str, **more):
  return detectors.build(_config(case, dtype, **more))


def _lively(variables: dict, seed: int) -> dict:
  """Random BatchNorm statistics and affine maps (as after training).

  At initialisation the tiny networks' maps are largely flat (BatchNorm the
  identity, most features rectified to zero), so float32 and bfloat16 could
  agree merely because every output is the same.
  """
  rng = np.random.default_rng(seed)
  fills = {"mean": lambda s: rng.normal(0, 0.3, s), "var": lambda s: rng.uniform(0.5, 2.0, s),
           "scale": lambda s: rng.uniform(0.5, 1.5, s), "bias": lambda s: rng.normal(0, 0.3, s)}

  def fill(path, leaf):
    f = fills.get(getattr(path[-1], "key", None))
    return f(leaf.shape).astype(np.float32) if f and leaf.ndim == 1 else leaf

  return jax.tree_util.tree_map_with_path(fill, variables)


def _batch(case: str, size: int, n: int = 4, seed: int = 0) -> dict:
  """A pipeline-shaped batch: noise patches, a mitotic figure near the centre of half."""
  rng = np.random.default_rng(seed)
  c = (size - 1) / 2
  points = np.zeros((n, 4, 2), np.float32)
  points[:, 0] = c + rng.uniform(-2, 2, (n, 2))
  points[:, 1] = rng.uniform(0.2 * size, 0.8 * size, (n, 2))
  classes = np.tile(np.asarray([[MITOSIS, IMPOSTER, 0, 0]], np.int32), (n, 1))
  mask = np.zeros((n, 4), bool)
  mask[:, 1] = True
  mask[::2, 0] = True  # every other patch is centred on a mitotic figure
  return dict(image=rng.integers(0, 256, (n, size, size, 3), np.uint8), points=points,
              classes=classes, mask=mask, label=(np.arange(n) % 2 == 0).astype(np.int32),
              domain=np.arange(n, dtype=np.int32) % 3, progress=np.full(n, 0.5, np.float32),
              rng=np.arange(n, dtype=np.int32))


def _logits(det, variables, images):
  """The network's raw output (the logits) through the detector's own apply."""
  if det.name == "retinanet":
    return det._apply(variables, images, train=False)[0][0]  # pylint: disable=protected-access
  if det.name == "p4":
    return det._apply(variables, images, train=False)[0]  # pylint: disable=protected-access
  if det.name == "kondo_da":
    return det.apply(variables["params"], variables["batch_stats"], images, 1.0, False)[0][0]
  # Image-level round 2: training mode (batch statistics, see CASES).
  return det.logits(variables["params"], variables["batch_stats"], images, True,
                    jax.random.key(0, impl="rbg"))[0]


def _grey_noise(images: np.ndarray, seed: int) -> np.ndarray:
  """``images`` with every value moved by +-1 grey level (clipped to 0..255)."""
  step = np.random.default_rng(seed).choice([-1, 1], images.shape)
  return np.clip(images.astype(np.int32) + step, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _outputs(case: str) -> dict:
  """Loss and logits (and tile outputs where the detector has them): float32,
  float32 on +-1 grey level noisier input ("noise"), and bfloat16."""
  d32, d16 = _detector(case, "float32"), _detector(case, "bfloat16")
  init = d32.init_variables(jax.random.key(0))
  # The bfloat16 detector initialises the very same variables: dtype is not a
  # parameter (so checkpoints load either way).
  init16 = d16.init_variables(jax.random.key(0))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), init) == jax.tree.map(
      lambda a: (a.shape, a.dtype), init16)
  variables = _lively(init, 1) if case != "image_level" else init
  batch = _batch(case, d32.patch_size)
  ctx = d32.tile_context
  tiles = np.random.default_rng(2).integers(0, 256, (2, 64 + 2 * ctx, 64 + 2 * ctx, 3),
                                            np.uint8)
  out = {}
  for run, det, noisy in (("float32", d32, False), ("noise", d32, True),
                          ("bfloat16", d16, False)):
    # Cached per detector: the noise run reuses the float32 program.
    fn = _loss_and_logits(det)
    b = dict(batch, image=_grey_noise(batch["image"], 3)) if noisy else batch
    loss, logits = fn(variables, b)
    got = dict(loss=np.asarray(loss), logits=np.asarray(logits))
    if case in ("retina", "p4"):
      x = _grey_noise(tiles, 4) if noisy else tiles
      got["tile"] = [np.asarray(a) for a in det.make_tile_fn(0.0)(variables, x)]
    out[run] = got
  return out


@functools.lru_cache(maxsize=None)
def _loss_and_logits(det):
  return jax.jit(lambda v, b: (det.loss(v["params"], v.get("batch_stats", {}), b, True)[0],
                               _logits(det, v, b["image"])))


# The tolerances (see the docstring below): bf16's deviation from float32 per
# logit, in units of what +-1 grey level of input noise does in float32; and
# the loss's relative deviation.
NOISE_FACTOR = 5.0
LOSS_RTOL = 0.02


@pytest.mark.parametrize("case", _heavy(*CASES))
def test_bf16_outputs_are_close_to_float32_but_not_identical(case):
  """Loss and logits of bfloat16 vs float32 on the same input and variables.

  Tolerances. bfloat16 keeps 8 significant bits: the input and every
  activation are rounded by up to 2^-9 = 0.2% relative (near the normalised
  input's extremes, about half a grey level). How far the outputs move then
  depends on the network's conditioning, not on the mechanism alone: the tiny
  ResNet and P4 nets move their logits by < 1% of their scale, while
  EfficientNet-B0 (~80 layers, BatchNorm on the batch statistics of 4 noise
  patches at random initialisation: a chaotic regime) moves its logits by
  ~60% of their scale, whether its activations are bfloat16 or its float32
  input is merely +-1 grey level noisier. So the yardstick is measured per
  network: bfloat16 may move the logits by at most NOISE_FACTOR = 5 times as
  much as +-1 grey level of input noise moves them in float32 (measured ratios
  on this CPU: P4 0.24, RetinaNet 1.3, image-level 1.0, Kondo 2.8), noise far
  below any colour augmentation. BatchNorm statistics computed from bfloat16
  activations exceed it on the EfficientNet (the well-conditioned nets
  tolerate them). The loss, a mean over the batch, may move by LOSS_RTOL = 2%
  (measured: <= 0.1%, image-level 0.7%). And the two must not be identical:
  a setting that is ignored fails.
  """
  out = _outputs(case)
  f32, noise, b16 = out["float32"], out["noise"], out["bfloat16"]
  for name in ("loss", "logits"):
    assert f32[name].dtype == np.float32 and b16[name].dtype == np.float32, name
  assert np.isfinite(b16["loss"])
  np.testing.assert_allclose(b16["loss"], f32["loss"], rtol=LOSS_RTOL)
  scale = float(np.abs(f32["logits"]).max())
  assert np.abs(f32["logits"] - f32["logits"].mean()).max() > 0.05 * scale, (
      "degenerate test: the float32 logits are all the same")
  err = np.abs(b16["logits"] - f32["logits"]).max()
  yardstick = np.abs(noise["logits"] - f32["logits"]).max()
  assert err <= NOISE_FACTOR * yardstick, (err, yardstick, scale)
  # Really computed in bfloat16: a no-op setting gives identical numbers.
  assert err > 0 and b16["loss"] != f32["loss"]


@pytest.mark.parametrize("case", _heavy("retina", "p4"))
def test_tile_functions_return_float32_and_close_scores(case):
  """The tile function's points and scores are float32 in bfloat16 mode, and each
  tile's best score (a continuous function of the map, unlike the peak set,
  where near-ties may swap) moves by at most NOISE_FACTOR times what +-1 grey
  level of input noise moves it by in float32 (plus 1e-6 for scores that
  saturate at 1)."""
  out = _outputs(case)
  (_, s32, _, v32), (p16, s16, c16, v16) = out["float32"]["tile"], out["bfloat16"]["tile"]
  _, sn, _, vn = out["noise"]["tile"]
  assert p16.dtype == np.float32 and s16.dtype == np.float32
  assert c16.dtype == np.int32 and v16.dtype == bool
  assert v16.any(axis=1).all()
  best = lambda s, v: np.where(v, s, 0).max(axis=1)
  err = np.abs(best(s16, v16) - best(s32, v32)).max()
  yardstick = np.abs(best(sn, vn) - best(s32, v32)).max()
  assert err <= NOISE_FACTOR * yardstick + 1e-6, (err, yardstick)
  assert not np.array_equal(s16, s32)


# ----------------------------------------------------------------- training


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_gradients_and_loss_are_float32(case):
  """The gradient of every detector's bfloat16 loss has the parameters' tree
  and float32 dtypes, and the loss is float32 (shapes and dtypes only:
  ``jax.eval_shape`` traces, nothing is compiled). Fails for a mechanism that
  differentiates bf16 copies of the parameters outside the cast, or returns
  a bfloat16 loss."""
  det = _detector(case, "bfloat16")
  v = jax.eval_shape(det.init_variables, jax.random.key(0))
  params, stats = v["params"], v.get("batch_stats", {})
  assert {x.dtype for x in jax.tree.leaves(v)} == {np.dtype(np.float32)}
  batch = _batch(case, det.patch_size, n=2)
  loss, grads = jax.eval_shape(lambda p, s: jax.value_and_grad(
      lambda q: det.loss(q, s, batch, True)[0])(p), params, stats)
  assert loss.dtype == np.float32 and loss.shape == ()
  assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == jax.tree.map(
      lambda p: (p.shape, p.dtype), params)


@pytest.mark.parametrize("case", _heavy("retina", "p4"))
def test_bf16_train_step_keeps_float32_state(case):
  """One jitted ``train.train_step`` in bfloat16 (the RetinaNet: BatchNorm and
  GroupNorm, Adam; the P4 ResNet: P4 BatchNorm, SGD with momentum): every
  parameter, optimizer-state and BatchNorm-statistic leaf is float32 with its
  shape before the step (what the checkpoint holds), the loss is finite, and
  the parameters and statistics did move. Fails for parameters or running
  statistics kept in bfloat16."""
  det = _detector(case, "bfloat16")
  config = _config(case, "bfloat16")
  variables = det.init_variables(jax.random.key(0))
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps,
                               det.trainable_mask(params))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
               opt_state=tx.init(params))
  batch = _batch(case, det.patch_size, n=2)
  step = jax.jit(functools.partial(train.train_step, detector=det, tx=tx))
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  for part in ("params", "batch_stats", "opt_state"):
    floats = [x for x in jax.tree.leaves(new[part]) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats), part
    # The same tree and dtypes as before the step (what the checkpoint holds).
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new[part]) == jax.tree.map(
        lambda x: (jnp.shape(x), jnp.result_type(x)), state[part]), part
  # The step did train: parameters and BatchNorm statistics moved.
  moved = lambda a, b: max(float(jnp.abs(x - y).max()) for x, y in
                           zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(new["params"], params) > 0 and moved(new["batch_stats"], stats) > 0


# ------------------------------------------------------- the traced programs


def _subjaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)


def _matmuls(jaxpr) -> list[tuple[str, float]]:
  """(operand dtype, multiply-adds) of every convolution and matmul, in program
  order, nested jaxprs (jit, custom_vjp) inlined where they are called."""
  out = []
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ("conv_general_dilated", "dot_general"):
      lhs, rhs = (v.aval for v in eqn.invars[:2])
      res = eqn.outvars[0].aval
      if name == "conv_general_dilated":
        # Per output element: the kernel without its output-feature axis.
        o = eqn.params["dimension_numbers"].rhs_spec[0]
        macs = np.prod(res.shape) * np.prod(rhs.shape) / rhs.shape[o]
      else:
        (contract, _), _ = eqn.params["dimension_numbers"]
        macs = np.prod(res.shape) * np.prod([lhs.shape[d] for d in contract])
      out.append((str(np.result_type(lhs.dtype, rhs.dtype)), float(macs)))
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        out.extend(_matmuls(sub))
  return out


def _traced(case: str, dtype: str) -> list[tuple[str, float]]:
  """``_matmuls`` of the detector's forward pass to its logits (``_logits``), or
  of round 1's feature extractor."""
  if case == "image_level_round1":  # the frozen feature extractor of round 1
    c = config_files.get_config("image_level", "tiny")
    c.model.compute_dtype = dtype
    det = detectors.build(c)
    fn = lambda v, x: det.model.apply(v, interface.normalize(x, det.input_mean,
                                                             det.input_std), train=False)
    size = 32
  else:
    det = _detector(case, dtype)
    fn = functools.partial(_logits, det)
    size = det.patch_size
  v = jax.eval_shape(det.init_variables, jax.random.key(0))
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8)
  return _matmuls(jax.make_jaxpr(fn)(v, x).jaxpr)


@pytest.mark.parametrize("case", [*CASES, "image_level_round1"])
def test_bf16_config_really_computes_in_bf16(case):
  """``jax.make_jaxpr`` of the forward pass (traced, not compiled).

  In bfloat16 mode at least 90% of the convolution and matmul multiply-adds
  take bfloat16 operands (the rest: the float32 output layers; measured: 94%
  for the tiny RetinaNet, whose 16-channel heads make its output convolutions
  relatively large, >= 99.9% for the others), and the LAST one, which makes
  the logits, takes float32 (so the logits are not rounded to bfloat16); in
  float32 mode none takes bfloat16. A detector that ignores the key fails the
  first, one that casts only some layers the 90%, one whose output layer
  computes in bfloat16 the last. (The numbers cannot show the last on a CPU:
  XLA's CPU backend may compute bfloat16 operations in float32 and drop
  roundings, so outputs are not reliably on the bfloat16 grid.)
  """
  f32 = _traced(case, "float32")
  assert f32 and all(d == "float32" for d, _ in f32), f32
  b16 = _traced(case, "bfloat16")
  share = sum(m for d, m in b16 if d == "bfloat16") / sum(m for _, m in b16)
  assert share >= 0.9, b16
  if case != "image_level_round1":  # features, not logits: no output layer
    assert b16[-1][0] == "float32", b16[-3:]


# ------------------------------------------------------------------ the key


def test_every_config_has_the_key_and_defaults_to_float32():
  from configs import common, image_level, kondo_da, p4_resnet, retina
  assert common.base_config().model.compute_dtype == "float32"
  for module, arg in ((retina, ""), (retina, "tiny"), (p4_resnet, ""), (kondo_da, ""),
                      (image_level, ""), (image_level, "round=2")):
    m = module.get_config(arg).model
    assert m.compute_dtype == "float32", module.__name__
    assert "dtype" not in m, module.__name__  # one key, not two
  assert interface.compute_dtype(retina.get_config("").model) == jnp.float32


def test_bad_values_are_refused_and_the_old_name_is_read():
  with pytest.raises(ValueError, match="model.compute_dtype"):
    _detector("retina", "float16")
  with pytest.raises(ValueError, match="'bf16'"):
    _detector("p4", "bf16")
  # Workdirs saved before the key was renamed hold model.dtype.
  c = _config("retina", "float32")
  del c.model["compute_dtype"]
  c.model.dtype = "bfloat16"
  assert detectors.build(c).model.dtype == jnp.bfloat16
  for case in CASES:
    assert _detector(case, "bfloat16").model.dtype == jnp.bfloat16, case


def test_compute_dtype_may_change_on_resume():
  old = _config("retina", "float32").to_dict()
  new = _config("retina", "bfloat16").to_dict()
  assert "model.compute_dtype" in RESUMABLE_KEYS
  assert config_differences(old, new) == []
  # A workdir saved under the old name resumes with the new config.
  legacy = dict(old, model={k: v for k, v in old["model"].items() if k != "compute_dtype"})
  legacy["model"]["dtype"] = "float32"
  assert config_differences(legacy, new) == []
  # ...but not with a change of what the model learns.
  other = dict(new, model=dict(new["model"], fpn_channels=32))
  assert config_differences(old, other) == ["model.fpn_channels (was 16, now 32)"]

