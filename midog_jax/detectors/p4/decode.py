"""P4 dense-map decoding: output indices -> pixels, strict local maxima.

See the ``midog_jax.detectors.p4`` docstring for the coordinate convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from midog_jax.models import p4_resnet as pr


def output_to_pixels(rows: jax.Array, cols: jax.Array, rf: int,
                     stride: int = pr.STRIDE) -> jax.Array:
  """Output-map indices -> (..., 2) float32 (x, y) in the input's pixel-index coords.

  ``stride`` 2 for the network's own map, 1 for the shift-and-stitch map.
  """
  off = rf / 2 - 0.5
  return jnp.stack([stride * cols + off, stride * rows + off],
                   axis=-1).astype(jnp.float32)


def local_maxima(logits: jax.Array, window: int) -> jax.Array:
  """Bool mask of STRICT local maxima of ``logits`` (B, H, W).

  A point is kept iff it is larger than every other point of its
  ``window`` x ``window`` neighbourhood (cut at the map border). Strict, so
  that exact ties cannot make the result depend on orientation: any rule that
  picks one member of a plateau breaks rotation symmetry somewhere (a plateau
  can be symmetric), while "no member of a plateau" is symmetric. Plateaus
  are regions where the network's output is exactly constant (e.g. every
  feature of the last layer rectified to zero), not detections. Works on
  logits, not probabilities, so that a saturated sigmoid cannot make ties.
  """
  r = window // 2
  _, h, w = logits.shape
  padded = jnp.pad(logits, ((0, 0), (r, r), (r, r)), constant_values=-jnp.inf)
  others = jnp.full_like(logits, -jnp.inf)
  for dy in range(window):
    for dx in range(window):
      if (dy, dx) != (r, r):
        others = jnp.maximum(others, padded[:, dy:dy + h, dx:dx + w])
  return logits > others
