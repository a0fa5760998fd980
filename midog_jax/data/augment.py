"""Patch augmentation in numpy (runs inside grain worker processes).

Conventions, applied everywhere in this module:
  * ``image`` is uint8 (H, W, 3); ``points`` is float32 (N, 2) of (x, y) =
    (column, row). A point (x, y) refers to the pixel centre at column x, row
    y; pixel i spans [i - 0.5, i + 0.5].
  * Every geometric transform (and ``Augmenter``) takes ``(image, points,
    ...)`` and returns ``(image, points, keep)``: each point is moved exactly
    as its pixel moves, the moved points that left the output image are
    dropped (``in_bounds``), and ``keep`` is the bool (N,) mask over the
    INPUT points of those returned, so the caller filters parallel arrays
    (e.g. classes) with ``classes[keep]``. ``compose_keep`` chains masks.
  * Colour transforms take ``(image, rng, strength)`` and return the image;
    points are untouched. ``strength`` 0 is the identity; 1 is a strong but
    plausible stain/scanner change.
  * ``rng`` is a ``np.random.Generator``; everything is a pure function of it.

The protocol of Lafarge & Koelzer (MIDOG 2022): spatial shifting, flips
(here the full D4 group of flips and 90-degree rotations), elastic
deformation, and linear colour transforms in RGB space (CA-RGB) or
optical-density space (CA-OD). Optical density and the stain matrix are
``stain.py``'s (one convention for the package).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage as ndi

from midog_jax.data import sampling
from midog_jax.data import stain

COLOURS = ("none", "rgb", "od")


def _check(image: np.ndarray, points: np.ndarray) -> np.ndarray:
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} "
                     f"{image.shape}")
  return np.asarray(points, np.float32).reshape(-1, 2)


Geometric = tuple[np.ndarray, np.ndarray, np.ndarray]


def in_bounds(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Keep mask: points whose pixel lies in an image of ``shape`` (H, W, ...).

  That is x in [-0.5, W - 0.5) and y in [-0.5, H - 0.5): the image is the
  window at pixel (0, 0) of ``sampling.points_in_window``.
  """
  return sampling.points_in_window(points, 0, 0, (shape[1], shape[0]))[1]


def compose_keep(first: np.ndarray, second: np.ndarray) -> np.ndarray:
  """Keep mask over the original points after two filtering steps."""
  out = first.copy()
  out[first] = second
  return out


def _result(out: np.ndarray, moved: np.ndarray) -> Geometric:
  moved = np.asarray(moved, np.float32).reshape(-1, 2)
  keep = in_bounds(moved, out.shape)
  return out, moved[keep], keep


# ---------------------------------------------------------------- geometry --


def flip_lr(image: np.ndarray, points: np.ndarray
            ) -> Geometric:
  """Mirror left-right: column c goes to W - 1 - c."""
  points = _check(image, points)
  w = image.shape[1]
  return _result(image[:, ::-1], np.stack([w - 1 - points[:, 0], points[:, 1]], 1))


def rot90(image: np.ndarray, points: np.ndarray, k: int = 1) -> Geometric:
  """``np.rot90(image, k)`` (counter-clockwise as displayed), points moved.

  For k = 1, ``out[i, j] = in[j, W - 1 - i]``: the pixel at (x, y) moves to
  (y, W - 1 - x) and the output is (W, H).
  """
  points = _check(image, points)
  k %= 4
  out = np.rot90(image, k, axes=(0, 1))
  x, y = points[:, 0], points[:, 1]
  h, w = image.shape[:2]
  if k == 1:
    x, y = y, w - 1 - x
  elif k == 2:
    x, y = w - 1 - x, h - 1 - y
  elif k == 3:
    x, y = h - 1 - y, x
  return _result(out, np.stack([x, y], 1))


def d4(image: np.ndarray, points: np.ndarray, index: int) -> Geometric:
  """Element ``index`` (0..7) of the dihedral group: rot90(index % 4) after
  an optional left-right flip (index >= 4). Index 0 is the identity."""
  keep = np.ones(len(_check(image, points)), bool)
  if index >= 4:
    image, points, keep = flip_lr(image, points)
  image, points, k2 = rot90(image, points, index % 4)
  return image, points, compose_keep(keep, k2)


def random_d4(image: np.ndarray, points: np.ndarray, rng: np.random.Generator
              ) -> Geometric:
  """One of the 8 flips/rotations, uniformly."""
  return d4(image, points, int(rng.integers(8)))


def random_shift(image: np.ndarray, points: np.ndarray,
                 rng: np.random.Generator, max_shift: int) -> Geometric:
  """A shift of up to ``max_shift`` px per axis, without border artefacts.

  The input must carry a margin of ``max_shift`` px on every side (the
  pipeline reads a patch ``2 * max_shift`` larger); the output is the
  (H - 2 max_shift) x (W - 2 max_shift) window at a random offset, so a zero
  shift is the centre crop.
  """
  points = _check(image, points)
  h, w = image.shape[:2]
  m = int(max_shift)
  if m < 0 or h - 2 * m < 1 or w - 2 * m < 1:
    raise ValueError(f"max_shift {max_shift} too large for a {h}x{w} input")
  oy, ox = rng.integers(0, 2 * m + 1, 2)
  out = image[oy:oy + h - 2 * m, ox:ox + w - 2 * m]
  return _result(out, points - np.asarray([ox, oy], np.float32))


def elastic_field(shape: tuple[int, int], rng: np.random.Generator,
                  alpha: float, sigma: float) -> np.ndarray:
  """Smooth random displacement field (2, H, W) as (dy, dx) in pixels.

  Gaussian-filtered white noise (Simard et al. 2003), scaled so that each
  component has standard deviation ``alpha`` px in expectation (unlike
  Simard's form, ``alpha`` does not depend on ``sigma``). The field is made
  on a grid ``sigma / 4`` px apart and upsampled linearly (as ``ndimage.zoom``
  with order 1 would, but by a cheaper separable gather):
  a Gaussian of width sigma is smooth on that scale, and the cost drops by
  ~(sigma/4)^2 (a 512 px patch with sigma 16 filters a 129x129 grid). The map
  stays one-to-one while ``alpha`` is well below ``sigma``: the gradient has
  std alpha / (sigma sqrt 2) and peaks near 4x that over a 512 px patch, so
  keep ``alpha <= sigma / 4``.
  """
  h, w = shape
  gh, gw, s = field_grid(shape, sigma)
  noise = rng.standard_normal((2, gh, gw)).astype(np.float32)
  field = ndi.gaussian_filter(noise, (0, s, s), mode="reflect")
  field *= alpha * unit_noise_scale(s)
  # Separable linear upsampling by gathering the two neighbours per axis:
  # ~10x cheaper than ndimage.zoom on the full-size output.
  field = _upsample(field, h, axis=1)
  return _upsample(field, w, axis=2)


def field_grid(shape: tuple[int, int], sigma: float) -> tuple[int, int, float]:
  """(gh, gw, s): the coarse grid ``elastic_field`` draws its noise on (about
  ``sigma / 4`` px apart, at least 2 x 2) and the Gaussian's width on it."""
  step = max(1.0, sigma / 4.0)
  gh = int(np.ceil((shape[0] - 1) / step)) + 1
  gw = int(np.ceil((shape[1] - 1) / step)) + 1
  return max(gh, 2), max(gw, 2), sigma / step


def unit_noise_scale(s: float) -> float:
  """1 / (std of unit white noise Gaussian-filtered with width ``s`` in 2-D):
  that std is the L2 norm of the separable kernel, the squared 1-D norm."""
  delta = np.zeros(int(8 * s) + 1, np.float32)
  delta[len(delta) // 2] = 1
  k = ndi.gaussian_filter1d(delta, s, mode="constant")
  return 1.0 / float(np.sum(k ** 2))


def _upsample(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
  """Linear resampling of ``axis`` to ``n_out`` samples, end points aligned
  (``ndimage.zoom``'s ``grid_mode=False``)."""
  n_in = a.shape[axis]
  if n_in == n_out:
    return a
  pos = np.linspace(0, n_in - 1, n_out, dtype=np.float32)
  lo = np.clip(np.floor(pos).astype(np.int64), 0, max(n_in - 2, 0))
  hi = np.minimum(lo + 1, n_in - 1)
  shape = [1] * a.ndim
  shape[axis] = n_out
  frac = (pos - lo).astype(a.dtype).reshape(shape)
  return np.take(a, lo, axis) * (1 - frac) + np.take(a, hi, axis) * frac


def warp(image: np.ndarray, points: np.ndarray, field: np.ndarray,
         max_iter: int = 50, tol: float = 1e-3) -> Geometric:
  """Backward warp ``out(p) = in(p + d(p))`` with the points moved along.

  A point q of the input moves to the p with p + d(p) = q, found by the
  fixed-point iteration p <- q - d(p) (d bilinearly interpolated) until it
  moves less than ``tol`` px; it converges while |grad d| < 1 (the map is
  one-to-one). The image is sampled bilinearly (``map_coordinates``, order
  1), reflecting at the border.
  """
  points = _check(image, points)
  h, w = image.shape[:2]
  rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
  coords = np.stack([rows + field[0], cols + field[1]])
  out = np.empty(image.shape, np.float32)
  for c in range(3):
    ndi.map_coordinates(image[..., c], coords, output=out[..., c], order=1,
                        mode="reflect")
  out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
  q = points[:, ::-1].T.astype(np.float64)  # (2, N) as (row, col)
  p = q.copy()
  for _ in range(max_iter):
    d = np.stack([ndi.map_coordinates(field[i], p, order=1, mode="nearest")
                  for i in range(2)])
    p, prev = q - d, p
    # Each step shrinks the error by ~|grad d| (about 0.2 typical, < 1 max).
    if not len(p.T) or np.abs(p - prev).max() < tol:
      break
  return _result(out, p[::-1].T)


def elastic(image: np.ndarray, points: np.ndarray, rng: np.random.Generator,
            alpha: float, sigma: float) -> Geometric:
  """Elastic deformation: ``warp`` with an ``elastic_field(alpha, sigma)``.

  ``alpha`` is the RMS displacement in px, ``sigma`` the smoothness in px;
  the field is computed at ~sigma/4 resolution and upsampled, which
  keeps a 512 px patch cheap. E.g. alpha 4, sigma 16 at 0.25 um/px.
  """
  _check(image, points)
  return warp(image, points, elastic_field(image.shape[:2], rng, alpha, sigma))


# ------------------------------------------------------------------ colour --

def _to_uint8(x: np.ndarray) -> np.ndarray:
  """Round and clip to uint8 (in place on ``x``, a float temporary)."""
  np.clip(x, 0, 255, out=x)
  x += 0.5  # truncation of a value in [0.5, 255.5] rounds it
  return x.astype(np.uint8)


def _channels_first(image: np.ndarray) -> np.ndarray:
  """(3, H*W) uint8 view of the pixels.

  Channel-first because numpy's (N, 3) @ (3, 3) does not reach BLAS and is
  ~10x slower than (3, 3) @ (3, N).
  """
  return image.reshape(-1, 3).T


def _to_image(y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Channel-first uint8 (3, H*W) back to a contiguous image of ``shape``."""
  return np.ascontiguousarray(y.T.reshape(shape))


def _affine(x: np.ndarray, m: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-vector affine map ``pixel @ m + b`` of channel-first pixels."""
  y = m.T.astype(np.float32) @ x
  y += b.astype(np.float32)[:, None]
  return y


def _random_linear_map(rng: np.random.Generator, s: float, bias: float,
                       gain: float = 0.2, mix: float = 0.05
                       ) -> tuple[np.ndarray, np.ndarray]:
  """The random 3x3 map and bias of both colour augmentations, at strength ``s``.

  Diagonal gains 1 +- ``gain`` s, off-diagonal mixing +- ``mix`` s, bias
  +- ``bias`` s (drawn in that order).
  """
  m = np.diag(1 + s * rng.uniform(-gain, gain, 3))
  off = s * rng.uniform(-mix, mix, (3, 3))
  np.fill_diagonal(off, 0)
  return m + off, s * rng.uniform(-bias, bias, 3)


def rgb_colour(image: np.ndarray, rng: np.random.Generator,
               strength: float = 1.0) -> np.ndarray:
  """Lafarge & Koelzer's CA-RGB: a random linear map in RGB space.

  Per-channel gain 1 +- 0.2 s, bias +- 0.08 s (of full range) and channel
  mixing +- 0.05 s, with s = ``strength``; ``strength`` 0 is the identity.
  """
  if strength == 0:
    return image.copy()
  m, b = _random_linear_map(rng, float(strength), bias=0.08 * 255)
  x = np.ascontiguousarray(_channels_first(image), np.float32)
  return _to_image(_to_uint8(_affine(x, m, b)), image.shape)


def od_colour(image: np.ndarray, rng: np.random.Generator,
              strength: float = 1.0) -> np.ndarray:
  """Lafarge & Koelzer's CA-OD: a random linear map in optical-density space.

  The OD (``stain.rgb_to_od``) is unmixed into haematoxylin / eosin /
  residual concentrations (``stain.DEFAULT_STAIN_MATRIX``, Ruifrok's
  vectors), each stain scaled by 1 +- 0.2 s, shifted by +- 0.03 s OD and
  mixed with the others by +- 0.05 s, and mixed back; all of it is one 3x3
  map plus bias in OD space. Scaling a stain changes how dark it is while
  white stays white (OD 0), which is how stain and scanner vary.
  ``strength`` 0 is the identity.
  """
  if strength == 0:
    return image.copy()
  a, bias = _random_linear_map(rng, float(strength), bias=0.03)
  # od = c @ M  =>  c = od @ inv(M); c' = c @ a + bias; od' = c' @ M
  hed = stain.DEFAULT_STAIN_MATRIX.astype(np.float64)
  m = np.linalg.inv(hed) @ a @ hed
  od = _affine(stain.rgb_to_od(_channels_first(image)), m, bias @ hed)
  return _to_image(stain.od_to_rgb(od), image.shape)


# --------------------------------------------------------------- the chain --


@dataclasses.dataclass(frozen=True)
class Augmenter:
  """The augmentation chain of the training pipeline.

  Order: elastic (on the whole input, so the reflected border lands in the
  shift margin), shift crop, D4, colour. Colour comes last so it runs on the
  smallest image.

  Attributes:
    d4: random flip/rotation from the 8-element dihedral group.
    max_shift: the input carries this margin per side; the output is the
      input cropped by it at a random offset (``random_shift``).
    elastic: (alpha, sigma) in px, or None (see ``elastic``).
    colour: "none", "rgb" (CA-RGB) or "od" (CA-OD).
    strength: colour strength (0 = identity, 1 = strong).
  """

  d4: bool = True
  max_shift: int = 0
  elastic: tuple[float, float] | None = None
  colour: str = "none"
  strength: float = 1.0

  def __post_init__(self):
    if self.colour not in COLOURS:
      raise ValueError(f"colour must be one of {COLOURS}, got {self.colour!r}")
    if self.elastic is not None and len(self.elastic) != 2:
      raise ValueError(f"elastic must be (alpha, sigma) or None, got {self.elastic!r}")
    if self.max_shift < 0:
      raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")

  def __call__(self, image: np.ndarray, points: np.ndarray,
               rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augments one patch.

    Returns:
      (image uint8 (H', W', 3) contiguous, the points float32 (K, 2) moved
      with the pixels that are still inside, keep bool (N,): which input
      points those are).
    """
    points = _check(image, points)
    keep = np.ones(len(points), bool)
    if self.elastic is not None:
      image, points, k = elastic(image, points, rng, *self.elastic)
      keep = compose_keep(keep, k)
    if self.max_shift:
      image, points, k = random_shift(image, points, rng, self.max_shift)
      keep = compose_keep(keep, k)
    if self.d4:
      image, points, k = random_d4(image, points, rng)
      keep = compose_keep(keep, k)
    if self.colour == "rgb":
      image = rgb_colour(image, rng, self.strength)
    elif self.colour == "od":
      image = od_colour(image, rng, self.strength)
    return np.ascontiguousarray(image), points.astype(np.float32), keep
