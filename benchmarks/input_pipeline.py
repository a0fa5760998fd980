"""Input-pipeline throughput and memory on full-size (7215x5412) images.

Prints one JSON object per measurement: patches/s for 512 px and 128 px
patches with every augmentation (D4, elastic, OD colour, shift), with 0 and N
worker processes, and the peak RSS of the whole process tree while streaming
from 20 full-size images. ``patches_per_cpu_s`` is patches per CPU-second of
the whole process tree (main process and workers): the host throughput of one
core, whatever the number of workers.

``--augment_on device`` (or ``both``) measures the pipeline as
``data.augment_on = "device"`` runs it: the workers only read the uint8 crops
with their margin, and a second record (``"benchmark": "augment_device"``)
times the jitted ``augment_device.augment_batch`` on the default JAX device
(a batch of ``--device_batch`` crops, after compilation).

  python benchmarks/input_pipeline.py [--data DIR] [--images 20] [--workers 2]
      [--augment_on host|device|both] [--sizes 512,128] [--device_batch 32]

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

# The augmentation every measurement uses (the chain of Lafarge & Koelzer).
AUGMENT = dict(shift=16, d4=True, elastic_alpha=4.0, elastic_sigma=10.0, colour="od",
               colour_strength=0.1)


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


def _tree_cpu_s(proc: psutil.Process) -> float:
  """User + system CPU seconds of this process and its live children."""
  total = 0.0
  for p in [proc] + proc.children(recursive=True):
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def measure(cases, patch_size, workers, batches, batch_size, augment_on="host"):
  cfg = pipeline.PatchConfig(patch_size=patch_size, augment_on=augment_on, **AUGMENT)
  ds = pipeline.make_dataset(cases, cfg, seed=0, batch_size=batch_size)
  it = pipeline.make_iterator(ds, num_workers=workers)
  next(it)  # start-up (worker spawn, first opens) is not throughput
  me = psutil.Process(os.getpid())
  with PeakRSS() as rss:
    cpu0, t0 = _tree_cpu_s(me), time.perf_counter()
    for _ in range(batches):
      next(it)
    dt, cpu = time.perf_counter() - t0, _tree_cpu_s(me) - cpu0
  n = batches * batch_size
  return dict(benchmark="input_pipeline", augment_on=augment_on, patch_size=patch_size,
              crop_size=patch_size + (2 * cfg.margin if augment_on == "device" else 0),
              workers=workers, images=len(cases),
              image_size=[cases[0].width, cases[0].height],
              patches=n, seconds=round(dt, 3), patches_per_s=round(n / dt, 2),
              cpu_seconds=round(cpu, 3), patches_per_cpu_s=round(n / max(cpu, 1e-9), 2),
              peak_rss_mb=round(rss.peak / 2**20, 1), cpu_count=os.cpu_count())


def measure_device(patch_size, batch_size, repeats=5):
  """patches/s of the jitted batch augmentation on the default JAX device."""
  import jax  # pylint: disable=g-import-not-at-top (host-only runs need no jax)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from midog_jax.data import augment_device  # pylint: disable=g-import-not-at-top
  cfg = pipeline.PatchConfig(patch_size=patch_size, augment_on="device", **AUGMENT)
  crop = patch_size + 2 * cfg.margin
  rng = np.random.default_rng(0)
  batch = jax.device_put(dict(
      image=rng.integers(0, 256, (batch_size, crop, crop, 3), dtype=np.uint8),
      points=rng.uniform(0, crop - 1, (batch_size, 32, 2)).astype(np.float32),
      mask=np.ones((batch_size, 32), bool),
      index=np.arange(batch_size, dtype=np.int32)))
  fn = jax.jit(lambda step, b: augment_device.augment_batch(
      augment_device.DeviceAugmenter.from_patch_config(cfg), 0, step, b))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(0, batch))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for step in range(1, repeats + 1):
    out = fn(step, batch)
  jax.block_until_ready(out)
  dt = time.perf_counter() - t0
  return dict(benchmark="augment_device", device=str(jax.devices()[0]),
              patch_size=patch_size, crop_size=crop, batch=batch_size,
              repeats=repeats, compile_seconds=round(compile_s, 2),
              seconds=round(dt, 4), patches_per_s=round(repeats * batch_size / dt, 1))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default="data/bench_midog21")
  p.add_argument("--images", type=int, default=20)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--augment_on", choices=("host", "device", "both"), default="host")
  p.add_argument("--sizes", default="512,128", help="patch sizes, comma-separated")
  p.add_argument("--device_batch", type=int, default=32)
  p.add_argument("--device_repeats", type=int, default=5)
  args = p.parse_args()
  data = Path(args.data)
  if not (data / "synthetic.json").exists():
    synthetic.generate(data, preset="midog21", seed=0, limit=args.images)
  # All images, the unlabeled scanner's too (they give random patches), so
  # the stream really touches every one of the full-size files.
  cases = list(midog.load_midog(data / "MIDOG.json").cases[:args.images])
  modes = ("host", "device") if args.augment_on == "both" else (args.augment_on,)
  for size in (int(s) for s in args.sizes.split(",")):
    bs = 8 if size >= 256 else 64
    for mode in modes:
      for workers in sorted({0, args.workers}):
        print(json.dumps(measure(cases, size, workers, args.batches, bs, mode)), flush=True)
      if mode == "device":
        print(json.dumps(measure_device(size, args.device_batch, args.device_repeats)),
              flush=True)


if __name__ == "__main__":
  main()
