"""RetinaNet anchors, box coding and anchor-to-ground-truth matching.

Conventions follow torchvision's RetinaNet so that its behaviour (and, with a
weight converter, its COCO weights) carries over:

* boxes are ``[x1, y1, x2, y2]`` in input pixels, float32;
* level ``l`` has stride ``2**l`` and a ``ceil(H / 2**l) x ceil(W / 2**l)``
  grid (what the backbone's padded stride-2 convolutions produce); the anchors
  of grid cell ``(i, j)`` are centred at ``(j * stride, i * stride)`` (the
  centre of the receptive field of torchvision-padded convolutions);
* order: level (ascending), then row, then column, then anchor (ratio-major,
  size-minor), the same order in which ``RetinaNet`` flattens its outputs;
* box coder weights (1, 1, 1, 1), ``dw``/``dh`` clamped at ``log(1000/16)``;
* matcher: fg IoU >= 0.5, bg IoU < 0.4, in between ignored, plus the
  "low-quality" matches that give every ground-truth box its best anchor.

Default anchors. Every MIDOG label is a 50x50 px box around a cell. The
default sizes are torchvision's three octave scales per level,
``int(4 * 2**l * 2**(k/3))`` (P3: 32, 40, 50; P4: 64, 80, 101; ...), with one
aspect ratio (1.0) because cells are labelled by squares. A 50x50 box whose
centre lies anywhere in the image is at most 4 px (x and y) from a P3 anchor
centre, so the size-50 P3 anchor has IoU >= 46^2 / (2 * 50^2 - 46^2) = 0.73
with it, and the size-64 P4 anchor (<= 8 px off) has IoU >= 0.57: every cell
gets at least two foreground anchors on merit, without the low-quality rule.
``TORCHVISION_RATIOS`` gives torchvision's (and Sheta's report's) 9-anchor layout.

``torchvision_exact=True`` reproduces torchvision's ``AnchorGenerator`` to the
last bit, for converted COCO weights: cell anchors rounded to whole pixels
(computed in float32, round half to even) and the stride of a level taken as
``image_size // grid_size`` (e.g. 800 px: P6 61 px, P7 114 px instead of 64
and 128), which differs from ``2**l`` wherever the size is not a multiple.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from midog_jax.models.retinanet import check_levels

DEFAULT_LEVELS = (3, 4, 5, 6, 7)
DEFAULT_RATIOS = (1.0,)
TORCHVISION_RATIOS = (0.5, 1.0, 2.0)
# torchvision's BoxCoder clamp: exp() of larger log-scales overflows nothing
# useful and destabilises training.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

# Anchor labels returned by `match_anchors`.
FG, BG, IGNORE = 1, 0, -1


def default_sizes(levels: Sequence[int] = DEFAULT_LEVELS
                  ) -> tuple[tuple[int, ...], ...]:
  """torchvision's anchor sizes: three octave scales of ``4 * 2**l`` a level."""
  return tuple(tuple(int(4 * 2**l * 2**(k / 3)) for k in range(3))
               for l in levels)


def level_shapes(image_size: Sequence[int], levels: Sequence[int]
                 ) -> tuple[tuple[int, int], ...]:
  """Feature-map (rows, cols) per level: ``ceil(size / 2**l)``."""
  h, w = int(image_size[0]), int(image_size[1])
  return tuple((-(-h // 2**l), -(-w // 2**l)) for l in levels)


def num_anchors_per_location(sizes: Sequence[Sequence[float]] | None = None,
                             ratios: Sequence[float] = DEFAULT_RATIOS) -> int:
  """Anchors per grid cell (the heads' ``num_anchors``)."""
  sizes = default_sizes() if sizes is None else sizes
  counts = {len(s) for s in sizes}
  if len(counts) != 1:
    # The heads are shared across levels, so every level needs the same count.
    raise ValueError(f"every level needs the same number of sizes, got {sizes}")
  return counts.pop() * len(ratios)


@functools.lru_cache(maxsize=32)
def _anchors_cached(image_size, levels, sizes, ratios, exact=False) -> np.ndarray:
  out = []
  dt = np.float32 if exact else np.float64  # torchvision computes in float32
  ratios_a = np.asarray(ratios, dt)
  h_ratios = np.sqrt(ratios_a)  # ratio = h / w, area kept equal to size**2
  w_ratios = dt(1.0) / h_ratios
  for level, (gh, gw), lsizes in zip(levels, level_shapes(image_size, levels),
                                     sizes):
    sy = sx = 2.0**level
    if exact:
      sy, sx = image_size[0] // gh, image_size[1] // gw
    s = np.asarray(lsizes, dt)
    ws = (w_ratios[:, None] * s[None, :]).reshape(-1)  # ratio-major
    hs = (h_ratios[:, None] * s[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / dt(2.0)  # (a, 4)
    if exact:
      base = np.round(base)  # half to even, as torch.round
    cy, cx = np.meshgrid(np.arange(gh) * sy, np.arange(gw) * sx,
                         indexing="ij")
    shifts = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
    out.append((shifts + base[None]).reshape(-1, 4))
  anchors = np.concatenate(out).astype(np.float32)
  anchors.flags.writeable = False  # shared by the cache: nobody may mutate it
  return anchors


def generate_anchors(image_size: Sequence[int],
                     levels: Sequence[int] = DEFAULT_LEVELS,
                     sizes: Sequence[Sequence[float]] | None = None,
                     ratios: Sequence[float] = DEFAULT_RATIOS,
                     torchvision_exact: bool = False) -> np.ndarray:
  """All anchors of an ``(H, W)`` input, ``(A_total, 4)`` float32 xyxy.

  Args:
    image_size: (H, W) of the network input.
    levels: pyramid levels (stride ``2**l``), ascending, as in the model.
    sizes: one tuple of anchor sizes (sqrt of area, px) per level; None gives
      `default_sizes(levels)`.
    ratios: aspect ratios h/w, shared by all levels.
    torchvision_exact: torchvision's rounded cell anchors and integer
      strides (see the module docstring).

  Returns:
    A read-only cached numpy array; ``A_total = sum_l ceil(H/2^l) *
    ceil(W/2^l) * len(sizes[l]) * len(ratios)``.
  """
  levels = check_levels(levels)
  sizes = default_sizes(levels) if sizes is None else sizes
  sizes = tuple(tuple(float(x) for x in s) for s in sizes)
  if len(sizes) != len(levels):
    raise ValueError(f"need one size tuple per level {levels}, got {sizes}")
  num_anchors_per_location(sizes, ratios)  # validates equal counts
  return _anchors_cached((int(image_size[0]), int(image_size[1])), levels,
                         sizes, tuple(float(r) for r in ratios),
                         bool(torchvision_exact))


def _xyxy_to_cxcywh(b):
  w = b[..., 2] - b[..., 0]
  h = b[..., 3] - b[..., 1]
  return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def encode(anchors: jax.Array, boxes: jax.Array) -> jax.Array:
  """Regression targets ``(dx, dy, dw, dh)`` of ``boxes`` w.r.t. ``anchors``.

  torchvision ``BoxCoder(weights=(1, 1, 1, 1)).encode_single``; shapes
  broadcast, last axis 4.
  """
  ax, ay, aw, ah = _xyxy_to_cxcywh(anchors)
  bx, by, bw, bh = _xyxy_to_cxcywh(boxes)
  return jnp.stack([(bx - ax) / aw, (by - ay) / ah,
                    jnp.log(bw / aw), jnp.log(bh / ah)], axis=-1)


def decode(anchors: jax.Array, deltas: jax.Array) -> jax.Array:
  """Boxes ``[x1, y1, x2, y2]`` from ``deltas`` relative to ``anchors``.

  Inverse of `encode`; ``dw``/``dh`` are clamped at ``log(1000/16)`` as in
  torchvision, so untrained heads cannot produce inf boxes.
  """
  ax, ay, aw, ah = _xyxy_to_cxcywh(anchors)
  dx, dy = deltas[..., 0], deltas[..., 1]
  dw = jnp.minimum(deltas[..., 2], BBOX_XFORM_CLIP)
  dh = jnp.minimum(deltas[..., 3], BBOX_XFORM_CLIP)
  cx, cy = dx * aw + ax, dy * ah + ay
  w, h = jnp.exp(dw) * aw, jnp.exp(dh) * ah
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h],
                   axis=-1)


def box_area(b: jax.Array) -> jax.Array:
  """Area of xyxy boxes (negative extents count as zero)."""
  return (jnp.maximum(b[..., 2] - b[..., 0], 0.0)
          * jnp.maximum(b[..., 3] - b[..., 1], 0.0))


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise IoU, ``(N, 4) x (M, 4) -> (N, M)``; 0 where the union is empty."""
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def match_anchors(anchors: jax.Array, gt_boxes: jax.Array, gt_mask: jax.Array,
                  fg_iou: float = 0.5, bg_iou: float = 0.4,
                  allow_low_quality: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
  """Assigns every anchor to a ground-truth box (torchvision ``Matcher``).

  Jit-able with fixed shapes: ground truth is padded to ``G`` boxes with a
  validity mask. A leading batch axis on ``gt_boxes``/``gt_mask`` is mapped.

  Args:
    anchors: (A, 4) xyxy.
    gt_boxes: (G, 4) or (B, G, 4) xyxy, padding arbitrary.
    gt_mask: (G,) or (B, G) bool, True for real boxes.
    fg_iou: IoU at or above which an anchor is foreground.
    bg_iou: IoU below which an anchor is background; in between is ignored.
    allow_low_quality: also make foreground, for each box, the anchors with
      its highest IoU (ties included). As in torchvision, such an anchor keeps
      its own best box. Unlike torchvision, a box that overlaps no anchor at
      all (IoU 0 everywhere, e.g. degenerate) claims nothing.

  Returns:
    ``(matched, labels)``: int32 (..., A) index of the assigned box (0 where
    not foreground) and int32 (..., A) labels `FG`/`BG`/`IGNORE`.
  """
  if gt_boxes.ndim == 3:
    fn = functools.partial(match_anchors, fg_iou=fg_iou, bg_iou=bg_iou,
                           allow_low_quality=allow_low_quality)
    return jax.vmap(fn, in_axes=(None, 0, 0))(anchors, gt_boxes, gt_mask)
  num_anchors = anchors.shape[0]
  if gt_boxes.shape[0] == 0:
    zeros = jnp.zeros((num_anchors,), jnp.int32)
    return zeros, zeros + BG
  gt_mask = gt_mask.astype(bool)
  # Padding gets IoU -1 so it never wins the argmax against a real box.
  iou = jnp.where(gt_mask[:, None], box_iou(gt_boxes, anchors), -1.0)  # (G, A)
  best_iou = iou.max(axis=0)
  matched = iou.argmax(axis=0).astype(jnp.int32)
  labels = jnp.where(best_iou >= fg_iou, FG,
                     jnp.where(best_iou < bg_iou, BG, IGNORE))
  if allow_low_quality:
    best_per_gt = iou.max(axis=1, keepdims=True)  # (G, 1)
    is_best = (iou == best_per_gt) & (best_per_gt > 0) & gt_mask[:, None]
    labels = jnp.where(is_best.any(axis=0), FG, labels)
  labels = labels.astype(jnp.int32)
  matched = jnp.where(labels == FG, matched, 0)
  return matched, labels
