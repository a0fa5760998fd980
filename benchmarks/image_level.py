"""Image-level classifier throughput: feature extraction and round-2 fine-tuning steps.

Prints one JSON object per measurement:

* ``extract``: the round-1 extractor (``image_level.features.Extractor``,
  EfficientNet-B0 with BatchNorm statistics calibrated on the fields, the
  jitted sharded window function) on random uint8 fields, per setting
  ``field_px:window:stride``: windows/s and fields/s after the first
  (compiling) call, and the compile seconds;
* ``finetune``: the round-2 training step (``train.train_step`` with the
  image-level method's loss, Adam, every layer trainable) per setting
  ``variant:image_px:batch``: steps/s and images/s after the compiling step.

  python benchmarks/image_level.py [--extract 180:96:42,1947:224:112]
      [--finetune b0:128:8,b4:512:2] [--fields 4] [--steps 3]

Defaults: the ``quick`` config's fields and windows, the write-up's one
high-power field (1947 px, 224 px windows with 50 % overlap: 289 windows),
and the ``quick`` and full round-2 steps. Pixels are random (reading TIFFs is
``benchmarks/input_pipeline.py``'s subject).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from midog_jax import config_files, optim, train
from midog_jax.image_level import features
from midog_jax.image_level.finetune import Finetune
from midog_jax.models.efficientnet import EfficientNet


def bench_extract(field_px: int, window: int, stride: int, n_fields: int) -> dict:
  model = EfficientNet("b0", num_classes=0)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.key(0, impl="rbg"))
  rng = np.random.default_rng(0)
  fields = rng.integers(0, 256, (n_fields, field_px, field_px, 3), dtype=np.uint8)
  origins = features.window_origins(field_px, window, stride)
  calib = np.stack([fields[0, y:y + window, x:x + window] for x, y in origins[:16]])
  variables = features.calibrate_batch_stats(model.clone(stochastic_depth=0.0), variables,
                                             calib)
  ex = features.Extractor(model, variables, field_px, window, stride, batch=32)
  t0 = time.perf_counter()
  ex(fields[:1])
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = ex(fields)
  dt = time.perf_counter() - t0
  return dict(kind="extract", field_px=field_px, window=window, stride=stride,
              windows_per_field=ex.num_windows, features_per_field=int(out.shape[1]),
              fields=n_fields, windows_per_s=round(n_fields * ex.num_windows / dt, 2),
              fields_per_s=round(n_fields / dt, 3), first_call_s=round(compile_s, 1),
              devices=jax.device_count(), backend=jax.default_backend())


def bench_finetune(variant: str, image_px: int, batch: int, steps: int) -> dict:
  c = config_files.get_config("image_level", "round=2,stage=b")
  c.model.variant, c.image_level.image_px, c.batch_size = variant, image_px, batch
  c.image_level.bn_calibration = 0
  det = Finetune(c)
  v = det.init_variables(jax.random.key(0, impl="rbg"))
  tx, _ = optim.make_optimizer(c.optimizer, 100, det.trainable_mask(v["params"]))
  state = dict(step=jnp.zeros((), jnp.int32), params=v["params"],
               batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]))
  rng = np.random.default_rng(0)
  data = dict(image=rng.integers(0, 256, (batch, image_px, image_px, 3), dtype=np.uint8),
              label=(np.arange(batch) % 2).astype(np.float32),
              rng=np.arange(batch, dtype=np.int32))
  step = jax.jit(functools.partial(train.train_step, detector=det, tx=tx), donate_argnums=0)
  t0 = time.perf_counter()
  state, m = step(state, data)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, data)
  jax.block_until_ready(m["loss"])
  dt = time.perf_counter() - t0
  return dict(kind="finetune", variant=variant, image_px=image_px, batch=batch, steps=steps,
              steps_per_s=round(steps / dt, 3), images_per_s=round(steps * batch / dt, 2),
              first_step_s=round(compile_s, 1), backend=jax.default_backend())


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--extract", default="180:96:42,1947:224:112")
  p.add_argument("--finetune", default="b0:128:8,b4:512:2")
  p.add_argument("--fields", type=int, default=4, help="fields per extraction setting")
  p.add_argument("--steps", type=int, default=3, help="timed steps per fine-tuning setting")
  args = p.parse_args()
  print(json.dumps(dict(kind="machine", cpus=os.cpu_count(), jax=jax.__version__)), flush=True)
  for spec in filter(None, args.extract.split(",")):
    f, w, s = map(int, spec.split(":"))
    n = args.fields if f <= 512 else max(1, args.fields // 4)
    print(json.dumps(bench_extract(f, w, s, n)), flush=True)
  for spec in filter(None, args.finetune.split(",")):
    v, px, b = spec.split(":")
    print(json.dumps(bench_finetune(v, int(px), int(b), args.steps)), flush=True)


if __name__ == "__main__":
  main()
