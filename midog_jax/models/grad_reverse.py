"""The gradient reversal layer of domain-adversarial training (Ganin & Lempitsky, 2015).

``grad_reverse(x, lam)`` is the identity in the forward pass; in the backward
pass it multiplies the incoming gradient by ``-lam``. Placed between a feature
extractor and a domain classifier, the classifier learns to tell the domains
apart while the features below it are pushed to make them indistinguishable
(Ganin et al., JMLR 2016; Kondo, MIDOG 2021, puts it in front of the scanner
head of a ResNet-18).

``lam`` is an ordinary (traced) argument, not a static one: a schedule can
change it every step without recompiling the step function. It receives a
zero gradient (it is a schedule, not a parameter).
:func:`ganin_lambda` is the schedule of Ganin & Lempitsky,
``2 / (1 + exp(-gamma * p)) - 1`` for training progress ``p`` in [0, 1],
which keeps the domain signal off while the classifiers are still noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def grad_reverse(x: jax.Array, lam: jax.Array | float) -> jax.Array:
  """Identity forward; the gradient of ``x`` times ``-lam`` backward.

  Args:
    x: any array (usually pooled features).
    lam: scalar reversal strength (a Python float or a traced scalar).

  Returns:
    ``x`` unchanged.
  """
  del lam
  return x


def _forward(x, lam):
  return x, jnp.asarray(lam)


def _backward(lam, g):
  # The cotangent of lam has lam's shape and dtype; it is zero because lam
  # is a schedule, not something to learn.
  return (-lam.astype(g.dtype) * g, jnp.zeros_like(lam))


grad_reverse.defvjp(_forward, _backward)


def ganin_lambda(progress: jax.Array | float, gamma: float = 10.0) -> jax.Array:
  """``2 / (1 + exp(-gamma * progress)) - 1``: 0 at the start, towards 1 at the end.

  Args:
    progress: training progress in [0, 1] (step / total steps).
    gamma: steepness; 10 in Ganin & Lempitsky (2015).
  """
  p = jnp.asarray(progress, jnp.float32)
  return 2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0
