"""Whole-ROI inference of the ResNet-50 RetinaNet: ours (JAX) and torchvision's, same run.

  python benchmarks/vs_torch.py [--data data/bench_midog21] [--tile_size 512]
      [--overlap 64] [--tile_batch 8] [--crop WxH] [--repeats 1] [--no_regions]

Both detectors run on the same 7215x5412 synthetic image (``inference.py``'s
``ensure_image``; ``--crop 1024x1024`` takes a centred crop for a quick
check), tiled the same way: ``infer.detect`` itself (tile grid, read-ahead
reader thread, padded last batch, ownership merge, distance suppression)
drives both, ours with the jitted tile function, torchvision's with an eager
one (uint8 tiles -> torch, ``model(list)`` under ``torch.inference_mode()``,
box centres as points). The torch model is torchvision's
``retinanet_resnet50_fpn_v2`` as ``configs/retina.py``'s default: one class,
its ``AnchorGenerator`` with the config's anchors (three octave sizes, ratio
1.0: 3 anchors per location, not COCO's 9), its transform fixed to the tile
size (a 512 px tile stays 512 px: no resize), BatchNorm2d, in eval mode.
Its randomly initialised state dict (seed 0) is converted into our variables
with ``midog_jax.weights``, so both compute the same function; post-processing
stays each one's own (torchvision: per-level top 1000, box NMS at IoU 0.5,
300 per tile; ours: global top 300, 25 px centre distance). Torch gets
``os.cpu_count()`` threads (on a GPU machine, the GPU); XLA every core.

Prints JSON lines: ``vs_torch_parity`` (max |ours - torch| of the
classification logits of every anchor of one tile, absolute and relative to
max |torch|), then one ``vs_torch`` line per measurement with, under
``ours`` and ``torch``: ``seconds_per_roi`` (end to end: read + decode +
infer + merge, best of ``--repeats``; ``all_seconds`` each), ``compute_s_per_roi``
(the tile function on a batch of real tiles already in memory, best call,
times the batches), ``gflops_per_s`` / ``compute_gflops_per_s`` and
``fraction_of_matmul`` / ``compute_fraction_of_matmul`` (FLOPs per tile by
XLA's cost analysis of our tile function, the same network for both, over
the time; against a float32 matmul timed here before and after, as
``inference.py``), ``cpu_share`` (this process's CPU time over wall time x
cores per repeat: well below 1 means other processes had the CPU),
``detections``; and ``ratio_torch_over_ours`` / ``compute_ratio_torch_over_ours``
(> 1: ours is faster). ``ours_regions`` (unless ``--no_regions``) is ours
again with the image cut into a few large regions (``--inference regions``
of ``predict``: 2 x 2 regions of 3648 x 2752 px for 7215 x 5412, 2.8% extra
pixels against the tiles' 29%), with ``*_ratio_torch_over_ours_regions``;
its compute time is one batch of regions (one per device) times the
batches, its FLOPs XLA's count of that program. Without torch/torchvision, one line says so and only
ours is timed (exit 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from midog_jax import config_files, detectors, infer, parallel
from midog_jax.detectors import interface
from midog_jax.data import slides
from midog_jax.detections import MITOSIS
from midog_jax.detectors.retinanet import anchors as anchors_lib
from midog_jax.weights import archs, converter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inference import _flops, ensure_image, matmul_gflops  # noqa: E402  pylint: disable=g-import-not-at-top


class Crop:
  """A centred ``w`` x ``h`` window of an image file, white outside it (a source
  ``infer.detect`` tiles like a whole image; opened on construction)."""

  def __init__(self, path: Path, w: int, h: int):
    self.slide = slides.Slide(path)
    self.width, self.height = min(w, self.slide.width), min(h, self.slide.height)
    self.x0 = (self.slide.width - self.width) // 2
    self.y0 = (self.slide.height - self.height) // 2

  def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
    out = np.full((h, w, 3), 255, np.uint8)
    xs, ys = max(x, 0), max(y, 0)
    xe, ye = min(x + w, self.width), min(y + h, self.height)
    if xe > xs and ye > ys:
      out[ys - y:ye - y, xs - x:xe - x] = self.slide.read(
          self.x0 + xs, self.y0 + ys, xe - xs, ye - ys)
    return out


def torch_detector(torch, cfg, tile_size: int, score_thresh: float):
  """torchvision's v2 RetinaNet with ``cfg.model``'s architecture (eval mode)."""
  from torchvision.models.detection.retinanet import (  # pylint: disable=g-import-not-at-top
      AnchorGenerator, RetinaNetHead, retinanet_resnet50_fpn_v2)
  m = cfg.model
  have = (m.backbone, m.backbone_width, tuple(m.levels), m.fpn_channels, m.head_depth,
          m.head_groups, m.norm, m.resize_to, m.imposters, tuple(m.input_mean),
          tuple(m.input_std))
  want = ("resnet50", 0, (3, 4, 5, 6, 7), 256, 4, 32, "batch", 0, "background",
          archs.IMAGENET_MEAN, archs.IMAGENET_STD)
  if have != want:
    raise SystemExit(f"torchvision's v2 RetinaNet has {want}, the config {have}")
  torch.manual_seed(0)
  model = retinanet_resnet50_fpn_v2(
      weights=None, weights_backbone=None, num_classes=1, min_size=tile_size,
      max_size=tile_size, score_thresh=score_thresh, detections_per_img=int(m.topk))
  sizes = tuple(m.anchor_sizes) or anchors_lib.default_sizes(tuple(m.levels))
  model.anchor_generator = AnchorGenerator(
      tuple(tuple(s) for s in sizes), (tuple(m.anchor_ratios),) * len(sizes))
  model.head = RetinaNetHead(256, model.anchor_generator.num_anchors_per_location()[0],
                             1, norm_layer=functools.partial(torch.nn.GroupNorm, 32))
  return model.eval()


def converted_variables(model, abstract) -> dict:
  """The torch model's state dict in our names (``midog_jax.weights``), checked
  against our detector's variables (``abstract``: their shapes)."""
  sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  arrays, _, _ = converter.map_arrays(archs.ARCHS["retinanet_resnet50_fpn_v2"], sd, "torch")
  ours = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  if ours != {k: v.shape for k, v in arrays.items()}:
    raise SystemExit("the converted torchvision weights do not fit our detector")
  return traverse_util.unflatten_dict(arrays, sep="/")


def torch_tile_fn(torch, model, device: str, k: int):
  """(variables, uint8 tiles (B, T, T, 3)) -> infer's (points, scores, classes,
  valid), eager torch; ``variables`` is unused (the model holds its weights)."""

  def tile_fn(_, tiles):
    x = torch.from_numpy(np.array(tiles)).to(device).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
      outs = model(list(x))
    b = len(outs)
    pts, sc = np.zeros((b, k, 2), np.float32), np.zeros((b, k), np.float32)
    valid = np.zeros((b, k), bool)
    for i, o in enumerate(outs):
      box = o["boxes"].cpu().numpy()
      n = min(len(box), k)
      pts[i, :n] = 0.5 * (box[:n, :2] + box[:n, 2:])
      sc[i, :n], valid[i, :n] = o["scores"][:n].cpu().numpy(), True
    return pts, sc, np.full((b, k), MITOSIS, np.int32), valid

  return tile_fn


def middle_tiles(source, tcfg: infer.TileConfig) -> np.ndarray:
  """``tile_batch`` tiles from the middle of the grid (real tissue, for compute timing)."""
  w, h, read = infer.image_reader(source)
  xs = infer.tile_origins(w, tcfg.tile_size, tcfg.overlap)
  ys = infer.tile_origins(h, tcfg.tile_size, tcfg.overlap)
  grid = [(x, y) for y in ys for x in xs]
  start = max(0, (len(grid) - tcfg.tile_batch) // 2)
  grid = grid[start:start + tcfg.tile_batch]
  out = np.full((tcfg.tile_batch, tcfg.tile_size, tcfg.tile_size, 3), 255, np.uint8)
  for i, (x, y) in enumerate(grid):
    out[i] = read(int(x), int(y), tcfg.tile_size, tcfg.tile_size)
  return out


def best_call(fn, calls: int) -> tuple[float, float]:
  """(best seconds of ``fn()`` over ``calls`` after a warm call, CPU share)."""
  jax.block_until_ready(fn())
  best, c0, t0 = np.inf, time.process_time(), time.perf_counter()
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  share = (time.process_time() - c0) / (time.perf_counter() - t0) / os.cpu_count()
  return best, share


def summary(times, cpu, compute, compute_share, flops_roi, flops_batches, matmul, n_det):
  sec = min(times)
  return dict(
      seconds_per_roi=round(sec, 3), all_seconds=[round(t, 3) for t in times],
      compute_s_per_roi=round(compute, 3),
      gflops_per_s=round(flops_roi / sec / 1e9, 2),
      fraction_of_matmul=round(flops_roi / sec / 1e9 / matmul, 4),
      compute_gflops_per_s=round(flops_batches / compute / 1e9, 2),
      compute_fraction_of_matmul=round(flops_batches / compute / 1e9 / matmul, 4),
      cpu_share=[round(c / t / os.cpu_count(), 3) for c, t in zip(cpu, times)],
      compute_cpu_share=round(compute_share, 3), detections=n_det)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default="data/bench_midog21", help="folder with (or for) 001.tiff")
  p.add_argument("--tile_size", type=int, default=0, help="default: config.eval.tile_size")
  p.add_argument("--overlap", type=int, default=-1, help="default: config.eval.tile_overlap")
  p.add_argument("--tile_batch", type=int, default=0, help="default: config.eval.tile_batch")
  p.add_argument("--crop", default="", help="WxH: a centred crop of the ROI (quick check)")
  p.add_argument("--repeats", type=int, default=1, help="timed ROIs per implementation")
  p.add_argument("--no_regions", dest="regions", action="store_false",
                 help="skip ours in regions mode (infer.plan: a few large regions per image)")
  a = p.parse_args(argv)
  cfg = config_files.get_config("retina")
  tcfg = infer.TileConfig(
      tile_size=a.tile_size or cfg.eval.tile_size,
      overlap=a.overlap if a.overlap >= 0 else cfg.eval.tile_overlap,
      tile_batch=a.tile_batch or cfg.eval.tile_batch,
      merge_radius=cfg.eval.merge_radius_px, score_thresh=cfg.eval.score_thresh)
  path = ensure_image(Path(a.data))
  crop = tuple(int(v) for v in a.crop.lower().split("x")) if a.crop else None
  source = (lambda: Crop(path, *crop)) if crop else (lambda: path)
  try:  # pylint: disable=g-import-not-at-top
    import torch
    import torchvision
  except ImportError as e:
    torch = None
    print(json.dumps(dict(benchmark="vs_torch", torch="missing", error=str(e),
                          note="timing ours only (pip install -e '.[torch]')")), flush=True)

  mesh = parallel.local_mesh()
  cfg.data.patch_size = 128  # parameters do not depend on the input size
  method = detectors.build(cfg)
  key = jax.random.key(cfg.seed, impl="rbg")
  info = dict(torch_version="missing")
  if torch is not None:
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    model = torch_detector(torch, cfg, tcfg.tile_size, tcfg.score_thresh).to(device)
    variables = converted_variables(model, jax.eval_shape(method.init_variables, key))
    torch_fn = torch_tile_fn(torch, model, device, int(cfg.model.topk))
    info = dict(torch_version=torch.__version__, torchvision_version=torchvision.__version__,
                torch_threads=torch.get_num_threads(), torch_device=device,
                weights="torchvision's random init (seed 0), converted")
  else:
    variables = method.init_variables(key)
  variables = parallel.replicate(variables, mesh)
  matmul_before = matmul_gflops()

  tiles_np = middle_tiles(source(), tcfg)
  batch = jax.device_put(tiles_np, parallel.data_sharding(mesh))
  tile_fn = method.make_tile_fn(tcfg.score_thresh)
  run = infer.for_platform(tile_fn)
  t0 = time.perf_counter()
  flops_per_tile = _flops(run.lower(variables, batch).compile()) / tcfg.tile_batch
  jax.block_until_ready(run(variables, batch))
  compile_s = time.perf_counter() - t0

  if torch is not None:  # parity: classification logits of every anchor, one tile
    (cls, _), _ = jax.jit(lambda v, x: method._apply(v, x, train=False))(  # pylint: disable=protected-access
        variables, tiles_np[:1])
    with torch.inference_mode():
      x = torch.from_numpy(tiles_np[0]).to(device).permute(2, 0, 1).float() / 255.0
      images, _ = model.transform([x])
      assert tuple(images.tensors.shape[-2:]) == tiles_np.shape[1:3], images.tensors.shape
      theirs = model.head(list(model.backbone(images.tensors).values()))["cls_logits"]
    theirs = theirs.cpu().numpy()
    diff = float(np.max(np.abs(np.asarray(cls) - theirs)))
    scale = float(np.max(np.abs(theirs)))
    print(json.dumps(dict(benchmark="vs_torch_parity", tile_size=tcfg.tile_size,
                          anchors=int(theirs.shape[1]), max_abs_diff_cls_logits=diff,
                          max_abs_torch_cls_logits=scale, rel_diff=diff / max(scale, 1e-12))),
          flush=True)

  calls = max(2, a.repeats)
  w, h, read = infer.image_reader(source())
  xs, ys, _, _ = infer.plan(w, h, tcfg)
  n_tiles = len(xs) * len(ys)
  batches = -(-n_tiles // tcfg.tile_batch)
  impls = {"ours": (tile_fn, variables, tcfg)}
  compute = {"ours": best_call(lambda: run(variables, batch), calls)}
  work = {"ours": (flops_per_tile * n_tiles, flops_per_tile * tcfg.tile_batch * batches,
                   batches)}
  if a.regions:  # ours again, the image cut into a few large regions (infer.plan)
    rcfg = dataclasses.replace(tcfg, mode="regions",
                               multiple=interface.hook(method, "input_multiple") or 1)
    xs, ys, th, tw = infer.plan(w, h, rcfg)
    n_dev = mesh.devices.size
    rb = jax.device_put(np.stack([read(int(x), int(y), tw, th) for y in ys for x in xs][:n_dev]),
                        parallel.data_sharding(mesh))
    r_batches = -(-len(xs) * len(ys) // n_dev)
    r_flops = _flops(run.lower(variables, rb).compile()) * r_batches
    impls["ours_regions"] = (tile_fn, variables, rcfg)
    compute["ours_regions"] = best_call(lambda: run(variables, rb), calls)  # compiles it too
    work["ours_regions"] = (r_flops, r_flops, r_batches)
    region_info = dict(regions=[len(xs), len(ys)], region_size=[tw, th],
                       region_mpx_processed=round(len(xs) * len(ys) * tw * th / 1e6, 2))
  if torch is not None:
    impls["torch"] = (torch_fn, None, tcfg)  # eager: infer.for_platform leaves it as is
    compute["torch"] = best_call(lambda: torch_fn(None, tiles_np), calls)
    work["torch"] = work["ours"]
  times, cpu, n_det = {n: [] for n in impls}, {n: [] for n in impls}, {}
  load_before = os.getloadavg()[0]
  for _ in range(a.repeats):  # interleaved, so a change of load hits all alike
    for name, (fn, v, cfg_i) in impls.items():
      t0, c0 = time.perf_counter(), time.process_time()
      n_det[name] = len(infer.detect(source(), fn, v, cfg_i, mesh))
      times[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  matmul = max(matmul_before[0], matmul_gflops()[0])

  out = dict(benchmark="vs_torch", image_size=[w, h], crop=a.crop or None, tiles=n_tiles,
             tile_size=tcfg.tile_size, overlap=tcfg.overlap, tile_batch=tcfg.tile_batch,
             batches=batches, repeats=a.repeats, flops_per_tile=flops_per_tile,
             matmul_gflops_per_s=round(matmul, 2), compile_s=round(compile_s, 1))
  if a.regions:
    out.update(region_info)
  for name in impls:
    sec_batch, share = compute[name]
    flops_roi, flops_batches, n_batches = work[name]
    out[name] = summary(times[name], cpu[name], sec_batch * n_batches, share,
                        flops_roi, flops_batches, matmul, n_det[name])
  if torch is not None:  # > 1: ours is faster
    for mine in [m for m in impls if m.startswith("ours")]:
      tag = mine[len("ours"):]
      for k, field in (("", "seconds_per_roi"), ("compute_", "compute_s_per_roi")):
        out[f"{k}ratio_torch_over_ours{tag}"] = round(
            out["torch"][field] / out[mine][field], 3)
  out.update(info, platform=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
             cpu_count=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""),
             load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)])
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
