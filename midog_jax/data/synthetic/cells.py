"""Cell templates: interphase nuclei, mitotic figures and their imposters.

Each template is a (3, P, P) float32 stamp (hematoxylin add, eosin
multiplier, eosin add) drawn in micron coordinates and converted with the
scanner's pixel spacing.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from midog_jax.data.synthetic.plan import Figure


def _grid(radius_um: float, sp: float) -> tuple[np.ndarray, np.ndarray]:
  c = int(math.ceil(radius_um / sp))
  yy, xx = np.mgrid[-c:c + 1, -c:c + 1].astype(np.float32)
  return xx * sp, yy * sp


def _sigmoid(z):
  return 0.5 * (1.0 + np.tanh(0.5 * np.clip(z, -30, 30)))


def _ellipse(X, Y, cx, cy, a, b, theta, rng=None, wobble=0.0, edge=0.25):
  """Soft mask of a (wobbly) ellipse; ``edge`` is the edge width in um."""
  c, s = math.cos(theta), math.sin(theta)
  u = (X - cx) * c + (Y - cy) * s
  v = -(X - cx) * s + (Y - cy) * c
  r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
  if wobble and rng is not None:
    phi = np.arctan2(v / b, u / a)
    pert = np.ones_like(r)
    for k in (2, 3, 4, 5):
      pert += wobble * rng.normal() / k ** 0.5 * np.cos(k * phi + rng.uniform(0, 6.3))
    r = r / pert
  return _sigmoid((1.0 - r) * math.sqrt(a * b) / edge)


def _strokes(X, Y, p0: np.ndarray, p1: np.ndarray, width: float) -> np.ndarray:
  """Max over K line segments p0->p1 (K, 2) of a Gaussian cross-section."""
  if len(p0) == 0:
    return np.zeros_like(X)
  d = (p1 - p0).astype(np.float32)
  l2 = np.maximum((d ** 2).sum(1), 1e-6)
  out = np.zeros_like(X)
  for k in range(0, len(p0), 16):  # chunks bound the (K, P, P) temporaries
    sl = slice(k, k + 16)
    px = X[None] - p0[sl, 0, None, None]
    py = Y[None] - p0[sl, 1, None, None]
    t = np.clip((px * d[sl, 0, None, None] + py * d[sl, 1, None, None])
                / l2[sl, None, None], 0, 1)
    dist2 = (px - t * d[sl, 0, None, None]) ** 2 + (py - t * d[sl, 1, None, None]) ** 2
    np.maximum(out, np.exp(-dist2 / (2 * width ** 2)).max(0), out=out)
  return out


def _texture(rng, shape, sigma_px):
  n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px)
  return n / (n.std() + 1e-6)


def _chromosomes(rng, centres: np.ndarray, angles: np.ndarray, lo: float,
                 hi: float, spread: float) -> tuple[np.ndarray, np.ndarray]:
  """V-shaped chromosomes: two arms from each centromere (segments p0 -> p1)."""
  k = len(centres)
  a1 = angles + rng.normal(0, spread, k)
  a2 = angles + np.pi + rng.normal(0, spread, k)
  l1, l2 = rng.uniform(lo, hi, k), rng.uniform(lo, hi, k)
  p0 = np.concatenate([centres, centres])
  ang = np.concatenate([a1, a2])
  ln = np.concatenate([l1, l2])
  p1 = p0 + np.stack([np.cos(ang) * ln, np.sin(ang) * ln], 1)
  return p0.astype(np.float32), p1.astype(np.float32)


def _pack(dh, emul, eadd=None) -> np.ndarray:
  if eadd is None:
    eadd = np.zeros_like(dh)
  return np.stack([dh, emul, eadd]).astype(np.float32)


def normal_nucleus(rng, sp: float, dark: bool = False,
                   fibroblast: bool = False, scale: float = 1.0) -> np.ndarray:
  """Interphase nucleus: pale-to-medium chromatin, texture, rim, nucleoli.

  ``scale`` multiplies the nucleus size (tumour types differ in it).
  """
  X, Y = _grid(7.5 * max(scale, 1.0), sp)
  theta = rng.uniform(0, np.pi)
  if fibroblast:
    a, b = rng.uniform(4.5, 7.0), rng.uniform(0.9, 1.4)
    base = rng.uniform(0.7, 1.0)
  else:
    a = rng.uniform(3.0, 5.0)
    b = a * rng.uniform(0.65, 0.95)
    base = rng.uniform(1.0, 1.4) if dark else rng.uniform(0.42, 0.8)
  a, b = a * scale, b * scale
  m = _ellipse(X, Y, 0, 0, a, b, theta, rng, wobble=0.04, edge=0.3)
  tex = _texture(rng, X.shape, 0.35 / sp)
  inner = _ellipse(X, Y, 0, 0, max(a - 0.6, 0.3), max(b - 0.6, 0.3), theta)
  dens = base * (1 + 0.22 * tex) + 0.25 * base * (m - inner)  # darker membrane
  if not fibroblast:
    for _ in range(int(rng.integers(1, 3))):
      r = math.sqrt(rng.uniform(0, 1)) * 0.5 * b
      ang = rng.uniform(0, 2 * np.pi)
      nx, ny = r * math.cos(ang), r * math.sin(ang)
      dens += 0.45 * np.exp(-((X - nx) ** 2 + (Y - ny) ** 2) / (2 * 0.35 ** 2))
  return _pack(m * np.maximum(dens, 0), 1 - 0.55 * m)


def _ambiguity_mitosis(likeness: float | None) -> float:
  """0 for an unmistakable mitosis (likeness 1), 1 at likeness <= 0.5."""
  return 0.0 if likeness is None else float(np.clip(2.0 * (1.0 - likeness), 0.0, 1.0))


def _ambiguity_lookalike(likeness: float | None) -> float:
  """0 for an unmistakable look-alike (likeness 0), 1 at likeness >= 0.5."""
  return 0.0 if likeness is None else float(np.clip(2.0 * likeness, 0.0, 1.0))


def mitotic_figure(rng, sp: float, kind: str, likeness: float | None = None
                   ) -> np.ndarray:
  """A mitosis of the given phase, with a clear cytoplasm halo.

  ``likeness`` below 1 makes it less typical: thicker smoother chromatin,
  less texture, a fainter halo, lower density (towards what a look-alike of
  likeness 0.5 looks like; see :func:`imposter`). None: the legacy look.
  """
  amb = _ambiguity_mitosis(likeness)
  X, Y = _grid(11.0, sp)
  theta = rng.uniform(0, np.pi)
  perp = theta + np.pi / 2  # plate axis = theta; spindle axis = perp
  peak = rng.uniform(1.6, 2.6)
  w = rng.uniform(0.22, 0.3) * (1.0 + 1.2 * amb)  # arm half-width (sigma, um)
  ct, st, cp, spp = math.cos(theta), math.sin(theta), math.cos(perp), math.sin(perp)
  if kind == "prophase":
    r = rng.uniform(3.8, 5.0)
    body = _ellipse(X, Y, 0, 0, r, r * rng.uniform(0.8, 1.0), theta, rng, 0.08)
    k = int(rng.integers(35, 55))
    rad, ang = r * 0.9 * np.sqrt(rng.uniform(0, 1, k)), rng.uniform(0, 2 * np.pi, k)
    cen = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    p0, p1 = _chromosomes(rng, cen, rng.uniform(0, 2 * np.pi, k), 0.5, 1.2, 0.9)
    chrom = np.maximum(_strokes(X, Y, p0, p1, w), 0.35 * body)
    halo = _ellipse(X, Y, 0, 0, r + rng.uniform(2.0, 3.5), r + rng.uniform(2.0, 3.5),
                    theta, rng, 0.05, edge=0.5)
  elif kind == "metaphase":
    lp, th = rng.uniform(7.0, 10.0), rng.uniform(1.2, 2.0)
    k = int(rng.integers(25, 40))
    u, v = rng.uniform(-lp / 2, lp / 2, k), rng.normal(0, th / 4, k)
    cen = np.stack([u * ct - v * st, u * st + v * ct], 1)
    p0, p1 = _chromosomes(rng, cen, np.full(k, perp), 0.8, 2.0, 0.4)
    core = _ellipse(X, Y, 0, 0, lp / 2, th / 2, theta, rng, 0.05)
    chrom = np.maximum(_strokes(X, Y, p0, p1, w), 0.85 * core)
    halo = _ellipse(X, Y, 0, 0, lp / 2 + rng.uniform(2.0, 3.0),
                    th / 2 + rng.uniform(3.0, 4.5), theta, rng, 0.05, edge=0.5)
  elif kind == "anaphase":
    sep, lp = rng.uniform(3.5, 6.0), rng.uniform(6.0, 9.0)
    chrom = np.zeros_like(X)
    for side in (-1, 1):
      ox, oy = side * sep / 2 * cp, side * sep / 2 * spp
      k = int(rng.integers(15, 25))
      u, v = rng.uniform(-lp / 2, lp / 2, k), rng.normal(0, 0.25, k)
      cen = np.stack([ox + u * ct - v * st, oy + u * st + v * ct], 1)
      p0, p1 = _chromosomes(rng, cen, np.full(k, perp), 0.6, 1.6, 0.45)
      core = _ellipse(X, Y, ox, oy, lp / 2, rng.uniform(0.5, 0.8), theta, rng, 0.05)
      chrom = np.maximum(chrom, np.maximum(_strokes(X, Y, p0, p1, w), 0.85 * core))
    halo = _ellipse(X, Y, 0, 0, sep / 2 + rng.uniform(3.5, 4.5),
                    lp / 2 + rng.uniform(2.0, 3.0), perp, rng, 0.05, edge=0.5)
  elif kind == "telophase":
    sep = rng.uniform(7.0, 9.5)
    chrom, halo = np.zeros_like(X), np.zeros_like(X)
    for side in (-1, 1):
      ox, oy = side * sep / 2 * cp, side * sep / 2 * spp
      a, b = rng.uniform(2.2, 3.2), rng.uniform(1.2, 2.0)
      core = _ellipse(X, Y, ox, oy, a, b, theta, rng, 0.12)
      k = int(rng.integers(15, 22))
      u, v = rng.uniform(-a, a, k) * 0.9, rng.uniform(-b, b, k) * 0.8
      cen = np.stack([ox + u * ct - v * st, oy + u * st + v * ct], 1)
      p0, p1 = _chromosomes(rng, cen, rng.uniform(0, 2 * np.pi, k), 0.5, 1.2, 0.8)
      chrom = np.maximum(chrom, np.maximum(_strokes(X, Y, p0, p1, w), 0.75 * core))
      rh = rng.uniform(3.6, 4.6)
      halo = np.maximum(halo, _ellipse(X, Y, ox * 1.1, oy * 1.1, rh, rh, 0.0,
                                       rng, 0.05, edge=0.5))
  elif kind == "atypical":
    # Atypical mitosis: a tripolar division (three chromatin masses) or an
    # anaphase with a lagging chromosome bridge.
    chrom = np.zeros_like(X)
    tripolar = rng.uniform() < 0.5
    n_poles = 3 if tripolar else 2
    sep = rng.uniform(3.0, 4.5)
    for j in range(n_poles):
      ang = theta + 2 * np.pi * j / n_poles + rng.normal(0, 0.2)
      ox, oy = sep * math.cos(ang), sep * math.sin(ang)
      k = int(rng.integers(10, 18))
      cen = np.stack([ox + rng.normal(0, 0.9, k), oy + rng.normal(0, 0.9, k)], 1)
      p0, p1 = _chromosomes(rng, cen, rng.uniform(0, 2 * np.pi, k), 0.5, 1.3, 0.8)
      core = _ellipse(X, Y, ox, oy, rng.uniform(1.4, 2.2), rng.uniform(0.8, 1.3),
                      ang + np.pi / 2, rng, 0.1)
      chrom = np.maximum(chrom, np.maximum(_strokes(X, Y, p0, p1, w), 0.8 * core))
    if not tripolar:  # lagging chromatin between the two masses
      t = rng.uniform(-0.5, 0.5, 6)[:, None]
      lag = np.stack([np.cos(theta) * sep * t[:, 0], np.sin(theta) * sep * t[:, 0]], 1)
      p0, p1 = _chromosomes(rng, lag, np.full(6, theta), 0.4, 1.0, 0.6)
      chrom = np.maximum(chrom, 0.9 * _strokes(X, Y, p0, p1, w))
    r = sep + rng.uniform(2.5, 3.5)
    halo = _ellipse(X, Y, 0, 0, r, r * rng.uniform(0.8, 1.0), theta, rng, 0.05, edge=0.5)
  else:
    raise ValueError(f"unknown mitosis kind {kind!r}")
  # Granular chromatin: dark clumps and threads over a darker body.
  tex = _texture(rng, X.shape, 0.3 / sp)
  if amb:
    # Less typical: chromatin smoothed into a blob, fainter and less textured.
    chrom = ndimage.gaussian_filter(chrom, 0.5 * amb / sp)
    chrom /= max(float(chrom.max()), 1e-6)
    peak *= 1.0 - 0.2 * amb
  dh = peak * chrom * (1 + 0.12 * (1 - 0.6 * amb) * tex)
  emul = 1 - rng.uniform(0.45, 0.9) * (1 - 0.75 * amb) * halo
  return _pack(np.maximum(dh, 0), emul)


def imposter(rng, sp: float, kind: str, likeness: float | None = None) -> np.ndarray:
  """A mitosis look-alike: as dark, but smooth and round.

  ``likeness`` above 0 makes it more mitosis-like: clumped, thread-like
  chromatin over the body and a clear halo (see :func:`_mitosis_like`).
  None: the legacy look.
  """
  tpl = _imposter(rng, sp, kind)
  v = _ambiguity_lookalike(likeness)
  return _mitosis_like(rng, sp, tpl, v) if v else tpl


def _mitosis_like(rng, sp: float, tpl: np.ndarray, v: float) -> np.ndarray:
  """Adds granular chromatin threads and a halo of strength ``v`` to a look-alike."""
  X, Y = _grid(9.0, sp)
  dh, emul, eadd = tpl
  body = dh > 0.3 * max(float(dh.max()), 1e-6)
  r = max(2.0, math.sqrt(float(body.sum())) * sp / 1.77)  # equivalent radius, um
  k = int(15 + 20 * v)
  rad, ang = r * np.sqrt(rng.uniform(0, 1, k)), rng.uniform(0, 2 * np.pi, k)
  cen = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
  p0, p1 = _chromosomes(rng, cen, rng.uniform(0, 2 * np.pi, k), 0.5, 1.3, 0.9)
  threads = _strokes(X, Y, p0, p1, rng.uniform(0.24, 0.32))
  peak = float(dh.max())
  dh = np.maximum(dh * (1 - 0.35 * v), 0.9 * v * peak * threads)
  halo = _ellipse(X, Y, 0, 0, r + 2.5, r + 2.5, 0.0, rng, 0.05, edge=0.5)
  emul = np.minimum(emul, 1 - 0.6 * v * halo)
  eadd = eadd * (1 - v)
  return np.stack([dh, emul, eadd]).astype(np.float32)


def _imposter(rng, sp: float, kind: str) -> np.ndarray:
  X, Y = _grid(9.0, sp)
  if kind == "apoptotic":
    peak = rng.uniform(2.0, 2.6)
    if rng.uniform() < 0.5:
      r = rng.uniform(2.0, 3.2)
      ball = _ellipse(X, Y, 0, 0, r, r * rng.uniform(0.9, 1.0), rng.uniform(0, np.pi),
                      rng, 0.015, edge=0.18)
      dh = peak * ball * (1 - 0.12 * (X ** 2 + Y ** 2) / r ** 2)
    else:
      dh = np.zeros_like(X)
      for _ in range(int(rng.integers(2, 5))):
        r = rng.uniform(0.9, 1.8)
        rad, ang = rng.uniform(0.5, 2.6), rng.uniform(0, 2 * np.pi)
        ball = _ellipse(X, Y, rad * math.cos(ang), rad * math.sin(ang), r, r, 0.0,
                        edge=0.18)
        dh = np.maximum(dh, peak * ball)
    rc = rng.uniform(4.0, 5.5)
    cyto = _ellipse(X, Y, 0, 0, rc, rc * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi),
                    rng, 0.03, edge=0.3)
    ring = _ellipse(X, Y, 0, 0, rc + 1.1, rc + 1.1, 0.0, edge=0.3) - cyto
    return _pack(np.maximum(dh, 0), 1 - 0.7 * np.clip(ring, 0, 1),
                 rng.uniform(0.5, 0.9) * cyto)
  if kind == "lymphocyte":
    r = rng.uniform(2.2, 3.2)
    m = _ellipse(X, Y, 0, 0, r, r * rng.uniform(0.88, 1.0), rng.uniform(0, np.pi),
                 rng, 0.02, edge=0.22)
    tex = _texture(rng, X.shape, 0.6 / sp)
    dh = rng.uniform(1.8, 2.4) * m * (1 + 0.07 * tex)
    rim = _ellipse(X, Y, 0, 0, r + 0.7, r + 0.7, 0.0, edge=0.3)
    return _pack(np.maximum(dh, 0), 1 - 0.5 * rim)
  if kind == "hyperchromatic":
    a = rng.uniform(4.5, 6.5)
    b = a * rng.uniform(0.7, 0.95)
    theta = rng.uniform(0, np.pi)
    m = _ellipse(X, Y, 0, 0, a, b, theta, rng, 0.025, edge=0.25)
    tex = _texture(rng, X.shape, 0.5 / sp)
    dh = rng.uniform(1.6, 2.2) * m * (1 + 0.07 * tex)
    nx, ny = rng.uniform(-1, 1, 2) * 0.3 * b
    dh += 0.4 * m * np.exp(-((X - nx) ** 2 + (Y - ny) ** 2) / (2 * 0.45 ** 2))
    return _pack(np.maximum(dh, 0), 1 - 0.6 * m)
  raise ValueError(f"unknown imposter kind {kind!r}")


MITOTIC_KINDS = ("prophase", "metaphase", "anaphase", "telophase", "atypical")


def figure_template(rng, sp: float, fig: Figure) -> np.ndarray:
  """Template of an annotated figure (mitosis or imposter).

  The morphology follows the figure's kind, not its category: in the
  benchmark suites the category is the raters' consensus, which may call an
  ambiguous mitosis a look-alike or the other way round.
  """
  if fig.kind in MITOTIC_KINDS:
    return mitotic_figure(rng, sp, fig.kind, fig.likeness)
  return imposter(rng, sp, fig.kind, fig.likeness)
