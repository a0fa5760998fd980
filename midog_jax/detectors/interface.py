"""The one interface every detector implements, and the helpers it shares.

A detector is everything model-specific between the data pipeline and the
whole-image machinery: it builds its Flax model from ``config.model``, says
which parameters train, computes the training loss of a batch of augmented
patches, and turns whole-image tiles into scored points (with its own input
normalisation and decoding). The trainer (``train.py``), model evaluation
(``evaluation.py``), prediction (``predict.py``) and negative mining
(``mining``) talk to detectors only through :class:`Detector`.

Batches (from ``data.pipeline``) are dicts of global arrays: ``image`` uint8
(B, P, P, 3), ``points`` float32 (B, N, 2) (x, y) in patch pixel-index
coordinates (pixel k spans [k - 0.5, k + 0.5]), ``classes`` int32 (B, N)
(``detections.MITOSIS`` / ``IMPOSTER``) and ``mask`` bool (B, N).

Adding a detector: see ``docs/architecture.md`` ("How to add a detector").
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp

# (variables, uint8 tiles (B, T, T, 3)) -> (points (B, K, 2) (x, y) in the
# tiles' pixel coordinates, scores (B, K), classes (B, K) int32
# MITOSIS/IMPOSTER, valid (B, K) bool). Jitted, with fixed K, and the weights
# an ARGUMENT (not constants baked into the program): one compiled program
# serves every tile, every validation during training and every workdir.
TileFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array, jax.Array, jax.Array]]
# uint8 patches (B, P, P, 3) -> (B,) probability that each patch is centred on
# a mitotic figure (what hard-negative mining ranks negatives by). Jitted.
PatchScoreFn = Callable[[jax.Array], jax.Array]
# (loss scalar, (metrics dict of scalars, new batch_stats)).
LossOutput = tuple[jax.Array, tuple[dict[str, jax.Array], Any]]

# ImageNet statistics of [0, 1] RGB pixels (torchvision's transforms): the
# input normalisation of detectors whose backbones start from ImageNet weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images_uint8: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """uint8 RGB -> float32 ``(x / 255 - mean) / std`` (per channel).

  The one input normalisation of the package; each detector applies it, with
  its own ``mean``/``std``, in its loss, tile function and patch scorer alike,
  so training and inference see the same numbers.
  """
  x = images_uint8.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# Mixed precision: the values of ``config.model.compute_dtype``. float16 is
# left out on purpose: its 5-bit exponent needs loss scaling, bfloat16's
# float32-sized exponent does not.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(model_config: Any) -> Any:
  """The dtype a detector's network computes in: ``config.model.compute_dtype``.

  The one mixed-precision rule of the package; every detector passes its
  result as its Flax model's ``dtype`` (the computation dtype of every layer;
  ``param_dtype`` stays Flax's float32 default). With ``"bfloat16"``:

  * parameters, hence gradients and optimizer state, stay float32: each layer
    casts a copy of its float32 kernel to bfloat16, and the transpose of that
    cast returns float32 gradients;
  * convolutions, matmuls and the activations between them run in bfloat16;
    the networks cast their (float32, normalised) input at the first layer;
  * BatchNorm and GroupNorm compute their statistics in float32 and keep
    running statistics in float32 (``models/resnet.BatchNorm``,
    ``models/p4.P4BatchNorm``, Flax's ``GroupNorm``); their outputs are
    bfloat16;
  * the layer that makes each network's output computes in float32 (the
    RetinaNet's predictor convolutions, the P4 head, the last dense layer of
    the DANN heads and of the EfficientNet classifier), so logits and box
    deltas are float32 and not rounded to bfloat16's 8 bits (which would tie
    neighbouring P4 outputs and drop their local maxima); pooled features
    are averaged in float32. Losses (the focal loss above all), decoding and
    everything a detector returns are therefore float32.

  Casting the params in the detector instead was rejected: these models give
  every layer an explicit ``dtype`` (float32 by default), which would promote
  the cast copies back to float32, and BatchNorm's affine parameters would
  be rounded to bfloat16 too. The setting changes no parameter shape or dtype,
  so checkpoints load either way and it may change on resume
  (``workdir.RESUMABLE_KEYS``).

  ``model_config`` is ``config.model``; workdirs saved before the key existed
  name it ``model.dtype``, read as a fallback.
  """
  name = str(model_config.get("compute_dtype", model_config.get("dtype", "float32")))
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"model.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                     f"got {name!r}")
  return COMPUTE_DTYPES[name]


@runtime_checkable
class Detector(Protocol):
  """What every detector provides (``midog_jax.detectors.build`` makes one).

  Attributes:
    name: the ``config.method`` that selects it.
    model: the pure Flax module.
    input_mean, input_std: the normalisation of [0, 1] RGB pixels that
      :func:`normalize` applies before the model (recorded with pretrained
      weights, so a converted checkpoint is fed what it was trained on).
    tile_context: extra pixels the tile function needs on every side of each
      whole-image tile (0 for "same"-padded networks; dense VALID networks
      such as the P4 ResNet need about half their receptive field). Points it
      returns are in the coordinates of the context-padded tiles.
    patch_size: the training patch side (``config.data.patch_size`` when set,
      else the detector's own, e.g. the receptive field of a patch
      classifier).
  """

  name: str
  model: Any
  input_mean: tuple[float, ...]
  input_std: tuple[float, ...]
  tile_context: int
  patch_size: int

  def init_variables(self, rng: jax.Array) -> dict:
    """Initial ``{"params": ..., ["batch_stats": ...]}`` for training patches."""

  def trainable_mask(self, params: Any) -> Any:
    """Pytree of bools like ``params``: False leaves are frozen (zero updates)."""

  def loss(self, params: Any, batch_stats: Any, batch: dict[str, jax.Array],
           train: bool) -> LossOutput:
    """Loss of the GLOBAL batch (sums/means span every device under jit).

    Returns ``(loss, (metrics, new_batch_stats))``; ``metrics`` holds scalar
    arrays, ``loss`` among them.
    """

  def make_tile_fn(self, score_thresh: float) -> TileFn:
    """The jitted whole-image tile detector (normalisation and decoding inside).

    ``score_thresh`` is the lowest score worth returning; suppression of
    duplicates across tiles is ``infer``'s merge, within a tile the
    detector's own decoding. The same threshold gives the same function
    object, so jit's cache keeps its compiled program.
    """

  def make_patch_score_fn(self, variables: dict, patch_size: int) -> PatchScoreFn:
    """The jitted patch scorer hard-negative mining ranks negatives with."""


# Optional members: a method whose data, training or whole-image inference
# differ from the patch detectors' provides some of these, and the callers
# (train.py, evaluation.py) reach them ONLY through :func:`hook`, so the list
# below is every extension point there is.
HOOKS = {
    # fit(workdir, writer=, log=) -> summary dict: the method trains itself
    # instead of the loop (the image-level classifier's round 1: cached
    # features and heads, no gradient steps); the workdir lock and the
    # resume-config check still apply.
    "fit": "train.py",
    # load_data() -> data.experiment.ExperimentData: its own train / val /
    # held-out sets (candidate stores; image-level fields).
    "load_data": "train.py",
    # make_dataset(cases, patch_cfg, *, seed, batch_size, augment=True,
    # num_examples=None, process_index=0, process_count=1, negatives=None)
    # -> grain.MapDataset with data.pipeline.make_dataset's contract
    # (deterministic per (seed, i), checkpointable), so resume works unchanged.
    "make_dataset": "train.py",
    # evaluation: an object with validate / evaluate_sets / format_table of
    # the evaluation module's signatures (image-level F1 and threshold).
    "evaluation": "train.py",
    # make_tiler(variables, config, *, score_thresh=None, mesh=None) -> an
    # object with detect(source) -> Detections: whole images without tiles
    # (Kondo's method: the image's candidates, then their patches).
    "make_tiler": "evaluation.py",
    # input_multiple: int, the multiple whole-image regions' sides are
    # rounded up to (eval.inference = "regions"; infer.TileConfig.multiple):
    # the network's stride requirement. Default 1 (any size).
    "input_multiple": "evaluation.py",
    # extra_validation(variables, cases, config) -> dict of scalars logged
    # beside the validation F1 (Kondo's candidate-level F1).
    "extra_validation": "evaluation.py",
}


def hook(detector: Any, name: str) -> Any:
  """The detector's optional member ``name`` (one of :data:`HOOKS`), or None."""
  if name not in HOOKS:
    raise KeyError(f"{name!r} is not a declared detector hook; declared: {sorted(HOOKS)}")
  return getattr(detector, name, None)
