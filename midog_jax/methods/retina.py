"""RetinaNet (seed 000) as a method of the shared training loop.

Point labels become 50x50 px boxes (the MIDOG annotation convention).
Imposters (category 2) are handled by ``config.model.imposters``:
"background" (they are simply not foreground, the seed's default), "class"
(a second class, ``num_classes=2``; detections of it are written as
"non-mitotic figure") or "ignore" (anchors on them count neither as
foreground nor as background).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from midog_jax import anchors as anchors_lib
from midog_jax import losses
from midog_jax.data.midog import IMPOSTER, MITOSIS
from midog_jax.models import resnet as resnet_lib
from midog_jax.models import retinanet as retina_lib

IMPOSTER_MODES = ("background", "class", "ignore")


class RetinaMethod:
  """Builds the model from ``config.model`` and provides loss and inference."""

  def __init__(self, config):
    m = config.model
    if m.imposters not in IMPOSTER_MODES:
      raise ValueError(f"model.imposters must be one of {IMPOSTER_MODES}")
    self.cfg = m
    self.num_classes = 2 if m.imposters == "class" else 1
    self.model = retina_lib.RetinaNet(
        backbone=m.backbone, num_classes=self.num_classes, levels=tuple(m.levels),
        num_anchors=anchors_lib.num_anchors_per_location(
            self._sizes(), tuple(m.anchor_ratios)),
        fpn_channels=m.fpn_channels, head_depth=m.head_depth,
        head_groups=m.head_groups, norm=m.norm,
        trainable_backbone_layers=m.trainable_backbone_layers,
        backbone_width=m.backbone_width,
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32)

  def _sizes(self):
    s = self.cfg.anchor_sizes
    return tuple(tuple(x) for x in s) if s else anchors_lib.default_sizes(tuple(self.cfg.levels))

  def anchors(self, size: int) -> jax.Array:
    return jnp.asarray(anchors_lib.generate_anchors(
        (size, size), tuple(self.cfg.levels), self._sizes(),
        tuple(self.cfg.anchor_ratios)))

  def init_variables(self, rng: jax.Array, patch_size: int) -> dict:
    x = jnp.zeros((1, patch_size, patch_size, 3), jnp.uint8)
    # Jitted: op-by-op initialisation of a ResNet takes minutes on a CPU.
    return dict(jax.jit(lambda r: self.model.init(r, x, train=False))(rng))

  def trainable_mask(self, params) -> Any:
    return resnet_lib.trainable_mask(params, self.cfg.trainable_backbone_layers)

  def _targets(self, batch):
    half = self.cfg.box_size / 2.0
    pts = batch["points"]
    boxes = jnp.concatenate([pts - half, pts + half], axis=-1)
    cls, mask = batch["classes"], batch["mask"]
    mode = self.cfg.imposters
    is_mit = cls == MITOSIS
    if mode == "class":
      gt_cls = jnp.where(is_mit, 0, 1)
    elif mode == "ignore":
      gt_cls = jnp.where(is_mit, 0, -1)
    else:
      gt_cls = jnp.zeros_like(cls)
      mask = mask & is_mit
    return boxes, gt_cls.astype(jnp.int32), mask

  def loss(self, params, batch_stats, batch, train: bool):
    """Global-batch loss: sums over the (sharded) batch / global positives."""
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    images = batch["image"]
    if train and batch_stats:
      (cls, box), upd = self.model.apply(variables, images, train=True,
                                         mutable=["batch_stats"])
      new_stats = upd["batch_stats"]
    else:
      cls, box = self.model.apply(variables, images, train=False)
      new_stats = batch_stats
    boxes, gt_cls, mask = self._targets(batch)
    parts = losses.retinanet_loss(
        cls, box, self.anchors(images.shape[1]), boxes, gt_cls, mask,
        box_loss=self.cfg.box_loss, alpha=self.cfg.focal_alpha,
        gamma=self.cfg.focal_gamma)
    # Normalised by the positive anchors of the GLOBAL batch: under jit the
    # sharded batch is one array, so these sums already span all devices.
    num_pos = jnp.maximum(parts["num_pos"].sum(), 1.0)
    cls_loss = parts["cls_sum"].sum() / num_pos
    box_loss = parts["box_sum"].sum() / num_pos
    loss = cls_loss + self.cfg.box_weight * box_loss
    return loss, (dict(loss=loss, cls_loss=cls_loss, box_loss=box_loss,
                       num_pos=num_pos), new_stats)

  def make_tile_fn(self, variables: dict, tile_size: int, score_thresh: float,
                   radius: float):
    """Jitted uint8 tiles -> points in tile pixels, scores, classes (1/2), valid."""
    anchors = self.anchors(tile_size)

    @jax.jit
    def tile_fn(tiles):
      cls, box = self.model.apply(variables, tiles, train=False)
      pts, scores, classes, valid = retina_lib.postprocess(
          cls, box, anchors, score_thresh=score_thresh, topk=self.cfg.topk,
          radius=radius, class_agnostic=True)
      # Class index 0 is the mitotic figure; 1 (imposter class) -> category 2.
      return pts, scores, jnp.where(classes == 0, MITOSIS, IMPOSTER), valid

    return tile_fn
