"""Training-step speed: our compiled step, and torchvision's detector in the same run.

Compute only: one fixed batch (uint8 patches with a few labelled points, as
the pipeline delivers them) is fed to the jitted train step of
``midog_jax.train`` (the detector's loss, gradients, the optimiser update)
again and again; data loading is excluded (``benchmarks/input_pipeline.py``
measures it). Prints one JSON object per measurement::

  python benchmarks/train_step.py [--method retina|p4] [--config ARG] [--batch N]
      [--size PX] [--steps 3] [--dtype float32|bfloat16] [--torch] [--peak_tflops T]

``--method retina`` is the seed-000 RetinaNet (ResNet-50 FPN, Adam; default
batch 2 of 512 px here, 30 in the paper), ``p4`` the P4 ResNet (SGD; its own
patch size). ``--dtype bfloat16`` sets ``config.model.compute_dtype`` (mixed
precision, ``detectors/interface.compute_dtype``: bfloat16 convolutions and
activations, float32 parameters, optimizer state, BatchNorm statistics and
loss); the printed ``dtype`` is the one the detector's model was built with.
FLOP/s use XLA's cost analysis of the compiled step, so they count what really
runs. With ``--torch`` (RetinaNet only; torch and torchvision
installed, the ``torch`` extra) torchvision's own ``retinanet_resnet50_fpn_v2``
(weights=None, all five backbone layers trainable, its transform fixed to
``--size`` so both see the same pixels, Adam) is timed on the same batch in
eager mode, and ``ratio_torch_over_ours`` > 1 means ours is faster.
``cpu_share`` (CPU time over wall time x cores) well below 1 means other
processes had the CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import numpy as np
import psutil

import xla_profile
from midog_jax import config_files, detectors, optim, parallel, train


def _batch(batch: int, size: int, rng: np.random.Generator) -> dict:
  """A pipeline-shaped batch: uint8 images, 32 padded points, 4 real per patch."""
  pts = np.zeros((batch, 32, 2), np.float32)
  pts[:, :4] = rng.uniform(0.25 * size, 0.75 * size, (batch, 4, 2))
  cls = np.zeros((batch, 32), np.int32)
  cls[:, :4] = [1, 1, 2, 2]
  mask = np.zeros((batch, 32), bool)
  mask[:, :4] = True
  return dict(image=rng.integers(0, 256, (batch, size, size, 3), np.uint8),
              points=pts, classes=cls, mask=mask,
              domain=np.zeros(batch, np.int32), image_id=np.zeros(batch, np.int32),
              x0=np.zeros(batch, np.int32), y0=np.zeros(batch, np.int32),
              positive=np.ones(batch, np.int32))


def _timed(fn, steps: int) -> tuple[float, float]:
  """(best seconds per call, CPU share) over ``steps`` calls after one warm call."""
  fn()
  proc = psutil.Process()
  best, cpu0, wall0 = np.inf, proc.cpu_times(), time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  cpu1, wall = proc.cpu_times(), time.perf_counter() - wall0
  share = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall / (os.cpu_count() or 1)
  return best, share


def ours(a) -> dict:
  name = "retina" if a.method == "retina" else "p4_resnet"
  config = config_files.get_config(name, a.config or None)
  config.model.compute_dtype = a.dtype  # the one mixed-precision switch
  if a.method == "retina":
    config.data.patch_size = a.size
  det = detectors.build(config)
  size = det.patch_size
  variables = det.init_variables(jax.random.key(0))
  params = variables["params"]
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps,
                               det.trainable_mask(params))
  state = dict(step=jax.numpy.int32(0), params=params,
               batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
  batch = jax.device_put(_batch(a.batch, size, np.random.default_rng(0)))
  step = jax.jit(functools.partial(train.train_step, detector=det, tx=tx),
                 compiler_options=None if a.xla_defaults else parallel.compiler_options())
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  holder = [state]

  def run():
    holder[0], m = compiled(holder[0], batch)
    jax.block_until_ready(m)

  secs, share = _timed(run, a.steps)
  if a.profile:
    print(json.dumps(dict(benchmark="train_step_profile", method=a.method, batch=a.batch,
                          patch_size=size, xla_defaults=a.xla_defaults,
                          thread_s=xla_profile.profile(compiled, run))), flush=True)
  return dict(benchmark="train_step", impl="midog_jax", method=a.method, config=a.config,
              xla_options="defaults" if a.xla_defaults else "project",
              dtype=str(np.dtype(det.model.dtype)), batch=a.batch, patch_size=size,
              seconds_per_step=round(secs, 4),
              images_per_s=round(a.batch / secs, 3), gflops_per_step=round(flops / 1e9, 2),
              achieved_gflops_per_s=round(flops / secs / 1e9, 2), cpu_share=round(share, 3),
              platform=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
              load_avg_1m=round(os.getloadavg()[0], 2))


def torch_step(a) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torchvision.models.detection.retinanet_resnet50_fpn_v2(
      weights=None, weights_backbone=None, num_classes=2, trainable_backbone_layers=5,
      min_size=a.size, max_size=a.size)
  model.train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  b = _batch(a.batch, a.size, np.random.default_rng(0))
  images = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in b["image"]]
  targets = []
  for p, c, m in zip(b["points"], b["classes"], b["mask"]):
    keep = m & (c == 1)  # imposters are background, as in our default config
    xy = torch.from_numpy(p[keep])
    boxes = torch.cat([xy - 25, xy + 25], dim=1)
    targets.append(dict(boxes=boxes, labels=torch.ones(len(xy), dtype=torch.int64)))

  def run():
    opt.zero_grad()
    loss = sum(model(images, targets).values())
    loss.backward()
    opt.step()

  secs, share = _timed(run, a.steps)
  return dict(benchmark="train_step", impl="torchvision_eager", method="retina",
              batch=a.batch, patch_size=a.size, seconds_per_step=round(secs, 4),
              images_per_s=round(a.batch / secs, 3), torch=torch.__version__,
              torch_threads=torch.get_num_threads(), cpu_share=round(share, 3),
              load_avg_1m=round(os.getloadavg()[0], 2))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--method", choices=("retina", "p4"), default="retina")
  p.add_argument("--config", default="", help="config argument, e.g. quick")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=512, help="RetinaNet patch size")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--torch", action="store_true", help="also time torchvision's detector")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="the device's peak for --dtype (e.g. 989 for an H100/H200 in bf16): "
                 "adds flop_utilisation")
  p.add_argument("--profile", action="store_true",
                 help="also print where one step's time goes (benchmarks/xla_profile.py)")
  p.add_argument("--xla_defaults", action="store_true",
                 help="compile with XLA's default options instead of the training loop's "
                 "(parallel.compiler_options(): on CPU, XLA's own convolutions)")
  a = p.parse_args()
  if a.torch and (a.method != "retina" or a.config):
    raise SystemExit("--torch compares the full ResNet-50 RetinaNet: --method retina, no --config")
  mine = ours(a)
  if a.peak_tflops > 0:
    mine["flop_utilisation"] = round(mine["achieved_gflops_per_s"] / (a.peak_tflops * 1e3), 4)
  print(json.dumps(mine), flush=True)
  if a.torch:
    theirs = torch_step(a)
    print(json.dumps(theirs), flush=True)
    print(json.dumps(dict(benchmark="train_step_ratio", batch=a.batch, patch_size=a.size,
                          ratio_torch_over_ours=round(theirs["seconds_per_step"]
                                                      / mine["seconds_per_step"], 3))))


if __name__ == "__main__":
  main()
