"""Writing a benchmark suite: ``train/`` and ``test/`` in the MIDOG++ format.

::

  python -m midog_jax.data.synthetic --suite midog21|midogpp --preset tiny|small|full --out DIR

Layout of ``DIR`` (the contract the benchmark harness reads):
  * ``train/`` and ``test/``: each a ``MIDOG++.json`` (images carry
    ``tumor_type`` and ``roi_type``; annotations carry the raters' ``labels``,
    ``category_id`` is their majority), a ``MIDOGpp_xvalidation.csv`` (Slide;
    Dataset;Tumor;Scanner;Origin;Species, Dataset "train", "test" or
    "unlabeled") and the TIFFs. Test image ids never occur in ``train/``: a
    training run given ``train/`` cannot reach a test image.
  * ``suite.json``: {suite, preset, seed, generator_version, domain_key,
    train_domains, unlabeled_domains, unseen_domains, human_agreement:
    {target, f1 (test set), f1_all, sharpness}, counts}; written LAST, its
    presence marks a complete suite.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from midog_jax.data import midog
from midog_jax.data.synthetic import raters, suites
from midog_jax.data.synthetic.plan import Plan
from midog_jax.data.synthetic.write import (GENERATOR_VERSION, WRITING, _box,
                                            _refuse_foreign, _write_json,
                                            render_all)
from midog_jax.fileio import atomic_output

SUITE_MANIFEST = "suite.json"
SUITE_VERSION = GENERATOR_VERSION + ".suite1"


def _folder_files(plans: list[Plan], slots: dict[int, suites.Slot], suite: str,
                  preset: str, seed: int) -> tuple[dict, str]:
  """The MIDOG++.json object and the csv text of one folder."""
  info = {"description": f"Synthetic MIDOG++-format benchmark suite {suite} "
                         f"(midog_jax.data.synthetic, preset {preset}, seed {seed})",
          "version": SUITE_VERSION, "year": 2022,
          "contributor": "midog_jax synthetic generator", "date_created": "synthetic"}
  cats = [{"id": midog.MITOSIS, "name": midog.CATEGORY_NAMES[midog.MITOSIS]},
          {"id": midog.IMPOSTER, "name": midog.CATEGORY_NAMES[midog.IMPOSTER]}]
  obj = {"info": info, "licenses": [{"url": "", "id": 1, "name": "Synthetic data"}],
         "images": [], "categories": cats, "annotations": []}
  buf = io.StringIO()
  w = csv.writer(buf, delimiter=";", lineterminator="\n")
  w.writerow(["Slide", "Dataset", "Tumor", "Scanner", "Origin", "Species"])
  ann_id = 1
  for p in plans:
    s = slots[p.image_id]
    obj["images"].append({"license": 1, "file_name": f"{p.image_id:03d}.tiff",
                          "id": p.image_id, "width": p.width, "height": p.height,
                          "tumor_type": s.tumour, "roi_type": p.roi_type})
    w.writerow([p.image_id, s.dataset, s.tumour_csv, s.domain.name, s.domain.lab,
                s.domain.species])
    if s.dataset == midog.UNLABELED_SPLIT:
      continue
    for f in p.figures:
      obj["annotations"].append({"bbox": _box(f), "category_id": f.category,
                                 "image_id": p.image_id, "labels": list(f.votes),
                                 "id": ann_id})
      ann_id += 1
  return obj, buf.getvalue()


def read_suite(out_dir: str | os.PathLike) -> dict | None:
  """The manifest of a COMPLETE suite in ``out_dir``, or None."""
  try:
    return json.loads((Path(out_dir) / SUITE_MANIFEST).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def generate_suite(out_dir: str | os.PathLike, suite: str = "midog21",
                   preset: str = "small", seed: int = 0, workers: int | None = None,
                   force: bool = False) -> Path:
  """Writes a benchmark suite (see the module docstring); returns ``out_dir``."""
  slot_list = suites.slots(suite, preset)
  out = Path(out_dir)
  if not force:
    _refuse_foreign(out)
    for sub in ("train", "test"):
      _refuse_foreign(out / sub)
  for sub in ("train", "test"):
    (out / sub).mkdir(parents=True, exist_ok=True)
  (out / WRITING).touch()
  (out / SUITE_MANIFEST).unlink(missing_ok=True)
  planned = [suites.plan_slot(s, preset, seed) for s in slot_list]
  plans, sharp = suites.with_votes([p for p, _ in planned], [m for _, m in planned], seed)
  slots = {s.image_id: s for s in slot_list}
  render_all([(out / slots[p.image_id].folder, p) for p in plans], workers)
  for sub in ("train", "test"):
    sel = [p for p in plans if slots[p.image_id].folder == sub]
    obj, text = _folder_files(sel, slots, suite, preset, seed)
    _write_json(out / sub / "MIDOG++.json", obj)
    with atomic_output(out / sub / "MIDOGpp_xvalidation.csv", "w", encoding="utf-8") as f:
      f.write(text)

  def votes(folder=None):
    return [list(f.votes) for p in plans for f in p.figures
            if slots[p.image_id].dataset != midog.UNLABELED_SPLIT
            and (folder is None or slots[p.image_id].folder == folder)]

  domain_key = "scanner" if suite == "midog21" else "tumor_type"
  key = (lambda s: s.domain.name) if suite == "midog21" else (lambda s: s.tumour)
  train_d = sorted({key(s) for s in slot_list if s.dataset == "train"})
  unl_d = sorted({key(s) for s in slot_list if s.dataset == midog.UNLABELED_SPLIT})
  unseen = sorted({key(s) for s in slot_list if s.folder == "test"} - set(train_d))
  counts = {sub: dict(images=sum(slots[p.image_id].folder == sub for p in plans),
                      mitotic_figures=sum(f.category == midog.MITOSIS for p in plans
                                          for f in p.figures
                                          if slots[p.image_id].folder == sub))
            for sub in ("train", "test")}
  _write_json(out / SUITE_MANIFEST, {
      "suite": suite, "preset": preset, "seed": seed, "generator_version": SUITE_VERSION,
      "domain_key": domain_key, "train_domains": train_d, "unlabeled_domains": unl_d,
      "unseen_domains": unseen, "counts": counts,
      "human_agreement": {"target": suites.HUMAN_AGREEMENT,
                          "f1": raters.agreement(votes("test")),
                          "f1_all": raters.agreement(votes()), "sharpness": sharp}})
  (out / WRITING).unlink(missing_ok=True)
  return out
