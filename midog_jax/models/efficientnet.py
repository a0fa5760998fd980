"""EfficientNet B0-B7 (Tan & Le, ICML 2019) in torchvision's layout, Flax linen.

One definition for all eight variants: the B0 stage table scaled by a width
multiplier (channels rounded to multiples of 8, never more than 10 % down) and
a depth multiplier (blocks per stage rounded up), exactly as torchvision
builds ``efficientnet_b0`` .. ``efficientnet_b7``, so its ImageNet weights
convert one to one (``midog_jax.weights``).

Blocks are MBConv: 1x1 expansion (absent when the ratio is 1), depthwise
kxk, squeeze-and-excitation (reduction to a quarter of the block's INPUT
channels, SiLU, sigmoid gate), 1x1 projection without activation, and a
residual with stochastic depth (per sample; the drop probability grows
linearly from 0 over all blocks to ``stochastic_depth``) where the stride is
1 and the width does not change. Activations are SiLU; BatchNorm uses eps
1e-5 / momentum 0.1 for B0-B4 and eps 1e-3 / momentum 0.01 for B5-B7
(torchvision's values; Flax's momentum is one minus torch's).

Input: NHWC float images already normalised with the ImageNet mean/std.
Output: globally average-pooled features (``FEATURES[variant]`` wide) when
``num_classes == 0``, else logits of a dropout + dense classifier. Training
with stochastic depth or dropout needs ``rngs={"dropout": key}``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from midog_jax.models import resnet as resnet_lib

# B0 stages: (expand ratio, kernel, stride, in channels, out channels, blocks).
B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# variant -> (width multiplier, depth multiplier, classifier dropout).
VARIANTS = {
    "b0": (1.0, 1.0, 0.2),
    "b1": (1.0, 1.1, 0.2),
    "b2": (1.1, 1.2, 0.3),
    "b3": (1.2, 1.4, 0.3),
    "b4": (1.4, 1.8, 0.4),
    "b5": (1.6, 2.2, 0.4),
    "b6": (1.8, 2.6, 0.5),
    "b7": (2.0, 3.1, 0.5),
}

# torchvision: kaiming_normal(fan_out) convs, uniform(+-1/sqrt(out)) linear.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(v: float, divisor: int = 8) -> int:
  """Nearest multiple of ``divisor`` (at least ``divisor``), never < 90 % of v."""
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new < 0.9 * v:
    new += divisor
  return new


def stage_table(variant: str) -> list[tuple[int, int, int, int, int, int]]:
  """The scaled stage table of ``variant`` (same columns as ``B0_STAGES``)."""
  width, depth, _ = _variant(variant)
  return [(e, k, s, make_divisible(cin * width), make_divisible(cout * width),
           int(math.ceil(n * depth))) for e, k, s, cin, cout, n in B0_STAGES]


def num_features(variant: str) -> int:
  """Width of the pooled features: 4x the last stage's output channels."""
  return 4 * stage_table(variant)[-1][4]


def _variant(variant: str) -> tuple[float, float, float]:
  if variant not in VARIANTS:
    raise ValueError(
        f"unknown EfficientNet variant {variant!r}; expected one of {list(VARIANTS)}")
  return VARIANTS[variant]


FEATURES = {v: num_features(v) for v in VARIANTS}


def _bn(train: bool, large: bool, dtype: Any, name: str) -> nn.Module:
  # torch BatchNorm2d statistics; B5-B7 use torchvision's
  # partial(BatchNorm2d, eps=1e-3, momentum=0.01).
  return resnet_lib.BatchNorm(use_running_average=not train,
                              momentum=0.99 if large else 0.9,
                              epsilon=1e-3 if large else 1e-5, dtype=dtype,
                              name=name)


def _conv(features: int, kernel: int, stride: int = 1, groups: int = 1,
          use_bias: bool = False, dtype: Any = jnp.float32,
          name: str | None = None) -> nn.Conv:
  # torchvision pads (k - 1) // 2 on every side (not "SAME": a stride-2 3x3
  # on an even size differs).
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                 use_bias=use_bias, kernel_init=_conv_init, dtype=dtype,
                 name=name)


def stochastic_depth(x: jax.Array, p: float, train: bool,
                     module: nn.Module) -> jax.Array:
  """Drops whole samples of the residual branch with probability ``p``.

  Survivors are scaled by ``1 / (1 - p)`` (torchvision's "row" mode), so the
  expectation is unchanged and evaluation is the identity.
  """
  if not train or p <= 0.0:
    return x
  keep = 1.0 - p
  rng = module.make_rng("dropout")
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MBConv(nn.Module):
  """Inverted residual block with squeeze-and-excitation."""

  expand_ratio: int
  kernel: int
  stride: int
  out_channels: int
  drop_prob: float = 0.0
  large: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cin = x.shape[-1]
    expanded = make_divisible(cin * self.expand_ratio)
    y = x
    if expanded != cin:
      y = _conv(expanded, 1, dtype=self.dtype, name="expand_conv")(y)
      y = nn.silu(_bn(train, self.large, self.dtype, "expand_bn")(y))
    y = _conv(expanded, self.kernel, self.stride, groups=expanded,
              dtype=self.dtype, name="dw_conv")(y)
    y = nn.silu(_bn(train, self.large, self.dtype, "dw_bn")(y))
    # Squeeze-and-excitation: the squeeze width is a quarter of the block's
    # input channels (not of the expanded ones), as in torchvision.
    s = jnp.mean(y, axis=(1, 2), keepdims=True)
    s = nn.silu(_conv(max(1, cin // 4), 1, use_bias=True, dtype=self.dtype,
                      name="se_reduce")(s))
    s = nn.sigmoid(_conv(expanded, 1, use_bias=True, dtype=self.dtype,
                         name="se_expand")(s))
    y = y * s
    y = _conv(self.out_channels, 1, dtype=self.dtype, name="project_conv")(y)
    y = _bn(train, self.large, self.dtype, "project_bn")(y)
    if self.stride == 1 and cin == self.out_channels:
      y = stochastic_depth(y, self.drop_prob, train, self) + x
    return y


class EfficientNet(nn.Module):
  """EfficientNet ``variant`` ("b0".."b7"); ``__call__(x, train)``.

  Attributes:
    variant: "b0" .. "b7".
    num_classes: 0 returns the pooled features (``FEATURES[variant]``),
      otherwise logits of a ``num_classes`` dense layer.
    dropout: dropout before the classifier; None = torchvision's value for
      the variant (0.2 .. 0.5). Unused when ``num_classes == 0``.
    stochastic_depth: drop probability of the last block's residual branch
      (linearly less for earlier blocks); 0.2 as torchvision.
    dtype: computation dtype (parameters float32; the pooled features and the
      classifier are float32, so the output is float32 and unrounded).

  Parameter scopes: ``stem_conv``, ``stem_bn``, ``stage{s}_{b}/...`` (s = 1..7,
  torchvision's ``features.{s}.{b}``), ``head_conv``, ``head_bn``,
  ``classifier``.
  """

  variant: str = "b0"
  num_classes: int = 0
  dropout: float | None = None
  stochastic_depth: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {x.shape}")
    _, _, default_dropout = _variant(self.variant)
    large = self.variant in ("b5", "b6", "b7")
    table = stage_table(self.variant)
    x = x.astype(self.dtype)
    x = _conv(table[0][3], 3, 2, dtype=self.dtype, name="stem_conv")(x)
    x = nn.silu(_bn(train, large, self.dtype, "stem_bn")(x))
    total = sum(row[5] for row in table)
    block_id = 0
    for s, (e, k, stride, _, cout, n) in enumerate(table):
      for b in range(n):
        x = MBConv(expand_ratio=e, kernel=k, stride=stride if b == 0 else 1,
                   out_channels=cout,
                   drop_prob=self.stochastic_depth * block_id / total,
                   large=large, dtype=self.dtype,
                   name=f"stage{s + 1}_{b}")(x, train)
        block_id += 1
    x = _conv(4 * table[-1][4], 1, dtype=self.dtype, name="head_conv")(x)
    x = nn.silu(_bn(train, large, self.dtype, "head_bn")(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if not self.num_classes:
      return x
    rate = default_dropout if self.dropout is None else self.dropout
    x = nn.Dropout(rate, deterministic=not train)(x)
    bound = 1.0 / math.sqrt(self.num_classes)
    # The classifier computes in float32 whatever ``dtype`` (unrounded logits).
    x = nn.Dense(self.num_classes, dtype=jnp.float32,
                 kernel_init=lambda k, shape, dt=jnp.float32: jax.random.uniform(
                     k, shape, dt, -bound, bound),
                 bias_init=nn.initializers.zeros, name="classifier")(x)
    return x.astype(jnp.float32)
