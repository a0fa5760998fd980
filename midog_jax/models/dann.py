"""Domain-adversarial patch classifier (Kondo, MIDOG 2021; Ganin et al., JMLR 2016).

A ResNet (``models/resnet.py``, torchvision's parameter names under
``backbone``, so converted ImageNet weights load into it) without its final
layer: the C5 feature map is globally average-pooled into one vector per
patch, which feeds two branches:

  * ``mitosis_head``: three fully connected layers -> 2 logits
    (index 0: non-mitosis, index 1: mitosis, ``detections.MITOSIS``);
  * ``domain_head``: the gradient reversal layer (``grad_reverse``), then
    three fully connected layers -> ``num_domains`` logits (the scanners).

Hidden widths: the seed says "three fully connected layers" and gives no
widths; we use ``hidden=(512, 256)`` for both heads: the first layer keeps
ResNet-18's 512-d pooled feature, the second halves it, the third maps to
the classes. ReLU between them; no dropout (none in the seed).

The adaptation phase trains on the target image's patches as one more
scanner class: :func:`grow_domain_head` adds one output unit to the last
domain layer, keeping every existing weight exactly, and :meth:`DANN.grown`
is the matching module. :func:`dann_loss` is the loss of both phases: a
mean cross-entropy over the masked mitosis examples plus one over the masked
domain examples; target patches have ``mit_mask = 0``, so they reach the
parameters only through the domain head (and, below the reversal, the
backbone).

BatchNorm caveat: with ``train=True`` and ``norm="batch"``, the batch
statistics of a batch that mixes source and target patches make the source
patches' mitosis logits depend on the target patches. To keep the target
patches out of the mitosis branch in training, call the model on the source
and the target patches separately (each call normalises with its own batch
statistics), or use ``norm="frozen"``/``"group"``.

The module is pure (no data code, no input normalisation); the detector
normalises the patches and schedules ``lam`` (``grad_reverse.ganin_lambda``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from midog_jax.models import resnet as resnet_lib
from midog_jax.models.grad_reverse import grad_reverse

# Flax's default Dense initialiser, named so the unit added by
# grow_domain_head is drawn from the same distribution as the others.
_dense_init = nn.initializers.lecun_normal()

MITOSIS_HEAD, DOMAIN_HEAD, BACKBONE = "mitosis_head", "domain_head", "backbone"


class MLPHead(nn.Module):
  """``len(hidden) + 1`` fully connected layers (``fc1``.. ``fcN``), ReLU between."""

  hidden: Sequence[int]
  num_outputs: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, kernel_init=_dense_init, dtype=self.dtype,
                           name=f"fc{i + 1}")(x))
    # The output layer computes in float32 whatever ``dtype`` (unrounded logits).
    return nn.Dense(self.num_outputs, kernel_init=_dense_init, dtype=jnp.float32,
                    name=f"fc{len(self.hidden) + 1}")(x)


class DANN(nn.Module):
  """ResNet + mitosis head + (gradient reversal, domain head).

  ``__call__(x, lam, train=False) -> (mitosis_logits (B, 2),
  domain_logits (B, num_domains))``, both float32.

  Attributes:
    backbone: "resnet18" (the seed) | "resnet34" | "resnet50" | "resnet101" |
      "resnet_tiny" (tests).
    num_domains: scanner classes of the domain head (3 labelled scanners;
      one more after :func:`grow_domain_head`).
    hidden: widths of the two hidden layers of each head (three FC layers).
    backbone_width: stem/layer1 width override (0: the architecture's own).
    norm: backbone normalisation, "batch" | "frozen" | "group".
    trainable_backbone_layers: 0..5 as torchvision's (frozen layers'
      BatchNorm uses running averages; pair with ``resnet.trainable_mask``).
    dtype: computation dtype (parameters float32; each head's output layer
      computes in float32, so the logits are float32 and unrounded).
  """

  backbone: str = "resnet18"
  num_domains: int = 3
  hidden: Sequence[int] = (512, 256)
  backbone_width: int = 0
  norm: str = "batch"
  trainable_backbone_layers: int = 5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, lam: jax.Array | float, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB patches, got shape {x.shape}")
    width = {"width": self.backbone_width} if self.backbone_width else {}
    feats = resnet_lib.resnet(
        self.backbone, **width, norm=self.norm,
        trainable_layers=self.trainable_backbone_layers, dtype=self.dtype,
        name=BACKBONE)(x, train=train)
    # Global average pooling of C5, as torchvision's avgpool before its fc.
    pooled = jnp.mean(feats["C5"].astype(jnp.float32), axis=(1, 2))
    mit = MLPHead(self.hidden, 2, self.dtype, name=MITOSIS_HEAD)(pooled)
    dom = MLPHead(self.hidden, self.num_domains, self.dtype, name=DOMAIN_HEAD)(
        grad_reverse(pooled, lam))
    return mit.astype(jnp.float32), dom.astype(jnp.float32)

  def grown(self) -> "DANN":
    """The same model with one more domain class (pair with :func:`grow_domain_head`)."""
    return self.clone(num_domains=self.num_domains + 1)


def _last_layer_name(head: dict) -> str:
  return max(head, key=lambda k: int(k.removeprefix("fc")))


def grow_domain_head(params: dict, rng: jax.Array) -> dict:
  """``params`` with one more output unit in the domain head's last layer.

  Pure: returns new params (the input is not modified). Every existing
  weight is kept exactly, so the old classes' logits are unchanged; the new
  unit's weights are drawn like the layer's initial ones (LeCun normal over
  its fan-in) and its bias is zero. The new class is index ``num_domains``
  (the target of the adaptation phase). Optimizer states built for the old
  params do not fit the new ones: initialise a new one (the adaptation phase
  starts its own Adam).

  Args:
    params: ``variables["params"]`` of a :class:`DANN`.
    rng: key for the new unit's weights.
  """
  if DOMAIN_HEAD not in params:
    raise ValueError(f"no {DOMAIN_HEAD!r} in params (got {sorted(params)}); pass "
                     "variables['params'] of a DANN")
  head = dict(params[DOMAIN_HEAD])
  last = _last_layer_name(head)
  kernel, bias = head[last]["kernel"], head[last]["bias"]
  new_col = _dense_init(rng, (kernel.shape[0], 1), kernel.dtype)
  head[last] = dict(head[last],
                    kernel=jnp.concatenate([kernel, new_col], axis=1),
                    bias=jnp.concatenate([bias, jnp.zeros((1,), bias.dtype)]))
  return dict(params, **{DOMAIN_HEAD: head})


def _masked_mean_ce(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels.astype(jnp.int32))
  mask = mask.astype(jnp.float32)
  # An empty mask gives 0, not NaN (a batch of target patches only).
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def dann_loss(mit_logits: jax.Array, dom_logits: jax.Array, mit_labels: jax.Array,
              dom_labels: jax.Array, mit_mask: jax.Array, dom_mask: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The summed cross-entropies of both heads (Kondo: "the summation of two losses").

  Args:
    mit_logits: (B, 2) mitosis logits; mit_labels (B,) in {0, 1}.
    dom_logits: (B, D) domain logits; dom_labels (B,) in [0, D).
    mit_mask: (B,) 1 where the mitosis label counts (source patches), 0 for
      target patches, whose mitosis label is unknown.
    dom_mask: (B,) 1 where the domain label counts (usually every patch).

  Returns:
    ``(loss, {"mitosis_loss", "domain_loss"})``: each part the mean over its
    masked examples (0 when none), ``loss`` their sum.
  """
  mit = _masked_mean_ce(mit_logits, mit_labels, mit_mask)
  dom = _masked_mean_ce(dom_logits, dom_labels, dom_mask)
  return mit + dom, {"mitosis_loss": mit, "domain_loss": dom}
