"""Benchmark suites: scanners, tumour types, protocols and presets (issue 12).

Two suites, each written as a ``train/`` and a ``test/`` folder in the real
MIDOG++ format (see :mod:`midog_jax.data.synthetic.suite_write`):

* ``midog21`` (the MIDOG 2021 protocol): breast-cancer regions from three
  labelled scanners (Hamamatsu XR, Hamamatsu S360, Aperio CS2), a fourth
  scanner without labels (Leica GT450: for methods that use unlabeled images),
  and a test set of held-out regions of the three training scanners plus two
  scanners that appear ONLY in ``test/`` (3D Histech, Zeiss Axioscan Z1).
* ``midogpp`` (MIDOG++ / 2022): the seven tumour types with the scanner, lab
  and species of the MIDOG++ metadata; an official-style train/test split and
  leave-one-domain-out over the train folder.

Domain shift comes from the scanners (stain vectors and densities, white
point, per-channel gamma, saturation, focus, noise, JPEG) and, in ``midogpp``,
from the labs (stain strength) and the tissue (:class:`plan.Tissue`).

Presets: ``tiny`` (tests: ~512 px, a few images per domain), ``small`` (the
demo and the quick leaderboard: ~1024 px) and ``full`` (the real 7215x5412
regions, a GPU user's benchmark).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from midog_jax.data import midog
from midog_jax.data.synthetic import artefacts, raters
from midog_jax.data.synthetic.fields import _rng
from midog_jax.data.synthetic.plan import (DOMAINS, Domain, Figure, Plan,
                                           Tissue, _random_figures)

SUITES = ("midog21", "midogpp")
SUITE_PRESETS = ("tiny", "small", "full")
ROI_TYPES = ("hotspot", "random", "challenging")
HUMAN_AGREEMENT = 0.76  # rater-vs-rater F1 of the real MIDOG++ consensus
LOOKALIKES_PER_MITOSIS = 1.4  # real: 1.2-1.6
AMBIGUOUS_FRACTION = 0.3
SUITE_MITOSIS_KINDS = ("prophase", "metaphase", "anaphase", "telophase", "atypical")
SUITE_MITOSIS_P = (0.22, 0.32, 0.17, 0.17, 0.12)
SUITE_LOOKALIKE_KINDS = ("apoptotic", "lymphocyte", "hyperchromatic")
SUITE_LOOKALIKE_P = (0.4, 0.25, 0.35)

_BY_NAME = {d.name: d for d in DOMAINS}


def _scanner(name: str, **kw) -> Domain:
  return dataclasses.replace(_BY_NAME[name], **kw)


# The three training scanners keep the legacy look plus a mild camera
# response; the unseen two are far from them in every respect a real
# scanner differs in (measured: see the README's benchmark section).
SCANNERS = {
    "Hamamatsu XR": _scanner("Hamamatsu XR"),
    "Hamamatsu S360": _scanner("Hamamatsu S360", gamma=(0.95, 1.0, 1.05),
                               saturation=1.05),
    "Aperio CS2": _scanner("Aperio CS2", gamma=(1.05, 1.0, 0.95), saturation=0.95),
    "Leica GT450": _scanner("Leica GT450", labeled=False, gamma=(0.9, 0.95, 1.0),
                            saturation=1.1),
    "3D Histech": Domain("3D Histech", 0, 0.25, True, (0.45, 0.80, 0.40),
                         (0.05, 0.97, 0.25), 1.35, 0.70, (250, 244, 232), 1.3, 3.0,
                         65, "rgb", gamma=(0.8, 0.9, 1.15), saturation=1.3),
    "Zeiss Axioscan Z1": Domain("Zeiss Axioscan Z1", 0, 0.22, True, (0.70, 0.65, 0.30),
                                (0.25, 0.80, 0.55), 0.70, 1.40, (232, 238, 250), 0.5,
                                1.0, 95, "ycbcr444", gamma=(1.25, 1.1, 0.85),
                                saturation=0.75),
}

BREAST = Tissue("human breast cancer", nucleus_um=1.1, grid_um=7.2, lumen_q=0.03,
                epi_q=0.2, keep_epi=0.99, keep_stroma=0.5, hbg=0.22, eosin=0.75,
                fine_grain=0.3, jitter=0.45)
# MIDOG++ tumour types: (JSON name, csv name, tissue, [(scanner, lab)], species).
TUMOURS = (
    ("human breast cancer", "human breast cancer", BREAST,
     (("Hamamatsu XR", "UMC Utrecht"), ("Hamamatsu S360", "UMC Utrecht"),
      ("Aperio CS2", "UMC Utrecht")), "Human"),
    ("canine lung cancer", "canine lung cancer",
     dataclasses.replace(BREAST, name="canine lung cancer", nucleus_um=0.9,
                         lumen_q=0.10, epi_q=0.30, eosin=0.55),
     (("3D Histech", "VMU Vienna"),), "Canine"),
    ("canine lymphosarcoma", "canine lymphoma",
     dataclasses.replace(BREAST, name="canine lymphosarcoma", nucleus_um=0.75,
                         grid_um=6.8, lumen_q=0.01, epi_q=0.0, keep_epi=0.97,
                         eosin=0.3, dark_fraction=0.3),
     (("3D Histech", "VMU Vienna"),), "Canine"),
    ("canine cutaneous mast cell tumor", "canine cutaneous mast cell tumor",
     dataclasses.replace(BREAST, name="canine cutaneous mast cell tumor",
                         nucleus_um=0.85, grid_um=9.5, epi_q=0.15, granules=1.0),
     (("Aperio CS2", "FU Berlin"),), "Canine"),
    ("human neuroendocrine tumor", "human neuroendocrine tumor",
     dataclasses.replace(BREAST, name="human neuroendocrine tumor", nucleus_um=0.85,
                         epi_q=0.35, fine_grain=0.45),
     (("Hamamatsu XR", "UMC Utrecht"),), "Human"),
    ("canine soft tissue sarcoma", "canine soft tissue sarcoma",
     dataclasses.replace(BREAST, name="canine soft tissue sarcoma", spindle=0.7,
                         epi_q=0.15, eosin=0.5),
     (("3D Histech", "AMC New York"), ("3D Histech", "VMU Vienna")), "Canine"),
    ("human melanoma", "human melanoma",
     dataclasses.replace(BREAST, name="human melanoma", nucleus_um=1.15, grid_um=9.5,
                         melanin=2.0),
     (("Hamamatsu XR", "UMC Utrecht"),), "Human"),
)
# Lab staining protocols scale the two stains (a lab shift on top of the scanner's).
LAB_STAIN = {"UMC Utrecht": (1.0, 1.0), "VMU Vienna": (1.15, 0.85),
             "FU Berlin": (0.9, 1.2), "AMC New York": (1.25, 1.1)}


@dataclasses.dataclass(frozen=True)
class Slot:
  """One image of a suite: its id, folder, domain and everything fixed."""

  image_id: int
  folder: str  # "train" or "test"
  dataset: str  # the csv's Dataset column: "train", "test" or "unlabeled"
  domain: Domain
  tissue: Tissue
  tumour: str  # JSON tumour name
  tumour_csv: str


# (per labelled train domain: train images, test images; unlabeled; unseen)
_COUNTS = {"tiny": (3, 1, 2, 1), "small": (9, 3, 6, 4), "full": (40, 10, 50, 20)}
_SIZE = {"tiny": 512, "small": 1024, "full": None}
_MITOSES = {"tiny": (3, 5), "small": (7, 12), "full": None}


def slots(suite: str, preset: str) -> list[Slot]:
  """Every image of a suite preset, ids ascending (domain k uses ids 100k+1..)."""
  if suite not in SUITES:
    raise ValueError(f"unknown suite {suite!r}; choose from {SUITES}")
  if preset not in SUITE_PRESETS:
    raise ValueError(f"unknown suite preset {preset!r}; choose from {SUITE_PRESETS}")
  n_train, n_test, n_unl, n_unseen = _COUNTS[preset]
  out = []
  if suite == "midog21":
    plan = (("Hamamatsu XR", n_train, n_test), ("Hamamatsu S360", n_train, n_test),
            ("Aperio CS2", n_train, n_test), ("Leica GT450", n_unl, 0),
            ("3D Histech", 0, n_unseen), ("Zeiss Axioscan Z1", 0, n_unseen))
    for k, (name, a, b) in enumerate(plan):
      dom = dataclasses.replace(SCANNERS[name], first_id=100 * k + 1)
      for i in range(a + b):
        test = i >= a
        ds = "test" if test else ("train" if dom.labeled else "unlabeled")
        out.append(Slot(100 * k + 1 + i, "test" if test else "train", ds, dom, BREAST,
                        "human breast cancer", "human breast cancer"))
    return out
  for k, (tumour, tumour_csv, tissue, sources, species) in enumerate(TUMOURS):
    for i in range(n_train + n_test):
      scanner, lab = sources[i % len(sources)]
      h, e = LAB_STAIN[lab]
      base = SCANNERS[scanner]
      dom = dataclasses.replace(base, first_id=100 * k + 1, labeled=True, lab=lab,
                                species=species, h_scale=base.h_scale * h,
                                e_scale=base.e_scale * e)
      test = i >= n_train
      out.append(Slot(100 * k + 1 + i, "test" if test else "train",
                      "test" if test else "train", dom, tissue, tumour, tumour_csv))
  return out


def _kinds(rng, n: int, mitosis: bool) -> list[str]:
  kinds, p = ((SUITE_MITOSIS_KINDS, SUITE_MITOSIS_P) if mitosis
              else (SUITE_LOOKALIKE_KINDS, SUITE_LOOKALIKE_P))
  return [kinds[int(i)] for i in rng.choice(len(kinds), n, p=p)]


def plan_slot(slot: Slot, preset: str, seed: int) -> tuple[Plan, np.ndarray]:
  """The plan of one suite image (votes not yet drawn) and its figures' likeness.

  The ROI type sets the figures: hotspots have twice the mitoses of a random
  region, challenging regions twice the look-alikes and more ambiguity.
  """
  rng = _rng(seed, slot.image_id, 20)
  roi = ROI_TYPES[int(rng.integers(0, 3))]
  sp = slot.domain.spacing_um
  if preset == "full":
    width, height = 7215, 5412
    n_mit = int(rng.poisson(11.5))
  else:
    base = _SIZE[preset]
    width = base + int(rng.integers(-32, 33))
    height = base + int(rng.integers(-32, 33))
    lo, hi = _MITOSES[preset]
    n_mit = int(rng.integers(lo, hi + 1))
  n_mit = max(1, int(round(n_mit * {"hotspot": 1.6, "random": 0.7,
                                    "challenging": 0.8}[roi])))
  ratio = LOOKALIKES_PER_MITOSIS * (2.0 if roi == "challenging" else 1.0)
  n_look = max(1, int(round(ratio * n_mit + rng.normal(0, 1))))
  pts = _random_figures(rng, seed, slot.image_id, width, height, n_mit, n_look,
                        spacing_um=sp, tissue=slot.tissue)
  is_mit = np.array([c == midog.MITOSIS for _, _, c in pts], bool)
  amb = AMBIGUOUS_FRACTION * (1.5 if roi == "challenging" else 1.0)
  likeness = raters.draw_likeness(rng, len(pts), is_mit, amb)
  mk, lk = _kinds(rng, int(is_mit.sum()), True), _kinds(rng, int((~is_mit).sum()), False)
  figures = []
  for (x, y, cat), m in zip(pts, likeness):
    kind = mk.pop() if cat == midog.MITOSIS else lk.pop()
    figures.append(Figure(x, y, cat, kind, likeness=float(m)))
  avoid = np.array([(x, y) for x, y, _ in pts], np.float64).reshape(-1, 2)
  arts = artefacts.plan_artefacts(_rng(seed, slot.image_id, 21), width, height, sp,
                                  slot.tissue.melanin, avoid)
  plan = Plan(seed, slot.image_id, width, height, tuple(figures), slot.domain,
              slot.tissue, roi, arts)
  return plan, likeness


def with_votes(plans: list[Plan], likeness: list[np.ndarray], seed: int
               ) -> tuple[list[Plan], float]:
  """Draws two raters (and a tie-breaker) for every figure of a suite.

  One rater sharpness for the whole suite, calibrated so that the expected
  rater-vs-rater F1 is :data:`HUMAN_AGREEMENT`; each figure's category is
  the majority vote, as in MIDOG++. Returns the plans and the sharpness.
  """
  allm = np.concatenate([m for m in likeness if len(m)]) if plans else np.zeros(0)
  sharp = raters.calibrate(allm, HUMAN_AGREEMENT)
  out = []
  for p, m in zip(plans, likeness):
    votes = raters.simulate(_rng(seed, p.image_id, 22), m, sharp)
    cats = raters.consensus(votes)
    figs = tuple(dataclasses.replace(f, votes=tuple(int(v) for v in vs),
                                     category=int(c))
                 for f, vs, c in zip(p.figures, votes, cats))
    out.append(dataclasses.replace(p, figures=figs))
  return out, float(sharp)
