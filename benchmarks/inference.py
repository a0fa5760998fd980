"""Whole-image inference throughput against the machine's own matmul FLOP/s.

Times ``infer.detect`` (lazy tile reads + the jitted, sharded detector + the
cross-tile merge) on ONE full-size 7215x5412 synthetic image with the default
seed-000 model (ResNet-50 RetinaNet, random init: timing does not depend on
the weights) and prints one JSON object per measurement::

  python benchmarks/inference.py [--data data/bench_midog21] [--tile_size 512]
      [--tile_batch 8] [--backbone resnet50] [--repeats 1] [--xla_defaults]
      [--quick] [--tta] [--mode tiles|regions] [--region_max_mpx 12]
      [--dtype float32|bfloat16]

``--tile_size`` and ``--tile_batch`` take comma-separated lists (one line per
combination). ``--mode regions`` cuts the image into a few large regions
instead (``infer.plan``; the tile size and batch do not apply: one region
per device per step); every line reports ``mpx_processed`` (what the network
sees) and ``extra_pixel_fraction`` (over the image's own pixels). ``--quick`` uses the small ``quick`` model (a smoke run).
``infer.detect`` compiles the detector with ``parallel.CPU_COMPILER_OPTIONS``
on CPU (XLA's own convolutions instead of YNNPACK's); ``--xla_defaults``
measures XLA's default options instead, for comparison.

FLOPs are XLA's own count (``cost_analysis()`` of the compiled per-batch
program, divided by the batch), so they match what really runs (padding of
the last batch excluded: ``tiles`` counts real tiles or regions; the
``*_per_tile`` fields are per region in regions mode). ``--data`` may name
any folder with a ``001.tiff`` (e.g. a small synthetic set, for a smoke run). The reference is a
float32 N x N matmul timed in the same process (best of a few, before and
after the image, under XLA's default options and under the detector's, the
best of all), with its FLOPs counted the same way.
``fraction_of_matmul`` = achieved / matmul FLOP/s.

Breakdown fields (on unless ``--no-breakdown``) say where time goes:
``compute_s_per_tile`` (the compiled tile function on device-resident tiles,
back to back), ``model_s_per_tile`` (network only, without ``postprocess``)
and ``read_s_per_tile`` (reading + decoding the tiles alone, one thread).
XLA flags are taken from ``$XLA_FLAGS`` and echoed in the output, with the
load average and ``cpu_share`` (this process's CPU time over wall time x
cores): on a shared machine, a share well below 1 means the figures are
low because other processes had the CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from midog_jax import detectors, infer, parallel, tta  # noqa: E402
from midog_jax.detectors import interface  # noqa: E402
from midog_jax import config_files  # noqa: E402
from midog_jax.data import slides, synthetic  # noqa: E402


def _flops(compiled) -> float:
  """FLOPs of a compiled executable by XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost["flops"])


def matmul_gflops(n: int = 4096, reps: int = 4) -> tuple[float, float]:
  """Best float32 N x N matmul rates: GFLOP/s of wall time and of CPU time.

  FLOPs by XLA's count. Compiled both with XLA's default options and with
  the ones ``infer`` uses for the detector; the faster is the reference, so
  a change of XLA options cannot flatter the ratio by slowing the reference.
  """
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  best_rate = best_cpu_rate = 0.0
  for opts in (None, dict(parallel.CPU_COMPILER_OPTIONS) or None):
    f = jax.jit(jnp.matmul).lower(a, b).compile(compiler_options=opts)
    flops = _flops(f)
    f(a, b).block_until_ready()
    for _ in range(reps):
      t0, c0 = time.perf_counter(), time.process_time()
      f(a, b).block_until_ready()
      best_rate = max(best_rate, flops / (time.perf_counter() - t0) / 1e9)
      best_cpu_rate = max(best_cpu_rate, flops / (time.process_time() - c0) / 1e9)
  return best_rate, best_cpu_rate


def ensure_image(data: Path) -> Path:
  """``data/001.tiff`` (7215x5412, midog21 preset), generated if missing."""
  path = data / "001.tiff"
  if not path.exists():
    print(f"generating {path} (one full-size synthetic image) ...", file=sys.stderr)
    synthetic.generate(data, preset="midog21", seed=0, ids=[1], workers=1)
  return path


def _time_calls(fn, x, calls: int) -> float:
  """Seconds per call of ``fn(x)``, back to back, after one warm call."""
  jax.block_until_ready(fn(x))
  t0 = time.perf_counter()
  for _ in range(calls):
    out = fn(x)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / calls


def _read_seconds_per_tile(path: Path, tcfg: infer.TileConfig, n: int) -> float:
  """Reading + decoding alone: the first ``n`` tiles (or regions), one thread."""
  with slides.Slide(path) as s:
    xs, ys, th, tw = infer.plan(s.width, s.height, tcfg)
    grid = [(x, y) for y in ys for x in xs][:n]
    t0 = time.perf_counter()
    for x, y in grid:
      s.read(int(x), int(y), tw, th)
    return (time.perf_counter() - t0) / len(grid)


def measure(path: Path, method, variables, cfg, tile_size: int,
            tile_batch: int, mesh, repeats: int, breakdown: bool,
            matmul_before: float, use_tta: bool = False, mode: str = "tiles",
            region_max_mpx: float = 12.0) -> dict:
  tcfg = infer.TileConfig(tile_size=tile_size, overlap=cfg.eval.tile_overlap,
                          tile_batch=tile_batch, merge_radius=cfg.eval.merge_radius_px,
                          score_thresh=cfg.eval.score_thresh, mode=mode,
                          region_max_mpx=region_max_mpx,
                          multiple=interface.hook(method, "input_multiple") or 1)
  with slides.Slide(path) as s:
    width, height = s.width, s.height
  xs, ys, th, tw = infer.plan(width, height, tcfg)
  if mode == "regions":  # one region per device per step, as detect() runs them
    tile_batch = mesh.devices.size
  tile_fn = method.make_tile_fn(tcfg.score_thresh)
  run = infer.for_platform(tile_fn)  # what detect() compiles and calls
  sharding = parallel.data_sharding(mesh)
  batch = jax.device_put(np.full((tile_batch, th, tw, 3), 200, np.uint8), sharding)
  t0 = time.perf_counter()
  flops_per_tile = _flops(run.lower(variables, batch).compile()) / tile_batch
  if use_tta:  # eight views, each tiled like the image
    flops_per_tile *= len(tta.D4)
  jax.block_until_ready(run(variables, batch))  # compiles the program detect() runs
  compile_s = time.perf_counter() - t0

  tiles = len(xs) * len(ys)
  processed = infer.pixels_processed(width, height, tcfg)
  times, n_det = [], 0
  load_before = os.getloadavg()[0]
  cpu_s = []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    det = (tta.detect if use_tta else infer.detect)(path, tile_fn, variables, tcfg, mesh)
    times.append(time.perf_counter() - t0)
    cpu_s.append(time.process_time() - c0)
    n_det = len(det)
  after = matmul_gflops()
  matmul = max(matmul_before[0], after[0])
  matmul_cpu = max(matmul_before[1], after[1])
  per_cpu = flops_per_tile * tiles / min(cpu_s) / 1e9
  sec = min(times)
  achieved = flops_per_tile * tiles / sec / 1e9
  out = dict(
      benchmark="inference", backbone=cfg.model.backbone, tta=use_tta, mode=mode,
      image_size=[width, height], tile_size=tile_size if mode == "tiles" else [tw, th],
      overlap=tcfg.overlap, tile_batch=tile_batch, tiles=tiles,
      batches=-(-tiles // tile_batch),
      seconds_per_image=round(sec, 3), all_seconds=[round(t, 3) for t in times],
      mpix_per_s=round(width * height / sec / 1e6, 4),
      # What the network sees (tiles or regions, overlaps and padding), and
      # its excess over the image's own pixels.
      mpx_processed=round(processed / 1e6, 3),
      extra_pixel_fraction=round(processed / (width * height) - 1, 4),
      flops_per_tile=flops_per_tile,
      achieved_gflops_per_s=round(achieved, 2),
      matmul_gflops_per_s=round(matmul, 2),
      fraction_of_matmul=round(achieved / matmul, 4),
      compile_s=round(compile_s, 1), detections=n_det,
      device_kind=jax.devices()[0].device_kind, platform=jax.default_backend(),
      device_count=jax.device_count(), cpu_count=os.cpu_count(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      cpu_compiler_options=parallel.CPU_COMPILER_OPTIONS,
      # Other processes on the machine make every figure here slower.
      load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
      # CPU time of this process over (wall time x cores): 1.0 = it had the
      # whole machine; less = it waited (for other processes, or idled).
      cpu_share=[round(c / t / os.cpu_count(), 3) for c, t in zip(cpu_s, times)],
      # The same ratio per second of CPU time (both sides): a shared machine
      # slows both down alike, so this is the figure to read when busy.
      achieved_gflops_per_cpu_s=round(per_cpu, 2),
      matmul_gflops_per_cpu_s=round(matmul_cpu, 2),
      fraction_of_matmul_per_cpu_s=round(per_cpu / matmul_cpu, 4))
  if breakdown:
    compute = _time_calls(functools.partial(run, variables), batch, 2) / tile_batch
    model_only = infer.for_platform(
        jax.jit(lambda t: method.model.apply(variables, interface.normalize(
            t, method.input_mean, method.input_std), train=False)))
    model = _time_calls(model_only, batch, 2) / tile_batch
    read = _read_seconds_per_tile(path, tcfg, 2 * tile_batch)
    out.update(
        compute_s_per_tile=round(compute, 4), model_s_per_tile=round(model, 4),
        read_s_per_tile=round(read, 4),
        compute_fraction_of_matmul=round(flops_per_tile / compute / 1e9 / matmul, 4),
        # Share of the image's wall time not explained by back-to-back compute.
        overhead_fraction=round(1.0 - compute * tiles / sec, 4))
  return out


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default="data/bench_midog21",
                 help="folder with (or to receive) the full-size 001.tiff")
  p.add_argument("--tile_size", default="", help="e.g. 512 or 512,1024 "
                 "(default: config.eval.tile_size)")
  p.add_argument("--tile_batch", default="", help="e.g. 8 or 4,8 "
                 "(default: config.eval.tile_batch)")
  p.add_argument("--backbone", default="", help="resnet18|resnet34|resnet50 "
                 "(default: the config's)")
  p.add_argument("--repeats", type=int, default=1, help="timed images per setting")
  p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
  p.add_argument("--xla_defaults", action="store_true",
                 help="compile the detector with XLA's default CPU options "
                 "(YNNPACK convolutions) instead of parallel.CPU_COMPILER_OPTIONS")
  p.add_argument("--quick", action="store_true",
                 help="the small 'quick' model (smoke run)")
  p.add_argument("--tta", action="store_true",
                 help="D4 test-time augmentation (midog_jax.tta): eight views per image")
  p.add_argument("--mode", default="tiles", choices=infer.MODES,
                 help="tiles (tile_size squares) or regions (a few large regions "
                 "per image; --tile_size/--tile_batch do not apply)")
  p.add_argument("--region_max_mpx", type=float, default=None,
                 help="regions: largest region in Mpx (default: config.eval.region_max_mpx)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="config.model.compute_dtype (mixed precision)")
  args = p.parse_args(argv)
  if args.xla_defaults:
    parallel.CPU_COMPILER_OPTIONS = {}

  cfg = config_files.get_config("retina", "quick" if args.quick else None)
  if args.backbone:
    cfg.model.backbone = args.backbone
  cfg.model.compute_dtype = args.dtype
  path = ensure_image(Path(args.data))
  mesh = parallel.local_mesh()
  # Parameters do not depend on the input size: initialise on a small patch.
  cfg.data.patch_size = 128
  method = detectors.build(cfg)
  variables = method.init_variables(jax.random.key(cfg.seed, impl="rbg"))
  variables = parallel.replicate(variables, mesh)
  matmul_before = matmul_gflops()
  region_max = (cfg.eval.region_max_mpx if args.region_max_mpx is None
                else args.region_max_mpx)
  tiled = args.mode == "tiles"  # regions: one line, the sizes do not apply
  for tile_size in (tiled and _ints(args.tile_size)) or [cfg.eval.tile_size]:
    for tile_batch in (tiled and _ints(args.tile_batch)) or [cfg.eval.tile_batch]:
      print(json.dumps(dict(measure(path, method, variables, cfg, tile_size, tile_batch,
                                    mesh, args.repeats, args.breakdown, matmul_before,
                                    args.tta, args.mode, region_max), dtype=args.dtype)),
            flush=True)


if __name__ == "__main__":
  main()
