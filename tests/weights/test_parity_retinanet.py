"""A converted torchvision ``retinanet_resnet50_fpn_v2`` computes what it does.

The real torchvision model (random weights, random BatchNorm/GroupNorm
statistics) against the project's RetinaNet detector built from
``configs/retina.py:pretrained=coco``, on the same uint8 images through both
input pipelines (torchvision's transform: ImageNet normalisation and bilinear
resize; ours: ``model.input_mean/std`` and ``model.resize_to``): the
classification and box-regression outputs of every pyramid level, the
anchors, and the decoded boxes in input pixels. 64 px inputs resized to 96
(a multiple of 32, so torchvision pads nothing), where torchvision's integer
strides (P6: 96 // 2 = 48 px, not 64) and rounded anchors differ from the
plain ``2**l`` grid.
"""

from __future__ import annotations

import jax
import numpy as np
from weights_helpers import convert, load, randomize_norms, record, rel_err, require_torch

from midog_jax import config_files, detectors
from midog_jax import pretrained as pretrained_lib
from midog_jax.detectors.retinanet import anchors as anchors_lib

torch, torchvision = require_torch()
TOL = 1e-4
SIZE, NET = 64, 96


def test_retinanet_outputs_anchors_and_boxes_match_torchvision(tmp_path):
  from torchvision.models.detection import retinanet_resnet50_fpn_v2
  torch.manual_seed(0)
  tv = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None,
                                 min_size=NET, max_size=1333).eval()
  randomize_norms(torch, tv, seed=7)
  with torch.no_grad():  # head biases are 0 / the prior: make them count
    for p in (tv.head.classification_head.cls_logits.bias,
              tv.head.regression_head.bbox_reg.bias):
      p.copy_(0.1 * torch.randn(p.shape[0]))
  path = convert(torch, tv, "retinanet_resnet50_fpn_v2", tmp_path, resize_to=NET)

  cfg = config_files.get_config("retina", "tiny,pretrained=coco")
  cfg.data.patch_size, cfg.model.resize_to = SIZE, NET
  header = pretrained_lib.pretrained_header(path)
  assert pretrained_lib.fidelity_mismatches(header, cfg) == []
  det = detectors.build(cfg)
  det.model = det.model.clone(num_classes=91)  # COCO's head, to compare it
  variables, m = load(path, det.model, (1, SIZE, SIZE, 3))
  assert m.ok and not m.reinit and not m.dropped, m.problem()

  rng = np.random.default_rng(8)
  images = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  with torch.no_grad():
    batch = [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images]
    image_list, _ = tv.transform(batch)
    assert tuple(image_list.tensors.shape) == (2, 3, NET, NET)
    feats = list(tv.backbone(image_list.tensors).values())
    head = tv.head(feats)
    tv_anchors = tv.anchor_generator(image_list, feats)[0].numpy()
    tv_boxes = tv.box_coder.decode_single(head["bbox_regression"][0],
                                          torch.from_numpy(tv_anchors)).numpy()
  (cls, box), _ = jax.jit(lambda v, x: det._apply(v, x, train=False))(variables, images)
  cls, box = np.asarray(cls), np.asarray(box)

  levels = tuple(cfg.model.levels)
  counts = [h * w * 9 for h, w in anchors_lib.level_shapes((NET, NET), levels)]
  assert cls.shape == (2, sum(counts), 91) and box.shape == (2, sum(counts), 4)
  start = 0
  for level, n in zip(levels, counts):
    sl = slice(start, start + n)
    for name, ours, theirs in (("cls", cls, head["cls_logits"]),
                               ("box", box, head["bbox_regression"])):
      err = rel_err(ours[:, sl], theirs[:, sl].numpy())
      record(f"retinanet P{level} {name}", err)
      assert err <= TOL, (level, name, err)
    start += n

  # Anchors: exactly torchvision's in network pixels, scaled back to input
  # pixels by the detector; the plain grid would differ from P6 on.
  exact = anchors_lib.generate_anchors((NET, NET), levels, None, (0.5, 1.0, 2.0),
                                       torchvision_exact=True)
  assert np.array_equal(exact, tv_anchors)
  plain = anchors_lib.generate_anchors((NET, NET), levels, None, (0.5, 1.0, 2.0))
  assert not np.allclose(plain, tv_anchors)
  ours_anchors = np.asarray(det.anchors(SIZE))
  err = rel_err(ours_anchors, tv_anchors * SIZE / NET)
  record("retinanet anchors (input px)", err)
  assert err <= 1e-6
  # Decoded boxes in input pixels (torchvision: decode, then scale back).
  ours_boxes = np.asarray(anchors_lib.decode(ours_anchors, box[0]))
  err = rel_err(ours_boxes, tv_boxes * SIZE / NET)
  record("retinanet decoded boxes (input px)", err)
  assert err <= TOL
