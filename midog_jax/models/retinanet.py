"""RetinaNet (torchvision ``retinanet_resnet50_fpn_v2`` layout) in Flax linen.

ResNet -> FPN (P3..P7 by default) -> shared classification and regression
subnets. Output: ``(cls_logits (B, A_total, C), box_deltas (B, A_total, 4))``
concatenated over levels in the order of the detector's anchors (level, row,
column, anchor). Anchors, box coding, losses and decoding live with the
detector (``midog_jax.detectors.retinanet``); the model holds no data,
normalisation or loss code.

Faithful to torchvision v2 where it matters for reproducing Sheta's MIDOG 2021
RetinaNet:
* FPN: lateral 1x1 (+bias) on C_l, top-down nearest upsampling to the lateral's
  size, 3x3 output conv; P6 = 3x3/2 conv on **C5** (``LastLevelP6P7(2048,
  256)`` in v2 takes C5 because in != out channels; ``p6_input="p5"`` gives the
  v1 variant), P7 = 3x3/2 conv on relu(P6).
* heads: 4 x (3x3 conv without bias + GroupNorm(32) + ReLU), then a 3x3 conv to
  ``A*C`` logits (bias = -log((1-pi)/pi), pi = 0.01) or ``A*4`` deltas; all
  head convs N(0, 0.01) initialised; one set of weights for all levels.
* input: float images, already normalised (the detector applies ImageNet
  mean/std to [0, 1] pixels as torchvision's transform does, see
  ``detectors.interface.normalize``). No resizing here: torchvision's
  rescale to 800 px is the detector's ``model.resize_to``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from midog_jax.models import resnet as resnet_lib


# torchvision FPN / P6P7 convs: kaiming_uniform(a=1), i.e. variance 1/fan_in.
_fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
_head_init = nn.initializers.normal(0.01)


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
  """Validates pyramid levels: an ascending run whose lowest is in 2..5."""
  levels = tuple(int(l) for l in levels)
  if not levels or list(levels) != list(range(levels[0], levels[-1] + 1)):
    raise ValueError(f"levels must be a non-empty ascending run, got {levels}")
  if levels[0] < 2 or levels[0] > 5:
    raise ValueError(f"the lowest level must be in 2..5 (C2..C5), got {levels}")
  return levels


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torchvision ``F.interpolate(mode="nearest", size=...)`` on NHWC.

  Source index ``floor(i * in / out)``, so odd sizes (ceil-halved maps) line
  up exactly as in torchvision. For ``in == ceil(out / 2)`` (every FPN step)
  that index is ``i // 2``: a 2x repeat and a crop, no gather.
  """
  h, w = x.shape[1], x.shape[2]
  if h == -(-size[0] // 2) and w == -(-size[1] // 2):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, :size[0], :size[1]]
  iy = (np.arange(size[0]) * h) // size[0]
  ix = (np.arange(size[1]) * w) // size[1]
  return x[:, iy][:, :, ix]


class FPN(nn.Module):
  """Feature pyramid over ``{"C2".."C5"}`` returning ``{level: P_level}``."""

  levels: Sequence[int] = (3, 4, 5, 6, 7)
  channels: int = 256
  p6_input: str = "c5"  # "c5" (v2) or "p5" (v1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: dict[str, jax.Array]) -> dict[int, jax.Array]:
    levels = tuple(self.levels)
    lo = levels[0]
    conv = lambda k, s, name: resnet_lib.conv(
        self.channels, k, s, name, self.dtype, use_bias=True,
        kernel_init=_fpn_init)
    # Top-down path always starts at C5 (as torchvision), whatever is output.
    inner = None
    outs = {}
    for l in range(5, lo - 1, -1):
      lateral = conv(1, 1, f"inner{l}")(feats[f"C{l}"])
      if inner is not None:
        lateral = lateral + upsample_nearest(inner, lateral.shape[1:3])
      inner = lateral
      if l in levels:
        outs[l] = conv(3, 1, f"layer{l}")(inner)
    extra = [l for l in levels if l > 5]
    if extra:
      if self.p6_input == "c5":
        x = feats["C5"]
      elif self.p6_input == "p5":
        # P5 itself (not only its lateral) even when level 5 is not output.
        x = outs[5] if 5 in outs else conv(3, 1, "layer5")(inner)
      else:
        raise ValueError(
            f"p6_input must be 'c5' or 'p5', got {self.p6_input!r}")
      for l in extra:
        x = conv(3, 2, f"p{l}")(x if l == 6 else nn.relu(x))
        outs[l] = x
    return outs


class Head(nn.Module):
  """RetinaNet v2 subnet: ``depth`` x (conv3x3, GroupNorm, ReLU), predictor."""

  out_per_anchor: int
  num_anchors: int
  channels: int = 256
  depth: int = 4
  groups: int = 32
  bias_init: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth):
      x = resnet_lib.conv(self.channels, 3, 1, f"conv{i}", self.dtype,
                          use_bias=False, kernel_init=_head_init)(x)
      x = nn.GroupNorm(num_groups=resnet_lib.group_count(self.channels,
                                                         self.groups),
                       epsilon=1e-5, dtype=self.dtype, name=f"gn{i}")(x)
      x = nn.relu(x)
    # The predictor computes in float32 whatever ``dtype``: bfloat16 would
    # round the logits to steps of 1/32 near the prior's -4.6 (3% steps of a
    # 0.01 score) and box deltas in [1, 2) to steps of 1/128. It costs a few
    # percent of the head's FLOPs.
    x = resnet_lib.conv(self.num_anchors * self.out_per_anchor, 3, 1, "out",
                        jnp.float32, use_bias=True, kernel_init=_head_init,
                        bias_init=nn.initializers.constant(self.bias_init))(x)
    b, h, w, _ = x.shape
    # (B, H, W, A*K) -> (B, H*W*A, K): row, column, anchor order.
    return x.reshape(b, h * w * self.num_anchors, self.out_per_anchor)


class RetinaNet(nn.Module):
  """RetinaNet; ``__call__(images, train) -> (cls_logits, box_deltas)``.

  Attributes:
    backbone: "resnet18" | "resnet34" | "resnet50" | "resnet101" |
      "resnet_tiny".
    backbone_width: stem/layer1 width override (0: the named default; e.g.
      16 for a CPU-sized ResNet-50 layout).
    num_classes: 1 (mitotic figure) or 2 (+ imposter); no background class.
    levels: pyramid levels, an ascending run starting in 2..5.
    num_anchors: anchors per location (`anchors.num_anchors_per_location`).
    fpn_channels: FPN/head width (256; 16 for tiny tests).
    head_depth, head_groups: subnet depth and GroupNorm groups.
    p6_input: "c5" (v2) or "p5" (v1).
    norm: backbone norm, "batch" | "frozen" | "group".
    trainable_backbone_layers: 0..5; frozen layers' BatchNorm uses running
      averages. Pair with `resnet.trainable_mask` + `resnet.freeze`.
    prior_prob: initial foreground probability of the classifier.
    dtype: computation dtype (parameters stay float32; the heads' predictor
      convolutions compute in float32, so outputs are float32 and unrounded).
  """

  backbone: str = "resnet50"
  backbone_width: int = 0
  num_classes: int = 1
  levels: Sequence[int] = (3, 4, 5, 6, 7)
  num_anchors: int = 3
  fpn_channels: int = 256
  head_depth: int = 4
  head_groups: int = 32
  p6_input: str = "c5"
  norm: str = "batch"
  trainable_backbone_layers: int = 5
  prior_prob: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    x = images
    width = {"width": self.backbone_width} if self.backbone_width else {}
    feats = resnet_lib.resnet(
        self.backbone, **width, norm=self.norm,
        trainable_layers=self.trainable_backbone_layers, dtype=self.dtype,
        name="backbone")(x, train=train)
    pyramid = FPN(levels=check_levels(self.levels),
                  channels=self.fpn_channels,
                  p6_input=self.p6_input, dtype=self.dtype, name="fpn")(feats)
    head = lambda k, bias, name: Head(
        out_per_anchor=k, num_anchors=self.num_anchors,
        channels=self.fpn_channels, depth=self.head_depth,
        groups=self.head_groups, bias_init=bias, dtype=self.dtype, name=name)
    # Focal-loss prior: sigmoid(initial logit) = prior_prob, so the many
    # background anchors do not swamp the first steps.
    prior = -math.log((1.0 - self.prior_prob) / self.prior_prob)
    cls_head = head(self.num_classes, prior, "cls_head")
    box_head = head(4, 0.0, "box_head")
    levels = sorted(pyramid)  # ascending, as generate_anchors
    cls = jnp.concatenate([cls_head(pyramid[l]) for l in levels], axis=1)
    box = jnp.concatenate([box_head(pyramid[l]) for l in levels], axis=1)
    return cls.astype(jnp.float32), box.astype(jnp.float32)


def retinanet_tiny(**kwargs) -> RetinaNet:
  """A tiny RetinaNet for tests and CPU smoke runs (resnet_tiny, 16-ch FPN)."""
  kw = dict(backbone="resnet_tiny", fpn_channels=16, head_groups=8)
  kw.update(kwargs)
  return RetinaNet(**kw)
