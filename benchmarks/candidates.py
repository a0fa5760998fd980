"""Blue-ratio candidate extraction and store build on full-size 7215x5412 images.

Prints one JSON object per measurement:

* ``streamed``: ``candidates.find_candidates`` on the first image in a FRESH
  process (so its peak RSS is the extraction's, not this script's), per
  ``--tile_px``: candidates/s, wall and CPU seconds, the process's peak RSS
  and its RSS after the imports (the difference is what the extraction costs);
* ``whole``: the same image read whole and extracted at once
  (``find_candidates_whole``), the memory the streaming avoids;
* ``parallel``: ``find_candidates_many`` over all images with ``--workers``
  processes, candidates/s and the peak RSS of the process tree;
* ``store``: ``build_store`` of all images (patches written), candidates/s,
  images/s, bytes written and the tree's peak RSS.

  python benchmarks/candidates.py [--data data/bench_candidates] [--images 2]
      [--workers 2] [--tile_px 2048,1024] [--quick]

The images are the synthetic ``midog21`` preset (ids 1.., 7215x5412 each),
generated into ``--data`` on first use; ``--quick`` uses them at scale 0.25
(about 1800x1350) in ``--data``_quick.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

from midog_jax import candidates
from midog_jax.data import midog, slides, synthetic


def _mb(n_bytes: float) -> float:
  return round(n_bytes / 2**20, 1)


def _peak_rss() -> int:
  """This process's peak RSS in bytes: VmHWM of its own address space (not
  ru_maxrss, which Linux carries over from the parent across fork + exec)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _in_child(kind: str, path: str, tile_px: int) -> dict:
  """Runs in a fresh process: one extraction and this process's peak RSS."""
  base = psutil.Process().memory_info().rss
  t0, c0 = time.perf_counter(), time.process_time()
  if kind == "streamed":
    n = len(candidates.find_candidates(path, candidates.Settings(tile_px=tile_px)))
  else:
    n = len(candidates.find_candidates_whole(slides.Slide(path).read_all()))
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  return dict(candidates=n, seconds=dt, cpu_seconds=cpu, peak=_peak_rss(), base=base)


def _fresh(kind: str, path: Path, tile_px: int) -> dict:
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
    return ex.submit(_in_child, kind, str(path), tile_px).result()


def ensure_images(data: Path, n: int, quick: bool) -> list[midog.Case]:
  if not (data / synthetic.MANIFEST).exists():
    print(f"generating {n} synthetic image(s) into {data} ...", file=sys.stderr)
    synthetic.generate(data, preset="midog21", seed=0, ids=list(range(1, n + 1)),
                       scale=0.25 if quick else 1.0, workers=min(2, n))
  cases = list(midog.load_midog(data / "MIDOG.json").cases)[:n]
  if len(cases) < n:
    raise SystemExit(f"{data} holds {len(cases)} images; remove it to regenerate")
  return cases


def main():
  # The benchmarks' one RSS sampler (imported here, not at the top, so the
  # spawned extraction processes do not load the input pipeline).
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from input_pipeline import PeakRSS  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default="data/bench_candidates")
  p.add_argument("--images", type=int, default=2)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--tile_px", default="2048,1024")
  p.add_argument("--quick", action="store_true", help="images at scale 0.25")
  args = p.parse_args()
  data = Path(args.data + ("_quick" if args.quick else ""))
  cases = ensure_images(data, args.images, args.quick)
  size = [cases[0].width, cases[0].height]
  # On a shared machine the load says how far wall times are from the CPU's.
  common = dict(image_size=size, cpu_count=os.cpu_count(),
                load_avg_1m=round(os.getloadavg()[0], 2))

  for tile_px in (int(t) for t in args.tile_px.split(",")):
    r = _fresh("streamed", cases[0].path, tile_px)
    print(json.dumps(dict(benchmark="candidates", mode="streamed", tile_px=tile_px,
                          candidates=r["candidates"], seconds=round(r["seconds"], 2),
                          cpu_seconds=round(r["cpu_seconds"], 2),
                          candidates_per_s=round(r["candidates"] / r["seconds"], 1),
                          peak_rss_mb=_mb(r["peak"]), rss_after_imports_mb=_mb(r["base"]),
                          **common)), flush=True)
  r = _fresh("whole", cases[0].path, 0)
  print(json.dumps(dict(benchmark="candidates", mode="whole", candidates=r["candidates"],
                        seconds=round(r["seconds"], 2), cpu_seconds=round(r["cpu_seconds"], 2),
                        candidates_per_s=round(r["candidates"] / r["seconds"], 1),
                        peak_rss_mb=_mb(r["peak"]), rss_after_imports_mb=_mb(r["base"]),
                        **common)), flush=True)

  paths = [c.path for c in cases]
  with PeakRSS() as rss:
    t0 = time.perf_counter()
    n = sum(len(xy) for xy in candidates.find_candidates_many(paths, workers=args.workers))
    dt = time.perf_counter() - t0
  print(json.dumps(dict(benchmark="candidates", mode="parallel", images=len(paths),
                        workers=args.workers, candidates=n, seconds=round(dt, 2),
                        candidates_per_s=round(n / dt, 1), images_per_s=round(len(paths) / dt, 3),
                        peak_tree_rss_mb=_mb(rss.peak), **common)), flush=True)

  root = Path(tempfile.mkdtemp(prefix="bench_store_"))
  try:
    with PeakRSS() as rss:
      t0 = time.perf_counter()
      store = candidates.build_store(cases, root, workers=args.workers)
      dt = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in store.path.iterdir())
    print(json.dumps(dict(benchmark="candidate_store", images=len(cases), workers=args.workers,
                          candidates=len(store), seconds=round(dt, 2),
                          candidates_per_s=round(len(store) / dt, 1),
                          images_per_s=round(len(cases) / dt, 3), store_mb=_mb(written),
                          bytes_per_candidate=round(written / max(len(store), 1)),
                          peak_tree_rss_mb=_mb(rss.peak), **common)), flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
