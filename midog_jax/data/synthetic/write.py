"""Writing a data set: tiled JPEG TIFFs, the annotation files, the manifest, the CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile

from midog_jax.data import midog
from midog_jax.data.synthetic.plan import (PRESETS, Figure, Plan, domain_of, plan_domain,
                                           plan_image, preset_ids, standin_midog21)
from midog_jax.data.synthetic.render import TILE, render_image
from midog_jax.errors import DataError
from midog_jax.fileio import atomic_output, atomic_path

GENERATOR_VERSION = "2"
MANIFEST = "synthetic.json"
TRUTH = "MIDOG_unlabeled_truth.json"
BOX = 50  # bbox side in px, as in the real release


def write_tiff(path: Path, plan: Plan) -> None:
  """Renders ``plan`` band by band into a tiled JPEG TIFF (atomic)."""
  dom = plan_domain(plan)

  def tiles():
    for band in render_image(plan):
      for x0 in range(0, plan.width, TILE):
        yield band[:, x0:x0 + TILE]

  ppcm = 1e4 / dom.spacing_um
  # tifffile converts RGB input to the JPEG colour space itself; the three
  # modes vary chroma subsampling and colour space between scanners.
  cargs = {"level": dom.jpeg_quality}
  if dom.jpeg_mode == "rgb":
    cargs["outcolorspace"] = "RGB"
  sub = (1, 1) if dom.jpeg_mode == "ycbcr444" else (2, 2)
  # A half-written TIFF (a crash, a killed worker) never gets the final name.
  with atomic_path(path) as tmp:
    tifffile.imwrite(tmp, tiles(), shape=(plan.height, plan.width, 3),
                     dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
                     compressionargs=cargs, subsampling=sub,
                     photometric="rgb", resolution=(ppcm, ppcm),
                     resolutionunit="CENTIMETER", metadata=None)


# ----------------------------------------------------------------------------
# Annotation files and the driver.


def shared_midog_json() -> Path | None:
  """The shipped real ``MIDOG.json`` (the ``midog21`` preset's positions).

  ``$MIDOG_SHARED_DATA`` (a folder or the file) names it; otherwise it is
  looked up beside the repository (``<repo>/../shared/data/midog``). None
  when neither is there (a bare clone or an installed package): the preset
  then generates realistic positions. A named file that is missing is an
  error, not a silent change of data.
  """
  env = os.environ.get("MIDOG_SHARED_DATA")
  if env:
    p = Path(env)
    p = p if p.suffix == ".json" else p / "MIDOG.json"
    if not p.is_file():
      raise DataError(p, "MIDOG_SHARED_DATA names no MIDOG.json (the real "
                      "annotation file the 'midog21' preset takes positions from)")
    return p
  # <repo>/midog_jax/data/synthetic/write.py -> <repo>
  repo = Path(__file__).resolve().parents[3]
  p = repo.parent / "shared" / "data" / "midog" / "MIDOG.json"
  return p if p.is_file() else None


def _box(fig: Figure) -> list:
  if fig.bbox is not None:
    return list(fig.bbox)
  h = BOX // 2
  return [fig.x - h, fig.y - h, fig.x + h, fig.y + h]


def _annotation_files(plans: Sequence[Plan], preset: str, seed: int
                      ) -> tuple[dict, dict]:
  info = {"description": f"Synthetic MIDOG 2021-format data (midog_jax.data."
                         f"synthetic, preset {preset}, seed {seed})",
          "version": GENERATOR_VERSION, "year": 2021,
          "contributor": "midog_jax synthetic generator",
          "date_created": "synthetic"}
  licenses = [{"url": "", "id": 1, "name": "Synthetic data, no restrictions"}]
  cats = [{"id": midog.MITOSIS, "name": midog.CATEGORY_NAMES[midog.MITOSIS]},
          {"id": midog.IMPOSTER, "name": midog.CATEGORY_NAMES[midog.IMPOSTER]}]

  def image(p):
    return {"license": 1, "file_name": f"{p.image_id:03d}.tiff", "id": p.image_id,
            "width": p.width, "height": p.height}

  main = {"info": info, "licenses": licenses, "images": [], "categories": cats,
          "annotations": []}
  truth = {"info": dict(info, description=info["description"]
                        + " - labels of the unlabeled domain"),
           "licenses": licenses, "images": [], "categories": cats,
           "annotations": []}
  used = {f.ann_id for p in plans for f in p.figures if f.ann_id is not None}
  next_id = max(used, default=0) + 1
  held = []
  for p in plans:
    main["images"].append(image(p))
    if domain_of(p.image_id).labeled:
      for f in p.figures:
        if f.ann_id is None:
          ann_id, next_id = next_id, next_id + 1
        else:
          ann_id = f.ann_id
        main["annotations"].append({"bbox": _box(f), "category_id": f.category,
                                    "image_id": p.image_id, "id": ann_id})
    else:
      held.append(p)
  for p in held:  # ids continue after the main file's
    truth["images"].append(image(p))
    for f in p.figures:
      truth["annotations"].append({"bbox": _box(f), "category_id": f.category,
                                   "image_id": p.image_id, "id": next_id})
      next_id += 1
  return main, truth


def _write_json(path: Path, obj: dict) -> None:
  # Compact JSON with no trailing newline, the bytes every data set written
  # so far has (fileio.write_json_atomic would append a newline).
  text = json.dumps(obj)
  with atomic_output(path, "w", encoding="utf-8") as f:
    f.write(text)


def _select(all_ids: list[int], ids: Sequence[int] | None, limit: int | None,
            preset: str) -> list[int]:
  if ids is not None:
    bad = sorted(set(ids) - set(all_ids))
    if bad:
      raise ValueError(f"image ids {bad} are not in preset {preset!r} (its ids: "
                       f"{all_ids[0]}..{all_ids[-1]}, {len(all_ids)} images)")
    return sorted(set(ids))
  if limit is not None:
    if limit < 1:
      raise ValueError(f"limit must be >= 1, got {limit}")
    # Round-robin over the domains so that a subset still has all of them.
    by_dom: dict[str, list[int]] = {}
    for i in all_ids:
      by_dom.setdefault(domain_of(i).name, []).append(i)
    queues = [list(v) for v in by_dom.values()]
    out = []
    while len(out) < min(limit, len(all_ids)):
      for q in queues:
        if q and len(out) < limit:
          out.append(q.pop(0))
    return sorted(out)
  return list(all_ids)


def _render_one(args: tuple[str, Plan]) -> tuple[int, float]:
  out_dir, plan = args
  t0 = time.perf_counter()
  write_tiff(Path(out_dir) / f"{plan.image_id:03d}.tiff", plan)
  return plan.image_id, time.perf_counter() - t0


def render_all(jobs: Sequence[tuple[Path, Plan]], workers: int | None = None) -> None:
  """Renders every (folder, plan) to ``folder/NNN.tiff``, ``workers`` processes (spawn)."""
  if workers is None:
    workers = min(2, os.cpu_count() or 1)
  # Largest images first keeps the pool busy until the end.
  jobs = sorted(((str(d), p) for d, p in jobs), key=lambda j: -j[1].width * j[1].height)
  if workers <= 1 or len(jobs) <= 1:
    for j in jobs:
      _render_one(j)
  else:
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
      for _ in pool.imap_unordered(_render_one, jobs):
        pass


# Present while a data set is being written: with the manifest, what marks a
# folder as this generator's to overwrite.
WRITING = ".synthetic_writing"


def _refuse_foreign(out: Path) -> None:
  """Raises ``DataError`` when ``out`` holds a data set this generator did not write."""
  if not out.is_dir() or (out / MANIFEST).exists() or (out / WRITING).exists():
    return
  foreign = sorted(p.name for p in out.iterdir()
                   if p.name in ("MIDOG.json", "MIDOG++.json")
                   or p.suffix.lower() in (".tif", ".tiff"))
  if foreign:
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    raise DataError(out, f"holds a data set this generator did not write ({shown}); "
                    "refusing to overwrite it: choose another --out, or pass --force")


def generate(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0,
             workers: int | None = None, ids: Sequence[int] | None = None,
             limit: int | None = None, scale: float = 1.0, force: bool = False) -> Path:
  """Writes a synthetic MIDOG 2021-format data set; returns its MIDOG.json.

  Args:
    out_dir: folder to write (created if needed).
    preset: "tiny", "small" or "midog21" (see the package docstring).
    seed: random seed; same preset + seed -> identical output.
    workers: processes rendering images (spawn); default min(2, cpu_count).
    ids: generate only these image ids (must belong to the preset).
    limit: generate only the first N ids of a domain-balanced round-robin
      order (so a subset still spans all scanners).
    scale: shrinks the midog21 image sizes and annotation positions (a
      testing knob; physical cell sizes are unchanged). 1.0 for real use.
    force: write even into a folder holding a data set this generator did
      not write (a real release, say); refused by default.
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
  if scale != 1.0 and preset != "midog21":
    raise ValueError("scale is only meaningful for preset 'midog21'")
  real, source = None, preset
  if preset == "midog21" and shared_midog_json() is None:
    real = standin_midog21(seed)  # no real file here: generated positions
  elif preset == "midog21":
    source = shared_midog_json()
    try:
      real = json.loads(source.read_text())
      real["images"], real["annotations"]  # noqa: B018 (presence check)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
      raise DataError(source, f"not a MIDOG annotation file ({e!r})") from None
  chosen = _select(preset_ids(preset, real), ids, limit, preset)
  out = Path(out_dir)
  if not force:
    _refuse_foreign(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / WRITING).touch()
  # An old manifest would vouch for a half-rewritten folder: drop it first.
  (out / MANIFEST).unlink(missing_ok=True)
  plans = [plan_image(preset, seed, i, real, scale) for i in chosen]
  render_all([(out, p) for p in plans], workers)
  main, truth = _annotation_files(plans, preset, seed)
  _write_json(out / "MIDOG.json", main)
  if truth["images"]:
    _write_json(out / TRUTH, truth)
  else:
    (out / TRUTH).unlink(missing_ok=True)
  _write_json(out / MANIFEST, {"preset": preset, "seed": seed,
                               "n_images": len(plans), "ids": chosen,
                               "scale": scale,
                               "positions": ("generated" if real and real.get("generated")
                                             else "real" if real else "random"),
                               "generator_version": GENERATOR_VERSION})
  (out / WRITING).unlink(missing_ok=True)
  return out / "MIDOG.json"


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
  """The manifest of a COMPLETE data set in ``out_dir``, or None."""
  p = Path(out_dir) / MANIFEST
  try:
    return json.loads(p.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None
