"""metrics.jsonl + TensorBoard event files (tensorboardX; no TensorFlow needed).

Only process 0 writes (DESIGN.md); other processes get a writer that drops
everything, so call sites need no ``if process_index == 0``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np


class MetricWriter:
  """Scalars to ``metrics.jsonl`` and TensorBoard; images to TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      workdir = Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / "tensorboard"))
      self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)

  def scalars(self, step: int, metrics: dict[str, float]) -> None:
    """One JSON line ``{"step": ..., **metrics}`` and one TB scalar each."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps(dict(step=int(step), **{
        k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})) + "\n")
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))

  def images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """HWC uint8 images."""
    if not self.enabled:
      return
    for k, v in images.items():
      self._tb.add_image(k, np.asarray(v), int(step), dataformats="HWC")

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
