"""Flax models: ResNet backbones and RetinaNet (pure modules, no data code)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (e.g. ``variables["params"]``)."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64)
                 for x in jax.tree_util.tree_leaves(params)))


from midog_jax.models.resnet import (  # noqa: E402
    ResNet, freeze, trainable_mask)
from midog_jax.models.retinanet import (  # noqa: E402
    RetinaNet, postprocess, retinanet_tiny)

__all__ = ["count_params", "ResNet", "trainable_mask", "freeze",
           "RetinaNet", "retinanet_tiny", "postprocess"]
