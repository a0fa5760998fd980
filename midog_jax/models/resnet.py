"""ResNet backbones (torchvision layout) returning the C2..C5 feature maps.

NHWC, float32 parameters, ``dtype`` for the computation (e.g. bfloat16).
Layout and padding follow torchvision (ResNet v1.5: the stride of a
bottleneck sits on its 3x3 conv; explicit ``k // 2`` padding, so a stride-2
layer maps n pixels to ``ceil(n / 2)``), and parameter scopes mirror its module
names (``conv1``, ``bn1``, ``layer1_0/conv1``, ``layer1_0/downsample_conv``...)
so torchvision weights can be converted and ``trainable_backbone_layers``
maps onto scopes one to one.

Normalisation (``norm``):
  "batch": BatchNorm as torch's BatchNorm2d (`BatchNorm`); batch statistics in
    training, running averages otherwise.
  "frozen": torchvision's FrozenBatchNorm2d: a fixed affine map whose scale,
    bias, mean and var all live in the "batch_stats" collection, so no
    optimiser ever touches them (what torchvision uses with pretrained weights).
  "group": GroupNorm (32 groups, fewer where the width does not allow it).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# name -> (block kind, blocks per stage, base width)
SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2), 64),
    "resnet34": ("basic", (3, 4, 6, 3), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 64),
    "resnet_tiny": ("basic", (1, 1, 1, 1), 8),
}
NORMS = ("batch", "frozen", "group")
# torchvision's trainable-layer candidates, counted from the top.
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")

# torchvision initialises ResNet convs with kaiming_normal(fan_out, relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def group_count(channels: int, max_groups: int = 32) -> int:
  """Groups for GroupNorm: ``max_groups`` where it divides, else the gcd."""
  return math.gcd(channels, max_groups)


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine (torchvision FrozenBatchNorm2d).

  All four arrays are in "batch_stats": they are constants to the optimiser
  and only change when pretrained weights are loaded.
  """

  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.variable("batch_stats", "scale", jnp.ones, (c,), jnp.float32)
    bias = self.variable("batch_stats", "bias", jnp.zeros, (c,), jnp.float32)
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    mul = scale.value * jax.lax.rsqrt(var.value + self.epsilon)
    add = bias.value - mean.value * mul
    return (x * mul.astype(self.dtype) + add.astype(self.dtype)).astype(
        self.dtype)


class BatchNorm(nn.Module):
  """BatchNorm with torch ``BatchNorm2d``'s exact statistics.

  Same variables as ``flax.linen.BatchNorm`` (params scale/bias, batch_stats
  mean/var), but the running variance is updated with the UNBIASED batch
  variance (times n / (n - 1)) as torch does, and the batch variance is
  computed in two passes (no E[x^2] - E[x]^2 cancellation), so one training
  step moves the statistics exactly as torchvision's would. ``momentum`` is
  Flax's (the weight of the old average: torch's 0.1 is 0.9 here).
  Statistics are computed in float32 whatever ``dtype``.
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if not self.is_initializing():
        n = x.size // c
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return (x * mul.astype(self.dtype) + add.astype(self.dtype)).astype(self.dtype)


def make_norm(kind: str, train: bool, name: str, dtype: Any,
              frozen: bool = False) -> Callable[[jax.Array], jax.Array]:
  """One normalisation layer of ``kind`` (see module docstring).

  ``frozen`` (a layer outside ``trainable_backbone_layers``) makes BatchNorm
  use its running averages even in training, so frozen layers really do not
  change, statistics included.
  """
  if kind == "batch":
    # torchvision: momentum 0.1 (Flax counts the other way), eps 1e-5.
    return BatchNorm(use_running_average=(not train) or frozen,
                     momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)
  if kind == "frozen":
    return FrozenBatchNorm(dtype=dtype, name=name)
  if kind == "group":
    def apply(x):
      return nn.GroupNorm(num_groups=group_count(x.shape[-1]), epsilon=1e-5,
                          dtype=dtype, name=name)(x)
    return apply
  raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


_NHWC = ("NHWC", "HWIO", "NHWC")


def _pointwise_forward(x, w, stride):
  return lax.conv_general_dilated(x, w, stride, ((0, 0), (0, 0)), dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise(x, w, stride):
  return _pointwise_forward(x, w, stride)


def _pointwise_fwd(x, w, stride):
  return _pointwise_forward(x, w, stride), (x, w)


def _pointwise_bwd(stride, res, g):
  x, w = res
  _, vjp = jax.vjp(lambda x: _pointwise_forward(x, w, stride), x)
  (dx,) = vjp(g)
  # The weight gradient of a 1x1 convolution is one matrix product over every
  # (example, row, column): [N*H*W, Cin]^T @ [N*H*W, Cout]. XLA would write it
  # as a convolution of the batch-minor transposed activations with the
  # gradient as "kernel"; on CPU those transposes alone (batch 2 as the minor
  # dimension) cost more than the product (benchmarks/train_step.py --profile).
  xs = x[:, ::stride[0], ::stride[1]]
  dw = lax.dot_general(xs.reshape(-1, xs.shape[-1]), g.reshape(-1, g.shape[-1]),
                       (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx, dw.reshape(w.shape).astype(w.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def pointwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                   precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` for an unpadded 1x1 NHWC/HWIO convolution
  (``nn.Conv``'s ``conv_general_dilated`` in :func:`conv`): the same forward
  pass, with the weight gradient computed as one matrix product."""
  if (rhs.shape[:2] != (1, 1) or tuple(map(tuple, padding)) != ((0, 0), (0, 0))
      or tuple(lhs_dilation or (1, 1)) != (1, 1) or tuple(rhs_dilation or (1, 1)) != (1, 1)
      or feature_group_count != 1 or batch_group_count != 1 or precision is not None
      or preferred_element_type is not None
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC) != lax.conv_dimension_numbers(
          lhs.shape, rhs.shape, dimension_numbers)):
    raise ValueError("pointwise_conv is an unpadded, undilated, ungrouped 1x1 NHWC "
                     "convolution")
  return _pointwise(lhs, rhs, tuple(int(s) for s in window_strides))


def conv(features: int, kernel: int, stride: int = 1, name: str | None = None,
         dtype: Any = jnp.float32, use_bias: bool = False,
         kernel_init=_conv_init,
         bias_init=nn.initializers.zeros) -> nn.Conv:
  """A torchvision-padded convolution (``kernel // 2`` on every side); 1x1
  ones through :func:`pointwise_conv` (the same function, a cheaper weight
  gradient)."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                 kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                 conv_general_dilated=pointwise_conv if kernel == 1 else None,
                 name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); output channels = ``planes``."""

  planes: int
  stride: int = 1
  norm: str = "batch"
  frozen: bool = False
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    nrm = lambda name: make_norm(self.norm, train, name, self.dtype,
                                 self.frozen)
    y = conv(self.planes, 3, self.stride, "conv1", self.dtype)(x)
    y = nn.relu(nrm("bn1")(y))
    y = conv(self.planes, 3, 1, "conv2", self.dtype)(y)
    y = nrm("bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = conv(self.planes, 1, self.stride, "downsample_conv", self.dtype)(x)
      x = nrm("downsample_bn")(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 (x4); output = ``4 * planes``."""

  planes: int
  stride: int = 1
  norm: str = "batch"
  frozen: bool = False
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    nrm = lambda name: make_norm(self.norm, train, name, self.dtype,
                                 self.frozen)
    out = self.planes * self.expansion
    y = conv(self.planes, 1, 1, "conv1", self.dtype)(x)
    y = nn.relu(nrm("bn1")(y))
    y = conv(self.planes, 3, self.stride, "conv2", self.dtype)(y)
    y = nn.relu(nrm("bn2")(y))
    y = conv(out, 1, 1, "conv3", self.dtype)(y)
    y = nrm("bn3")(y)
    if self.stride != 1 or x.shape[-1] != out:
      x = conv(out, 1, self.stride, "downsample_conv", self.dtype)(x)
      x = nrm("downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet trunk without pooling/classifier; returns ``{"C2": .., "C5": ..}``.

  Attributes:
    stage_sizes: blocks per stage (layer1..layer4).
    block: "basic" or "bottleneck".
    width: channels of the stem and of layer1's 3x3 convs (64 standard).
    norm: "batch" | "frozen" | "group".
    trainable_layers: 0..5 as torchvision's ``trainable_backbone_layers``;
      BatchNorm in the frozen layers runs on its running averages. (The
      parameters themselves are frozen by the optimiser, `trainable_mask`.)
    dtype: computation dtype.
  """

  stage_sizes: Sequence[int]
  block: str = "bottleneck"
  width: int = 64
  norm: str = "batch"
  trainable_layers: int = 5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    trainable = set(trainable_groups(self.trainable_layers))
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    x = x.astype(self.dtype)
    x = conv(self.width, 7, 2, "conv1", self.dtype)(x)
    x = make_norm(self.norm, train, "bn1", self.dtype,
                  "conv1" not in trainable)(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    feats = {}
    for i, n_blocks in enumerate(self.stage_sizes):
      layer = f"layer{i + 1}"
      for j in range(n_blocks):
        x = block_cls(planes=self.width * 2**i,
                      stride=2 if (i > 0 and j == 0) else 1,
                      norm=self.norm, frozen=layer not in trainable,
                      dtype=self.dtype, name=f"{layer}_{j}")(x, train)
      feats[f"C{i + 2}"] = x
    return feats


def resnet(arch: str, **kwargs) -> ResNet:
  """A named backbone: resnet18/34/50/101, or resnet_tiny (basic x1, width 8).

  ``kwargs`` go to `ResNet` (norm, trainable_layers, dtype, name, width...).
  """
  if arch not in SPECS:
    raise ValueError(
        f"unknown backbone {arch!r}; expected one of {list(SPECS)}")
  block, stages, width = SPECS[arch]
  kwargs.setdefault("width", width)
  return ResNet(stage_sizes=stages, block=block, **kwargs)


def trainable_groups(trainable_backbone_layers: int) -> tuple[str, ...]:
  """torchvision's layer groups trained for ``trainable_backbone_layers``."""
  n = int(trainable_backbone_layers)
  if not 0 <= n <= 5:
    raise ValueError(f"trainable_backbone_layers must be in 0..5, got {n}")
  return TRAINABLE_ORDER[:n]


def _group_of(scope: str) -> str:
  # conv1 and bn1 form torchvision's "conv1" group (it adds "bn1" at 5).
  if scope in ("conv1", "bn1"):
    return "conv1"
  return scope.split("_")[0]  # "layer3_1" -> "layer3"


def trainable_mask(params: Any, trainable_backbone_layers: int,
                   backbone_key: str = "backbone") -> Any:
  """Pytree of bools like ``params``: True where a parameter is trainable.

  Exactly torchvision's rule: the top ``trainable_backbone_layers`` of
  (layer4, layer3, layer2, layer1, conv1+bn1) train, the rest of the backbone
  is frozen; everything outside the backbone (FPN, heads) always trains.
  ``params`` is either a model's params with the backbone under
  ``backbone_key`` or a bare ResNet's params. Use with `midog_jax.optim.freeze`.
  """
  groups = set(trainable_groups(trainable_backbone_layers))
  bare = backbone_key not in params

  def leaf(path, _):
    keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    if not bare:
      if keys[0] != backbone_key:
        return True
      keys = keys[1:]
    return _group_of(str(keys[0])) in groups

  return jax.tree_util.tree_map_with_path(leaf, params)
