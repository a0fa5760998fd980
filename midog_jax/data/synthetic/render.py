"""Rendering: per-image layout (fields, stains, cell stamps) and bands of pixels.

An image is rendered in 256-row bands (plus a blur margin) through
Beer-Lambert: hematoxylin and eosin optical densities times the scanner's
stain vectors, exponentiated against its white point, blurred, with sensor
noise on top.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from midog_jax.data.synthetic.cells import (_sigmoid, figure_template,
                                            normal_nucleus)
from midog_jax.data.synthetic.fields import (
    _CELL, _F_EDENS, _F_EPI, _F_HBG, _F_MIX, _F_PATCH, _F_TISSUE, _F_WARP1,
    _F_WARP2, _G_EPI, _G_HBG, _G_MIX, _G_PATCH, _G_PHASE1, _G_PHASE2,
    _G_STROMA, _PAD, _epi, _hash_uniform, _interp, _interp_points, _raw_fields,
    _rng, _tissue)
from midog_jax.data.synthetic import artefacts
from midog_jax.data.synthetic.plan import (Domain, Plan, Tissue, plan_domain,
                                           plan_tissue)

TILE = 256


@dataclasses.dataclass
class Layout:
  """Per-image rendering state (fields, stains, stamps)."""

  plan: Plan
  domain: Domain
  fields: np.ndarray  # (F, gh, gw) float32, standardised
  maps: np.ndarray  # (7, gh, gw) float32 derived maps (_G_*)
  lumen_thr: float
  epi_thr: float
  h_vec: np.ndarray
  e_vec: np.ndarray
  h_scale: float
  e_scale: float
  fibre_angles: tuple[float, float]
  fibre_period_px: float
  stamps: list  # (cx, cy, template (3, P, P))
  stamp_y0: np.ndarray  # first row of each stamp, sorted ascending
  stamp_y1: np.ndarray
  tissue: Tissue


def _make_fields(plan: Plan, dom: Domain, ctr: np.ndarray) -> tuple[np.ndarray,
                                                                    float, float]:
  tis = plan_tissue(plan)
  fields, lumen_thr, epi_thr = _raw_fields(plan.seed, plan.image_id, plan.width,
                                           plan.height, dom.spacing_um,
                                           tis.lumen_q, tis.epi_q)
  _, gh, gw = fields.shape
  if len(ctr):
    # Figures sit in tissue, in epithelium (real positions may fall anywhere
    # in our random fields): lift both fields under a broad smooth bump around
    # each figure, so it ends up inside a tumour nest with its own nuclei.
    gy, gx = np.mgrid[0:gh, 0:gw]
    pos = np.stack([(gx.ravel() - _PAD) * _CELL, (gy.ravel() - _PAD) * _CELL], 1)
    sig = 25.0 / dom.spacing_um
    d, _ = cKDTree(ctr).query(pos, distance_upper_bound=4 * sig)
    bump = np.exp(-0.5 * (np.minimum(d, 4 * sig) / sig) ** 2).reshape(gh, gw)
    bump = bump.astype(np.float32)
    np.maximum(fields[_F_TISSUE], lumen_thr - 0.6 + 1.6 * bump,
               out=fields[_F_TISSUE])
    np.maximum(fields[_F_EPI], epi_thr - 0.6 + 1.5 * bump, out=fields[_F_EPI])
  return fields, lumen_thr, epi_thr


# ----------------------------------------------------------------------------
# Layout: fields, stains, nuclei placement.


def build_layout(plan: Plan) -> Layout:
  """Fields, stain parameters and all cell stamps of one image."""
  dom = plan_domain(plan)
  tis = plan_tissue(plan)
  sp = dom.spacing_um
  ctr = np.array([(f.x, f.y) for f in plan.figures], np.float64).reshape(-1, 2)
  fields, lumen_thr, epi_thr = _make_fields(plan, dom, ctr)

  srng = _rng(plan.seed, plan.image_id, 5)
  h_vec = np.asarray(dom.h_vec) + srng.normal(0, 0.02, 3)
  e_vec = np.asarray(dom.e_vec) + srng.normal(0, 0.02, 3)
  h_vec = np.abs(h_vec) / np.linalg.norm(h_vec)
  e_vec = np.abs(e_vec) / np.linalg.norm(e_vec)
  h_scale = dom.h_scale * srng.uniform(0.92, 1.08)
  e_scale = dom.e_scale * srng.uniform(0.92, 1.08)
  a1 = srng.uniform(0, np.pi)
  angles = (a1, a1 + srng.uniform(0.6, 1.2))
  period = srng.uniform(2.2, 3.0) / sp

  # Normal nuclei on a jittered grid, thinned by tissue type, kept clear of
  # the figures so that each annotated cell stands on its own.
  nrng = _rng(plan.seed, plan.image_id, 3)
  g = tis.grid_um / sp
  gy, gx = np.mgrid[-0.5:plan.height / g + 0.5, -0.5:plan.width / g + 0.5]
  px = (gx.ravel() + nrng.uniform(-tis.jitter, tis.jitter, gx.size)) * g
  py = (gy.ravel() + nrng.uniform(-tis.jitter, tis.jitter, gy.size)) * g
  f = _interp_points(fields, px, py)
  t = _tissue(f[_F_TISSUE], lumen_thr)
  e = _epi(f[_F_EPI], epi_thr)
  keep_p = t * (tis.keep_epi * e + tis.keep_stroma * (1 - e))
  keep = nrng.uniform(0, 1, px.size) < keep_p
  if len(ctr):
    d, _ = cKDTree(ctr).query(np.stack([px, py], 1))
    keep &= d > 8.5 / sp
  px, py, e = px[keep], py[keep], e[keep]
  # Spindle-cell tumours (sarcomas) have spindle nuclei in the tumour too.
  is_fib = nrng.uniform(0, 1, px.size) > e * (1 - tis.spindle)
  is_dark = (~is_fib) & (nrng.uniform(0, 1, px.size) < tis.dark_fraction)

  trng = _rng(plan.seed, plan.image_id, 4)
  n_t = 24
  bank = {
      "epi": [normal_nucleus(trng, sp, scale=tis.nucleus_um) for _ in range(2 * n_t)],
      "dark": [normal_nucleus(trng, sp, dark=True, scale=tis.nucleus_um)
               for _ in range(n_t // 2)],
      "fib": [normal_nucleus(trng, sp, fibroblast=True) for _ in range(n_t)],
  }
  stamps = []
  choice = nrng.integers(0, 1 << 30, px.size)
  orient = nrng.integers(0, 8, px.size)
  for i in range(px.size):
    key = "fib" if is_fib[i] else "dark" if is_dark[i] else "epi"
    tpl = bank[key][choice[i] % len(bank[key])]
    tpl = np.rot90(tpl, orient[i] % 4, axes=(1, 2))
    if orient[i] >= 4:
      tpl = tpl[:, :, ::-1]
    stamps.append((int(round(px[i])), int(round(py[i])), tpl))
  for j, fig in enumerate(plan.figures):
    frng = _rng(plan.seed, plan.image_id, 6, j)
    stamps.append((fig.x, fig.y, figure_template(frng, sp, fig)))
  # Sorted by first row, so a band finds its stamps with one binary search.
  stamps.sort(key=lambda s: s[1] - s[2].shape[1] // 2)
  y0 = np.array([cy - s.shape[1] // 2 for _, cy, s in stamps], np.int64)
  y1 = np.array([cy + s.shape[1] // 2 + 1 for _, cy, s in stamps], np.int64)
  t = _tissue(fields[_F_TISSUE], lumen_thr)
  e = _epi(fields[_F_EPI], epi_thr)
  dens = 1 + 0.12 * fields[_F_EDENS]
  maps = np.stack([
      t * e * dens,  # weight of epithelial cytoplasm eosin
      t * (1 - e) * dens,  # weight of stroma eosin
      t * (tis.hbg + 0.02 * fields[_F_HBG] + 0.04 * e),  # background hematoxylin
      10.0 * fields[_F_WARP1],  # fibre phase warps (radians)
      10.0 * fields[_F_WARP2],
      _sigmoid(2.0 * fields[_F_MIX]),  # blend of the two fibre families
      np.clip(0.65 + 0.5 * fields[_F_PATCH], 0.1, 1.2),  # bundles fade in/out
  ]).astype(np.float32)
  return Layout(plan, dom, fields, maps, lumen_thr, epi_thr, h_vec.astype(np.float32),
                e_vec.astype(np.float32), h_scale, e_scale, angles, period, stamps,
                y0, y1, tis)


def _stamp(h, emul, eadd, ya: int, cx: int, cy: int, tpl: np.ndarray) -> None:
  p = tpl.shape[1]
  c = p // 2
  ty, tx = cy - c - ya, cx - c
  sy0, sy1 = max(0, -ty), min(p, h.shape[0] - ty)
  sx0, sx1 = max(0, -tx), min(p, h.shape[1] - tx)
  if sy0 >= sy1 or sx0 >= sx1:
    return
  dst = (slice(ty + sy0, ty + sy1), slice(tx + sx0, tx + sx1))
  src = (slice(sy0, sy1), slice(sx0, sx1))
  h[dst] += tpl[0][src]
  np.minimum(emul[dst], tpl[1][src], out=emul[dst])
  eadd[dst] += tpl[2][src]


def render_band(lay: Layout, y0: int, y1: int) -> np.ndarray:
  """Rows [y0, y1) of the image as uint8 (y1 - y0, W, 3).

  Everything before the blur is a pure function of pixel coordinates, so
  bands rendered with a margin join without seams.
  """
  dom, plan = lay.domain, lay.plan
  width = plan.width
  tis = lay.tissue
  arts = plan.artefacts
  blur = dom.blur_px
  if any(a.kind == "focus" for a in arts):
    blur = math.hypot(blur, artefacts.FOCUS_SIGMA_PX)
  m = int(math.ceil(4 * blur)) + 1  # blur margin
  gm = 4  # margin of the grain filter
  ya, yb = y0 - m, y1 + m
  ys = np.arange(ya, yb)
  g = _interp(lay.maps, ys, width)
  key = (plan.seed * 1000003 + plan.image_id * 7919) & 0xFFFFFFFF
  grain = _hash_uniform(np.arange(ya - gm, yb + gm), np.arange(width), key)
  grain -= 0.5
  grain = ndimage.gaussian_filter(grain, 1.0, mode="nearest")[gm:-gm]
  grain *= np.float32(12.0)  # ~unit std after smoothing
  # Collagen: two families of wavy fibres (phase-warped cosines), blended.
  k = 2 * np.pi / lay.fibre_period_px
  xs = np.arange(width, dtype=np.float32)
  yf = ys.astype(np.float32)
  fibres = None
  for ang, gi in zip(lay.fibre_angles, (_G_PHASE1, _G_PHASE2)):
    ph = g[gi] + (xs * np.float32(k * math.cos(ang)))[None, :]
    ph += (yf * np.float32(k * math.sin(ang)))[:, None]
    np.cos(ph, out=ph)
    ph += 1.0
    ph *= ph  # (1 + cos)^2 / 4 up to scale: thin bright-dark fibres
    if fibres is None:
      fibres = ph * g[_G_MIX]
    else:
      fibres += ph * (1 - g[_G_MIX])
  fibres *= np.float32(0.25) * g[_G_PATCH]
  eo = fibres
  eo *= 0.45
  eo += 0.45
  eo *= 1 + 0.12 * grain
  eo *= g[_G_STROMA]
  eo += g[_G_EPI] * (tis.eosin + 0.03 * grain)
  he = g[_G_HBG] * (1 + 0.2 * grain)
  if tis.granules:
    # Mast-cell granules: sparse purple dots in the tumour cells' cytoplasm.
    dots = _hash_uniform(ys, np.arange(width), key ^ 0x5BD1E995) > 0.95
    he += np.float32(0.5 * tis.granules) * dots * g[_G_EPI]
  del g, grain
  emul = np.ones_like(he)
  eadd = np.zeros_like(he)
  tallest = int((lay.stamp_y1 - lay.stamp_y0).max(initial=0))
  lo = int(np.searchsorted(lay.stamp_y0, ya - tallest))
  for i in range(lo, len(lay.stamps)):
    if lay.stamp_y0[i] >= yb:
      break
    if lay.stamp_y1[i] <= ya:
      continue
    cx, cy, tpl = lay.stamps[i]
    _stamp(he, emul, eadd, ya, cx, cy, tpl)
  eo *= emul
  eo += eadd
  if tis.fine_grain:
    # Chromatin and cytoplasm texture at the 1-2 px scale (real tissue's
    # high-frequency energy); unit-variance white noise per pixel.
    xs_i = np.arange(width)
    fine = _hash_uniform(ys, xs_i, key ^ 0x27D4EB2F)
    fine -= 0.5
    fine *= np.float32(3.4641 * tis.fine_grain)
    fine += 1.0
    he *= fine
    fine = _hash_uniform(ys, xs_i, key ^ 0x165667B1)
    fine -= 0.5
    fine *= np.float32(3.4641 * 0.5 * tis.fine_grain)
    fine += 1.0
    eo *= fine
    del fine
  extra, focus = artefacts.apply_band(arts, ya, yb, width, he, eo) if arts else (None, None)
  np.maximum(he, 0, out=he)
  np.maximum(eo, 0, out=eo)
  he *= np.float32(lay.h_scale)
  eo *= np.float32(lay.e_scale)
  od = he[..., None] * lay.h_vec
  od += eo[..., None] * lay.e_vec
  if extra is not None:
    od += extra
  od += np.float32(0.01)
  np.negative(od, out=od)
  rgb = np.exp(od, out=od)
  rgb *= np.asarray(dom.white, np.float32)
  rgb = ndimage.gaussian_filter(rgb, (dom.blur_px, dom.blur_px, 0), mode="nearest")
  if focus is not None:
    s2 = artefacts.FOCUS_SIGMA_PX
    rgb += focus[..., None] * (ndimage.gaussian_filter(rgb, (s2, s2, 0), mode="nearest")
                               - rgb)
  rgb = rgb[m:m + (y1 - y0)]
  if dom.gamma != (1.0, 1.0, 1.0) or dom.saturation != 1.0:
    # The camera's colour response: per-channel gamma, then saturation.
    white = np.float32(255.0)
    np.maximum(rgb, 0, out=rgb)
    rgb /= white
    rgb **= np.asarray(dom.gamma, np.float32)
    grey = rgb.mean(-1, keepdims=True)
    rgb -= grey
    rgb *= np.float32(dom.saturation)
    rgb += grey
    rgb *= white
  nrng = _rng(plan.seed, plan.image_id, 7, y0)
  rgb += nrng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(dom.noise)
  np.rint(rgb, out=rgb)
  np.clip(rgb, 0, 255, out=rgb)
  return rgb.astype(np.uint8)


def render_image(plan: Plan) -> Iterator[np.ndarray]:
  """Yields 256-row bands of the whole image, top to bottom."""
  lay = build_layout(plan)
  for y0 in range(0, plan.height, TILE):
    yield render_band(lay, y0, min(plan.height, y0 + TILE))
