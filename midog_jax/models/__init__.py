"""Flax models: ResNet backbones, RetinaNet, P4 layers and the dense P4 ResNet.

Pure modules: no data code, no normalisation of inputs, no losses, no
collectives. The detectors (``midog_jax.detectors``) wrap them.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (e.g. ``variables["params"]``)."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64)
                 for x in jax.tree_util.tree_leaves(params)))
