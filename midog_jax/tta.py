"""Test-time augmentation: the eight D4 views of a whole image, merged back.

Any detector, any image size: each view (a left-right flip or not, then
``k`` quarter turns, as ``np.rot90``) is read lazily through :class:`View`
(the tiles of the view are cut from the original image and turned), detected
with ``infer.detect`` exactly as the image itself, and its points are mapped
back into the original's pixel coordinates. :func:`merge_views` then joins the
views' detections of one figure: greedily from the highest score, a cluster
takes, from every other view, the nearest unclaimed detection within
``radius``; its score is the MEAN over all eight views (a view without a
detection there counts 0, so a figure seen in one view only scores an
eighth), its position the score-weighted mean. The set of eight views is the
same for an image and any flip or rotation of it, so TTA output is
equivariant for every detector (tested), at eight times the cost.

MIDOG 2025's winner used D4 TTA; the challenge report found it helped little
on average. It is off by default (``eval.tta``, ``predict --tta``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.spatial import cKDTree

from midog_jax import infer
from midog_jax.detections import Detections

# (quarter turns k, flip first) of the eight views; the identity first.
D4 = tuple((k, flip) for flip in (False, True) for k in range(4))


class View:
  """``rot90(fliplr(image) if flip else image, k)``, read lazily tile by tile.

  Has ``width``, ``height`` and ``read(x, y, w, h)`` like ``slides.Slide``, so
  ``infer.detect`` tiles it as any image.
  """

  def __init__(self, width: int, height: int, read: Callable, k: int, flip: bool):
    self.src_width, self.src_height, self._read = int(width), int(height), read
    self.k, self.flip = int(k) % 4, bool(flip)
    self.width, self.height = ((self.src_height, self.src_width) if self.k % 2
                               else (self.src_width, self.src_height))

  def to_view(self, xy: np.ndarray) -> np.ndarray:
    """Original pixel-index (x, y) -> this view's."""
    x, y = np.asarray(xy, np.float64).reshape(-1, 2).T
    w, h = self.src_width, self.src_height
    if self.flip:
      x = (w - 1) - x
    for _ in range(self.k):  # np.rot90: (x, y) -> (y, W - 1 - x), sides swap
      x, y, w, h = y, (w - 1) - x, h, w
    return np.stack([x, y], axis=1)

  def from_view(self, xy: np.ndarray) -> np.ndarray:
    """This view's pixel-index (x, y) -> the original's."""
    x, y = np.asarray(xy, np.float64).reshape(-1, 2).T
    w, h = self.width, self.height
    for _ in range(self.k):  # undo one turn: (x', y') -> (W_before - 1 - y', x')
      x, y, w, h = (h - 1) - y, x, h, w
    if self.flip:
      x = (w - 1) - x
    return np.stack([x, y], axis=1)

  def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The view's (h, w, 3) region at (x, y); beyond the image: white, as slides pad."""
    corners = self.from_view(np.array([[x, y], [x + w - 1, y + h - 1]], np.float64))
    (x0, y0), (x1, y1) = corners.min(0).astype(int), corners.max(0).astype(int)
    arr = self._read(int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1))
    if self.flip:
      arr = arr[:, ::-1]
    return np.ascontiguousarray(np.rot90(arr, self.k))


def merge_views(views: list[Detections], radius: float) -> Detections:
  """One detection per figure from the views' detections (original coordinates)."""
  n = len(views)
  xy = np.concatenate([v.xy for v in views]).astype(np.float64) if views else np.zeros((0, 2))
  if len(xy) == 0:
    return Detections(np.zeros((0, 2)), np.zeros(0))
  s = np.concatenate([v.scores for v in views]).astype(np.float64)
  cls = np.concatenate([v.classes for v in views])
  view = np.concatenate([np.full(len(v), i) for i, v in enumerate(views)])
  tree = cKDTree(xy)
  used = np.zeros(len(xy), bool)
  out_xy, out_s, out_c = [], [], []
  for i in np.lexsort((xy[:, 1], xy[:, 0], -s)):
    if used[i]:
      continue
    members = [i]
    used[i] = True
    near = np.asarray(tree.query_ball_point(xy[i], radius), np.int64)
    near = near[~used[near]]
    if len(near):
      d = np.hypot(*(xy[near] - xy[i]).T)
      for j in near[np.argsort(d, kind="stable")]:
        if not used[j] and view[j] not in view[members]:
          members.append(j)
          used[j] = True
    m = np.asarray(members)
    out_xy.append((xy[m] * s[m, None]).sum(0) / max(s[m].sum(), 1e-12))
    out_s.append(s[m].sum() / n)
    out_c.append(cls[i])
  return Detections(np.asarray(out_xy), np.asarray(out_s), np.asarray(out_c))


def detect(source, tile_fn, variables, cfg: infer.TileConfig, mesh=None,
           radius: float | None = None) -> Detections:
  """D4 test-time augmentation around ``infer.detect`` (module docstring).

  ``radius`` (px) joins the views' detections of one figure; default: the
  tiling's ``merge_radius`` (at least 1 px).
  """
  w, h, read = infer.image_reader(source)
  radius = max(cfg.merge_radius, 1.0) if radius is None else radius
  views = []
  for k, flip in D4:
    v = View(w, h, read, k, flip)
    d = infer.detect(v, tile_fn, variables, cfg, mesh)
    views.append(Detections(v.from_view(d.xy), d.scores, d.classes))
  return merge_views(views, radius)
