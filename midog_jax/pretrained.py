"""Loading pretrained weights into a model strictly, under explicit named rules.

``config.init_from`` files (``checkpoint.load_pretrained`` reads them) are
matched here array by array: every array of the model must come from the file
or fall under one of the rules of `match_pretrained` (a backbone-only file in
a detector, the FrozenBatchNorm layout, class heads of another class count),
and each rule names the arrays it touched. Converted torchvision files
(``midog_jax.weights``) carry a JSON header (`pretrained_header`) with the
settings the weights were computed under; `fidelity_mismatches` compares them
with the config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from midog_jax.errors import DataError

# Metadata key of the JSON header in converted weight files (midog_jax.weights).
HEADER_KEY = "midog_jax"


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def pretrained_header(path: str | os.PathLike) -> dict | None:
  """The JSON header of a converted weights file (``midog_jax.weights``).

  None for anything else (a workdir, an orbax step, a plain safetensors
  file); ``DataError`` for an unreadable safetensors file or header.
  """
  p = Path(path)
  if p.suffix != ".safetensors" or not p.is_file():
    return None
  import json
  from safetensors import safe_open
  try:
    with safe_open(str(p), "np") as f:
      meta = f.metadata() or {}
  except Exception as e:  # safetensors raises several types for bad files
    raise DataError(p, f"not a valid safetensors file ({_first_line(e)})") from None
  if HEADER_KEY not in meta:
    return None
  try:
    header = json.loads(meta[HEADER_KEY])
  except ValueError as e:
    raise DataError(p, f"unreadable weights header ({e})") from None
  return header if isinstance(header, dict) else None


class PretrainedMatch:
  """How a pretrained file maps onto a model's variables (`match_pretrained`).

  Attributes:
    merged: the model's variables with every matched array replaced.
    loaded: model paths taken from the file.
    reinit: model paths of class heads whose class count differs from the
      file's: kept at their fresh initialisation.
    dropped: file class-head paths the model does not have (e.g. the
      ImageNet classifier of a backbone loaded into a detector).
    fresh: model paths outside the backbone when a backbone-only file is
      loaded into a detector: kept at their fresh initialisation.
    unmatched_file: file paths that fit no model array (an error when strict).
    unmatched_model: model paths no rule covers (an error when strict).
    rules: short descriptions of the layout rules that were applied.
  """

  def __init__(self):
    self.merged = None
    self.loaded, self.reinit, self.dropped, self.fresh = [], [], [], []
    self.unmatched_file, self.unmatched_model, self.rules = [], [], []

  @property
  def ok(self) -> bool:
    return not (self.unmatched_file or self.unmatched_model)

  def problem(self) -> str:
    """One line naming what does not match (empty when everything does)."""
    parts = []
    if self.unmatched_file:
      total = len(self.loaded) + len(self.unmatched_file)
      parts.append(f"{len(self.unmatched_file)} of {total} arrays match no parameter of "
                   f"the model by name and shape: {_few(self.unmatched_file)}")
    if self.unmatched_model:
      parts.append(f"{len(self.unmatched_model)} arrays of the model are not in the "
                   f"file: {_few(self.unmatched_model)}")
    return "; ".join(parts)

  def log_lines(self) -> list[str]:
    """What was loaded and what each explicit rule did, naming the arrays."""
    out = [f"loaded {len(self.loaded)} arrays" + (
        f" ({'; '.join(self.rules)})" if self.rules else "")]
    if self.reinit:
      out.append("re-initialised (the model's class count differs from the file's): "
                 + ", ".join(self.reinit))
    if self.dropped:
      out.append("not used (class heads the model does not have): " + ", ".join(self.dropped))
    if self.fresh:
      scopes = sorted({"/".join(k.split("/")[:2]) for k in self.fresh})
      out.append(f"freshly initialised (not in a backbone-only file): {len(self.fresh)} "
                 f"arrays under {', '.join(scopes)}")
    if self.unmatched_file:
      out.append("skipped (no parameter of that name and shape): "
                 + ", ".join(self.unmatched_file))
    if self.unmatched_model:
      out.append("not in the file (kept as initialised): " + ", ".join(self.unmatched_model))
    return out


def _few(names: list[str], n: int = 8) -> str:
  return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def match_pretrained(variables: dict, pretrained: dict, header: dict | None = None
                     ) -> PretrainedMatch:
  """Matches every array of ``pretrained`` to ``variables`` under explicit rules.

  Rules, in order (each logged by `PretrainedMatch.log_lines`):
    1. backbone-only file (``header["backbone"]``) into a model with a
       ``backbone`` scope: the file's arrays go under ``backbone/``; every
       model array outside it keeps its initialisation ("fresh").
    2. BatchNorm layout: a file with scale/bias in ``params`` and mean/var in
       ``batch_stats`` loads into a FrozenBatchNorm (all four in
       ``batch_stats``) and the other way round.
    3. class heads (``header["class_heads"]``): a model head of another shape
       (class count) keeps its initialisation ("reinit"); a head the model
       lacks is "dropped".
  Everything else must match by path and shape; the rest is listed in
  ``unmatched_file`` / ``unmatched_model``.
  """
  header = header or {}
  m = PretrainedMatch()
  flat = traverse_util.flatten_dict(variables, sep="/")
  src = traverse_util.flatten_dict(pretrained, sep="/")
  heads = set(header.get("class_heads", ()))
  model_params = variables.get("params", {})
  backbone_only = bool(header.get("backbone")) and "backbone" in model_params
  if backbone_only:
    def under(k):
      coll, _, rest = k.partition("/")
      return f"{coll}/backbone/{rest}"
    src = {under(k): v for k, v in src.items()}
    heads = {under(k) for k in heads}
    m.rules.append("backbone-only file loaded under backbone/")
  moved = 0
  for k in list(src):
    coll, _, rest = k.partition("/")
    scope, _, leaf = rest.rpartition("/")
    if leaf not in ("scale", "bias") or k in flat:
      continue
    other = {"params": "batch_stats", "batch_stats": "params"}.get(coll)
    if other and f"{other}/{rest}" in flat and (
        f"batch_stats/{scope}/mean" in flat or f"batch_stats/{scope}/mean" in src):
      src[f"{other}/{rest}"] = src.pop(k)
      moved += 1
  if moved:
    m.rules.append(f"{moved} BatchNorm scale/bias arrays moved between params and "
                   "batch_stats (FrozenBatchNorm layout)")
  for k, v in src.items():
    if k in flat and tuple(flat[k].shape) == tuple(np.shape(v)):
      flat[k] = jax.numpy.asarray(v, flat[k].dtype)
      m.loaded.append(k)
    elif k in heads:
      (m.reinit if k in flat else m.dropped).append(k)
    else:
      m.unmatched_file.append(k)
  done = set(m.loaded) | set(m.reinit)
  for k in flat:
    if k in done:
      continue
    if backbone_only and k.split("/")[1:2] != ["backbone"]:
      m.fresh.append(k)
    else:
      m.unmatched_model.append(k)
  m.merged = traverse_util.unflatten_dict(flat, sep="/")
  return m


def fidelity_mismatches(header: dict | None, config: Any) -> list[tuple[str, Any, Any]]:
  """``(dotted key, the header's value, the config's)`` for each fidelity
  setting of a converted file that the config sets differently.

  Keys the config does not have (another model family) are not compared.
  """
  out = []
  for key, want in ((header or {}).get("fidelity") or {}).items():
    node, found = config, True
    for part in key.split("."):
      if hasattr(node, "get") and part in node:
        node = node[part]
      else:
        found = False
        break
    if found and _canon(node) != _canon(want):
      out.append((key, want, node))
  return out


def _canon(v):
  if isinstance(v, (list, tuple)):
    return tuple(_canon(x) for x in v)
  if isinstance(v, (bool, str)) or v is None:
    return v
  if isinstance(v, (int, float, np.number)):
    return float(v)
  return v


def flag_value(v) -> str:
  """A config value as a command-line flag value: tuples as (a,b)."""
  if isinstance(v, (list, tuple)):
    return "(" + ",".join(flag_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def load_into(variables: dict, path: str | os.PathLike, config: Any
              ) -> tuple[dict, list[str]]:
  """``config.init_from`` -> (merged variables, log lines); the trainer's entry.

  Strict unless ``config.init_strict`` is False: arrays that no rule of
  `match_pretrained` covers are a ``DataError`` naming them. A converted
  file's fidelity settings that the config sets differently are a
  ``DataError`` too unless ``config.init_fidelity`` is False (then a warning).
  """
  from midog_jax.checkpoint import load_pretrained  # orbax is heavy to import
  header = pretrained_header(path)
  m = match_pretrained(variables, load_pretrained(path), header)
  if not m.ok and config.get("init_strict", True):
    # A mis-named weight file must not silently train from scratch.
    raise DataError(path, f"{m.problem()}; set --config.init_strict=False to load "
                    "the rest")
  notes = m.log_lines()
  if header:
    notes.insert(0, f"converted {header.get('arch')} weights (source "
                 f"{header.get('source', {}).get('file')}, sha256 "
                 f"{header.get('source', {}).get('sha256', '?')[:16]}...)")
  bad = fidelity_mismatches(header, config)
  if bad:
    flags = " ".join(f"--config.{k}={flag_value(want)}" for k, want, _ in bad)
    text = (f"these weights were computed with settings the config lacks: {flags} "
            "(configs/retina.py:pretrained=coco|imagenet sets them)")
    if config.get("init_fidelity", True):
      raise DataError(path, f"{text}; or set --config.init_fidelity=False to train "
                      "with the config's own settings")
    notes.append(f"warning: {text}")
  return m.merged, notes
