"""Artefacts of real slides: ink, pigment, debris, folds, blur, air bubbles.

The benchmark suites put them on every image so that stain-residual mining
and a detector's precision have something real to face:

* ``ink``: marker ink at a margin: a large soft blob with an OD direction no
  H&E mixture has (green, blue or black).
* ``pigment``: clusters of brown granules (melanin, hemosiderin): dark dots
  a detector may take for chromatin; brown is outside the H&E plane.
* ``debris``: small dark irregular fragments, nearly hematoxylin-coloured.
* ``fold``: a band where the section lies double (both stains darker).
* ``focus``: a region out of focus (blurred more than the scanner's PSF).
* ``bubble``: an air bubble under the coverslip: dark rim, paler inside.

Sizes are drawn in microns; counts scale with the image area (so a full
7215x5412 region has many, a 512 px test tile one or two). Every artefact's
pixels are a pure function of the coordinates, so bands still join.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KINDS = ("ink", "pigment", "debris", "fold", "focus", "bubble")
# OD directions (unit vectors, R, G, B) of what is not hematoxylin or eosin.
_INK = ((0.70, 0.22, 0.68), (0.74, 0.62, 0.25), (0.58, 0.58, 0.57))  # green, blue, black
_BROWN = (0.32, 0.49, 0.81)  # melanin / hemosiderin
_DEBRIS = (0.55, 0.70, 0.45)
_REF_MM2 = 0.066  # a 1024x1024 region at 0.25 um/px
FOCUS_SIGMA_PX = 3.0  # extra blur inside an out-of-focus region


@dataclasses.dataclass(frozen=True)
class Artefact:
  """One artefact: centre and size in px, and its parts (px offsets, radii)."""

  kind: str
  x: float
  y: float
  size: float  # radius (blob, bubble, focus) or half-width (fold), px
  angle: float = 0.0
  strength: float = 1.0
  vec: tuple[float, float, float] = (0.0, 0.0, 0.0)
  parts: tuple = ()  # (dx, dy, r) granules / fragments

  def rows(self, height: int) -> tuple[int, int]:
    """The rows it touches (folds cross the whole image)."""
    if self.kind == "fold":
      return 0, height
    reach = self.size * 1.6 + 4
    return int(self.y - reach), int(self.y + reach) + 1


def plan_artefacts(rng: np.random.Generator, width: int, height: int, sp: float,
                   melanin: float = 0.0, avoid: np.ndarray | None = None
                   ) -> tuple[Artefact, ...]:
  """Artefacts of one image; pigment and debris keep 10 um off ``avoid`` points."""
  a = width * height * sp * sp / 1e6 / _REF_MM2
  root = math.sqrt(a)
  arts: list[Artefact] = []

  def spot(margin_um: float) -> tuple[float, float] | None:
    for _ in range(50):
      x, y = rng.uniform(0, width), rng.uniform(0, height)
      if avoid is None or len(avoid) == 0 or (
          ((avoid - (x, y)) ** 2).sum(1).min() > (margin_um / sp) ** 2):
        return x, y
    return None

  for _ in range(rng.poisson(0.35 * root)):
    # Ink sits at a margin: centre near a border, mostly outside the image.
    side = int(rng.integers(0, 4))
    r = rng.uniform(50, 160) / sp
    x = rng.uniform(0, width) if side < 2 else (0 if side == 2 else width)
    y = rng.uniform(0, height) if side >= 2 else (0 if side == 0 else height)
    arts.append(Artefact("ink", x, y, r, rng.uniform(0, np.pi), rng.uniform(0.4, 1.1),
                         _INK[int(rng.integers(0, 3))]))
  for _ in range(rng.poisson((2.0 + 5.5 * melanin) * a)):
    xy = spot(12.0)
    if xy is None:
      continue
    r = rng.uniform(2.5, 7.0) / sp
    k = int(rng.integers(8, 40))
    rad, ang = r * np.sqrt(rng.uniform(0, 1, k)), rng.uniform(0, 2 * np.pi, k)
    parts = tuple((float(rad[i] * math.cos(ang[i])), float(rad[i] * math.sin(ang[i])),
                   float(rng.uniform(0.35, 0.9) / sp)) for i in range(k))
    arts.append(Artefact("pigment", *xy, r, 0.0, rng.uniform(0.8, 1.8), _BROWN, parts))
  for _ in range(rng.poisson(5.0 * a)):
    xy = spot(12.0)
    if xy is None:
      continue
    r = rng.uniform(1.5, 4.0) / sp
    parts = tuple((float(rng.normal(0, r / 2)), float(rng.normal(0, r / 2)),
                   float(rng.uniform(0.4, 1.0) * r)) for _ in range(int(rng.integers(2, 5))))
    arts.append(Artefact("debris", *xy, r, 0.0, rng.uniform(1.2, 2.2), _DEBRIS, parts))
  for _ in range(rng.poisson(0.25 * root)):
    arts.append(Artefact("fold", rng.uniform(0, width), rng.uniform(0, height),
                         rng.uniform(8, 25) / sp, rng.uniform(0, np.pi),
                         rng.uniform(0.5, 0.9)))
  for _ in range(rng.poisson(0.3 * root)):
    arts.append(Artefact("focus", rng.uniform(0, width), rng.uniform(0, height),
                         rng.uniform(60, 200) / sp, 0.0, 1.0))
  for _ in range(rng.poisson(0.15 * root)):
    arts.append(Artefact("bubble", rng.uniform(0, width), rng.uniform(0, height),
                         rng.uniform(35, 120) / sp, 0.0, rng.uniform(0.4, 0.8)))
  return tuple(arts)


def _soft(z: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(np.clip(z, -30, 30)))


def apply_band(arts, ya: int, yb: int, width: int, he: np.ndarray, eo: np.ndarray
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """Applies the artefacts to rows [ya, yb) of a band's stain densities.

  Folds and bubbles change ``he``/``eo`` in place; ink, pigment, debris and
  bubble rims come back as extra optical density (rows, width, 3); focus as
  a blend mask (rows, width) for the extra blur. None where there is none.
  """
  extra = focus = None
  ys = np.arange(ya, yb, dtype=np.float32)[:, None]
  for art in arts:
    r0, r1 = art.rows(10 ** 9)
    if art.kind != "fold" and (r1 <= ya or r0 >= yb):
      continue
    if art.kind == "fold":
      x0, x1 = 0, width
    else:
      reach = art.size * 1.6 + 4
      x0, x1 = max(0, int(art.x - reach)), min(width, int(art.x + reach) + 1)
      if x0 >= x1:
        continue
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    dx, dy = xs - art.x, ys - art.y
    if art.kind == "fold":
      d = np.abs(-dx * math.sin(art.angle) + dy * math.cos(art.angle))
      m = (1.0 + art.strength * _soft((art.size - d) / 2.0)).astype(np.float32)
      he[:, x0:x1] *= m
      eo[:, x0:x1] *= m
      continue
    d = np.sqrt(dx * dx + dy * dy)
    if art.kind == "focus":
      focus = np.zeros(he.shape, np.float32) if focus is None else focus
      np.maximum(focus[:, x0:x1], _soft((art.size - d) / (0.15 * art.size)),
                 out=focus[:, x0:x1])
      continue
    if art.kind == "bubble":
      inside = _soft((art.size - d) / 3.0).astype(np.float32)
      he[:, x0:x1] *= 1 - 0.35 * inside
      eo[:, x0:x1] *= 1 - 0.35 * inside
      dens = art.strength * np.exp(-0.5 * ((d - art.size) / 2.5) ** 2)
      vec = (0.58, 0.58, 0.57)
    elif art.kind == "ink":
      wob = 1 + 0.15 * np.cos(3 * np.arctan2(dy, dx) + art.angle)
      dens = art.strength * _soft((art.size * wob - d) / (0.08 * art.size))
      vec = art.vec
    else:  # pigment granules / debris fragments: max of round parts
      dens = np.zeros(d.shape, np.float32)
      for px, py, pr in art.parts:
        q = ((dx - px) ** 2 + (dy - py) ** 2) / (pr * pr)
        if art.kind == "pigment":
          np.maximum(dens, np.exp(-0.5 * q), out=dens)
        else:  # debris: hard-edged fragments
          np.maximum(dens, _soft((1.0 - np.sqrt(q)) * 3.0), out=dens)
      dens = dens * art.strength
      vec = art.vec
    extra = np.zeros(he.shape + (3,), np.float32) if extra is None else extra
    extra[:, x0:x1] += dens[..., None].astype(np.float32) * np.asarray(vec, np.float32)
  return extra, focus
