"""The candidate store: every candidate of a data set and its patch, built once.

Layout of ``ROOT/store-<key>/`` (the key is a hash of the data, the settings
and the code, so a change to any of them builds a new folder)::

  store.json               key, settings, domain names, per-image counts (written last)
  index.npz                xy float32 (N, 2), labels / domains / image_ids int32 (N,),
                           record int64 (N,): the patch's record in the shards
  patches-NNNNN.array_record   one shard per image with candidates; record =
                           the raw bytes of one (P, P, 3) uint8 patch (zstd)

Candidates are ordered by case (the order given to :func:`build_store`), then
by (y, x) within an image. Labels: 1 mitotic, 0 not, -1 for images without
labels (the rule is in ``labels.py``).

The key hashes: per case its id, file name, resolved path, size and mtime of
the image file, annotation size, domain, labelled flag, nominal spacing and
the mitotic-figure coordinates (what the annotation file contributes to the
store: rewriting the file with other figures rebuilds, re-saving the same
content does not); the settings except ``tile_px`` (which does not change the
output); and the code (the source of the extraction and labelling modules, the
blue-ratio and patch-centring functions, and ``FORMAT``).

Atomic: a store is built in ``ROOT/.tmp-<key>-<pid>-<random>/`` and renamed to
its final name when complete, so a killed build never leaves a folder that a
later call trusts; temp folders of dead builders are removed by the next build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from midog_jax.candidates import extract, labels as labels_lib
from midog_jax.data import midog, sampling, slides, stain, tiff_meta
from midog_jax.errors import DataError
from midog_jax.fileio import read_json, write_json_atomic

FORMAT = 1  # bump when the layout or the meaning of a field changes
PATCH_OPTIONS = "group_size:1,zstd:1"  # group 1: one record read per random access
META, INDEX = "store.json", "index.npz"


def code_version() -> str:
  """Hash of the code that decides a store's contents."""
  h = hashlib.sha256(f"format {FORMAT}\n".encode())
  for mod in (extract, labels_lib):
    h.update(Path(inspect.getfile(mod)).read_bytes())
  for fn in (stain.blue_ratio, sampling.centred_request):
    h.update(inspect.getsource(fn).encode())
  return h.hexdigest()


def _case_key(c: midog.Case) -> dict:
  try:
    st = os.stat(c.path)
  except FileNotFoundError:
    raise DataError(c.path, f"image file of image id {c.image_id} not found") from None
  figures = np.ascontiguousarray(c.mitoses, np.float32)
  return dict(image_id=int(c.image_id), file_name=c.file_name,
              path=os.path.realpath(c.path), size=st.st_size, mtime_ns=st.st_mtime_ns,
              width=int(c.width), height=int(c.height), domain=c.domain,
              labeled=bool(c.labeled), spacing_um=float(c.spacing_um),
              mitoses=hashlib.sha256(figures.tobytes()).hexdigest(),
              n_mitoses=int(len(figures)))


def store_key(cases: Sequence[midog.Case], settings: extract.Settings) -> str:
  """The hash naming the store of ``cases`` under ``settings``."""
  s = dataclasses.asdict(settings)
  s.pop("tile_px")  # memory only: the output does not depend on it
  blob = json.dumps(dict(cases=[_case_key(c) for c in cases], settings=s,
                         code=code_version()), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def _fsync(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _build_image(job: tuple) -> dict:
  """One image: streams its candidates and patches into a shard (worker)."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  case, shard, settings = job
  with slides.Slide(case.path) as slide:
    slides.check_size(slide, case.width, case.height, "the annotation file")
    # As evaluate.with_image_spacing: the TIFF's resolution tags win.
    spacing = tiff_meta.check_plausible(slide.spacing_um, case.path) or case.spacing_um
    parts = []
    writer = ArrayRecordWriter(os.fspath(shard), PATCH_OPTIONS)
    try:
      for xy, patches in extract.candidates_and_patches(slide, settings):
        parts.append(xy)
        for p in patches:
          writer.write(p.tobytes())
    finally:
      writer.close()
  xy = np.concatenate(parts) if parts else np.zeros((0, 2), np.float32)
  if len(xy):
    _fsync(shard)
  else:
    os.unlink(shard)  # an empty shard is not a readable array_record source
  lab, found = labels_lib.label_candidates(xy, case.mitoses, spacing)
  if not case.labeled:
    lab, found = np.full(len(xy), -1, np.int32), 0
  return dict(xy=xy, labels=lab, found=found, spacing_um=float(spacing))


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_stale(root: Path) -> None:
  """Removes temp folders of builders that are no longer running."""
  for d in root.glob(".tmp-*"):
    try:
      pid = int(d.name.split("-")[2])
    except (IndexError, ValueError):
      continue
    if pid != os.getpid() and not _pid_alive(pid):
      shutil.rmtree(d, ignore_errors=True)


def _run_jobs(jobs: list, workers: int) -> list[dict]:
  return extract.map_images(_build_image, jobs, workers)


def build_store(cases: Sequence[midog.Case], root_dir: str | os.PathLike,
                settings: extract.Settings = extract.Settings(),
                workers: int = 2) -> "CandidateStore":
  """The store of ``cases`` (labelled or not) under ``root_dir``.

  Returns the existing store when one with the same key is there; otherwise
  builds it (``workers`` processes, one image each at a time) atomically.
  """
  cases = list(cases)
  if not cases:
    raise ValueError("build_store needs at least one case")
  root = Path(root_dir)
  key = store_key(cases, settings)
  final = root / f"store-{key[:24]}"
  if (final / META).exists():
    if read_json(final / META, "candidate store file").get("key") == key:
      return CandidateStore(final)
    shutil.rmtree(final)  # a truncated-hash clash: not this store
  root.mkdir(parents=True, exist_ok=True)
  _remove_stale(root)
  tmp = root / f".tmp-{key[:24]}-{os.getpid()}-{secrets.token_hex(4)}"
  tmp.mkdir()
  try:
    jobs = [(c, tmp / f"patches-{i:05d}.array_record", settings)
            for i, c in enumerate(cases)]
    results = _run_jobs(jobs, workers)
    domain_names = sorted({c.domain for c in cases})
    xy, lab, dom, ids, rec, images, shards = [], [], [], [], [], [], []
    offset = 0
    for (c, shard, _), r in zip(jobs, results):
      order = extract.yx_order(r["xy"])
      n = len(order)
      xy.append(r["xy"][order])
      lab.append(r["labels"][order])
      dom.append(np.full(n, domain_names.index(c.domain), np.int32))
      ids.append(np.full(n, c.image_id, np.int32))
      rec.append(offset + order.astype(np.int64))
      if n:
        shards.append(shard.name)
        offset += n
      images.append(dict(image_id=int(c.image_id), file_name=c.file_name,
                         domain=c.domain, labeled=bool(c.labeled), candidates=n,
                         mitotic_candidates=int((r["labels"] == 1).sum()),
                         figures=int(len(c.mitoses)) if c.labeled else 0,
                         found=r["found"], spacing_um=r["spacing_um"]))
    with open(tmp / INDEX, "wb") as f:
      np.savez(f, xy=np.concatenate(xy).reshape(-1, 2).astype(np.float32),
               labels=np.concatenate(lab).astype(np.int32),
               domains=np.concatenate(dom).astype(np.int32),
               image_ids=np.concatenate(ids).astype(np.int32),
               record=np.concatenate(rec).astype(np.int64))
      f.flush()
      os.fsync(f.fileno())
    write_json_atomic(dict(format=FORMAT, key=key, settings=dataclasses.asdict(settings),
                           domain_names=domain_names, shards=shards, images=images,
                           candidates=int(offset),
                           mitotic_candidates=int(sum(i["mitotic_candidates"] for i in images))),
                      tmp / META)
    try:
      os.rename(tmp, final)
    except OSError:
      if not (final / META).exists():
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # another builder finished first
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return CandidateStore(final)


class CandidateStore:
  """A built store, read as a grain ``RandomAccessDataSource``.

  ``store[i]`` -> ``dict(patch=uint8 (P, P, 3), label=int32, domain=int32,
  image_id=int32, xy=float32 (2,))``. ``labels``, ``domains``, ``image_ids``
  (int32) and ``xy`` (float32 (N, 2)) are in memory for sampling without
  reading patches; ``domain_names[domain]`` names a domain. Picklable (the
  readers are reopened in each process).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.meta = read_json(self.path / META, "candidate store file")
    if self.meta.get("format") != FORMAT:
      raise DataError(self.path / META, f"store format {self.meta.get('format')!r}, "
                      f"this code reads {FORMAT}: rebuild it")
    with np.load(self.path / INDEX) as z:
      self.xy, self.labels = z["xy"], z["labels"]
      self.domains, self.image_ids, self._record = z["domains"], z["image_ids"], z["record"]
    self.domain_names: list[str] = list(self.meta["domain_names"])
    self.settings = extract.Settings(**self.meta["settings"])
    self._source, self._pid = None, None

  def _reader(self):
    if self._source is None or self._pid != os.getpid():
      import grain.python as grain  # pylint: disable=g-import-not-at-top
      self._source = grain.ArrayRecordDataSource(
          [os.fspath(self.path / s) for s in self.meta["shards"]])
      self._pid = os.getpid()
    return self._source

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i) -> dict:
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f"candidate {i} of a store of {len(self)}")
    p = self.settings.patch_size
    raw = self._reader()[int(self._record[i])]
    return dict(patch=np.frombuffer(raw, np.uint8).reshape(p, p, 3).copy(),
                label=self.labels[i], domain=self.domains[i],
                image_id=self.image_ids[i], xy=self.xy[i].copy())

  def patches(self, indices) -> np.ndarray:
    """The patches of candidates ``indices``, (N, P, P, 3) uint8, in one batched read."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    p = self.settings.patch_size
    if len(indices) and not (indices.min() >= -len(self) and indices.max() < len(self)):
      raise IndexError(f"candidates {indices.min()}..{indices.max()} of a store of {len(self)}")
    raws = self._reader().__getitems__([int(r) for r in self._record[indices]])
    out = np.empty((len(indices), p, p, 3), np.uint8)
    for j, raw in enumerate(raws):
      out[j] = np.frombuffer(raw, np.uint8).reshape(p, p, 3)
    return out

  @property
  def images(self) -> list[dict]:
    """Per image: id, file name, domain, candidates, figures, found."""
    return list(self.meta["images"])

  def recall_per_domain(self) -> dict[str, dict]:
    """domain -> {figures, found, recall} over its labelled images (recall
    None for a domain without figures)."""
    out: dict[str, dict] = {}
    for im in self.meta["images"]:
      if im["labeled"]:
        row = out.setdefault(im["domain"], dict(figures=0, found=0))
        row["figures"] += im["figures"]
        row["found"] += im["found"]
    for row in out.values():
      row["recall"] = row["found"] / row["figures"] if row["figures"] else None
    return dict(sorted(out.items()))

  def __getstate__(self) -> dict:
    state = self.__dict__.copy()
    state.update(_source=None, _pid=None)
    return state

  def __repr__(self) -> str:
    return f"CandidateStore({os.fspath(self.path)!r}, {len(self)} candidates)"
