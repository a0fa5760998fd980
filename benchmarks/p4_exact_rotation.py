"""Cost of the P4 method's rotation-exact stride-1 map (``eval.exact_rotation``).

Times the jitted tile function of the P4 detector on one batch of
context-padded tiles, with the network's own stride-2 map and with the
shift-and-stitch stride-1 map (four shifted applications), and prints one JSON
object per setting plus the ratio::

  python benchmarks/p4_exact_rotation.py [--config quick|full] [--tile_size 256]
      [--tile_batch 4] [--repeats 3]

Random weights (timing does not depend on them). ``cpu_share`` is this
process's CPU time over wall time x cores: well below 1 means other processes
had the CPU and the absolute times are high (the ratio is still telling).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
import psutil

from midog_jax.config_files import get_config
from midog_jax.detectors import p4 as p4m


def _time(fn, variables, tiles, repeats: int) -> float:
  jax.block_until_ready(fn(variables, tiles))  # compile
  best = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, tiles))
    best = min(best, time.perf_counter() - t0)
  return best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="quick", help="p4_resnet config argument (quick or full)")
  p.add_argument("--tile_size", type=int, default=256)
  p.add_argument("--tile_batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  proc = psutil.Process()
  times = {}
  for exact in (False, True):
    config = get_config("p4_resnet", "" if a.config == "full" else a.config)
    config.eval.tile_size = a.tile_size
    config.eval.exact_rotation = exact
    det = p4m.P4Detector(config)
    variables = det.init_variables(jax.random.key(0))
    side = a.tile_size + 2 * det.tile_context
    tiles = np.random.default_rng(0).integers(0, 256, (a.tile_batch, side, side, 3), np.uint8)
    cpu0, wall0 = proc.cpu_times(), time.perf_counter()
    secs = _time(det.make_tile_fn(0.05), variables, tiles, a.repeats)
    cpu1, wall1 = proc.cpu_times(), time.perf_counter()
    share = ((cpu1.user + cpu1.system - cpu0.user - cpu0.system)
             / max(wall1 - wall0, 1e-9) / (os.cpu_count() or 1))
    times[exact] = secs
    print(json.dumps(dict(benchmark="p4_tile_fn", config=a.config, exact_rotation=exact,
                          tile_size=a.tile_size, tile_batch=a.tile_batch,
                          seconds_per_tile=secs / a.tile_batch,
                          mpix_per_s=a.tile_batch * a.tile_size ** 2 / secs / 1e6,
                          cpu_share=round(share, 2),
                          load_average=os.getloadavg()[0])), flush=True)
  print(json.dumps(dict(benchmark="p4_exact_rotation_cost", config=a.config,
                        tile_size=a.tile_size, ratio=times[True] / times[False])))


if __name__ == "__main__":
  main()
