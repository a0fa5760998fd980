"""``benchmarks/vs_torch.py``'s torchvision detector computes what ours does.

``configs/retina.py``'s default RetinaNet (one class, 3 anchors per location,
no resize) is not the layout of a torchvision builder (test_parity_retinanet
covers COCO's: 91 classes, 9 anchors, resized input): the benchmark builds
it from ``retinanet_resnet50_fpn_v2`` with the config's ``AnchorGenerator``
and head and converts its state dict with ``midog_jax.weights``. With random
weights and BatchNorm/GroupNorm statistics, both give the same classification
and box outputs on 128 px uint8 tiles through both input pipelines (ImageNet
normalisation; torchvision's transform fixed to the tile size, so no resize),
and the benchmark's eager tile function returns ``infer``'s fixed shapes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
from weights_helpers import randomize_norms, record, rel_err, require_torch

from midog_jax import config_files, detectors

torch, torchvision = require_torch()
TOL = 1e-4
SIZE = 128
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_torch.py"


def _vs_torch():
  spec = importlib.util.spec_from_file_location("vs_torch", BENCH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_benchmark_torchvision_detector_matches_ours_with_converted_weights():
  vs = _vs_torch()
  cfg = config_files.get_config("retina")
  cfg.data.patch_size = SIZE
  det = detectors.build(cfg)
  tv = vs.torch_detector(torch, cfg, SIZE, cfg.eval.score_thresh)
  randomize_norms(torch, tv, seed=3)
  with torch.no_grad():  # head biases are the prior / 0: make them count
    for p in (tv.head.classification_head.cls_logits.bias,
              tv.head.regression_head.bbox_reg.bias):
      p.copy_(0.1 * torch.randn(p.shape[0]))
  variables = vs.converted_variables(tv, jax.eval_shape(det.init_variables, jax.random.key(0)))

  images = np.random.default_rng(4).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  with torch.inference_mode():
    x = [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images]
    image_list, _ = tv.transform(x)
    assert tuple(image_list.tensors.shape) == (2, 3, SIZE, SIZE)
    head = tv.head(list(tv.backbone(image_list.tensors).values()))
  (cls, box), _ = jax.jit(lambda v, t: det._apply(v, t, train=False))(variables, images)
  # 3 anchors per location on P3-P7 of a 128 px tile: (256 + 64 + 16 + 4 + 1) * 3.
  assert cls.shape == (2, 1023, 1) and box.shape == (2, 1023, 4)
  for name, ours, theirs in (("cls", cls, head["cls_logits"]),
                             ("box", box, head["bbox_regression"])):
    err = rel_err(ours, theirs.numpy())
    record(f"vs_torch default retinanet {name}", err)
    assert err <= TOL, (name, err)

  pts, scores, classes, valid = vs.torch_tile_fn(torch, tv, "cpu", 300)(None, images)
  assert pts.shape == (2, 300, 2) and scores.shape == classes.shape == valid.shape == (2, 300)
  assert np.all(scores[valid] >= cfg.eval.score_thresh) and np.all(scores[~valid] == 0)
