"""``resnet.pointwise_conv``: 1x1 convolutions whose weight gradient is one matrix product.

The forward pass must be XLA's convolution itself (so converted torchvision
weights keep their parity) and both gradients must equal the ones jax
derives for ``lax.conv_general_dilated``; the compiled gradient must really
use a matrix product instead of a weight-gradient convolution (the case that
fails if ``conv`` stops routing 1x1 kernels through it).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midog_jax.models import resnet


def _module(stride, dtype=jnp.float32, kernel=1, custom=True):
  if custom:
    return resnet.conv(8, kernel, stride, dtype=dtype, use_bias=True)
  pad = kernel // 2
  return nn.Conv(8, (kernel, kernel), strides=(stride, stride), use_bias=True,
                 padding=((pad, pad), (pad, pad)), dtype=dtype)


def _grads(module, params, x):
  loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("stride,size", [(1, 12), (2, 12), (2, 13)])
def test_same_outputs_and_gradients_as_xla_convolution(stride, size):
  x = jax.random.normal(jax.random.key(0), (3, size, size + 2, 5))
  params = _module(stride).init(jax.random.key(1), x)
  ours, ref = _module(stride), _module(stride, custom=False)
  np.testing.assert_array_equal(ours.apply(params, x), ref.apply(params, x))
  (gp, gx), (rp, rx) = _grads(ours, params, x), _grads(ref, params, x)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(rp)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(gp["params"]["kernel"]).max()) > 1e-2  # not a zero gradient


def test_bfloat16_gradients_stay_close():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))
  params = _module(1).init(jax.random.key(1), x)
  (gp, _), (rp, _) = (_grads(_module(1, jnp.bfloat16), params, x),
                      _grads(_module(1, jnp.bfloat16, custom=False), params, x))
  k, r = gp["params"]["kernel"], rp["params"]["kernel"]
  assert k.dtype == jnp.float32  # parameters stay float32
  assert float(jnp.abs(k - r).max()) <= 0.02 * float(jnp.abs(r).max())


def _ops(module, params, x) -> tuple[int, int]:
  text = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x)))).lower(params).as_text()
  return text.count("stablehlo.convolution"), text.count("stablehlo.dot_general")


def test_weight_gradient_is_a_matrix_product_only_for_1x1_kernels():
  x = jnp.ones((2, 8, 8, 4))
  p1 = _module(1).init(jax.random.key(0), x)
  # Only the weight gradient is asked for: XLA's own path writes it as a
  # second convolution; ours as one dot (and jax drops the unused forward).
  ours, xla = _ops(_module(1), p1, x), _ops(_module(1, custom=False), p1, x)
  assert xla[0] >= 1 and xla[1] == 0
  assert ours[1] == 1 and ours[0] < xla[0]
  p3 = _module(1, kernel=3).init(jax.random.key(0), x)
  # 3x3 kernels keep XLA's own weight gradient.
  assert _ops(_module(1, kernel=3), p3, x) == _ops(_module(1, kernel=3, custom=False), p3, x)


def test_refuses_what_it_does_not_compute():
  x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 3))
  with pytest.raises(ValueError, match="1x1"):
    resnet.pointwise_conv(x, w, (1, 1), ((1, 1), (1, 1)),
                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  with pytest.raises(ValueError, match="1x1"):
    resnet.pointwise_conv(x, jnp.ones((3, 3, 2, 3)), (1, 1), ((0, 0), (0, 0)),
                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
