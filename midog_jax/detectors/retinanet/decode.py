"""RetinaNet decoding: anchor outputs -> scored points (jit-able, fixed shapes).

MIDOG detections are points, so duplicates are removed by the distance of box
centres (greedy, highest score first) rather than by IoU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from midog_jax.detectors.retinanet import anchors as anchors_lib


def _suppress_by_distance(points: jax.Array, classes: jax.Array,
                          valid: jax.Array, radius: float,
                          class_agnostic: bool) -> jax.Array:
  """Greedy suppression of score-sorted points, exactly, with fixed shapes.

  Greedy NMS keeps ``i`` iff no kept ``j < i`` lies within ``radius``. The
  fixed point of ``keep <- valid & ~any_{j<i}(keep_j & near_ij)`` started
  from ``valid`` is that greedy answer (entry i is final once entries < i
  are, so at most K rounds), and in practice it settles in a few rounds of
  one (K, K) mask product each, far cheaper than K sequential steps.
  """
  k = points.shape[0]
  d2 = jnp.sum((points[:, None] - points[None]) ** 2, axis=-1)
  near = (d2 < radius * radius) & (jnp.arange(k)[None] < jnp.arange(k)[:, None])
  if not class_agnostic:
    near &= classes[:, None] == classes[None]

  def body(state):
    keep, _, it = state
    new = valid & ~jnp.any(near & keep[None], axis=1)
    return new, jnp.any(new != keep), it + 1

  keep, _, _ = jax.lax.while_loop(lambda s: s[1] & (s[2] <= k), body,
                                  (valid, jnp.array(True), 0))
  return keep


def postprocess(cls_logits: jax.Array, box_deltas: jax.Array,
                anchors: jax.Array, score_thresh: float = 0.05,
                topk: int = 1000, radius: float = 25.0,
                class_agnostic: bool = False
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Detections as points: top-k anchors, decoded, centre-distance suppression.

  MIDOG detections are points, so duplicates are removed by the distance of
  box centres (greedy, highest score first) rather than by IoU. Unlike
  torchvision (top-k per level), the top-k is taken over all levels at once.
  Jit-able; fixed-size output.

  Args:
    cls_logits: (B, A, C) logits; box_deltas: (B, A, 4); anchors: (A, 4).
    score_thresh: minimum sigmoid score.
    topk: candidates kept before suppression, and the output size K.
    radius: suppression radius in pixels (default 25 px, half a cell box).
    class_agnostic: suppress across classes (default: per class, as
      torchvision's batched NMS).

  Returns:
    ``(points (B, K, 2) xy, scores (B, K), classes (B, K) int32,
    valid (B, K) bool)``; valid detections first, by descending score;
    invalid slots have score 0.
  """
  b, a, c = cls_logits.shape
  k = min(int(topk), a * c)
  scores = jax.nn.sigmoid(cls_logits.astype(jnp.float32)).reshape(b, a * c)
  top, idx = jax.lax.top_k(scores, k)  # sorted descending
  anchor_idx, classes = idx // c, (idx % c).astype(jnp.int32)
  deltas = jnp.take_along_axis(box_deltas.astype(jnp.float32),
                               anchor_idx[..., None], axis=1)
  boxes = anchors_lib.decode(jnp.asarray(anchors, jnp.float32)[anchor_idx],
                             deltas)
  points = 0.5 * (boxes[..., :2] + boxes[..., 2:])
  valid = top >= score_thresh
  keep = jax.vmap(lambda p, cl, v: _suppress_by_distance(
      p, cl, v, radius, class_agnostic))(points, classes, valid)
  # Compact: kept first, each group still in descending score (stable sort).
  order = jnp.argsort(~keep, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order if x.ndim == 2
                                       else order[..., None], axis=1)
  keep = take(keep)
  return (take(points), jnp.where(keep, take(top), 0.0), take(classes), keep)
