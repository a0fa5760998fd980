"""The image-level sets of one experiment: train, val and held-out items.

``source="midog"``: fields of the experiment's cases (``data.experiment``:
the same domain-stratified splits, held-out domains and truth files as every
other method; a field inherits its image's split), optionally only the
domains in ``image_level.domains`` for training and validation (round 2's
second dataset can be a second domain; held-out sets keep every domain). ``source="csv"``: the items of a labelled CSV (``fields.read_label_csv``).
"""

from __future__ import annotations

import dataclasses
import json

from midog_jax.data import experiment
from midog_jax.errors import DataError
from midog_jax.image_level import fields as fields_lib
from midog_jax.image_level.fields import Item


@dataclasses.dataclass
class ItemSets:
  """Items by split; the attributes the training loop reads of ``ExperimentData``."""

  train: list[Item]
  val: list[Item]
  heldout: dict[str, list[Item]]
  excluded: dict[str, int] = dataclasses.field(default_factory=dict)
  unlabeled: list = dataclasses.field(default_factory=list)

  @property
  def pool_cases(self) -> list[Item]:
    return self.train

  def sets(self) -> dict[str, list[Item]]:
    """Every non-empty set by name: train, val, then the held-out ones."""
    out = dict(train=self.train, val=self.val, **self.heldout)
    return {k: v for k, v in out.items() if v}

  def describe(self) -> str:
    text = ", ".join(f"{k} {len(v)}" for k, v in self.sets().items()) + " items"
    if self.excluded:
      text += " (excluded border fields: " + ", ".join(
          f"{k} {v}" for k, v in self.excluded.items()) + ")"
    return text + "\n" + fields_lib.format_balance(self.sets())

  def balance(self) -> dict:
    """Class balance per split and domain (``fields.balance``), and exclusions."""
    return dict(balance={k: fields_lib.balance(v) for k, v in self.sets().items()},
                excluded=self.excluded)


def out_px(config) -> int:
  """Side (px) items are resampled to: ``image_px``, else the field at work spacing."""
  il = config.image_level
  if il.image_px:
    return int(il.image_px)
  return max(1, int(round(fields_lib.field_side_um(il.field_area_mm2) / il.work_spacing_um)))


def load_sets(config, size: int | None = None) -> ItemSets:
  """The items of ``config`` (see module docstring), resampled to ``size`` px."""
  il = config.image_level
  size = out_px(config) if size is None else int(size)
  if il.source == "csv":
    if not il.csv:
      raise DataError(None, "source=csv needs --config.image_level.csv=PATH")
    by = fields_lib.read_label_csv(il.csv, size, il.scale, il.work_spacing_um,
                                   config.data.val_fraction, config.data.split_seed)
    sets = ItemSets(by["train"], by["val"], {"test": by["test"]} if by["test"] else {})
  elif il.source == "midog":
    data = experiment.load_experiment(config.data)
    keep = {d.strip() for d in str(il.domains).split(",") if d.strip()}
    known = {c.domain for c in data.all_cases()}
    if keep - known:
      raise DataError(None, f"image_level.domains: unknown {sorted(keep - known)}; "
                      f"domains: {sorted(known)}")

    def fields_of(cases, restrict=True):
      cases = [c for c in cases if not (keep and restrict) or c.domain in keep]
      return fields_lib.midog_items(cases, il.field_area_mm2, size, il.margin_um)

    (train, ex_t), (val, ex_v) = fields_of(data.train), fields_of(data.val)
    heldout, excluded = {}, dict(train=ex_t, val=ex_v)
    for name, cases in data.heldout.items():  # always scored on every domain
      heldout[name], excluded[name] = fields_of(cases, restrict=False)
    sets = ItemSets(train, val, {k: v for k, v in heldout.items() if v}, excluded)
  else:
    raise ValueError(f"image_level.source must be midog or csv, got {il.source!r}")
  if not sets.train:
    raise DataError(il.csv or config.data.root or None, "no training items")
  if len({it.label for it in sets.train}) < 2:
    raise DataError(il.csv or config.data.root or None,
                    "the training items hold one class only: " + json.dumps(
                        fields_lib.balance(sets.train)["all"]))
  return sets
