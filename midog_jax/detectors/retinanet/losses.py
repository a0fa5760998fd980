"""RetinaNet losses: sigmoid focal loss and box regression, as per-example sums.

`retinanet_loss` returns un-normalised per-example sums and positive-anchor
counts. The training step sums them over the GLOBAL batch and divides by the
global positive count ("focal loss normalised by the global positive
count"); `normalize` does that for a batch that is all in one array (under
``jax.jit`` with a sharded batch that *is* the global batch).
torchvision instead divides per image and averages images; with equal
positives per image the two agree.

Box loss (``box_loss``): "giou" (default) is what ``retinanet_resnet50_fpn_v2``
(Sheta's report) uses: 1 - GIoU of the decoded box and its ground truth. "l1"
(torchvision v1) and "smooth_l1" (Detectron, beta 1/9) act on the encoded
deltas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from midog_jax.detectors.retinanet import anchors as anchors_lib

BOX_LOSSES = ("giou", "smooth_l1", "l1")


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array,
                       alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """Elementwise focal loss (Lin et al. 2017; torchvision's formula).

  ``ce * (1 - p_t)**gamma``, times ``alpha_t`` when ``alpha >= 0``; no
  reduction. ``gamma=0, alpha=-1`` is plain binary cross-entropy.
  """
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  # Stable BCE with logits: max(x, 0) - x t + log(1 + exp(-|x|)).
  ce = (jnp.maximum(logits, 0.0) - logits * targets
        + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  p_t = p * targets + (1.0 - p) * (1.0 - targets)
  loss = ce if gamma == 0 else ce * (1.0 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
  return loss


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Elementwise smooth L1 (Huber / beta), as ``torch.nn.functional``."""
  ax = jnp.abs(x)
  if beta <= 0:
    return ax
  return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def giou_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-7
              ) -> jax.Array:
  """Elementwise ``1 - GIoU`` of xyxy boxes (torchvision, eps 1e-7)."""
  area_p = anchors_lib.box_area(pred)
  area_t = anchors_lib.box_area(target)
  lt = jnp.maximum(pred[..., :2], target[..., :2])
  rb = jnp.minimum(pred[..., 2:], target[..., 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area_p + area_t - inter
  iou = inter / (union + eps)
  clt = jnp.minimum(pred[..., :2], target[..., :2])
  crb = jnp.maximum(pred[..., 2:], target[..., 2:])
  cwh = jnp.maximum(crb - clt, 0.0)
  area_c = cwh[..., 0] * cwh[..., 1]
  return 1.0 - (iou - (area_c - union) / (area_c + eps))


def retinanet_loss(cls_logits: jax.Array, box_deltas: jax.Array,
                   anchors: jax.Array, gt_boxes: jax.Array,
                   gt_classes: jax.Array, gt_mask: jax.Array, *,
                   box_loss: str = "giou", alpha: float = 0.25,
                   gamma: float = 2.0, smooth_l1_beta: float = 1.0 / 9,
                   fg_iou: float = 0.5, bg_iou: float = 0.4,
                   allow_low_quality: bool = True) -> dict[str, jax.Array]:
  """Per-example RetinaNet loss sums and positive counts (jit-able).

  Args:
    cls_logits: (B, A, C) logits; C excludes background.
    box_deltas: (B, A, 4) predicted deltas.
    anchors: (A, 4) xyxy, from `anchors.generate_anchors`.
    gt_boxes: (B, G, 4) xyxy, padded to G.
    gt_classes: (B, G) int class index in [0, C). A negative class marks an
      "ignore" box (e.g. imposters one neither wants to learn as foreground
      nor as background): anchors assigned to it are ignored.
    gt_mask: (B, G) bool, True for real boxes.
    box_loss: "giou" | "smooth_l1" | "l1" (see module docstring).
    alpha, gamma: focal loss parameters.
    smooth_l1_beta: beta of "smooth_l1".
    fg_iou, bg_iou, allow_low_quality: matcher settings.

  Returns:
    ``dict(cls_sum, box_sum, num_pos)``, each (B,) float32: focal loss summed
    over non-ignored anchors and classes, box loss summed over foreground
    anchors, and the number of foreground anchors. Not normalised.
  """
  if box_loss not in BOX_LOSSES:
    raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
  cls_logits = cls_logits.astype(jnp.float32)
  box_deltas = box_deltas.astype(jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = gt_boxes.astype(jnp.float32)
  num_classes = cls_logits.shape[-1]
  if anchors.shape[0] != cls_logits.shape[1] or box_deltas.shape != (
      *cls_logits.shape[:2], 4):
    raise ValueError(
        f"anchors {anchors.shape}, cls_logits {cls_logits.shape} and "
        f"box_deltas {box_deltas.shape} disagree on the anchor count (were "
        "the anchors made for the same image size, levels and sizes?)")

  matched, labels = anchors_lib.match_anchors(
      anchors, gt_boxes, gt_mask, fg_iou=fg_iou, bg_iou=bg_iou,
      allow_low_quality=allow_low_quality)  # (B, A) each
  matched_cls = jnp.take_along_axis(gt_classes.astype(jnp.int32), matched,
                                    axis=1)
  labels = jnp.where((labels == anchors_lib.FG) & (matched_cls < 0),
                     anchors_lib.IGNORE, labels)
  fg = labels == anchors_lib.FG
  valid = labels != anchors_lib.IGNORE

  onehot = jax.nn.one_hot(matched_cls, num_classes) * fg[..., None]
  focal = sigmoid_focal_loss(cls_logits, onehot, alpha, gamma)
  cls_sum = jnp.sum(jnp.where(valid[..., None], focal, 0.0), axis=(1, 2))

  matched_boxes = jnp.take_along_axis(gt_boxes, matched[..., None], axis=1)
  # Non-foreground anchors may be matched to padding (zero boxes, log(0));
  # give them their own anchor as target so no NaN reaches the masked sum.
  safe = jnp.where(fg[..., None], matched_boxes, anchors[None])
  if box_loss == "giou":
    per_anchor = giou_loss(anchors_lib.decode(anchors[None], box_deltas), safe)
  else:
    diff = box_deltas - anchors_lib.encode(anchors[None], safe)
    beta = smooth_l1_beta if box_loss == "smooth_l1" else 0.0
    per_anchor = smooth_l1(diff, beta).sum(-1)
  box_sum = jnp.sum(jnp.where(fg, per_anchor, 0.0), axis=1)
  return dict(cls_sum=cls_sum, box_sum=box_sum,
              num_pos=fg.sum(axis=1).astype(jnp.float32))


def normalize(parts: dict[str, jax.Array], box_weight: float = 1.0
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar loss from `retinanet_loss` parts: sums over the batch / positives.

  Returns ``(loss, metrics)`` with ``loss = (cls + box_weight * box) /
  max(1, total positives)``; the batch axis must hold the global batch.
  """
  denom = jnp.maximum(jnp.sum(parts["num_pos"]), 1.0)
  cls = jnp.sum(parts["cls_sum"]) / denom
  box = jnp.sum(parts["box_sum"]) / denom
  loss = cls + box_weight * box
  return loss, dict(loss=loss, cls_loss=cls, box_loss=box,
                    num_pos=jnp.sum(parts["num_pos"]))
