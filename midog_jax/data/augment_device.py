"""Patch augmentation on the accelerator: ``augment.py``'s chain as jitted JAX.

With ``config.data.augment_on = "device"`` the host only reads uint8 crops
with the margin the warps need (``PatchConfig.margin`` per side) and their
points in crop coordinates; :func:`augment_batch` then runs elastic
deformation, the shift crop, D4 and the colour transform inside the jitted
train step, so the grain workers do no per-pixel float work.

Conventions are ``augment.py``'s, in the fixed shapes a jitted program needs:
  * ``image`` is uint8 (H, W, 3); ``points`` float32 (P, 2) of (x, y) pixel
    centres, padded, with a bool ``mask`` (P,) of the real ones (the batch's
    ``points`` / ``mask``).
  * Geometric transforms take ``(image, points, mask, <parameters>)`` and
    return ``(image, points, mask)``: points move exactly as their pixels, and
    a point that leaves the output image gets mask False (``augment.in_bounds``'s
    rule, x in [-0.5, W - 0.5), y in [-0.5, H - 0.5)) instead of being dropped.
  * Colour transforms take ``(image, <parameters>)`` and return the image.
  * Given the SAME parameters (D4 index, offset, displacement field, colour
    map) every transform gives ``augment.py``'s pixels (exactly for D4 and the
    shift, within one grey level for bilinear sampling and colour rounding)
    and points (within 1e-3 px); tests/data/test_augment_device.py checks it.
    The random draws come from ``jax.random``, so they are not numpy's.

Randomness: example ``index`` (its global index in the stream, the batch's
``index``) of train step ``step`` uses ``fold_in(fold_in(key(seed), step),
index)``: the same whatever the number of devices or processes and however
the batch is sharded, and the same again when a run resumes at that step.
Each transform folds in its own constant, so turning one of them off does not
change the others' draws.

Optical density is ``stain.py``'s (``rgb_to_od_jnp`` / ``od_to_rgb_jnp``, the
same lookup table and formula as the numpy functions).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage as ndi

from midog_jax.data import augment as augment_lib
from midog_jax.data import stain

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: pixels must match numpy's

# fold_in constants of the per-transform keys (fixed: changing one changes runs).
_ELASTIC, _SHIFT, _D4, _COLOUR = 1, 2, 3, 4


def in_bounds(points: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``augment.in_bounds`` on (..., 2) points: inside an image of ``shape``."""
  h, w = shape[:2]
  x, y = points[..., 0], points[..., 1]
  return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def _result(image, moved, mask):
  moved = moved.astype(jnp.float32)
  return image, moved, mask & in_bounds(moved, image.shape)


# ---------------------------------------------------------------- geometry --


def d4(image: jax.Array, points: jax.Array, mask: jax.Array, index: jax.Array):
  """``augment.d4``: element ``index`` (0..7, may be traced) of the dihedral
  group, rot90(index % 4) after a left-right flip when index >= 4.

  The image must be square: with a traced index, the output shape cannot
  depend on it (training patches are square).
  """
  n, w = image.shape[:2]
  if n != w:
    raise ValueError(f"d4 on the device needs a square image, got {n}x{w}")
  index = jnp.asarray(index, jnp.int32)
  k = index % 4
  cases = [k == r for r in range(4)]
  # One gather from the source pixel of each output pixel (the inverse of the
  # point map below). Not flips and lax.switch over rot90s: under vmap those
  # become selects over all eight candidates, which XLA on the CPU ran ~6x
  # slower than the warp before them.
  rows, cols = jnp.mgrid[0:n, 0:n]
  src_x = jnp.select(cases, [cols, n - 1 - rows, n - 1 - cols, rows])
  src_y = jnp.select(cases, [rows, cols, n - 1 - rows, n - 1 - cols])
  src_x = jnp.where(index >= 4, n - 1 - src_x, src_x)
  image = image[src_y, src_x]
  x = jnp.where(index >= 4, n - 1 - points[..., 0], points[..., 0])
  y = points[..., 1]
  # The point maps of augment.rot90, with H = W = n.
  nx = jnp.select(cases, [x, y, n - 1 - x, n - 1 - y])
  ny = jnp.select(cases, [y, n - 1 - x, n - 1 - y, x])
  return _result(image, jnp.stack([nx, ny], -1), mask)


def shift(image: jax.Array, points: jax.Array, mask: jax.Array,
          offset: jax.Array, max_shift: int):
  """``augment.random_shift`` at a given ``offset`` = (oy, ox), each in
  [0, 2 max_shift]: the (H - 2m) x (W - 2m) window at that offset."""
  h, w = image.shape[:2]
  m = int(max_shift)
  if m < 0 or h - 2 * m < 1 or w - 2 * m < 1:
    raise ValueError(f"max_shift {max_shift} too large for a {h}x{w} input")
  offset = jnp.asarray(offset, jnp.int32)
  out = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h - 2 * m, w - 2 * m, 3))
  return _result(out, points - offset[::-1].astype(jnp.float32), mask)


@functools.lru_cache(maxsize=32)
def _field_operators(h: int, w: int, sigma: float):
  """The linear maps of ``augment.elastic_field``: coarse noise -> field.

  That function Gaussian-filters noise on a grid ``sigma / 4`` apart
  (``mode="reflect"``) and upsamples it linearly; both steps are linear and
  separable, so each axis is one (n_out, n_grid) matrix, built here by
  applying the numpy code itself to an identity matrix (its kernel, border
  rule and interpolation, with no second copy to drift). On the device the
  field is then two small matmuls instead of a convolution and a gather.

  Returns:
    (A_h (h, gh), A_w (w, gw), unit_scale): field = alpha * unit_scale *
    A_h @ noise @ A_w.T for (gh, gw) noise.
  """
  gh, gw, s = augment_lib.field_grid((h, w), sigma)

  def axis_map(g, n):
    smooth = ndi.gaussian_filter1d(np.eye(g), s, axis=0, mode="reflect")
    return augment_lib._upsample(smooth, n, axis=0)  # pylint: disable=protected-access

  return (axis_map(gh, h).astype(np.float32), axis_map(gw, w).astype(np.float32),
          augment_lib.unit_noise_scale(s))


def field_shape(shape: tuple[int, int], sigma: float) -> tuple[int, int, int]:
  """Shape (2, gh, gw) of the coarse noise ``elastic_field`` draws."""
  ah, aw, _ = _field_operators(int(shape[0]), int(shape[1]), float(sigma))
  return 2, ah.shape[1], aw.shape[1]


def field_from_noise(noise: jax.Array, shape: tuple[int, int], alpha: float,
                     sigma: float) -> jax.Array:
  """The (2, H, W) (dy, dx) field ``augment.elastic_field`` makes of ``noise``
  (standard normal of ``field_shape``): smoothed, scaled, upsampled."""
  ah, aw, unit = _field_operators(int(shape[0]), int(shape[1]), float(sigma))
  f = jnp.einsum("hi,cij,wj->chw", jnp.asarray(ah), noise.astype(jnp.float32),
                 jnp.asarray(aw), precision=_HIGHEST)
  return f * jnp.float32(alpha * unit)


def elastic_field(key: jax.Array, shape: tuple[int, int], alpha: float,
                  sigma: float) -> jax.Array:
  """``augment.elastic_field``: smooth random (2, H, W) displacements with
  RMS ``alpha`` px per component and smoothness ``sigma`` px."""
  noise = jax.random.normal(key, field_shape(shape, sigma), jnp.float32)
  return field_from_noise(noise, shape, alpha, sigma)


def _sample(array: jax.Array, rows: jax.Array, cols: jax.Array, mode: str
            ) -> jax.Array:
  """Bilinear samples (..., C) of an (H, W, C) array at float (rows, cols).

  ``ndimage.map_coordinates(order=1)``: the four neighbours' indices are
  extended past the border by ``mode``: "reflect" (half-sample symmetric,
  ``... b a | a b ...``) or "nearest" (edge value).
  """
  h, w = array.shape[:2]
  r0, c0 = jnp.floor(rows), jnp.floor(cols)
  fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
  r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)

  def index(i, n):
    if mode == "nearest":
      return jnp.clip(i, 0, n - 1)
    i = jnp.mod(i, 2 * n)  # reflect has period 2n
    return jnp.where(i >= n, 2 * n - 1 - i, i)

  ra, rb = index(r0, h), index(r0 + 1, h)
  ca, cb = index(c0, w), index(c0 + 1, w)
  a = array.astype(jnp.float32)
  top = a[ra, ca] * (1 - fc) + a[ra, cb] * fc
  bottom = a[rb, ca] * (1 - fc) + a[rb, cb] * fc
  return top * (1 - fr) + bottom * fr


def warp(image: jax.Array, points: jax.Array, mask: jax.Array, field: jax.Array,
         iterations: int = 20):
  """``augment.warp``: ``out(p) = in(p + d(p))``, points moved along.

  The image is sampled bilinearly, reflecting at the border. A point q moves
  to the p with p + d(p) = q, by the fixed-point iteration p <- q - d(p) (d
  bilinear, edge-extended). augment.py iterates to a tolerance; a jitted loop
  runs a fixed count instead: the error shrinks by ~|grad d| per step (about
  0.2 typical, < 1 while the map is one-to-one), so 20 steps are far past
  1e-3 px for the fields ``elastic_field`` makes.
  """
  h, w = image.shape[:2]
  rows = jnp.arange(h, dtype=jnp.float32)[:, None] + field[0]
  cols = jnp.arange(w, dtype=jnp.float32)[None, :] + field[1]
  out = _sample(image, rows, cols, "reflect")
  out = jnp.clip(jnp.rint(out), 0, 255).astype(jnp.uint8)  # as augment.warp
  q = points[..., ::-1].astype(jnp.float32)  # (P, 2) as (row, col)
  d_of = jnp.moveaxis(field, 0, -1)  # (H, W, 2): (dy, dx) per pixel

  def step(_, p):
    return q - _sample(d_of, p[..., 0], p[..., 1], "nearest")

  p = jax.lax.fori_loop(0, iterations, step, q)
  return _result(out, p[..., ::-1], mask)


# ------------------------------------------------------------------ colour --


def _to_uint8(x: jax.Array) -> jax.Array:
  """``augment._to_uint8``: clip to [0, 255], round half up."""
  return jnp.floor(jnp.clip(x, 0, 255) + 0.5).astype(jnp.uint8)


def _apply(x: jax.Array, m: jax.Array, b: jax.Array) -> jax.Array:
  """Row-vector affine map ``pixel @ m + b`` of (..., 3) pixels.

  Three broadcast products rather than a matmul: exact float32 on every
  backend (no TF32), and a 3x3 map is memory-bound anyway.
  """
  return (x[..., :, None] * m.astype(jnp.float32)).sum(-2) + b.astype(jnp.float32)


def random_linear_map(key: jax.Array, strength: float, bias: float,
                      gain: float = 0.2, mix: float = 0.05):
  """``augment._random_linear_map``: diagonal gains 1 +- ``gain`` s, mixing
  +- ``mix`` s off the diagonal, bias +- ``bias`` s; returns (m (3, 3), b (3,))."""
  kg, km, kb = jax.random.split(key, 3)
  s = jnp.float32(strength)
  m = jnp.diag(1 + s * jax.random.uniform(kg, (3,), jnp.float32, -gain, gain))
  off = s * jax.random.uniform(km, (3, 3), jnp.float32, -mix, mix)
  return m + off * (1 - jnp.eye(3, dtype=jnp.float32)), \
      s * jax.random.uniform(kb, (3,), jnp.float32, -bias, bias)


def rgb_affine(image: jax.Array, m: jax.Array, b: jax.Array) -> jax.Array:
  """CA-RGB with a given map: ``pixel @ m + b``, rounded to uint8."""
  return _to_uint8(_apply(image.astype(jnp.float32), m, b))


_HED = stain.DEFAULT_STAIN_MATRIX.astype(np.float64)
_HED_INV = np.linalg.inv(_HED)


def od_affine(image: jax.Array, a: jax.Array, bias: jax.Array) -> jax.Array:
  """CA-OD with a given map (``augment.od_colour``): the concentrations
  ``od @ inv(M)`` of the default stain matrix M are mapped by ``c @ a + bias``
  and mixed back, i.e. ``od @ (inv(M) a M) + bias M`` in OD space."""
  hed, hinv = jnp.asarray(_HED, jnp.float32), jnp.asarray(_HED_INV, jnp.float32)
  m = jnp.matmul(jnp.matmul(hinv, a, precision=_HIGHEST), hed, precision=_HIGHEST)
  b = jnp.matmul(bias, hed, precision=_HIGHEST)
  return stain.od_to_rgb_jnp(_apply(stain.rgb_to_od_jnp(image), m, b))


def rgb_colour(image: jax.Array, key: jax.Array, strength: float = 1.0) -> jax.Array:
  """``augment.rgb_colour`` (Lafarge & Koelzer's CA-RGB) with a jax key."""
  if strength == 0:
    return image
  return rgb_affine(image, *random_linear_map(key, strength, bias=0.08 * 255))


def od_colour(image: jax.Array, key: jax.Array, strength: float = 1.0) -> jax.Array:
  """``augment.od_colour`` (Lafarge & Koelzer's CA-OD) with a jax key."""
  if strength == 0:
    return image
  return od_affine(image, *random_linear_map(key, strength, bias=0.03))


# --------------------------------------------------------------- the chain --


@dataclasses.dataclass(frozen=True)
class DeviceAugmenter:
  """``augment.Augmenter`` on the device, for one example (vmap for a batch).

  Same attributes and order: elastic on the whole input (its reflected border
  lands in the margin), the shift crop of ``max_shift`` per side, D4, colour.
  Hashable, so it can be a static argument of ``jax.jit``.
  """

  d4: bool = True
  max_shift: int = 0
  elastic: tuple[float, float] | None = None
  colour: str = "none"
  strength: float = 1.0

  def __post_init__(self):
    # The same checks as the host augmenter, with its messages.
    augment_lib.Augmenter(d4=self.d4, max_shift=self.max_shift, elastic=self.elastic,
                          colour=self.colour, strength=self.strength)
    if self.elastic is not None:
      object.__setattr__(self, "elastic", tuple(float(v) for v in self.elastic))

  @classmethod
  def from_patch_config(cls, cfg: Any) -> "DeviceAugmenter":
    """The training augmentation of a ``pipeline.PatchConfig`` (as ``PatchMaker``
    builds its host ``Augmenter``: the shift crops the whole margin)."""
    return cls(d4=cfg.d4, max_shift=cfg.margin,
               elastic=((cfg.elastic_alpha, cfg.elastic_sigma)
                        if cfg.elastic_alpha > 0 else None),
               colour=cfg.colour, strength=cfg.colour_strength)

  def __call__(self, key: jax.Array, image: jax.Array, points: jax.Array,
               mask: jax.Array):
    """Augments one crop: (uint8 (H - 2m, W - 2m, 3), points (P, 2), mask (P,)).

    Points that left the image get mask False and coordinates 0 (as the host
    pipeline's padding).
    """
    mask = mask & in_bounds(points, image.shape)
    if self.elastic is not None:
      field = elastic_field(jax.random.fold_in(key, _ELASTIC), image.shape[:2],
                            *self.elastic)
      image, points, mask = warp(image, points, mask, field)
    if self.max_shift:
      offset = jax.random.randint(jax.random.fold_in(key, _SHIFT), (2,), 0,
                                  2 * self.max_shift + 1)
      image, points, mask = shift(image, points, mask, offset, self.max_shift)
    if self.d4:
      index = jax.random.randint(jax.random.fold_in(key, _D4), (), 0, 8)
      image, points, mask = d4(image, points, mask, index)
    if self.colour == "rgb":
      image = rgb_colour(image, jax.random.fold_in(key, _COLOUR), self.strength)
    elif self.colour == "od":
      image = od_colour(image, jax.random.fold_in(key, _COLOUR), self.strength)
    points = jnp.where(mask[..., None], points, 0).astype(jnp.float32)
    return image, points, mask


def example_keys(seed: int | jax.Array, step: jax.Array, index: jax.Array) -> jax.Array:
  """Keys (B,) of examples ``index`` (B,) at train step ``step``."""
  base = jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.uint32))
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(
      jnp.asarray(index).astype(jnp.uint32))


def augment_batch(augmenter: DeviceAugmenter, seed: int | jax.Array, step: jax.Array,
                  batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The batch with ``image``, ``points`` and ``mask`` augmented per example.

  ``batch`` is the device-mode pipeline's (``PatchConfig.augment_on =
  "device"``): uint8 crops (B, S + 2m, S + 2m, 3) with margin m, points in
  crop coordinates, and ``index``, each example's global stream index. Call
  it inside the jitted step (the train loop does); other keys pass through.
  """
  if "index" not in batch:
    raise ValueError("device augmentation needs the batch's 'index' (the "
                     "pipeline adds it when PatchConfig.augment_on='device')")
  keys = example_keys(seed, step, batch["index"])
  image, points, mask = jax.vmap(augmenter)(keys, batch["image"], batch["points"],
                                            batch["mask"])
  return dict(batch, image=image, points=points, mask=mask)
