"""Metrics: CLU collections for accumulation, a writer with CLU's interface.

Accumulation uses ``clu.metrics`` (which imports without TensorFlow): the
trainer merges each step's scalars into a :func:`averages` collection and
writes the interval's means at every log step. Writing goes through an object
with the method names of ``clu.metric_writers.MetricWriter``
(``write_scalars``, ``write_images``, ``write_hparams``, ``flush``,
``close``), so a user with TensorFlow installed can pass one of CLU's own
writers to ``train.train_and_evaluate(..., writer=...)``. Without it,
:class:`MetricWriter` writes ``metrics.jsonl`` (one JSON object per logged
step) and TensorBoard event files through tensorboardX.

Only process 0 writes; other processes get a writer that drops everything,
so call sites need no ``if process_index == 0``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from clu import metrics as clu_metrics


def averages(names) -> type[clu_metrics.Collection]:
  """A CLU collection averaging each of ``names`` over the merged steps."""
  return clu_metrics.Collection.create(
      **{n: clu_metrics.Average.from_output(n) for n in sorted(names)})


def accumulate(steps: list[Mapping[str, Any]]) -> dict[str, float]:
  """Means over ``steps`` (dicts of scalars) through a CLU collection."""
  if not steps:
    return {}
  collection = averages(steps[0])
  acc = None
  for m in steps:
    one = collection.single_from_model_output(
        **{k: np.asarray(v, np.float32) for k, v in m.items()})
    acc = one if acc is None else acc.merge(one)
  return {k: float(v) for k, v in acc.compute().items()}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; sequences become strings."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    elif isinstance(v, (bool, int, float, str)) or v is None:
      out[key] = v
    else:
      out[key] = str(v)
  return out


def example_image(batch) -> np.ndarray:
  """A few training patches side by side with their labels drawn (TensorBoard)."""
  imgs = np.asarray(batch["image"][:4]).copy()
  for k in range(len(imgs)):
    for (x, y), c, m in zip(batch["points"][k], batch["classes"][k], batch["mask"][k]):
      if not m:
        continue
      colour = (0, 255, 0) if c == 1 else (0, 0, 255)
      xi, yi = int(round(x)), int(round(y))
      h, w = imgs[k].shape[:2]
      imgs[k, max(yi - 1, 0):min(yi + 2, h), max(xi - 12, 0):min(xi + 13, w)] = colour
      imgs[k, max(yi - 12, 0):min(yi + 13, h), max(xi - 1, 0):min(xi + 2, w)] = colour
  return np.concatenate(list(imgs), axis=1)


class MetricWriter:
  """``clu.metric_writers.MetricWriter``'s methods over metrics.jsonl + TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      workdir = Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(workdir / "tensorboard"))
      self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One JSON line ``{"step": ..., **scalars}`` and one TB scalar each."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps(dict(step=int(step), **{
        k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})) + "\n")
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """HWC (or NHWC, first image) uint8 images."""
    if not self.enabled:
      return
    for k, v in images.items():
      v = np.asarray(v)
      self._tb.add_image(k, v[0] if v.ndim == 4 else v, int(step), dataformats="HWC")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's hyper-parameters (a flattened config) to TensorBoard's HPARAMS tab."""
    if not self.enabled:
      return
    from tensorboardX.summary import hparams as hparams_summary  # pylint: disable=g-import-not-at-top
    flat = flatten(hparams)
    # Into this run's own event file (tensorboardX's add_hparams would start
    # a separate run folder).
    for summary in hparams_summary(flat, {}):
      self._tb.file_writer.add_summary(summary)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


class Progress:
  """Progress lines with steps/s and ETA."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
    self.total, self.start, self.enabled = total_steps, start_step, enabled
    self.t0 = time.perf_counter()
    self._last = (start_step, self.t0)

  def line(self, step: int, metrics: dict[str, float]) -> str | None:
    now = time.perf_counter()
    s0, t0 = self._last
    rate = (step - s0) / max(now - t0, 1e-9)
    self._last = (step, now)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    text = (f"step {step}/{self.total}  " +
            "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()) +
            f"  {rate:.2f} steps/s  ETA {eta / 60:.1f} min")
    if self.enabled:
      print(text, flush=True)
    return text
