"""Input-pipeline throughput and memory on full-size (7215x5412) images.

Prints one JSON object per measurement: patches/s for 512 px and 128 px
patches with every augmentation (D4, elastic, OD colour, shift), with 0 and N
worker processes, and the peak RSS of the whole process tree while streaming
from 20 full-size images.

  python benchmarks/input_pipeline.py [--data DIR] [--images 20] [--workers 2]

The images are the synthetic ``midog21`` preset (real annotation positions),
generated into ``--data`` on first use and reused afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import psutil

from midog_jax.data import midog, pipeline, synthetic


def _tree_rss(proc: psutil.Process) -> int:
  total = 0
  for p in [proc] + proc.children(recursive=True):
    try:
      total += p.memory_info().rss
    except psutil.Error:
      pass
  return total


class PeakRSS:
  """Samples the RSS of this process and its children every 50 ms."""

  def __init__(self):
    self.peak = 0
    self._stop = threading.Event()
    self._proc = psutil.Process(os.getpid())
    self._t = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _tree_rss(self._proc))
      time.sleep(0.05)

  def __enter__(self):
    self._t.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._t.join()


def measure(cases, patch_size, workers, batches, batch_size):
  cfg = pipeline.PatchConfig(patch_size=patch_size, shift=16, d4=True,
                             elastic_alpha=4.0, elastic_sigma=10.0, colour="od",
                             colour_strength=0.1)
  ds = pipeline.make_dataset(cases, cfg, seed=0, batch_size=batch_size)
  it = pipeline.make_iterator(ds, num_workers=workers)
  next(it)  # start-up (worker spawn, first opens) is not throughput
  with PeakRSS() as rss:
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    dt = time.perf_counter() - t0
  return dict(benchmark="input_pipeline", patch_size=patch_size, workers=workers,
              images=len(cases), image_size=[cases[0].width, cases[0].height],
              patches=batches * batch_size, seconds=round(dt, 3),
              patches_per_s=round(batches * batch_size / dt, 2),
              peak_rss_mb=round(rss.peak / 2**20, 1), cpu_count=os.cpu_count())


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default="data/bench_midog21")
  p.add_argument("--images", type=int, default=20)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--batches", type=int, default=8)
  args = p.parse_args()
  data = Path(args.data)
  if not (data / "synthetic.json").exists():
    synthetic.generate(data, preset="midog21", seed=0, limit=args.images)
  # All images, the unlabeled scanner's too (they give random patches), so
  # the stream really touches every one of the full-size files.
  cases = list(midog.load_midog(data / "MIDOG.json").cases[:args.images])
  for size, bs in ((512, 8), (128, 64)):
    for workers in (0, args.workers):
      print(json.dumps(measure(cases, size, workers, args.batches, bs)), flush=True)


if __name__ == "__main__":
  main()
