"""Single convolutions of the ResNet-50 RetinaNet, forward and backward: ours (XLA) and torch's.

Where the training step's time goes, layer by layer (issue 13 item 8):
``benchmarks/train_step.py --profile`` splits one compiled step by kind of
operation; this script times the convolution shapes that dominate it, in
isolation, for both frameworks in the same run::

  python benchmarks/conv_layers.py [--batch 2] [--size 512] [--repeats 5] [--xla_defaults]

For each shape (the ResNet-50 bottleneck convolutions at a ``--size`` px
input, batch ``--batch``, NHWC float32) it prints one JSON line with the best
time of the forward pass, of the input gradient alone and of the weight
gradient alone, for ours (``jax.lax.conv_general_dilated`` jitted with the
training step's options, ``parallel.compiler_options()``, unless
``--xla_defaults``) and for torch (``torch.nn.functional.conv2d`` and
``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` on channels-last tensors,
eager), the GFLOP/s of each (2 x multiply-adds; each pass has the forward's
count) and ``ratio_torch_over_ours`` per pass (> 1: ours is faster). Without
torch only ours is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from midog_jax import parallel

# (name, input side as a fraction of --size, in channels, out channels, kernel, stride)
SHAPES = (
    ("layer1.conv2 3x3", 1 / 4, 64, 64, 3, 1),
    ("layer1.conv3 1x1", 1 / 4, 64, 256, 1, 1),
    ("layer2.conv2 3x3", 1 / 8, 128, 128, 3, 1),
    ("layer3.conv2 3x3", 1 / 16, 256, 256, 3, 1),
    ("layer3.conv1 1x1", 1 / 16, 1024, 256, 1, 1),
    ("layer4.conv2 3x3", 1 / 32, 512, 512, 3, 1),
    ("layer2.conv2 3x3 /2", 1 / 4, 128, 128, 3, 2),
)


def _best(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  best = np.inf
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def ours(x, w, stride: int, repeats: int, options) -> dict:
  pad = w.shape[0] // 2

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  y = jax.jit(conv)(x, w)
  g = jnp.ones_like(y)
  fwd = jax.jit(conv, compiler_options=options)
  dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
               compiler_options=options)
  dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
               compiler_options=options)
  return dict(forward=_best(lambda: fwd(x, w), repeats),
              input_grad=_best(lambda: dx(x, w, g), repeats),
              weight_grad=_best(lambda: dw(x, w, g), repeats))


def theirs(torch, x, w, stride: int, repeats: int) -> dict:
  pad = w.shape[0] // 2
  xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  wt = torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous(
      memory_format=torch.channels_last)
  f = torch.nn.functional
  with torch.no_grad():
    y = f.conv2d(xt, wt, stride=stride, padding=pad)
    g = torch.ones_like(y)
    return dict(
        forward=_best(lambda: f.conv2d(xt, wt, stride=stride, padding=pad), repeats),
        input_grad=_best(lambda: torch.nn.grad.conv2d_input(
            xt.shape, wt, g, stride=stride, padding=pad), repeats),
        weight_grad=_best(lambda: torch.nn.grad.conv2d_weight(
            xt, wt.shape, g, stride=stride, padding=pad), repeats))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--xla_defaults", action="store_true",
                 help="XLA's default options (YNNPACK convolutions on CPU)")
  a = p.parse_args()
  try:  # pylint: disable=g-import-not-at-top
    import torch
    torch.set_num_threads(os.cpu_count())
  except ImportError:
    torch = None
  options = None if a.xla_defaults else parallel.compiler_options()
  rng = np.random.default_rng(0)
  for name, frac, cin, cout, k, stride in SHAPES:
    side = int(a.size * frac)
    x = jnp.asarray(rng.standard_normal((a.batch, side, side, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.05, jnp.float32)
    out_side = -(-side // stride)
    flops = 2.0 * a.batch * out_side * out_side * cout * cin * k * k
    row = dict(benchmark="conv_layer", layer=name, input=[a.batch, side, side, cin],
               kernel=[k, k, cin, cout], stride=stride, gflop=round(flops / 1e9, 3),
               xla_options="defaults" if a.xla_defaults else "project")
    impls = {"ours": ours(x, w, stride, a.repeats, options)}
    if torch is not None:
      impls["torch"] = theirs(torch, x, w, stride, a.repeats)
    for impl, t in impls.items():
      row[impl] = {k: dict(s=round(v, 5), gflops_per_s=round(flops / v / 1e9, 1))
                   for k, v in t.items()}
    if torch is not None:
      row["ratio_torch_over_ours"] = {k: round(impls["torch"][k] / impls["ours"][k], 3)
                                      for k in impls["ours"]}
    row["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
