"""The cases of one experiment: training, validation and held-out sets.

``config.data.root`` empty means the synthetic ``small`` set (generated into
``config.data.synthetic_dir`` on first use). A truth file for the unlabeled
domain (the synthetic generator's ``MIDOG_unlabeled_truth.json``, or any file
given as ``config.data.extra_truth``) turns that domain into a held-out
*test* domain; it is never part of training or validation.

Splits (``config.data.split``):
  "train_val"       domain- and label-stratified 80/20 (Lafarge & Koelzer)
  "official"        MIDOG++'s train/test; validation carved out of train
  "lodo:<domain>"   leave one domain out: it becomes a held-out set
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from pathlib import Path

from midog_jax.data import midog, slides
from midog_jax.errors import DataError

TRUTH_NAME = "MIDOG_unlabeled_truth.json"


@dataclasses.dataclass
class ExperimentData:
  dataset: midog.MidogDataset
  train: list[midog.Case]
  val: list[midog.Case]
  heldout: dict[str, list[midog.Case]]  # evaluation-only sets, by name
  unlabeled: list[midog.Case]           # images without labels (for mining)

  def all_cases(self) -> list[midog.Case]:
    """Every case the experiment reads, each once."""
    seen, out = set(), []
    for c in self.train + self.val + [c for v in self.heldout.values() for c in v] + self.unlabeled:
      if (c.image_id, str(c.path)) not in seen:
        seen.add((c.image_id, str(c.path)))
        out.append(c)
    return out

  @property
  def pool_cases(self) -> list[midog.Case]:
    """The cases a negative pool's case indices refer to: train, then unlabeled.

    A mined pool may point into the unlabeled images (stain-mined negatives);
    they carry no mitoses, so they only ever give pool negatives.
    """
    return self.train + self.unlabeled

  def describe(self) -> str:
    parts = [f"train {len(self.train)}", f"val {len(self.val)}"]
    parts += [f"{k} {len(v)}" for k, v in self.heldout.items()]
    parts.append(f"unlabeled {len(self.unlabeled)}")
    return ", ".join(parts) + " images"


def ensure_synthetic(directory: str | os.PathLike, preset: str, seed: int = 0) -> Path:
  """Generates the synthetic set once; concurrent callers wait for it."""
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  with open(d / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # several processes may start at once
    from midog_jax.data import synthetic
    m = synthetic.read_manifest(d)
    want = dict(preset=preset, seed=seed, generator_version=synthetic.GENERATOR_VERSION)
    if m is None or any(m.get(k) != v for k, v in want.items()):
      # Missing, incomplete, or made by another preset/seed/generator version.
      print(f"generating the synthetic '{preset}' dataset in {d} ...", flush=True)
      synthetic.generate(d, preset=preset, seed=seed)
  return d


def find_annotations(root: Path) -> Path:
  for name in ("MIDOG.json", "MIDOG++.json"):
    if (root / name).exists():
      return root / name
  raise DataError(root, "no MIDOG.json or MIDOG++.json in the data root")


def load_experiment(dcfg, seed: int = 0) -> ExperimentData:
  """Cases for ``config.data`` (see module docstring)."""
  root = Path(dcfg.root) if dcfg.root else ensure_synthetic(
      dcfg.synthetic_dir, dcfg.synthetic_preset)
  if not root.is_dir():
    raise DataError(root, "the data root does not exist (config.data.root)")
  ann = Path(dcfg.annotations) if dcfg.annotations else find_annotations(root)
  ds = midog.load_midog(ann, root, domain_key=dcfg.domain_key or None)
  labeled = ds.labeled
  heldout: dict[str, list[midog.Case]] = {}
  split = dcfg.split
  if split == "train_val":
    train, val = midog.split_train_val(labeled, dcfg.val_fraction, seed=dcfg.split_seed)
  elif split == "official":
    train_all, test = midog.official_split(labeled)
    train, val = midog.split_train_val(train_all, dcfg.val_fraction, seed=dcfg.split_seed)
    heldout["test"] = test
  elif split.startswith("lodo:"):
    rest, held = midog.leave_one_domain_out(labeled, split[5:])
    train, val = midog.split_train_val(rest, dcfg.val_fraction, seed=dcfg.split_seed)
    heldout[f"domain {split[5:]}"] = held
  else:
    raise ValueError(f"unknown data.split {split!r} (train_val | official | lodo:<domain>)")
  truth = dcfg.extra_truth
  if truth == "auto":
    truth = str(root / TRUTH_NAME) if (root / TRUTH_NAME).exists() else ""
  if truth:
    with_truth = midog.attach_truth(ds, truth)
    unl_ids = {c.image_id for c in ds.unlabeled}
    held = [c for c in with_truth.cases if c.image_id in unl_ids and c.labeled]
    if held:
      heldout["heldout_domain"] = held
  if not train:
    raise DataError(ann, f"split {split!r} leaves no training images")
  data = ExperimentData(ds, train, val, heldout, ds.unlabeled)
  check_images(data.all_cases(), ann)
  return data


def check_images(cases, annotations: Path) -> None:
  """Every image exists, opens and has the size the annotation file gives.

  Checked up front (headers only), so a missing image does not stop a run
  hours later when it is first sampled, and an image smaller than its
  annotations does not train silently on white padding.
  """
  for c in cases:
    with slides.Slide(c.path) as slide:  # DataError naming the file if unusable
      slides.check_size(slide, c.width, c.height, annotations)
