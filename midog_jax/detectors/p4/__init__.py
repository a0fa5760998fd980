"""Dense P4 rotation-equivariant ResNet detector (Lafarge & Koelzer, MIDOG 2022).

Training: a patch classifier (Ciresan et al.). A ``P`` px patch with
``P = RF + 4k`` (RF = the receptive field, 78 for ``FULL_PLAN``) gives a
``(2k + 1)^2`` output map whose CENTRE output (row = col = k) is centred on
the patch centre ``((P - 1) / 2, (P - 1) / 2)``; that output is the patch's
logit. Its label is 1 iff a mitotic figure (class 1, unmasked) of the
augmented patch lies within ``model.pos_radius_px`` of the patch centre. The
batch points are the augmented ones, so shifts, flips and elastic warps are
accounted for. Loss: mean binary cross-entropy over the global batch.

Inference: the network runs densely on each tile read with ``context``
extra pixels per side (``tile_context``), giving a probability
map with stride 2; candidates are its strict local maxima (see
``local_maxima`` for why strict) above the score threshold (the top-K per
tile, by logit), and ``infer``'s merge applies the distance suppression.

Coordinate convention (pixel-index coordinates, pixel k spans
``[k - 0.5, k + 0.5]``, the convention of ``data/sampling.py``): output
``(i, j)`` of a network applied to an input array sees input rows
``2i .. 2i + RF - 1`` and columns ``2j .. 2j + RF - 1``, so its centre is
``(x, y) = (2j + RF/2 - 0.5, 2i + RF/2 - 0.5)`` in that array (see
``output_to_pixels``). With ``context = RF // 2 - 1`` (38 for RF 78) a tile's
map centres fall at ``2j + 0.5`` in tile coordinates (between pixels 2j and
2j + 1): every image pixel is within 1 px of a centre, the map of an even
``W`` x ``H`` image spans ``[0.5, W - 1.5]`` x ``[0.5, H - 1.5]``, and this
set of centres maps onto itself under ``rot90`` of the image. (A context of
``RF // 2`` = 39 would put the border centres at -0.5 and ``W - 0.5``, one
outside the image and one inside, which breaks the rotation symmetry of the
output at the image border.)

Exactness rules (what the rotation and tiling tests rely on): image height
and width even (the 2x2 pool grid maps onto itself), tile size and overlap
even (every tile origin is even, so every tile's map is an exact crop of the
whole-image map), and overlap >= ``4 * (peak_window // 2) + 4`` so that every
point a tile owns has its whole local-maximum neighbourhood inside that
tile's map.

``eval.exact_rotation`` (``predict --exact_rotation``) lifts the size rule: a
stride-1 map by shift-and-stitch. The network runs on the four crops of each
tile starting at (dy, dx) in {0, 1}^2 and the four stride-2 maps interleave
into one whose output ``J`` is centred at ``J + RF/2 - 0.5``: every
half-integer position, a set that ``rot90`` maps onto itself for ANY image
size. Each output is a function of its own RF x RF window only (the pool
pairs are fixed relative to the window's start), so a tile's map is an exact
crop of the whole-image map whatever the tile origin's parity. The context is
``RF/2 + r`` (``r = 2 * (peak_window // 2)``, the local-maximum radius in
stride-1 outputs), so that at each image border at least ``r`` outputs
centred outside the image (on the white padding) take part in the maxima as
neighbours, on both sides alike; ``infer`` keeps only points inside the image,
``0 <= x <= W - 1``, a set symmetric under every rotation. Peaks use the
same radius in pixels as the stride-2 map. Cost: 4x the network's compute.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from midog_jax.detections import MITOSIS
from midog_jax.detectors import interface
from midog_jax.detectors.p4.decode import local_maxima, output_to_pixels
from midog_jax.models import p4_resnet as pr


def context_for(plan: pr.LayerPlan) -> int:
  """Tile context (px per side) putting map centres at ``2j + 0.5``: RF/2 - 1."""
  rf = pr.receptive_field(plan)
  if rf % 2:
    raise ValueError(f"the receptive field {rf} must be even")
  return rf // 2 - 1


def patch_labels(points: jax.Array, classes: jax.Array, mask: jax.Array,
                 patch_size: int, radius: float) -> jax.Array:
  """1.0 where a mitotic figure lies within ``radius`` px of the patch centre.

  Args:
    points: (B, N, 2) float (x, y) in patch pixel-index coordinates.
    classes: (B, N) int, 1 = mitotic figure, 2 = imposter.
    mask: (B, N) bool, which rows are real points.
    patch_size: side ``P`` of the patches; the centre is ``(P - 1) / 2``.
    radius: positive radius in px (inclusive).

  Returns:
    (B,) float32 labels.
  """
  centre = (patch_size - 1) / 2.0
  d2 = jnp.sum(jnp.square(points - centre), axis=-1)
  hit = mask & (classes == MITOSIS) & (d2 <= radius * radius)
  return jnp.any(hit, axis=-1).astype(jnp.float32)


class P4Detector:
  """Builds ``P4ResNet`` from ``config.model``; loss and dense inference."""

  name = "p4"
  # Pixels scaled to about zero mean and unit scale (no pretrained weights).
  input_mean = (0.5, 0.5, 0.5)
  input_std = (0.25, 0.25, 0.25)

  def __init__(self, config):
    m = config.model
    self.cfg = m
    self.plan = pr.plan_by_name(m.plan)
    self.rf = pr.receptive_field(self.plan)
    self.tile_context = context_for(self.plan)
    # One output per patch unless the config asks for larger patches.
    self.patch_size = int(config.data.patch_size) or self.rf
    self.centre_index(self.patch_size)
    self.model = pr.P4ResNet(
        plan=self.plan, width=m.width, num_classes=1,
        dtype=interface.compute_dtype(m))
    window = int(m.peak_window)
    if window < 1 or window % 2 == 0:
      raise ValueError(f"model.peak_window must be odd and positive, got {window}")
    self.exact_rotation = bool(config.eval.get("exact_rotation", False))
    # Region sides (``infer.TileConfig.multiple``, the ``input_multiple``
    # hook): even, so every region's stride-2 map lies on the image's grid as
    # the tiles' maps do; the stride-1 map needs nothing.
    self.input_multiple = pr.STRIDE
    if self.exact_rotation:
      # Stride-1 maps: r outputs beyond each image border (module docstring).
      self.tile_context = self.rf // 2 + 2 * (window // 2)
      self.input_multiple = 1
    self._check_tiling(config.eval, window)

  def _check_tiling(self, e, window: int) -> None:
    """Fails early on tilings that would make tiles disagree with the whole map."""
    t, o, c = int(e.tile_size), int(e.tile_overlap), self.tile_context
    if t % 2 or o % 2:
      raise ValueError(f"P4: eval.tile_size ({t}) and eval.tile_overlap ({o}) must "
                       "be even, so every tile's map lies on the image's stride-2 grid")
    if o < 4 * (window // 2) + 4:
      raise ValueError(f"P4: eval.tile_overlap {o} is too small for peak_window "
                       f"{window}; use at least {4 * (window // 2) + 4}")
    if t + 2 * c < self.rf:
      raise ValueError(f"P4: a tile of {t} px with context {c} is smaller than "
                       f"the receptive field {self.rf}")

  def centre_index(self, patch_size: int) -> int:
    """Row/column of the output whose centre is the patch centre."""
    if patch_size < self.rf or (patch_size - self.rf) % 4:
      raise ValueError(f"P4: patch_size must be RF + 4k (RF {self.rf}), got "
                       f"{patch_size}")
    return (patch_size - self.rf) // 4

  def init_variables(self, rng: jax.Array) -> dict:
    """Initial ``params`` and ``batch_stats`` for training patches."""
    x = jnp.zeros((1, self.patch_size, self.patch_size, 3), jnp.float32)
    # Jitted: op-by-op initialisation of a 70-layer net takes minutes on a CPU.
    return dict(jax.jit(lambda r: self.model.init(r, x, train=False))(rng))

  def trainable_mask(self, params) -> Any:
    """Every parameter trains."""
    return jax.tree.map(lambda _: True, params)

  def _apply(self, variables: dict, images_uint8: jax.Array, train: bool):
    x = interface.normalize(images_uint8, self.input_mean, self.input_std)
    if train:
      out, upd = self.model.apply(variables, x, train=True, mutable=["batch_stats"])
      return out, upd["batch_stats"]
    return self.model.apply(variables, x, train=False), variables["batch_stats"]

  def logits(self, variables: dict, images_uint8: jax.Array, train: bool):
    """Centre logits (B,) of uint8 patches, and the updated ``batch_stats``."""
    out, new_stats = self._apply(variables, images_uint8, train)
    k = self.centre_index(images_uint8.shape[1])
    return out[:, k, k, 0], new_stats

  def make_patch_score_fn(self, variables: dict, patch_size: int
                          ) -> interface.PatchScoreFn:
    """Jitted uint8 patches (B, P, P, 3) -> probability (B,) that each is centred
    on a mitotic figure (hard-negative mining scores its pool with this)."""
    self.centre_index(patch_size)

    @jax.jit
    def score(patches):
      return jax.nn.sigmoid(self.logits(variables, patches, train=False)[0])

    return score

  def loss(self, params, batch_stats, batch, train: bool):
    """Mean binary cross-entropy of the centre logits over the global batch."""
    variables = {"params": params, "batch_stats": batch_stats}
    logit, new_stats = self.logits(variables, batch["image"], train)
    labels = patch_labels(batch["points"], batch["classes"], batch["mask"],
                          batch["image"].shape[1], float(self.cfg.pos_radius_px))
    # Under jit the sharded batch is one array: these means span all devices.
    loss = optax.sigmoid_binary_cross_entropy(logit, labels).mean()
    accuracy = jnp.mean(((logit > 0).astype(jnp.float32) == labels).astype(jnp.float32))
    return loss, (dict(loss=loss, accuracy=accuracy, pos_fraction=labels.mean()),
                  new_stats)

  @functools.lru_cache(maxsize=8)
  def make_tile_fn(self, score_thresh: float) -> interface.TileFn:
    """Jitted (variables, uint8 context-padded tiles) -> points, scores, classes, valid.

    Points are in the pixel-index coordinates of the tiles as given (the
    caller subtracts the context); suppression across tiles is ``infer``'s
    merge, within a tile the strict local maxima.
    """
    window, topk, rf = int(self.cfg.peak_window), int(self.cfg.topk), self.rf
    thresh = float(score_thresh)
    stride = 1 if self.exact_rotation else pr.STRIDE
    if self.exact_rotation:
      window = 4 * (window // 2) + 1  # the same radius in pixels at stride 1

    def dense_logits(variables, tiles):
      if not self.exact_rotation:
        return self._apply(variables, tiles, train=False)[0][..., 0]
      n, m = tiles.shape[1] - 1, tiles.shape[2] - 1  # every phase crop has one size
      phases = [self._apply(variables, tiles[:, dy:dy + n, dx:dx + m], train=False)[0][..., 0]
                for dy in (0, 1) for dx in (0, 1)]
      b, mh, mw = phases[0].shape
      # (dy, dx, B, mh, mw) -> (B, mh, dy, mw, dx): output (i, j) of phase
      # (dy, dx) is stitched output (2i + dy, 2j + dx).
      grid = jnp.stack(phases).reshape(2, 2, b, mh, mw)
      return grid.transpose(2, 3, 0, 4, 1).reshape(b, 2 * mh, 2 * mw)

    @jax.jit
    def tile_fn(variables, tiles):
      logit = dense_logits(variables, tiles)
      b, oh, ow = logit.shape
      prob = jax.nn.sigmoid(logit)
      cand = local_maxima(logit, window) & (prob >= thresh)
      k = min(topk, oh * ow)
      # Rank candidates by logit (no saturation); non-candidates sink.
      key = jnp.where(cand, logit, -jnp.inf).reshape(b, oh * ow)
      _, idx = jax.lax.top_k(key, k)
      valid = jnp.take_along_axis(cand.reshape(b, -1), idx, axis=1)
      scores = jnp.take_along_axis(prob.reshape(b, -1), idx, axis=1)
      pts = output_to_pixels(idx // ow, idx % ow, rf, stride)
      classes = jnp.full((b, k), MITOSIS, jnp.int32)
      return pts, jnp.where(valid, scores, 0.0), classes, valid

    return tile_fn


DETECTOR = P4Detector
