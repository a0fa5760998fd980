"""P4-equivariant fully convolutional ResNet for dense mitosis maps (Lafarge & Koelzer, MIDOG 2022).

The seed asks for "a customized ResNet architecture with 70 layers and a single
2x2 max-pooling layer such that our model has a receptive field of 78x78
pixels", with P4 group convolutions, applied densely to large images.

Layer plan of ``FULL_PLAN`` (all convolutions VALID, stride 1; pre-activation
residual blocks BN-ReLU-conv-BN-ReLU-conv with the skip cropped to the centre):

  =====================  ======  ==========  =================
  layer                  convs   RF after    width (group ch.)
  =====================  ======  ==========  =================
  P4Lift 5x5                 1        5      w
  2 blocks (3x3, 3x3)        4       13      w
  2x2 max-pool, stride 2     -       14      w
  16 x [block (3x3, 1x1),   64       78      2w
        block (1x1, 1x1)]
  BN-ReLU, max over the      1       78      num_classes
  4 rotations, 1x1 conv
  =====================  ======  ==========  =================

That is 70 conv layers (1 + 2 * 34 + 1; the one 1x1 projection shortcut where
the width doubles is not counted, as in He et al.). Receptive field:
``RF = 1 + s_pre + 1 + 2 * s_post`` with ``s_pre`` / ``s_post`` the summed
``k - 1`` of the convolutions before / after the pool: 1 + 12 + 1 + 64 = 78.
Most convolutions after the pool are 1x1 because each 3x3 there adds 4 px.

Output geometry (any plan; ``RF`` = receptive field, stride 2):
  * ``out = (in - RF) // 2 + 1`` per spatial axis (``in >= RF``);
  * output (i, j) sees exactly the input window rows ``2i .. 2i + RF - 1``,
    columns ``2j .. 2j + RF - 1``; its centre is at ``(2i + RF / 2,
    2j + RF / 2)`` in coordinates where pixel k covers ``[k, k + 1)``
    (``2i + (RF - 1) / 2`` in pixel-index coordinates): offset 39 for RF 78.
  * exact rotation equivariance, ``net(rot90(x)) == rot90(net(x))``, holds iff
    the map entering the pool has even size, i.e. ``(in - RF) % 2 == 0`` in
    both axes (``in - s_pre`` even and ``RF - s_pre`` is even). Otherwise the
    pool drops the last row/column and the pooling grid of the rotated image
    is shifted by one pixel.

Models are pure: they take float NHWC input as is (scale or standardise
outside) and return float32 logits of shape ``(B, out_h, out_w, num_classes)``.
``PlainResNet`` has the same plan with ordinary convolutions (the control that
must fail the equivariance test).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from midog_jax.models import p4

Array = jax.Array
Dtype = Any

STRIDE = 2  # the single 2x2 max-pool


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Kernel sizes of the network; widths are set on the module.

  Attributes:
    lift_kernel: kernel size of the first (lifting) convolution.
    pre_pool: per residual block before the pool, its two kernel sizes.
    post_pool: per residual block after the pool, its two kernel sizes.
    post_pool_width_mult: width after the pool = width * this.
  """

  lift_kernel: int = 5
  pre_pool: tuple[tuple[int, int], ...] = ((3, 3), (3, 3))
  post_pool: tuple[tuple[int, int], ...] = ((3, 1), (1, 1)) * 16
  post_pool_width_mult: int = 2


FULL_PLAN = LayerPlan()  # 70 conv layers, RF 78 (Lafarge & Koelzer, MIDOG 2022)
# A cheaper plan with the paper's receptive field for 2-core CPU runs: the same
# stem and pool, then 8 residual blocks of two 3x3 convolutions (RF
# 1 + 12 + 1 + 2 * 32 = 78, 22 conv layers instead of 70).
QUICK_PLAN = LayerPlan(lift_kernel=5, pre_pool=((3, 3), (3, 3)),
                       post_pool=((3, 3),) * 8, post_pool_width_mult=2)
# Tiny plan for tests: 8 conv layers, RF 1 + 2 + 4 + 1 + 4 = 12.
TINY_PLAN = LayerPlan(lift_kernel=3, pre_pool=((3, 3),),
                      post_pool=((3, 1), (1, 1)), post_pool_width_mult=1)
# The plans a config names (``config.model.plan``).
PLANS = {"full": FULL_PLAN, "quick": QUICK_PLAN, "tiny": TINY_PLAN}


def plan_by_name(name: str) -> LayerPlan:
  """The ``LayerPlan`` named ``name`` (one of ``PLANS``)."""
  if name not in PLANS:
    raise ValueError(f"unknown P4 plan {name!r}; known: {sorted(PLANS)}")
  return PLANS[name]


def _shrink(plan: LayerPlan) -> tuple[int, int]:
  """(pixels lost before the pool, pixels lost after it) by VALID convs."""
  s_pre = plan.lift_kernel - 1 + sum(k - 1 for b in plan.pre_pool for k in b)
  s_post = sum(k - 1 for b in plan.post_pool for k in b)
  return s_pre, s_post


def receptive_field(plan: LayerPlan = FULL_PLAN) -> int:
  """Receptive field in input pixels (one side of the square window)."""
  s_pre, s_post = _shrink(plan)
  # 2x2 pool adds (2 - 1) at jump 1; after it every tap is 2 input pixels.
  return 1 + s_pre + 1 + STRIDE * s_post


def num_conv_layers(plan: LayerPlan = FULL_PLAN) -> int:
  """Conv layers on the main path: lift + 2 per block + the 1x1 head."""
  return 1 + 2 * (len(plan.pre_pool) + len(plan.post_pool)) + 1


def output_size(in_h: int, in_w: int, plan: LayerPlan = FULL_PLAN
                ) -> tuple[int, int]:
  """Output map size ``(out_h, out_w)`` for an ``in_h x in_w`` input.

  Where each output lies on the input is the detector's business
  (``midog_jax.detectors.p4.output_to_pixels``).
  """
  rf = receptive_field(plan)
  if min(in_h, in_w) < rf:
    raise ValueError(f"input {in_h}x{in_w} is smaller than the RF {rf}")
  return (in_h - rf) // STRIDE + 1, (in_w - rf) // STRIDE + 1


def is_equivariant_size(size: int, plan: LayerPlan = FULL_PLAN) -> bool:
  """True when an input side of ``size`` px gives exact rot90 equivariance."""
  rf = receptive_field(plan)
  return size >= rf and (size - rf) % STRIDE == 0


class _Block(nn.Module):
  """Pre-activation residual block with VALID convs and a centre-cropped skip."""

  features: int
  kernels: tuple[int, int]
  group: bool
  dtype: Dtype = jnp.float32

  def _conv(self, features: int, k: int) -> nn.Module:
    if self.group:
      return p4.P4Conv(features, k, dtype=self.dtype)
    return nn.Conv(features, (k, k), padding="VALID", use_bias=False,
                   dtype=self.dtype)

  def _norm(self, train: bool) -> nn.Module:
    if self.group:
      return p4.P4BatchNorm(use_running_average=not train, dtype=self.dtype)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, dtype=self.dtype)

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    ch_axis = -2 if self.group else -1
    y = nn.relu(self._norm(train)(x))
    skip = x
    if x.shape[ch_axis] != self.features:
      skip = self._conv(self.features, 1)(y)  # projection shortcut
    ka, kb = self.kernels
    y = self._conv(self.features, ka)(y)
    y = nn.relu(self._norm(train)(y))
    y = self._conv(self.features, kb)(y)
    c = (ka - 1 + kb - 1) // 2  # odd kernels: the shrink is even, crop evenly
    if c:
      skip = skip[:, c:skip.shape[1] - c, c:skip.shape[2] - c]
    return y + skip


class _DenseResNet(nn.Module):
  """Shared body of ``P4ResNet`` and ``PlainResNet`` (see the module doc)."""

  plan: LayerPlan = FULL_PLAN
  width: int = 16
  num_classes: int = 1
  dtype: Dtype = jnp.float32

  group: ClassVar[bool] = True

  @property
  def receptive_field(self) -> int:
    """Receptive field of ``plan`` in input pixels."""
    return receptive_field(self.plan)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """``(B, H, W, Cin)`` float -> ``(B, out_h, out_w, num_classes)`` logits."""
    plan, w = self.plan, self.width
    if self.group:
      x = p4.P4Lift(w, plan.lift_kernel, dtype=self.dtype)(x)
    else:
      # Plain control: 4x the channels, so feature maps match the P4 net's.
      w = 4 * w
      x = nn.Conv(w, (plan.lift_kernel,) * 2, padding="VALID",
                  use_bias=False, dtype=self.dtype)(x)
    for kernels in plan.pre_pool:
      x = _Block(w, kernels, self.group, self.dtype)(x, train)
    if self.group:
      x = p4.p4_max_pool2x2(x)
    else:
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    w *= plan.post_pool_width_mult
    for kernels in plan.post_pool:
      x = _Block(w, kernels, self.group, self.dtype)(x, train)
    if self.group:
      x = p4.P4BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
      x = p4.p4_pool(nn.relu(x), "max")  # rotation-invariant features
    else:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       epsilon=1e-5, dtype=self.dtype)(x)
      x = nn.relu(x)
    # The head computes in float32 whatever ``dtype``: logits rounded to
    # bfloat16 (steps of 1/32 at 4..8) would tie neighbouring outputs and the
    # strict local maxima of the detector would drop those peaks.
    x = nn.Conv(self.num_classes, (1, 1), dtype=jnp.float32, name="head")(x)
    return x


class P4ResNet(_DenseResNet):
  """P4-equivariant dense ResNet; ``width`` counts group channels (x4 maps)."""

  group: ClassVar[bool] = True


class PlainResNet(_DenseResNet):
  """The same plan with ordinary convolutions (``4 * width`` channels)."""

  group: ClassVar[bool] = False
