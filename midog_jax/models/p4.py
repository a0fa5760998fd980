"""P4 group-convolution layers (rotations by multiples of 90 degrees).

Layout. A feature map on the group p4 (translations x 90-degree rotations) is
stored as a 5-D array ``(B, H, W, C, 4)``: the last axis holds the 4
orientations r = 0..3, ``C`` is the number of group channels. The layout is
chosen so that ``x.reshape(B, H, W, 4 * C)`` is free (channel ``c * 4 + r``),
which is what the single convolution of every layer works on.

Rotation convention. ``rot90`` below means ``jnp.rot90(x, k=1, axes=(1, 2))``
on the spatial axes (the same direction as ``jnp.rot90(kernel, axes=(0, 1))``).
With ``g = P4Lift(...)(x)`` or ``g = P4Conv(...)(f)``:

  * ``P4Lift(rot90(x)) == shift(rot90(g))``
  * ``P4Conv(shift(rot90(f))) == shift(rot90(g))``

where ``shift(y) = jnp.roll(y, 1, axis=-1)`` (orientation r of the output of
the rotated input is orientation r - 1 of the original output, rotated). The
relation is exact (up to float rounding) for VALID or SAME padding with odd
kernels and stride 1; see ``rotate_group``. ``p4_pool`` removes the shift, so
pooled features are rotation-invariant at each (rotated) location.

Derivation, so the kernels below can be checked: correlation commutes with a
joint rotation of image and kernel, ``(R f) * (R K) = R (f * K)``. The lifting
kernel of orientation r is ``R^r K``; the group kernel of output orientation r
is ``R^r Psi`` with its input-orientation axis rolled by r
(``Psi_r[..., s, :] = R^r Psi[..., s - r, :]``); substituting ``s -> s + 1``
gives the relations above.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any

NUM_ROT = 4
_DIMS = ("NHWC", "HWIO", "NHWC")


def rotate_image(x: Array, k: int = 1) -> Array:
  """Rotates NHWC images (or any ``(B, H, W, ...)`` array) by ``k * 90`` degrees."""
  return jnp.rot90(x, k=k, axes=(1, 2))


def rotate_group(g: Array, k: int = 1) -> Array:
  """What rotating the input by ``k * 90`` degrees does to a ``(B,H,W,C,4)`` map.

  Spatial ``rot90`` plus a cyclic shift of the orientation axis by ``k``.
  """
  return jnp.roll(rotate_image(g, k), k, axis=-1)


def _flat(g: Array) -> Array:
  """(B, H, W, C, 4) -> (B, H, W, 4C), channel index c * 4 + r."""
  return g.reshape(*g.shape[:-2], g.shape[-2] * g.shape[-1])


def _unflat(x: Array) -> Array:
  """(B, H, W, 4C) -> (B, H, W, C, 4)."""
  return x.reshape(*x.shape[:-1], x.shape[-1] // NUM_ROT, NUM_ROT)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def lift_kernel(kernel: Array) -> Array:
  """(k, k, Cin, Cout) kernel -> (k, k, Cin, 4 * Cout) of its 4 rotations.

  Output channel ``o * 4 + r`` holds ``rot90(kernel, r)`` of output ``o``.
  """
  rots = [jnp.rot90(kernel, r, axes=(0, 1)) for r in range(NUM_ROT)]
  full = jnp.stack(rots, axis=-1)  # (k, k, Cin, Cout, 4)
  return full.reshape(*kernel.shape[:3], kernel.shape[3] * NUM_ROT)


def group_kernel(kernel: Array) -> Array:
  """(k, k, Cin, 4, Cout) group kernel -> (k, k, 4 * Cin, 4 * Cout) conv kernel.

  The block for output orientation r is the kernel rotated by r in space
  with its input-orientation axis rolled by r (``new[s] = old[s - r]``).
  """
  k1, k2, cin, _, cout = kernel.shape
  rots = [jnp.roll(jnp.rot90(kernel, r, axes=(0, 1)), r, axis=3)
          for r in range(NUM_ROT)]
  full = jnp.stack(rots, axis=-1)  # (k, k, Cin, 4, Cout, 4)
  return full.reshape(k1, k2, cin * NUM_ROT, cout * NUM_ROT)


# He initialisation; for (k, k, Cin, 4, Cout) the default fan-in axes give
# fan_in = k * k * Cin * 4, the true number of inputs of each output unit.
_he = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class _P4ConvBase(nn.Module):
  """The attributes of both P4 convolutions and their shared output step."""

  features: int
  kernel_size: int | Sequence[int] = 3
  stride: int | Sequence[int] = 1
  padding: str = "VALID"
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Any = _he

  def _group_output(self, y: Array) -> Array:
    """Flat convolution output -> ``(B, H, W, C, 4)`` (+ a bias per group channel)."""
    y = _unflat(y)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        jnp.float32)
      y = y + bias.astype(self.dtype)[:, None]
    return y


class P4Lift(_P4ConvBase):
  """Lifting convolution: image ``(B, H, W, Cin)`` -> group map ``(B, H', W', C, 4)``.

  One learnable ``(k, k, Cin, C)`` kernel, applied at its 4 rotations in a
  single convolution (the rotated copies are stacked on the output channels).

  Attributes:
    features: group channels C of the output.
    kernel_size: spatial size (odd for exact equivariance).
    stride: spatial stride.
    padding: "VALID" (default; dense application) or "SAME".
    use_bias: one bias per group channel, shared over orientations.
    dtype: computation dtype; parameters stay float32.
  """


  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = _pair(self.kernel_size)
    kernel = self.param("kernel", self.kernel_init,
                        (*k, x.shape[-1], self.features), jnp.float32)
    full = lift_kernel(kernel).astype(self.dtype)
    y = lax.conv_general_dilated(x.astype(self.dtype), full, _pair(self.stride),
                                 self.padding, dimension_numbers=_DIMS)
    return self._group_output(y)


class P4Conv(_P4ConvBase):
  """Group convolution: ``(B, H, W, Cin, 4)`` -> ``(B, H', W', C, 4)``.

  Learnable kernel of shape ``(k, k, Cin, 4, C)``; the full
  ``(k, k, 4 Cin, 4 C)`` kernel is built once and applied in one convolution.
  Exact equivariance needs an odd kernel; with ``stride > 1`` it also needs
  the strided grid to map onto itself (``(H - k) % stride == 0``).

  Attributes: as ``P4Lift``.
  """


  @nn.compact
  def __call__(self, g: Array) -> Array:
    if g.ndim != 5 or g.shape[-1] != NUM_ROT:
      raise ValueError(f"P4Conv expects (B, H, W, C, 4), got {g.shape}")
    k = _pair(self.kernel_size)
    kernel = self.param("kernel", self.kernel_init,
                        (*k, g.shape[-2], NUM_ROT, self.features), jnp.float32)
    full = group_kernel(kernel).astype(self.dtype)
    y = lax.conv_general_dilated(_flat(g).astype(self.dtype), full,
                                 _pair(self.stride), self.padding,
                                 dimension_numbers=_DIMS)
    return self._group_output(y)


class P4BatchNorm(nn.Module):
  """Batch norm for ``(B, H, W, C, 4)`` maps, statistics shared over rotations.

  Mean and variance reduce over (B, H, W, orientation); scale, bias and the
  running statistics are per group channel C. Sharing over orientations is
  what keeps the layer equivariant (per-orientation statistics would not be).
  Under ``jax.jit`` with a batch-sharded input the means are global.

  Attributes:
    use_running_average: True at inference (uses ``batch_stats``).
    momentum: running-average decay.
    epsilon: added to the variance.
    dtype: output dtype; statistics are computed in float32.
  """

  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, g: Array, use_running_average: bool | None = None
               ) -> Array:
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    c = g.shape[-2]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if use_ra:
      mean, var = ra_mean.value, ra_var.value
    else:
      x32 = g.astype(jnp.float32)
      axes = (0, 1, 2, 4)
      mean = x32.mean(axes)
      # Two-pass variance: the one-pass E[x^2] - E[x]^2 loses precision.
      var = jnp.square(x32 - mean[:, None]).mean(axes)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    mul = scale * lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return (g.astype(jnp.float32) * mul[:, None] + add[:, None]).astype(self.dtype)


def p4_pool(g: Array, mode: str = "max") -> Array:
  """Pools over the orientation axis: ``(B, H, W, C, 4)`` -> ``(B, H, W, C)``.

  The result is rotation-invariant up to the spatial rotation of the map:
  ``p4_pool(rotate_group(g)) == rotate_image(p4_pool(g))``.
  """
  if mode == "max":
    return g.max(axis=-1)
  if mode == "mean":
    return g.mean(axis=-1)
  raise ValueError(f"p4_pool mode must be 'max' or 'mean', got {mode!r}")


def p4_max_pool2x2(g: Array) -> Array:
  """2x2 spatial max-pool, stride 2, VALID, on a ``(B, H, W, C, 4)`` map.

  Equivariant exactly when H and W are even (the pooling grid then maps onto
  itself under rotation); an odd trailing row/column is dropped.
  """
  y = nn.max_pool(_flat(g), (2, 2), strides=(2, 2), padding="VALID")
  return _unflat(y)
