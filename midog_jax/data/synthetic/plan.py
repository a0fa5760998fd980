"""Planning: scanner domains, presets, image sizes and figure positions.

A ``Plan`` fixes everything about one image before any pixel is rendered; it
is cheap, deterministic in (preset, seed, image id), and made in the parent
process.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from midog_jax.data import midog
from midog_jax.data.synthetic.fields import (_F_EPI, _F_TISSUE, _epi,
                                             _interp_points, _raw_fields, _rng,
                                             _tissue)

PRESETS = ("tiny", "small", "midog21")
MIN_SEP_PX = 60  # minimum distance between random figure centres
IMPOSTERS_PER_MITOSIS = 1.6

MITOSIS_KINDS = ("prophase", "metaphase", "anaphase", "telophase")
MITOSIS_P = (0.25, 0.35, 0.2, 0.2)
IMPOSTER_KINDS = ("apoptotic", "lymphocyte", "hyperchromatic")
IMPOSTER_P = (0.4, 0.3, 0.3)


@dataclasses.dataclass(frozen=True)
class Domain:
  """Rendering parameters of one synthetic scanner."""

  name: str
  first_id: int
  spacing_um: float
  labeled: bool
  h_vec: tuple[float, float, float]  # OD direction of hematoxylin
  e_vec: tuple[float, float, float]  # OD direction of eosin
  h_scale: float  # stain density multipliers
  e_scale: float
  white: tuple[float, float, float]  # RGB of empty glass
  blur_px: float  # Gaussian PSF sigma
  noise: float  # sensor noise std (intensity units)
  jpeg_quality: int
  jpeg_mode: str  # "ycbcr420", "ycbcr444" or "rgb" (JPEG colour space)
  # Colour response of the camera, applied to intensities in [0, 1] after
  # Beer-Lambert: a per-channel gamma, then a 3x3 mixing (saturation and
  # crosstalk). The legacy presets use the identity.
  gamma: tuple[float, float, float] = (1.0, 1.0, 1.0)
  saturation: float = 1.0
  lab: str = "UMC Utrecht"
  species: str = "Human"


DOMAINS = (
    Domain("Hamamatsu XR", 1, 0.23, True, (0.60, 0.73, 0.33), (0.14, 0.88, 0.45),
           1.00, 1.00, (242, 240, 246), 0.8, 2.0, 90, "ycbcr444"),
    Domain("Hamamatsu S360", 51, 0.23, True, (0.54, 0.76, 0.37),
           (0.10, 0.92, 0.38), 0.90, 1.10, (248, 246, 247), 0.6, 1.5, 85, "ycbcr420"),
    Domain("Aperio CS2", 101, 0.25, True, (0.66, 0.70, 0.27), (0.20, 0.84, 0.50),
           1.15, 0.90, (236, 233, 228), 1.0, 2.5, 70, "rgb"),
    Domain("Leica GT450", 151, 0.25, False, (0.57, 0.76, 0.31),
           (0.07, 0.95, 0.31), 0.85, 1.20, (251, 250, 252), 0.55, 1.2, 80, "ycbcr420"),
)


@dataclasses.dataclass(frozen=True)
class Tissue:
  """How a tumour type looks: cell size, crowding, stroma, special features.

  ``LEGACY`` reproduces the presets ``tiny``/``small``/``midog21`` exactly;
  the benchmark suites use denser, more textured looks (issue 12).
  """

  name: str = "legacy"
  nucleus_um: float = 1.0  # nucleus size multiplier
  grid_um: float = 10.5  # spacing of the jittered nucleus grid
  lumen_q: float = 0.12  # quantile of the tissue field that is glass/lumen
  epi_q: float = 0.40  # quantile of the epithelium field that is stroma
  keep_epi: float = 0.92  # nucleus keep probability in epithelium / stroma
  keep_stroma: float = 0.22
  dark_fraction: float = 0.12  # share of darker interphase nuclei
  spindle: float = 0.0  # extra share of spindle nuclei in tumour
  hbg: float = 0.06  # background hematoxylin of tissue
  eosin: float = 0.5  # eosin density of tumour cytoplasm
  fine_grain: float = 0.0  # 1-2 px chromatin/cytoplasm texture amplitude
  granules: float = 0.0  # mast-cell cytoplasm granules (purple dots) per nucleus
  melanin: float = 0.0  # melanin granule clusters per 100x100 um
  jitter: float = 0.3  # grid jitter (fraction of the grid step)


LEGACY = Tissue()


def domain_of(image_id: int) -> Domain:
  """The synthetic scanner of an image id (MIDOG 2021 id ranges)."""
  for d in reversed(DOMAINS):
    if image_id >= d.first_id:
      return d
  raise ValueError(f"image id {image_id} is below 1")


def plan_domain(plan: "Plan") -> Domain:
  """The scanner of a planned image (suites carry it; legacy: by id range)."""
  return plan.domain if plan.domain is not None else domain_of(plan.image_id)


def plan_tissue(plan: "Plan") -> Tissue:
  return plan.tissue if plan.tissue is not None else LEGACY


# ----------------------------------------------------------------------------
# Planning: image sizes and figure positions (cheap; done in the parent).


@dataclasses.dataclass(frozen=True)
class Figure:
  """One annotated cell: centre in px, category (1/2) and morphology kind."""

  x: int
  y: int
  category: int
  kind: str
  bbox: tuple | None = None  # real box (midog21); None -> 50x50 around (x, y)
  ann_id: int | None = None  # real annotation id (midog21)
  # Benchmark suites: how mitosis-like the cell looks (1 = unmistakable
  # mitosis, 0 = unmistakable look-alike; None = the legacy appearance) and
  # the simulated raters' votes in the MIDOG++ ``labels`` format.
  likeness: float | None = None
  votes: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything needed to render one image, fixed before rendering."""

  seed: int
  image_id: int
  width: int
  height: int
  figures: tuple[Figure, ...]
  # Benchmark suites carry their scanner, tissue look, ROI type and artefacts;
  # the legacy presets leave them None (scanner by id range, legacy look).
  domain: Domain | None = None
  tissue: "Tissue | None" = None
  roi_type: str = ""
  artefacts: tuple = ()


def _random_figures(rng: np.random.Generator, seed: int, image_id: int,
                    width: int, height: int, n_mit: int, n_imp: int,
                    spacing_um: float | None = None, tissue: Tissue = LEGACY
                    ) -> list[tuple[int, int, int]]:
  """Centres at least MIN_SEP_PX apart and 40 px from the border.

  Figures go where the image's own fields put tumour epithelium (as in real
  tissue); a figure that finds no room there after many tries goes anywhere.
  """
  sp = spacing_um if spacing_um is not None else domain_of(image_id).spacing_um
  fields, lumen_thr, epi_thr = _raw_fields(seed, image_id, width, height, sp,
                                           tissue.lumen_q, tissue.epi_q)
  pts: list[tuple[int, int, int]] = []
  cats = [midog.MITOSIS] * n_mit + [midog.IMPOSTER] * n_imp
  cats = [cats[i] for i in rng.permutation(len(cats))]
  for cat in cats:
    xy = np.stack([rng.integers(40, width - 40, 400),
                   rng.integers(40, height - 40, 400)], 1)
    f = _interp_points(fields, xy[:, 0], xy[:, 1])
    good = (_tissue(f[_F_TISSUE], lumen_thr) > 0.99) & (
        _epi(f[_F_EPI], epi_thr) > 0.8)
    xy = np.concatenate([xy[good], xy[~good]])  # preferred ones first
    if pts:
      d2 = ((xy[:, None, :] - np.asarray(pts)[None, :, :2]) ** 2).sum(-1).min(1)
      xy = xy[d2 >= MIN_SEP_PX ** 2]
    if len(xy):
      pts.append((int(xy[0, 0]), int(xy[0, 1]), cat))
  return pts


def _kind(rng: np.random.Generator, category: int) -> str:
  if category == midog.MITOSIS:
    return MITOSIS_KINDS[int(rng.choice(len(MITOSIS_KINDS), p=MITOSIS_P))]
  return IMPOSTER_KINDS[int(rng.choice(len(IMPOSTER_KINDS), p=IMPOSTER_P))]


def _n_imposters(rng: np.random.Generator, n_mit: int) -> int:
  return max(1, int(round(IMPOSTERS_PER_MITOSIS * n_mit + rng.normal(0, 1))))


def preset_ids(preset: str, real: dict | None = None) -> list[int]:
  """All image ids of a preset, ascending."""
  if preset == "tiny":
    return [d.first_id + i for d in DOMAINS for i in range(2)]
  if preset == "small":
    return [d.first_id + i for d in DOMAINS for i in range(10)]
  if preset == "midog21":
    return sorted(im["id"] for im in real["images"])
  raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")


# Region sizes of the real MIDOG 2021 scanners (mean, +- spread), from MIDOG.json.
_MIDOG21_SIZES = {1: (7215, 5412, 0), 51: (7120, 5335, 40), 101: (6475, 4845, 30),
                  151: (6205, 4665, 30)}


def standin_midog21(seed: int) -> dict:
  """A stand-in for the real ``MIDOG.json`` where it is not at hand.

  The 200 ids, the scanners' region sizes, and no annotations: with
  ``generated`` set, :func:`plan_image` draws figures at random positions at
  the real density, so ``--preset midog21`` works from a bare clone.
  """
  images = []
  for d in DOMAINS:
    w, h, spread = _MIDOG21_SIZES[d.first_id]
    for i in range(50):
      rng = _rng(seed, d.first_id + i, 30)
      images.append({"id": d.first_id + i, "file_name": f"{d.first_id + i:03d}.tiff",
                     "width": w + int(rng.integers(-spread, spread + 1)),
                     "height": h + int(rng.integers(-spread, spread + 1))})
  return {"images": images, "annotations": [], "generated": True}


def plan_image(preset: str, seed: int, image_id: int, real: dict | None = None,
               scale: float = 1.0) -> Plan:
  """Size and figures of one image (deterministic in preset, seed, id)."""
  rng = _rng(seed, image_id, 0)
  figures: list[Figure] = []
  if preset in ("tiny", "small"):
    base, n_lo, n_hi = (512, 3, 5) if preset == "tiny" else (1200, 8, 15)
    width = base + int(rng.integers(-32, 33))
    height = base + int(rng.integers(-32, 33))
    n_mit = int(rng.integers(n_lo, n_hi + 1))
    for x, y, cat in _random_figures(rng, seed, image_id, width, height, n_mit,
                                     _n_imposters(rng, n_mit)):
      figures.append(Figure(x, y, cat, _kind(rng, cat)))
    return Plan(seed, image_id, width, height, tuple(figures))
  if preset != "midog21":
    raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
  im = next(i for i in real["images"] if i["id"] == image_id)
  width = max(64, int(round(im["width"] * scale)))
  height = max(64, int(round(im["height"] * scale)))
  anns = [a for a in real["annotations"] if a["image_id"] == image_id]
  if anns:
    for a in anns:
      x1, y1, x2, y2 = (float(v) * scale for v in a["bbox"])
      cx = min(max(int(round((x1 + x2) / 2)), 0), width - 1)
      cy = min(max(int(round((y1 + y2) / 2)), 0), height - 1)
      box = tuple(a["bbox"]) if scale == 1.0 else None
      figures.append(Figure(cx, cy, a["category_id"],
                            _kind(rng, a["category_id"]), box, a["id"]))
  elif not domain_of(image_id).labeled or real.get("generated"):
    # The real GT450 cases have no labels (and a stand-in has no positions):
    # random figures at the real labelled images' average density (11.5
    # mitoses, 18 imposters).
    n_mit = max(1, int(rng.poisson(11.5 * scale ** 2)))
    for x, y, cat in _random_figures(rng, seed, image_id, width, height, n_mit,
                                     _n_imposters(rng, n_mit)):
      figures.append(Figure(x, y, cat, _kind(rng, cat)))
  return Plan(seed, image_id, width, height, tuple(figures))
