"""End to end: ``configs/retina.py:pretrained=coco`` trains from a converted
torchvision ``retinanet_resnet50_fpn_v2`` checkpoint (random weights).

The real command line (``python -m midog_jax.main``) on the synthetic tiny set,
two steps; the COCO classifier (91 classes) is re-initialised for the one
mitosis class and named in the log, everything else starts from the file.
Test-sized: 64 px patches scaled to 32 px (``model.resize_to``, recorded in
the converted file by ``convert --resize-to 32``) so the full ResNet-50
evaluates the whole images quickly on a CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from support import run_module
from weights_helpers import require_torch

from midog_jax import checkpoint as ckpt_lib

torch, torchvision = require_torch()


@pytest.mark.e2e
def test_retina_config_trains_from_a_converted_coco_checkpoint(tiny_dataset, tmp_path):
  from torchvision.models.detection import retinanet_resnet50_fpn_v2
  torch.manual_seed(0)
  src = tmp_path / "retinanet_coco.pth"
  torch.save(retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(), src)
  out = tmp_path / "r50_coco.safetensors"
  run_module("midog_jax.weights", "convert", "--arch", "retinanet_resnet50_fpn_v2",
             "--src", src, "--out", out, "--resize-to", "32")
  work = tmp_path / "work"
  # (A config without the recorded resize is refused: tests/weights/test_loading.py.)
  r = run_module("midog_jax.main", "--config=configs/retina.py:tiny,pretrained=coco",
                 f"--workdir={work}", f"--config.data.root={tiny_dataset}",
                 f"--config.init_from={out}", "--config.data.patch_size=64",
                 "--config.model.resize_to=32", "--config.total_steps=2",
                 "--config.eval_every=1000", "--config.eval.tile_size=128")
  log = r.stdout + r.stderr
  assert "converted retinanet_resnet50_fpn_v2 weights" in log
  reinit = [line for line in log.splitlines() if "re-initialised" in line]
  assert len(reinit) == 1 and "class count differs" in reinit[0]
  assert "params/cls_head/out/kernel" in reinit[0] and "params/cls_head/out/bias" in reinit[0]
  assert "box_head" not in reinit[0]
  assert (work / "eval" / "summary.json").exists()
  cfg = json.loads((work / "config.json").read_text())
  assert cfg["model"]["torchvision_anchors"] and cfg["model"]["resize_to"] == 32
  # It really started from the file: two Adam steps (lr 1e-4) move a weight
  # by at most ~2e-4; a fresh initialisation would be unrelated.
  variables, _ = ckpt_lib.load_for_inference(work, "latest")
  converted = load_file(str(out))
  for key in ("backbone/conv1/kernel", "fpn/p6/kernel", "box_head/out/kernel"):
    got = np.asarray(variables["params"]
                     [key.split("/")[0]][key.split("/")[1]][key.split("/")[2]])
    diff = np.max(np.abs(got - converted[f"params/{key}"]))
    assert diff < 1e-3, (key, diff)
