"""MIDOG 2021 / 2022 / MIDOG++ annotation readers, domains and splits.

The real releases are read as published (see ``shared/data/midog/README.md``):
COCO-like JSON whose ``bbox`` is ``[x1, y1, x2, y2]`` (50x50 px around the
cell), category 1 = mitotic figure, 2 = imposter ("not mitotic figure").
A case's labels are kept as centre points in pixels; boxes that reach past the
border are kept with their centre clipped onto the image, boxes wholly off the
image are rejected as corrupt.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from midog_jax.detections import IMPOSTER, MITOSIS
from midog_jax.errors import DataError
from midog_jax.fileio import read_json

CATEGORY_NAMES = {MITOSIS: "mitotic figure", IMPOSTER: "not mitotic figure"}

# MIDOG 2021: scanner by image-id range (Aubreville et al., the MIDOG 2021 dataset paper).
MIDOG21_SCANNERS = (
    (1, 50, "Hamamatsu XR", 0.23),
    (51, 100, "Hamamatsu S360", 0.23),
    (101, 150, "Aperio CS2", 0.25),
    (151, 200, "Leica GT450", 0.25),
)
# The Leica GT450 cases of MIDOG 2021 were released without labels.
MIDOG21_UNLABELED_SCANNER = "Leica GT450"

# Nominal pixel spacing per scanner, used when the TIFF carries no resolution.
SCANNER_SPACING_UM = {
    "Hamamatsu XR": 0.23,
    "Hamamatsu S360": 0.23,
    "Aperio CS2": 0.25,
    "Leica GT450": 0.25,
    "3D Histech": 0.25,
    "Zeiss Axioscan Z1": 0.22,  # an unseen scanner of the synthetic midog21 suite
}
# The csv's Dataset value of an image released without labels.
UNLABELED_SPLIT = "unlabeled"
# Spellings found in the published MIDOG++ metadata, mapped to one name.
_SCANNER_ALIASES = {"Hamammatsu XR": "Hamamatsu XR"}
# MIDOG++.json says "canine lymphosarcoma" where the CSV says "canine lymphoma".
_TUMOR_ALIASES = {"canine lymphoma": "canine lymphosarcoma"}

DOMAIN_KEYS = ("scanner", "tumor_type", "lab", "species")


@dataclasses.dataclass(frozen=True)
class Case:
  """One image (region of interest) with its metadata and point labels.

  Attributes:
    image_id: id in the annotation file.
    file_name: file name as written in the annotation file.
    path: resolved image path (inside the data root).
    width, height: image size in pixels, from the annotation file.
    scanner, tumor_type, lab, species: metadata ("" when unknown).
    domain: the domain used for stratification and per-domain tables
      (scanner for MIDOG 2021, tumour type for MIDOG++).
    spacing_um: microns per pixel (nominal for the scanner; the TIFF's
      resolution tags take precedence where the image is read).
    labeled: False for cases released without labels.
    mitoses: float32 (N, 2) array of (x, y) centres of mitotic figures.
    imposters: float32 (M, 2) array of (x, y) centres of imposters.
    official_split: "train"/"test" from MIDOG++ metadata, else "".
  """

  image_id: int
  file_name: str
  path: Path
  width: int
  height: int
  scanner: str
  tumor_type: str
  lab: str
  species: str
  domain: str
  spacing_um: float
  labeled: bool
  mitoses: np.ndarray
  imposters: np.ndarray
  official_split: str = ""

  @property
  def stem(self) -> str:
    return Path(self.file_name).stem

  def points(self, category: int) -> np.ndarray:
    """Centres (N, 2) of one category (``MITOSIS`` or ``IMPOSTER``)."""
    if category == MITOSIS:
      return self.mitoses
    if category == IMPOSTER:
      return self.imposters
    raise ValueError(f"unknown category {category}")

  def with_labels(self, mitoses: np.ndarray, imposters: np.ndarray,
                  labeled: bool = True) -> "Case":
    """A copy with other labels (used to attach a held-out truth file)."""
    return dataclasses.replace(
        self, mitoses=np.asarray(mitoses, np.float32).reshape(-1, 2),
        imposters=np.asarray(imposters, np.float32).reshape(-1, 2),
        labeled=labeled)


@dataclasses.dataclass(frozen=True)
class MidogDataset:
  """All cases of one annotation file."""

  annotations: Path
  root: Path
  kind: str  # "midog21" or "midogpp"
  cases: tuple[Case, ...]

  @property
  def labeled(self) -> list[Case]:
    return [c for c in self.cases if c.labeled]

  @property
  def unlabeled(self) -> list[Case]:
    return [c for c in self.cases if not c.labeled]

  def by_id(self, image_id: int) -> Case:
    for c in self.cases:
      if c.image_id == image_id:
        return c
    raise KeyError(image_id)

  def by_stem(self) -> dict[str, Case]:
    return {c.stem: c for c in self.cases}

  @property
  def domains(self) -> list[str]:
    return sorted({c.domain for c in self.cases})


def midog21_scanner(image_id: int) -> tuple[str, float]:
  """Scanner name and nominal spacing for a MIDOG 2021 image id."""
  for lo, hi, name, spacing in MIDOG21_SCANNERS:
    if lo <= image_id <= hi:
      return name, spacing
  raise KeyError(image_id)


def _is_int(v) -> bool:
  """An int, not a bool (``True`` is an int to Python, not an id or a size)."""
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  """A finite int or float, not a bool."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _read_json(path: Path) -> dict:
  data = read_json(path, "annotation file")
  if not isinstance(data, dict):
    raise DataError(path, "expected a JSON object at the top level")
  for key in ("images", "annotations", "categories"):
    if key not in data:
      raise DataError(path, f"missing top-level key {key!r}")
    if not isinstance(data[key], list):
      raise DataError(path, f"{key!r} must be a list")
  return data


def resolve_in_root(root: Path, file_name: str, source: Path) -> Path:
  """Joins ``file_name`` to ``root`` and refuses paths escaping the root."""
  if not isinstance(file_name, str) or not file_name:
    raise DataError(source, f"bad file_name {file_name!r}")
  root_abs = Path(os.path.realpath(root))
  candidate = Path(os.path.realpath(root_abs / file_name))
  if os.path.isabs(file_name) or (
      candidate != root_abs and root_abs not in candidate.parents):
    raise DataError(source, f"file_name {file_name!r} escapes the data root "
                    f"{root_abs}")
  return candidate


def read_xvalidation_csv(path: Path) -> dict[int, dict[str, str]]:
  """MIDOG++ ``datasets_xvalidation.csv``: slide -> split/tumor/scanner/lab/species."""
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f, delimiter=";"))
  except FileNotFoundError:
    raise DataError(path, "metadata CSV not found") from None
  need = {"Slide", "Dataset", "Tumor", "Scanner", "Origin", "Species"}
  if not rows or not need <= set(rows[0]):
    raise DataError(path, f"expected ';'-separated columns {sorted(need)}")
  out = {}
  for i, r in enumerate(rows):
    try:
      slide = int(r["Slide"])
    except (TypeError, ValueError):
      raise DataError(path, f"row {i + 2}: bad Slide {r['Slide']!r}") from None
    scanner = _SCANNER_ALIASES.get(r["Scanner"].strip(), r["Scanner"].strip())
    tumor = r["Tumor"].strip()
    out[slide] = dict(split=r["Dataset"].strip(),
                      tumor_type=_TUMOR_ALIASES.get(tumor, tumor),
                      scanner=scanner, lab=r["Origin"].strip(),
                      species=r["Species"].strip())
  return out


def _find_csv(annotations: Path) -> Path | None:
  for name in ("MIDOGpp_xvalidation.csv", "datasets_xvalidation.csv"):
    p = annotations.parent / name
    if p.exists():
      return p
  return None


def load_midog(annotations: str | os.PathLike, root: str | os.PathLike | None = None,
               *, xvalidation_csv: str | os.PathLike | None = None,
               check_images: bool = False,
               domain_key: str | None = None,
               truth_file: bool = False) -> MidogDataset:
  """Reads ``MIDOG.json`` (2021/2022 numbering) or ``MIDOG++.json``.

  Args:
    annotations: path of the JSON file.
    root: folder holding the images (default: the JSON's folder).
    xvalidation_csv: MIDOG++ metadata CSV (default: looked up beside the JSON).
    check_images: raise if an image file is missing.
    domain_key: which metadata is the domain ("scanner", "tumor_type", "lab",
      "species"); default: the tumour type for a MIDOG++ file of several
      tumour types, else the scanner (MIDOG 2021, and the synthetic midog21
      suite's MIDOG++-format files of one tumour type).
    truth_file: the file holds labels of the unlabeled domain (a held-out
      truth file): every case in it counts as labelled.

  Raises:
    DataError naming the file and the problem for any malformed input.
  """
  annotations = Path(annotations)
  root = Path(root) if root is not None else annotations.parent
  data = _read_json(annotations)
  is_pp = any("tumor_type" in im for im in data["images"] if isinstance(im, dict))
  kind = "midogpp" if is_pp else "midog21"
  if domain_key is None:
    # The domain is what varies: the tumour type in MIDOG++, the scanner in a
    # MIDOG++-format file of one tumour type (the synthetic midog21 suite).
    tumours = {im.get("tumor_type") for im in data["images"] if isinstance(im, dict)}
    domain_key = "tumor_type" if is_pp and len(tumours) > 1 else "scanner"
  if domain_key not in DOMAIN_KEYS:
    raise ValueError(f"domain_key must be one of {DOMAIN_KEYS}, got {domain_key!r}")

  meta: dict[int, dict[str, str]] = {}
  if is_pp:
    csv_path = Path(xvalidation_csv) if xvalidation_csv else _find_csv(annotations)
    if csv_path is not None:
      meta = read_xvalidation_csv(csv_path)

  cat_ids = set()
  for c in data["categories"]:
    if not isinstance(c, dict) or "id" not in c:
      raise DataError(annotations, f"malformed category entry {c!r}")
    cat_ids.add(c["id"])
  unknown_cats = cat_ids - {MITOSIS, IMPOSTER}
  if unknown_cats:
    raise DataError(annotations, f"unknown category ids {sorted(unknown_cats)} "
                    "(expected 1 = mitotic figure, 2 = not mitotic figure)")

  images: dict[int, dict] = {}
  for im in data["images"]:
    if not isinstance(im, dict):
      raise DataError(annotations, f"malformed image entry {im!r}")
    for key in ("id", "file_name", "width", "height"):
      if key not in im:
        raise DataError(annotations, f"image entry {im!r} is missing key {key!r}")
    if not _is_int(im["id"]):
      raise DataError(annotations, f"image entry {im.get('file_name')!r}: id must be an "
                      f"integer, got {im['id']!r}")
    if im["id"] in images:
      raise DataError(annotations, f"duplicate image id {im['id']}")
    if not (_is_int(im["width"]) and _is_int(im["height"])
            and im["width"] > 0 and im["height"] > 0):
      raise DataError(annotations, f"image {im['id']}: bad size "
                      f"{im['width']!r}x{im['height']!r}")
    images[im["id"]] = im

  points: dict[int, dict[int, list]] = {i: {MITOSIS: [], IMPOSTER: []} for i in images}
  for a in data["annotations"]:
    if not isinstance(a, dict):
      raise DataError(annotations, f"malformed annotation entry {a!r}")
    for key in ("image_id", "category_id", "bbox"):
      if key not in a:
        raise DataError(annotations, f"annotation {a.get('id', '?')} is missing "
                        f"key {key!r}")
    if not _is_int(a["image_id"]):
      raise DataError(annotations, f"annotation {a.get('id', '?')}: image_id must be an "
                      f"integer, got {a['image_id']!r}")
    if a["image_id"] not in images:
      raise DataError(annotations, f"annotation {a.get('id', '?')} refers to "
                      f"unknown image id {a['image_id']}")
    if not _is_int(a["category_id"]) or a["category_id"] not in (MITOSIS, IMPOSTER):
      raise DataError(annotations, f"annotation {a.get('id', '?')}: unknown "
                      f"category id {a['category_id']!r}")
    box = a["bbox"]
    if (not isinstance(box, (list, tuple)) or len(box) != 4
        or not all(_is_number(v) for v in box)):
      raise DataError(annotations, f"annotation {a.get('id', '?')}: bbox must be "
                      f"four finite numbers [x1, y1, x2, y2], got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
      raise DataError(annotations, f"annotation {a.get('id', '?')}: bbox "
                      f"{box!r} has x2 < x1 or y2 < y1")
    im = images[a["image_id"]]
    w, h = im["width"], im["height"]
    # Real files have boxes reaching past the border (a few centres even lie
    # just off the image); a box wholly off the image cannot belong to it.
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
      raise DataError(annotations, f"annotation {a.get('id', '?')}: box {box!r} "
                      f"lies wholly outside image {im['id']} ({w}x{h})")
    cx = min(max((x1 + x2) / 2, 0.0), w - 1.0)
    cy = min(max((y1 + y2) / 2, 0.0), h - 1.0)
    points[a["image_id"]][a["category_id"]].append((cx, cy))

  cases = []
  for image_id in sorted(images):
    im = images[image_id]
    path = resolve_in_root(root, im["file_name"], annotations)
    if check_images and not path.exists():
      raise DataError(path, f"image file of image id {image_id} not found")
    n_ann = len(points[image_id][MITOSIS]) + len(points[image_id][IMPOSTER])
    md = dict(scanner="", tumor_type=im.get("tumor_type", ""), lab="", species="",
              split="")
    if is_pp:
      md.update(meta.get(image_id, {}))
      # MIDOG++ cases without metadata row are the unlabeled 2021 GT450 cases;
      # a row whose Dataset is "unlabeled" marks one too (synthetic suites).
      labeled = (image_id in meta and md["split"] != UNLABELED_SPLIT) if meta \
          else n_ann > 0
    else:
      try:
        md["scanner"] = midog21_scanner(image_id)[0]
      except KeyError:
        md["scanner"] = ""
      md.update(tumor_type="human breast cancer", lab="UMC Utrecht",
                species="Human")
      labeled = truth_file or md["scanner"] != MIDOG21_UNLABELED_SCANNER
    spacing = SCANNER_SPACING_UM.get(md["scanner"], 0.25)
    domain = md[domain_key] or "unknown"
    cases.append(Case(
        image_id=image_id, file_name=im["file_name"], path=path,
        width=im["width"], height=im["height"], scanner=md["scanner"],
        tumor_type=md["tumor_type"], lab=md["lab"], species=md["species"],
        domain=domain, spacing_um=spacing, labeled=labeled,
        mitoses=np.asarray(points[image_id][MITOSIS], np.float32).reshape(-1, 2),
        imposters=np.asarray(points[image_id][IMPOSTER], np.float32).reshape(-1, 2),
        official_split=md["split"]))
    if not labeled and n_ann:
      raise DataError(annotations, f"image {image_id} is in the unlabeled domain "
                      f"but has {n_ann} annotations")
  return MidogDataset(annotations=annotations, root=root, kind=kind,
                      cases=tuple(cases))


def attach_truth(dataset: MidogDataset, truth: str | os.PathLike) -> MidogDataset:
  """Attaches a separate truth file (e.g. ``MIDOG_unlabeled_truth.json``).

  Cases listed in the truth file get its labels and become labeled; their
  domain is unchanged, so they can serve as a held-out domain.
  """
  t = load_midog(truth, dataset.root, truth_file=True)
  truth_cases = {c.image_id: c for c in t.cases}
  out = []
  for c in dataset.cases:
    if c.image_id in truth_cases:
      tc = truth_cases[c.image_id]
      c = c.with_labels(tc.mitoses, tc.imposters, labeled=True)
    out.append(c)
  return dataclasses.replace(dataset, cases=tuple(out))


def split_train_val(cases: Sequence[Case], val_fraction: float = 0.2,
                    seed: int = 0) -> tuple[list[Case], list[Case]]:
  """Domain- and label-stratified train/validation split (Lafarge & Koelzer's 80/20).

  Unlabeled cases are never part of a supervised split. Within each domain,
  cases are ordered by mitosis count and cut into consecutive groups of
  ``round(1 / val_fraction)``; one case of each group (chosen by ``seed``) goes
  to validation, so both splits see the same domains and label densities.
  """
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  rng = np.random.default_rng(seed)
  group = max(2, int(round(1 / val_fraction)))
  train, val = [], []
  by_domain: dict[str, list[Case]] = {}
  for c in cases:
    if c.labeled:
      by_domain.setdefault(c.domain, []).append(c)
  for domain in sorted(by_domain):
    ordered = sorted(by_domain[domain], key=lambda c: (len(c.mitoses), c.image_id))
    for start in range(0, len(ordered), group):
      chunk = ordered[start:start + group]
      # A short tail group only gives a validation case if it is full enough.
      if len(chunk) * val_fraction >= 0.5 or len(chunk) == group:
        pick = int(rng.integers(len(chunk)))
        val.append(chunk[pick])
        train.extend(c for j, c in enumerate(chunk) if j != pick)
      else:
        train.extend(chunk)
  key = lambda c: c.image_id
  return sorted(train, key=key), sorted(val, key=key)


def official_split(cases: Sequence[Case]) -> tuple[list[Case], list[Case]]:
  """MIDOG++'s published train/test split (labelled cases only)."""
  train = [c for c in cases if c.labeled and c.official_split == "train"]
  test = [c for c in cases if c.labeled and c.official_split == "test"]
  if not train and not test:
    raise ValueError("these cases carry no official split (MIDOG++ only)")
  return train, test


def leave_one_domain_out(cases: Sequence[Case], domain: str
                         ) -> tuple[list[Case], list[Case]]:
  """Labelled cases of all other domains, and those of ``domain``."""
  labeled = [c for c in cases if c.labeled]
  if domain not in {c.domain for c in labeled}:
    raise ValueError(f"no labelled case has domain {domain!r}; domains: "
                     f"{sorted({c.domain for c in labeled})}")
  return ([c for c in labeled if c.domain != domain],
          [c for c in labeled if c.domain == domain])


def count_table(cases: Iterable[Case]) -> dict[str, dict[str, int]]:
  """Per-domain counts of images, mitotic figures and imposters."""
  table: dict[str, dict[str, int]] = {}
  for c in cases:
    row = table.setdefault(c.domain, dict(images=0, labeled_images=0,
                                          mitotic_figures=0, imposters=0))
    row["images"] += 1
    row["labeled_images"] += int(c.labeled)
    row["mitotic_figures"] += len(c.mitoses)
    row["imposters"] += len(c.imposters)
  return dict(sorted(table.items()))
