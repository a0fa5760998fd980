"""RetinaNet detector: ResNet FPN, focal loss, points from boxes.

RetinaNet (Lin et al., ICCV 2017) in torchvision's ``retinanet_resnet50_fpn_v2``
layout, as Sheta's MIDOG 2021 report applies it to mitotic figures: 512 px
patches, the focal loss, GIoU box loss, all five backbone layers trainable.
The pieces live beside this module: ``anchors`` (generation, box coding,
matching), ``losses`` (focal, GIoU, the per-image sums) and ``decode``
(outputs -> scored points); the Flax model is ``models.retinanet``.

Fidelity options for converted torchvision weights (``midog_jax.weights``;
``configs/retina.py:pretrained=coco`` sets them all): ``model.input_mean`` /
``input_std`` (the normalisation of [0, 1] pixels, ImageNet's by default),
``model.norm="frozen"`` (FrozenBatchNorm2d), ``model.resize_to`` (torchvision's
detector transform resizes a 512 px tile to 800 px; here every network input
is scaled by ``resize_to / data.patch_size``, bilinear as torch's
``interpolate``, and boxes are scaled back, so training patches and inference
tiles share one magnification) and ``model.torchvision_anchors`` (its rounded
anchors and integer strides, see ``anchors``).

Point labels become 50x50 px boxes (the MIDOG annotation convention).
Imposters (category 2) are handled by ``config.model.imposters``:
"background" (they are simply not foreground, the report's default), "class"
(a second class, ``num_classes=2``; detections of it are written as
"non-mitotic figure") or "ignore" (anchors on them count neither as
foreground nor as background).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from midog_jax.detections import IMPOSTER, MITOSIS
from midog_jax.detectors import interface
from midog_jax.detectors.retinanet import anchors as anchors_lib
from midog_jax.detectors.retinanet import decode
from midog_jax.detectors.retinanet import losses
from midog_jax.models import resnet as resnet_lib
from midog_jax.models import retinanet as retina_lib

IMPOSTER_MODES = ("background", "class", "ignore")


class RetinaNetDetector:
  """Builds the model from ``config.model``; loss, tile function, patch scorer."""

  name = "retinanet"
  tile_context = 0  # "same"-padded convolutions: tiles need no extra border
  # Region sides are rounded up to this (``infer.TileConfig.multiple``, the
  # ``input_multiple`` hook): the backbone's C5 stride, torchvision's
  # ``size_divisible``. Any input size works (level maps are ceil(size /
  # 2**l), the FPN upsamples to the lateral's shape); the multiple only
  # spares partial cells at the far border.
  input_multiple = 32

  def __init__(self, config):
    m = config.model
    if m.imposters not in IMPOSTER_MODES:
      raise ValueError(f"model.imposters must be one of {IMPOSTER_MODES}")
    self.cfg = m
    self.patch_size = int(config.data.patch_size)
    if self.patch_size <= 0:
      raise ValueError("the RetinaNet needs config.data.patch_size > 0")
    # .get: configs of workdirs trained before these options existed.
    self.input_mean = tuple(m.get("input_mean", interface.IMAGENET_MEAN))
    self.input_std = tuple(m.get("input_std", interface.IMAGENET_STD))
    self.resize_to = int(m.get("resize_to", 0))
    self.torchvision_anchors = bool(m.get("torchvision_anchors", False))
    if self.resize_to < 0:
      raise ValueError(f"model.resize_to must be >= 0, got {self.resize_to}")
    # In-tile duplicate suppression uses the whole-image merge radius.
    self.radius = float(config.eval.merge_radius_px)
    self.num_classes = 2 if m.imposters == "class" else 1
    self.model = retina_lib.RetinaNet(
        backbone=m.backbone, num_classes=self.num_classes, levels=tuple(m.levels),
        num_anchors=anchors_lib.num_anchors_per_location(
            self._sizes(), tuple(m.anchor_ratios)),
        fpn_channels=m.fpn_channels, head_depth=m.head_depth,
        head_groups=m.head_groups, norm=m.norm,
        trainable_backbone_layers=m.trainable_backbone_layers,
        backbone_width=m.backbone_width,
        dtype=interface.compute_dtype(m))

  def _sizes(self):
    s = self.cfg.anchor_sizes
    return tuple(tuple(x) for x in s) if s else anchors_lib.default_sizes(tuple(self.cfg.levels))

  @staticmethod
  def _hw(size) -> tuple[int, int]:
    """(height, width) of ``size``: one int (a square) or a pair."""
    if isinstance(size, (tuple, list)):
      return int(size[0]), int(size[1])
    return int(size), int(size)

  def net_size(self, size) -> tuple[int, int]:
    """(rows, cols) the network sees for a ``size`` (int or (h, w)) px input
    (``model.resize_to``)."""
    h, w = self._hw(size)
    if not self.resize_to:
      return h, w
    r = self.resize_to / self.patch_size
    return max(1, int(round(h * r))), max(1, int(round(w * r)))

  def anchors(self, size) -> jax.Array:
    """(A, 4) anchors of a ``size`` (int: a square, or (h, w)) input, in the
    model's output order.

    With ``resize_to`` they are the anchors of the resized input scaled back
    to input pixels (x by w / net_w, y by h / net_h): box coding and IoU are
    scale-invariant, so this is torchvision's resize -> detect -> scale boxes
    back.
    """
    h, w = self._hw(size)
    net = self.net_size((h, w))
    a = anchors_lib.generate_anchors(
        net, tuple(self.cfg.levels), self._sizes(),
        tuple(self.cfg.anchor_ratios), torchvision_exact=self.torchvision_anchors)
    if net == (h, w):
      return jnp.asarray(a)
    sx, sy = np.float32(w / net[1]), np.float32(h / net[0])
    return jnp.asarray(a * np.asarray([sx, sy, sx, sy], np.float32))

  def _apply(self, variables: dict, images_uint8: jax.Array, train: bool):
    x = interface.normalize(images_uint8, self.input_mean, self.input_std)
    net = self.net_size(x.shape[1:3])
    if net != tuple(x.shape[1:3]):
      # torch interpolate(bilinear, align_corners=False): no antialiasing.
      x = jax.image.resize(x, (x.shape[0], *net, x.shape[3]), "bilinear",
                           antialias=False)
    if train and "batch_stats" in variables:
      out, upd = self.model.apply(variables, x, train=True, mutable=["batch_stats"])
      return out, upd["batch_stats"]
    return self.model.apply(variables, x, train=False), variables.get("batch_stats", {})

  def init_variables(self, rng: jax.Array) -> dict:
    x = jnp.zeros((1, self.patch_size, self.patch_size, 3), jnp.float32)
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
    """Focal + box loss summed over the global batch / its positive anchors."""
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    images = batch["image"]
    (cls, box), new_stats = self._apply(variables, images, train)
    boxes, gt_cls, mask = self._targets(batch)
    parts = losses.retinanet_loss(
        cls, box, self.anchors(images.shape[1:3]), boxes, gt_cls, mask,
        box_loss=self.cfg.box_loss, alpha=self.cfg.focal_alpha,
        gamma=self.cfg.focal_gamma)
    # Normalised by the positive anchors of the GLOBAL batch: under jit the
    # sharded batch is one array, so these sums already span all devices.
    loss, metrics = losses.normalize(parts, self.cfg.box_weight)
    return loss, (metrics, new_stats)

  @functools.lru_cache(maxsize=8)
  def make_tile_fn(self, score_thresh: float) -> interface.TileFn:
    """Jitted (variables, uint8 tiles) -> points in tile pixels, scores, classes, valid."""
    thresh, topk, radius = float(score_thresh), int(self.cfg.topk), self.radius

    @jax.jit
    def tile_fn(variables, tiles):
      (cls, box), _ = self._apply(variables, tiles, train=False)
      pts, scores, classes, valid = decode.postprocess(
          cls, box, self.anchors(tiles.shape[1:3]), score_thresh=thresh, topk=topk,
          radius=radius, class_agnostic=True)
      # Class index 0 is the mitotic figure; 1 (imposter class) -> IMPOSTER.
      return pts, scores, jnp.where(classes == 0, MITOSIS, IMPOSTER), valid

    return tile_fn

  def make_patch_score_fn(self, variables: dict, patch_size: int
                          ) -> interface.PatchScoreFn:
    """Jitted patches -> the highest mitosis score of an anchor centred near the
    patch centre (within half the box size), the RetinaNet's own answer to
    "is this patch centred on a mitotic figure?"."""
    anchors = self.anchors(patch_size)
    centres = 0.5 * (anchors[:, :2] + anchors[:, 2:])
    c = (patch_size - 1) / 2.0
    near = jnp.sum(jnp.square(centres - c), axis=-1) <= (self.cfg.box_size / 2.0) ** 2

    @jax.jit
    def score(patches):
      (cls, _), _ = self._apply(variables, patches, train=False)
      prob = jax.nn.sigmoid(cls[..., 0])  # class 0: mitotic figure
      return jnp.max(jnp.where(near[None], prob, 0.0), axis=1)

    return score


DETECTOR = RetinaNetDetector
