"""A benchmark suite on disk: ``suite.json``, the protocol, and the scored test cases.

Layout (written by ``python -m midog_jax.data.synthetic --suite ...``; a real
release arranged the same way works too)::

  DIR/suite.json   suite, preset, seed, generator_version, domain_key,
                   train_domains, unlabeled_domains, unseen_domains,
                   human_agreement {target, f1}; written last (complete suite)
  DIR/train/       MIDOG++.json + MIDOGpp_xvalidation.csv + NNN.tiff
  DIR/test/        the same; no image id of test/ occurs in train/

Protocols: ``official`` trains on every labelled domain of ``train/`` and
scores all of ``test/``; ``lodo:<domain>`` trains with that domain left out
(``data.split=lodo:<domain>``) and scores all of ``test/``, the left-out
domain being the "unseen" one. Every test case is scored once per run and
belongs to one *group*: "held-out images of the training domains" or
"unseen domains".
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from midog_jax import evaluate as eval_lib
from midog_jax.data import midog
from midog_jax.errors import DataError
from midog_jax.fileio import read_json

SUITES = ("midog21", "midogpp")
SUITE_FILE = "suite.json"
ANNOTATIONS = "MIDOG++.json"
HELD_OUT, UNSEEN = "held-out images of the training domains", "unseen domains"
GROUPS = (HELD_OUT, UNSEEN)


class UsageError(ValueError):
  """A bad command-line argument found once the data is read (exit 2)."""


@dataclasses.dataclass(frozen=True)
class Suite:
  """``suite.json`` of a suite folder, checked."""

  root: Path
  name: str
  preset: str
  seed: int
  generator_version: str
  domain_key: str
  train_domains: tuple[str, ...]
  unlabeled_domains: tuple[str, ...]
  unseen_domains: tuple[str, ...]
  human_agreement: dict

  @property
  def train_dir(self) -> Path:
    return self.root / "train"

  @property
  def test_dir(self) -> Path:
    return self.root / "test"


def load_suite(root: str | os.PathLike) -> Suite:
  """Reads and checks ``root/suite.json`` and the two folders (DataError if bad)."""
  root = Path(root).resolve()
  if not root.is_dir():
    raise DataError(root, "data folder not found")
  meta = read_json(root / SUITE_FILE, "suite file (suite.json, written last by the "
                   "suite generator: is the suite complete?)")
  path = root / SUITE_FILE
  if not isinstance(meta, dict):
    raise DataError(path, "expected a JSON object")
  need = ("suite", "domain_key", "train_domains", "unseen_domains")
  missing = [k for k in need if k not in meta]
  if missing:
    raise DataError(path, f"missing keys {missing}")
  if meta["suite"] not in SUITES:
    raise DataError(path, f"unknown suite {meta['suite']!r} (one of {SUITES})")
  if meta["domain_key"] not in midog.DOMAIN_KEYS:
    raise DataError(path, f"domain_key must be one of {midog.DOMAIN_KEYS}")
  for k in ("train_domains", "unlabeled_domains", "unseen_domains"):
    v = meta.get(k, [])
    if not isinstance(v, list) or not all(isinstance(d, str) for d in v):
      raise DataError(path, f"{k} must be a list of domain names")
  for folder in ("train", "test"):
    if not (root / folder / ANNOTATIONS).is_file():
      raise DataError(root / folder / ANNOTATIONS, "annotation file not found")
  return Suite(root=root, name=meta["suite"], preset=str(meta.get("preset", "")),
               seed=int(meta.get("seed", 0)),
               generator_version=str(meta.get("generator_version", "")),
               domain_key=meta["domain_key"],
               train_domains=tuple(meta["train_domains"]),
               unlabeled_domains=tuple(meta.get("unlabeled_domains", [])),
               unseen_domains=tuple(meta["unseen_domains"]),
               human_agreement=dict(meta.get("human_agreement") or {}))


def parse_protocol(protocol: str) -> tuple[str, str | None]:
  """``"official"`` -> ("official", None); ``"lodo:<d>"`` -> ("lodo", d)."""
  if protocol == "official":
    return "official", None
  if protocol.startswith("lodo:") and protocol[5:].strip():
    return "lodo", protocol[5:].strip()
  raise UsageError(f"--protocol must be official or lodo:<domain>, got {protocol!r}")


def check_protocol(suite: Suite, protocol: str) -> None:
  """A left-out domain must be one of the suite's training domains."""
  kind, domain = parse_protocol(protocol)
  if kind == "lodo" and domain not in suite.train_domains:
    raise UsageError(f"--protocol {protocol}: {domain!r} is not a training domain of the "
                     f"suite; one of: {', '.join(suite.train_domains)}")


def training_domains(suite: Suite, protocol: str) -> tuple[str, ...]:
  """The labelled domains a run trains on under ``protocol``."""
  _, left_out = parse_protocol(protocol)
  return tuple(d for d in suite.train_domains if d != left_out)


def unseen_domains(suite: Suite, protocol: str) -> tuple[str, ...]:
  """Domains no training image comes from: the suite's, plus a left-out one."""
  _, left_out = parse_protocol(protocol)
  return tuple(suite.unseen_domains) + ((left_out,) if left_out else ())


def training_split(protocol: str) -> str:
  """``config.data.split`` of the training runs."""
  kind, domain = parse_protocol(protocol)
  return "train_val" if kind == "official" else f"lodo:{domain}"


@dataclasses.dataclass(frozen=True)
class ScoredCase:
  """One scored test image: truth in millimetres and what it is grouped by."""

  stem: str
  path: Path
  domain: str
  roi_type: str
  group: str
  spacing_um: float
  area_mm2: float
  truth_mm: np.ndarray
  votes_mm: tuple[np.ndarray, np.ndarray] | None  # rater 1's and rater 2's mitoses


def _rater_points(raw: dict, image_id: int, rater: int) -> np.ndarray:
  pts = []
  for a in raw["annotations"]:
    labels = a.get("labels")
    if a["image_id"] == image_id and isinstance(labels, list) and len(labels) > rater:
      if labels[rater] == 1:
        x1, y1, x2, y2 = a["bbox"]
        pts.append(((x1 + x2) / 2, (y1 + y2) / 2))
  return np.asarray(pts, np.float64).reshape(-1, 2)


def load_test_cases(suite: Suite, protocol: str) -> list[ScoredCase]:
  """Every labelled image of ``test/`` with its group, ROI type and rater votes.

  Spacing comes from each TIFF's resolution tags (what ``predict`` writes
  millimetres with). ``votes_mm`` is None when the file has no per-rater
  ``labels`` (then there is no human-agreement row).
  """
  ann = suite.test_dir / ANNOTATIONS
  ds = midog.load_midog(ann, domain_key=suite.domain_key)
  raw = read_json(ann, "annotation file")
  roi = {im["id"]: str(im.get("roi_type", "unknown")) for im in raw["images"]}
  has_votes = any(isinstance(a.get("labels"), list) and len(a["labels"]) >= 2
                  for a in raw["annotations"])
  unseen = set(unseen_domains(suite, protocol))
  cases = eval_lib.with_image_spacing(ds.labeled)
  if not cases:
    raise DataError(ann, "the test folder has no labelled image")
  out = []
  for c in cases:
    mm = c.spacing_um / 1000.0
    votes = None
    if has_votes:
      votes = (_rater_points(raw, c.image_id, 0) * mm, _rater_points(raw, c.image_id, 1) * mm)
    out.append(ScoredCase(
        stem=c.stem, path=c.path, domain=c.domain, roi_type=roi.get(c.image_id, "unknown"),
        group=UNSEEN if c.domain in unseen else HELD_OUT, spacing_um=c.spacing_um,
        area_mm2=c.width * c.height * mm * mm,
        truth_mm=c.mitoses.astype(np.float64) * mm, votes_mm=votes))
  return out


def case_images(cases: Sequence[ScoredCase]) -> list[Path]:
  """The image files of the scored cases (what prediction commands are given)."""
  return [c.path for c in cases]


def by_domain(cases: Sequence[ScoredCase]) -> dict[str, list[ScoredCase]]:
  """Cases per domain, domains sorted (test-time adaptation runs per domain)."""
  out: dict[str, list[ScoredCase]] = {}
  for c in cases:
    out.setdefault(c.domain, []).append(c)
  return dict(sorted(out.items()))
